"""Models: the tokenizer and model a run trains, wrapped for full, LoRA or QLoRA fine-tuning.

A run either builds a new model from ``model_config`` (any AutoConfig JSON: llama, qwen2,
mistral, ...) or loads the local model dir ``model_name_or_path``. ``finetuning_type`` then
decides what trains: every weight (``full``), LoRA adapters on a frozen base (``lora``), or
LoRA adapters on a base quantized to 4 or 8 bits with bitsandbytes (``qlora``).

``load_for_inference("PATH+ADAPTER")`` is the other way in: a saved model, optionally with a
PEFT adapter on top, ready for generation (serve, eval, chat, merge).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from infuse.config import TrainConfig
from infuse.errors import InfuseError

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
GENERATION_CONFIG = "generation_config.json"
# Config fields that different architectures use for the longest sequence they were built for.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(config: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer at ``tokenizer_name_or_path`` (default: ``model_name_or_path``), with a pad token."""
    path = config.tokenizer_name_or_path or config.model_name_or_path
    if not path:
        raise InfuseError(
            f"model_config: a model built from {config.model_config} has no tokenizer of its own. Set "
            "tokenizer_name_or_path to a tokenizer dir, or train one with `infuse tokenizer train "
            "--corpus FILE --vocab-size N --output DIR`."
        )
    tokenizer = _tokenizer_from(path, config.trust_remote_code)
    if config.pad_token:
        set_pad_token(tokenizer, config.pad_token)
    tokenizer.padding_side = config.padding_side
    return ensure_pad_token(tokenizer)


def _tokenizer_from(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InfuseError(f"Tokenizer path {folder} does not exist. {_hub_hint(str(path))}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InfuseError(
            f"{folder} holds no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}, found "
            f"{_listing(folder)}. Point tokenizer_name_or_path at a saved transformers tokenizer."
        )
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def set_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token: str) -> None:
    """Pad with ``pad_token``: ``eos`` or ``unk`` (the tokenizer's own), or a token of the vocabulary.

    A new token is refused rather than added: it would need a new embedding row that nothing trains.
    """
    if pad_token in ("eos", "unk"):
        token = getattr(tokenizer, f"{pad_token}_token")
        if token is None:
            raise InfuseError(f"pad_token: {pad_token}, but the tokenizer has no {pad_token} token. Name a "
                              "token of its vocabulary instead (e.g. '<pad>'), or leave pad_token unset.")
        pad_token = token
    if pad_token not in tokenizer.get_vocab():
        raise InfuseError(f"pad_token: '{pad_token}' is not a token of the tokenizer's vocabulary. Use eos, "
                          "unk or one of its tokens, or leave pad_token unset.")
    tokenizer.pad_token = pad_token


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one: its unk token if it has one, else eos.

    unk comes first because common collators (transformers' DataCollatorForLanguageModeling) mask
    the pad token by id: with pad = eos a model trained through them never learns to stop.
    infuse's own collators mask padding by position, so ``pad_token: eos`` is safe with them.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    spare = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
    tokenizer.pad_token = spare or tokenizer.eos_token
    logger.warning("The tokenizer has no pad token; padding with %s %r (id %d).",
                   "its unk token" if spare else "its eos token", tokenizer.pad_token, tokenizer.pad_token_id)
    return tokenizer


# ---------------------------------------------------------------- training models


def load_model(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel | PeftModel:
    """The model ``config`` trains: built or loaded, quantized for qlora, wrapped with LoRA for
    lora/qlora, with activation checkpointing when the training keys ask for it."""
    check_dora_on_4bit(config)
    if config.model_config:
        model = _build_for_training(config, tokenizer)
    else:
        folder, _ = check_model_source(config)
        model = _load_for_training(folder, config)
        if tokenizer is not None and grows_with_tokenizer(config) \
                and len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))  # new rows drawn around the old ones' mean
    if config.finetuning_type == "qlora":
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched on below with the transformers 5 call, not peft's older one.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if _wants_checkpointing(config):
        model.config.use_cache = False  # the cache is useless in training and clashes with recomputation
        model.activation_checkpointing_enable()
    if config.finetuning_type in ("lora", "qlora"):
        model = _wrap_lora(model, config)
    return model


def dora_reads_4bit_weights(device: str | torch.device) -> bool:
    """Whether peft's DoRA computes right over a bitsandbytes 4-bit base on ``device``: on a CUDA
    GPU. On a CPU, bitsandbytes repacks a 4-bit weight for its own kernel at the first forward pass,
    and DoRA reads the weight's norm by dequantizing it as if it were not repacked: a tiny Llama's
    dequantized q_proj then differed by 0.40 at weights of at most 0.28, and an adapter trained
    there learnt against wrong norms and did not merge."""
    return torch.device(device).type == "cuda"


def check_dora_on_4bit(config: TrainConfig) -> None:
    """DoRA over a 4-bit base (qlora) is trained only where it computes right."""
    training_device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.use_dora and config.finetuning_type == "qlora" and not dora_reads_4bit_weights(training_device):
        raise InfuseError("use_dora with finetuning_type: qlora needs a CUDA GPU: on a CPU, bitsandbytes repacks "
                          "4-bit weights after the first forward pass and peft's DoRA then reads wrong weight "
                          "norms. Use finetuning_type: lora with use_dora, or qlora without it.")


def _build_for_training(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A new model from ``model_config``. For qlora it is saved to a temporary dir and loaded back
    quantized, because bitsandbytes quantizes weights only on the from_pretrained path."""
    model = build_model(config, tokenizer)
    if config.finetuning_type != "qlora":
        return model
    with tempfile.TemporaryDirectory(prefix="infuse-base-") as tmp:
        model.save_pretrained(tmp)
        quantized = _load_for_training(Path(tmp), config)
    quantized.name_or_path = str(config.model_config)
    return quantized


def build_model(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised model from ``config.model_config``, seeded by the training seed, with
    its vocabulary and special token ids taken from ``tokenizer``. Weights are float32 (see
    ``training_dtype``)."""
    _, model_config = check_model_source(config)
    fit_to_tokenizer(model_config, tokenizer)
    if config.attn_implementation:
        model_config._attn_implementation = config.attn_implementation
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32,
                                            trust_remote_code=config.trust_remote_code)


def fit_to_tokenizer(model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the vocabulary to the tokenizer's (never shrink it: padded vocabularies are common) and
    take bos/eos/pad ids from the tokenizer, so generation stops where the data put eos."""
    if getattr(model_config, "vocab_size", None) is not None and model_config.vocab_size < len(tokenizer):
        logger.info("vocab_size %d in the model config is smaller than the tokenizer's %d; using %d.",
                    model_config.vocab_size, len(tokenizer), len(tokenizer))
        model_config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(model_config, name, value)


def _load_for_training(folder: Path, config: TrainConfig) -> PreTrainedModel:
    quantization = quantization_config(config) if config.finetuning_type == "qlora" else None
    kwargs: dict[str, Any] = {"dtype": training_dtype(config), "trust_remote_code": config.trust_remote_code,
                              "use_safetensors": _has_safetensors(folder)}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if quantization is not None:
        # Quantized weights are made on the device they will train on; the Trainer cannot move them later.
        kwargs.update(quantization_config=quantization, device_map={"": _training_device()})
    # Absolute, as the model's name_or_path is what an adapter records as its base: a relative one
    # would only load from the directory the run was started in.
    return AutoModelForCausalLM.from_pretrained(folder.resolve(), **kwargs)


def training_dtype(config: TrainConfig) -> torch.dtype:
    """Full fine-tuning keeps float32 weights: the Trainer's bf16/fp16 switches run the maths in half
    precision, while the optimizer needs full-precision weights (fp16 weights cannot be trained at
    all by its gradient scaler). Frozen bases (lora, qlora) are stored in the compute dtype."""
    return torch.float32 if config.finetuning_type == "full" else compute_dtype(config.training)


def compute_dtype(training: dict[str, Any]) -> torch.dtype:
    """bfloat16 when ``bf16`` is on, float16 when ``fp16`` is, else float32."""
    if training.get("bf16"):
        return torch.bfloat16
    if training.get("fp16"):
        return torch.float16
    return torch.float32


def quantization_config(config: TrainConfig) -> BitsAndBytesConfig:
    """bitsandbytes settings for qlora: 4-bit (nf4/fp4, double quant switch) or 8-bit."""
    if config.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization_type,
        bnb_4bit_use_double_quant=config.double_quantization,
        bnb_4bit_compute_dtype=compute_dtype(config.training),
    )


def _training_device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device  # this process's accelerator (its local rank's GPU) or the CPU


def _wants_checkpointing(config: TrainConfig) -> bool:
    # config_from_dict maps the transformers 4 name gradient_checkpointing onto activation_checkpointing.
    return bool(config.training.get("activation_checkpointing"))


def _wrap_lora(model: PreTrainedModel, config: TrainConfig) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_targets(config.lora_target),
        modules_to_save=config.modules_to_save,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.seed)  # lora_A starts random: the same seed, the same run
    try:
        with peft_quietly():
            return get_peft_model(model, lora)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise InfuseError(
            f"lora_target: {config.lora_target} names no module of this {model.config.model_type} model. "
            f"Its linear layers are: {', '.join(linear_module_names(model))}; or use lora_target: all-linear."
        ) from None


def lora_targets(value: str | list[str]) -> str | list[str]:
    """peft's ``target_modules`` for ``lora_target``. LLaMA-Factory's spellings mean the same here:
    ``all`` is ``all-linear``, and ``q_proj,v_proj`` a list (peft would take a string as a regex)."""
    if value == "all":
        return "all-linear"
    if isinstance(value, str) and "," in value:
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft 0.21 still asks transformers 5 for the renamed ``is_gradient_checkpointing``; the
    deprecation warning that causes is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can adapt (q_proj, up_proj, ...), lm_head excluded."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name}
    return sorted(names - {"lm_head"})


# ---------------------------------------------------------------- checks


def check_model_dir(path: str | Path) -> Path:
    """The model dir ``path`` if it holds a config.json and weights; else an error that lists what
    it found and what was expected."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InfuseError(
            f"Model path {folder} does not exist. Point model_name_or_path (or --model/--base) at a saved "
            f"model dir, or build a new model with model_config. {_hub_hint(str(path))}"
        )
    has_config = (folder / "config.json").is_file()
    if has_config and _has_weights(folder):
        return folder
    found = _listing(folder)
    if (folder / "adapter_config.json").is_file():
        hint = "It holds a PEFT adapter, not a model: load it as BASE+ADAPTER, BASE the model it adapts."
    else:
        hint = "Save the model there with model.save_pretrained(DIR), or point at the dir that holds it."
    raise InfuseError(
        f"{folder} is not a complete model dir: expected config.json and weights (model.safetensors, or "
        f"model-*.safetensors shards with model.safetensors.index.json, or pytorch_model.bin), found "
        f"{found}. {hint}"
    )


def check_model_source(config: TrainConfig) -> tuple[Path, PretrainedConfig]:
    """The model's source (model_config file or model dir) and its config, checked: an error when the
    model does not exist or its context is shorter than the blocks or samples the config asks for.
    Training calls it before any data is tokenized."""
    if config.model_config:
        source = Path(config.model_config).expanduser()
        if not source.exists():
            raise InfuseError(f"model_config: {source} does not exist. Give the path of a config JSON "
                              "(any AutoConfig, e.g. configs/tiny-llama.json) or of a dir holding config.json.")
    else:
        source = check_model_dir(config.model_name_or_path)
    model_config = auto_config(source, config.trust_remote_code)
    check_context(model_config, _sequence_length(config), _length_key(config), source)
    return source, model_config


def grows_with_tokenizer(config: TrainConfig) -> bool:
    """Whether the trained model takes the tokenizer's vocabulary, tokens added to it included: a model
    built from model_config, or one trained with full weights (its new embedding rows are trained).
    An adapter cannot give the base new rows."""
    return bool(config.model_config) or config.finetuning_type == "full"


def check_vocabulary(config: TrainConfig, model_config: PretrainedConfig, largest_id: int) -> None:
    """Every token id of the data needs a row in the model's embeddings: a tokenizer with tokens the
    model has none for fails inside the first forward pass. A model that takes the tokenizer's
    vocabulary (``grows_with_tokenizer``) has one for every id."""
    vocab = getattr(model_config, "vocab_size", None)
    if not grows_with_tokenizer(config) and vocab is not None and largest_id >= vocab:
        source = config.model_config or config.model_name_or_path
        raise InfuseError(f"the data holds token id {largest_id}, but the model's vocabulary has {vocab} entries "
                          f"(vocab_size of {source}): the tokenizer has tokens the model has no embedding for, "
                          "and an adapter cannot add them. Use the tokenizer the model was trained with, or "
                          "finetuning_type: full, which grows the embeddings and trains the new rows.")


def check_context(model_config: PretrainedConfig, length: int, key: str = "block_size",
                  source: str | Path = "the model config") -> None:
    """Raise if ``length`` tokens do not fit the positions the model was built for."""
    field, limit = context_limit(model_config)
    if limit is None or length <= limit:
        return
    raise InfuseError(
        f"{key} {length} is longer than the model's context: {field} is {limit} in {source}. Set {key} "
        f"to {limit} or less; a pretrained model has never seen positions beyond it (a new model "
        f"built from model_config can instead raise {field} in its config JSON)."
    )


def context_limit(model_config: PretrainedConfig) -> tuple[str, int | None]:
    """(the config field that holds the longest sequence the model was built for, its value)."""
    text_config = getattr(model_config, "text_config", None) or model_config
    for field in CONTEXT_FIELDS:
        value = getattr(text_config, field, None)
        if isinstance(value, int):
            return field, value
    return "", None


def _sequence_length(config: TrainConfig) -> int:
    return config.block_size if config.stage == "pt" else config.cutoff_len


def _length_key(config: TrainConfig) -> str:
    return "block_size" if config.stage == "pt" else "cutoff_len"


def auto_config(source: Path, trust_remote_code: bool) -> PretrainedConfig:
    """The AutoConfig at ``source`` (a config JSON or a model dir), without loading any weights."""
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise InfuseError(
            f"{source}: not a usable model config ({e}). A config JSON names its model_type "
            "(llama, qwen2, mistral, ...) and sizes, as configs/tiny-llama.json does."
        ) from None


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES) or _has_safetensors(folder)


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (the dir is empty)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _hub_hint(path: str) -> str:
    """Models are read from local dirs; a Hub id gets the command that downloads it."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        local = f"models/{path.split('/')[1]}"
        return (f"If {path} is a Hugging Face Hub id, download it first (`hf download {path} --local-dir "
                f"{local}`) and use {local}.")
    return ""


# ---------------------------------------------------------------- parameters


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the elements they stand for."""
    trainable = total = 0
    for param in model.parameters():
        count = _elements(param)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _elements(param: torch.nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit values per byte; the quant state remembers the original shape.
    quant_state = getattr(param, "quant_state", None)
    if param.__class__.__name__ == "Params4bit" and quant_state is not None:
        return quant_state.shape.numel()
    return param.numel()


def describe_model(model: torch.nn.Module, console: Console) -> None:
    """Print trainable and total parameters and the trainable share."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    console.print(f"Parameters: [bold]{trainable:,}[/bold] trainable of {total:,} ({share:.4g}%).")


# ---------------------------------------------------------------- inference


def load_for_inference(spec: str, dtype: torch.dtype | str | None = None, device: str | None = None,
                       quantization: BitsAndBytesConfig | None = None,
                       ) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """``"PATH"`` or ``"PATH+ADAPTER"`` → (model in eval mode, tokenizer).

    PATH may also be an adapter dir on its own; its base is then the ``base_model_name_or_path``
    its adapter_config.json records. ``dtype`` defaults to the dtype the model was saved in,
    ``device`` to the GPU when there is one. The tokenizer comes from ADAPTER when it holds one
    (a run saves its tokenizer next to the adapter), else from PATH.
    """
    from peft import PeftModel

    base, adapter = split_spec(spec)
    folder = check_model_dir(base)
    if adapter:
        check_adapter_dir(adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": dtype or "auto", "device_map": device,
                              "use_safetensors": _has_safetensors(folder)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if adapter and (Path(adapter).expanduser() / GENERATION_CONFIG).is_file():
        # An SFT run writes one next to its adapter, with the template's end of turn among its eos ids.
        model.generation_config = GenerationConfig.from_pretrained(Path(adapter).expanduser())
    if adapter:
        with peft_quietly():
            model = PeftModel.from_pretrained(model, Path(adapter).expanduser())
    model.eval()
    return model, inference_tokenizer(folder, adapter)


def adapter_differences(base: str | Path, adapter: str | Path | None) -> list[str]:
    """What differs between ``adapter`` on ``base`` and the adapter as trained: another base than
    the one it records, or the unquantized base under a QLoRA adapter."""
    if not adapter:
        return []
    from infuse.resume import run_settings

    adapter = Path(adapter).expanduser()
    notes = []
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and Path(recorded).expanduser().is_dir() and Path(recorded).resolve() != Path(base).resolve():
        notes.append(f"the adapter was trained on {recorded}, and is used here on {base}.")
    settings, _ = run_settings(adapter)
    if settings and settings.get("finetuning_type") == "qlora":
        notes.append("a QLoRA adapter, trained on the 4-bit quantized base, used here on the unquantized one: "
                     "its answers differ slightly from the model as trained (`infuse merge` makes that model).")
    return notes


def inference_tokenizer(base: str | Path, adapter: str | Path | None) -> PreTrainedTokenizerBase:
    """The adapter's tokenizer when its dir holds one (a run saves its tokenizer next to the
    adapter), else the base model's."""
    return ensure_pad_token(_tokenizer_from(adapter if adapter and _has_tokenizer(Path(adapter)) else base))


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"PATH+ADAPTER"`` → (PATH, ADAPTER); ``"PATH"`` → (PATH, None), or (its base, PATH) when PATH
    is an adapter dir. A path that itself contains '+' is taken whole when it exists."""
    if "+" in spec and not Path(spec).expanduser().exists():
        base, adapter = spec.rsplit("+", 1)
        return base, adapter
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        return _adapter_base(folder), spec
    return spec, None


def _adapter_base(adapter: Path) -> str:
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base or not Path(base).expanduser().is_dir():
        raise InfuseError(f"{adapter} is a PEFT adapter whose base model ({base or 'not recorded'}) is not "
                          f"a local dir. Give the base explicitly as BASE+{adapter}.")
    return base


def check_adapter_dir(path: str | Path) -> Path:
    """The adapter dir ``path`` if it holds an adapter_config.json; else an error listing what it holds."""
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        found = _listing(folder) if folder.is_dir() else "nothing (no such dir)"
        raise InfuseError(f"Adapter {folder} is not a PEFT adapter: expected adapter_config.json and "
                          f"adapter_model.safetensors, found {found}. Give the output_dir of a lora or "
                          "qlora run (a full run is a model: load it as PATH alone).")
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)

