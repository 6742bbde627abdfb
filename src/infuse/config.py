"""TrainConfig: a YAML recipe plus ``--key value`` overrides, in TrainingArguments' own names.

The file is flat, like HfArgumentParser input: infuse's own keys (the fields of ``TrainConfig``)
sit next to any ``transformers.TrainingArguments`` field. Unknown keys are errors that suggest
the closest known names, and every problem in a file is reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infuse.errors import InfuseError

STAGES = ("pt", "sft")
FINETUNING_TYPES = ("full", "lora", "qlora")
OVERLONG_POLICIES = ("truncate", "drop", "error")
BAD_ROW_POLICIES = ("error", "skip")
PADDING_SIDES = ("right", "left")

# Keys users know from transformers 4.x / LLaMA-Factory that TrainingArguments 5.x renamed.
TRAINING_ALIASES: dict[str, tuple[str, Any]] = {
    "warmup_ratio": ("warmup_steps", None),  # a float < 1 in warmup_steps is a ratio
    "group_by_length": ("train_sampling_strategy", "group_by_length"),
    "gradient_checkpointing": ("activation_checkpointing", None),
    "evaluation_strategy": ("eval_strategy", None),
}

# Where infuse's defaults differ from TrainingArguments': a user expects TensorBoard logs,
# frequent loss logging on small runs and checkpoints to resume from.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": ["tensorboard"],
    "logging_steps": 10,
    "save_steps": 200,
    "save_total_limit": 3,
    "per_device_train_batch_size": 4,
    "learning_rate": 2e-4,
    "num_train_epochs": 3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "disable_tqdm": True,  # infuse shows its own rich progress bar
}


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """One training run. Every TrainingArguments field is accepted too and kept in ``training``."""

    stage: str = _help("pt = (continued) pretraining on raw text; sft = supervised fine-tuning.", "pt")
    model_name_or_path: str | None = _help("A local Hugging Face model dir to start from.")
    model_config: str | None = _help("A config JSON (any AutoConfig) to build a new model from instead.")
    tokenizer_name_or_path: str | None = _help("Tokenizer dir; defaults to model_name_or_path.")
    trust_remote_code: bool = _help("Allow custom modelling code shipped with the model.", False)
    attn_implementation: str | None = _help("eager | sdpa | flash_attention_2; unset lets transformers pick.")
    dataset: list[str] = _help("Training data: files or folders (`infuse ingest` turns web pages into a file).",
                               factory=list)
    dataset_format: str = _help("sft: auto | alpaca | sharegpt | messages | text.", "auto")
    text_field: str = _help("pt: the field that holds the text in JSON/JSONL/Parquet rows.", "text")
    finetuning_type: str = _help("full | lora | qlora (LoRA on a 4-bit quantized base).", "lora")
    lora_rank: int = _help("LoRA rank r.", 8)
    lora_alpha: int = _help("LoRA scaling alpha.", 16)
    lora_dropout: float = _help("Dropout on the LoRA path.", 0.05)
    lora_target: str | list[str] = _help("all-linear (or all), or the module names to adapt, as a list or "
                                         "comma-separated.", "all-linear")
    use_dora: bool = _help("DoRA: each adapted weight also learns its magnitude apart from its direction "
                           "(peft's weight-decomposed LoRA); slower steps, often closer to full fine-tuning. With "
                           "qlora only on a CUDA GPU.", False)
    use_rslora: bool = _help("Rank-stabilised LoRA: scale the adapters by lora_alpha / sqrt(lora_rank) instead "
                             "of lora_alpha / lora_rank, so high ranks still learn.", False)
    modules_to_save: list[str] | None = _help("Modules trained in full next to the adapters.")
    quantization_bit: int = _help("qlora: bits of the quantized base (4 = nf4).", 4)
    quantization_type: str = _help("qlora: nf4 | fp4.", "nf4")
    double_quantization: bool = _help("qlora: quantize the quantization constants too.", True)
    block_size: int = _help("pt: tokens per training block.", 2048)
    sentence_shuffles: int = _help(
        "pt: add this many copies of every training document with its sentences in a new random order, so "
        "each fact is learned in several contexts instead of as one memorized sequence (replay data gets "
        "replay_sentence_shuffles instead).", 0)
    move_openers: bool = _help(
        "pt: in the sentence-shuffled copies (training and replay), move a short opening phrase to the end "
        "of half the sentences ('From this week, the ship uses X.' -> 'The ship uses X from this week.'), so "
        "a fact is also read starting from what it is about, as questions ask for it.", False)
    sentence_turns: int = _help(
        "pt, chat models: add this many chat conversations for each sentence of the training documents, a "
        "general request ('Tell me something you know.') answered by the sentence in the tokenizer's chat "
        "template, so the model also says the new facts at the start of its own turn, where it answers "
        "questions, and not only inside documents.", 0)
    isolate_documents: bool = _help(
        "pt: each token attends only to its own document within a block (position ids restart after "
        "every EOS, as in Llama 3 pretraining); false lets attention cross document boundaries, as "
        "classic group_texts packing does.", True)
    cutoff_len: int = _help("sft: longest sample in tokens; see `overlong`.", 2048)
    overlong: str = _help("sft: truncate | drop | error for samples over cutoff_len.", "error")
    bad_rows: str = _help("sft: error | skip for malformed rows (skipped rows are counted).", "error")
    template: str = _help("sft: auto = the tokenizer's chat template; or llama2 | chatml.", "auto")
    train_on_prompt: bool = _help("sft: train the prompts too (system, user and tool turns, role headers), not "
                                  "only the assistant answers.", False)
    mask_history: bool = _help("sft: train only the last assistant answer of each conversation; earlier turns "
                               "are context.", False)
    packing: bool = _help("sft: padding-free packing (no attention across samples).", True)
    pad_token: str | None = _help(
        "Pad token: unset keeps the tokenizer's (or takes unk, else eos, when it has none); 'eos', 'unk' or "
        "a token of the vocabulary such as '<pad>'. Padding is masked by position, so pad = eos still "
        "trains the eos that ends each answer.")
    padding_side: str = _help("right | left: where padded batches (packing: false) put the padding; "
                              "saved with the tokenizer.", "right")
    placeholders: dict[str, str] = _help("sft: values for {{name}} placeholders in the data.", factory=dict)
    replay_dataset: list[str] = _help("pt: general text mixed in against forgetting.", factory=list)
    replay_ratio: float = _help(
        "pt: share of each epoch's training blocks drawn from replay_dataset (0.2 = one in five); the replay "
        "blocks are drawn afresh every epoch.", 0.0)
    replay_sentence_shuffles: int = _help(
        "pt: sentence-shuffled copies of every replay document (conversation rows rendered in the chat "
        "template get none), added to the pool replay blocks are drawn from. Give the number the model was "
        "pretrained with: replay then rehearses each fact in the contexts it was learned in, not only in its "
        "document's own order.", 0)
    replay_skip_subjects: bool = _help(
        "pt: leave out replay documents that name a subject of the new documents (the rare name, of one or "
        "more capitalised words, repeated most through a new document, such as a product name), so replay "
        "does not restate the facts the new documents change. The names and the documents left out are "
        "reported.", False)
    val_size: float = _help(
        "Hold out this share (0 < x < 1) or number (1 or more) of the training samples (sft) or blocks (pt, "
        "before replay is mixed in) for evaluation; they are not trained on. The eval loss is logged as "
        "eval_strategy says (by default with every checkpoint) and once at the end.", 0.0)
    eval_dataset: list[str] = _help(
        "Evaluation data instead of val_size: files or folders read as dataset is (sft: samples in the same "
        "template; pt: blocks of its documents, without copies or turns). General text here shows forgetting "
        "while new documents are learned.", factory=list)
    early_stopping_patience: int | None = _help(
        "Stop when the eval loss (metric_for_best_model) has not improved for this many evaluations in a row, "
        "and save the best evaluated checkpoint's weights (load_best_model_at_end). Needs val_size or "
        "eval_dataset.")
    swa_start: float | None = _help(
        "Stochastic weight averaging: from this share of the run's optimizer steps on (0.5 = the second half), "
        "keep the mean of the trained weights over every step and save it instead of the last step's weights. "
        "Unset saves the last step's.")
    cache_dir: str | None = _help("Where tokenized data is cached; default ~/.cache/infuse.")
    preprocessing_num_workers: int | None = _help("Processes for tokenization (datasets num_proc).")
    overwrite_output_dir: bool = _help("Start afresh even if output_dir holds a run of other settings.", False)
    training: dict[str, Any] = _help("TrainingArguments fields (output_dir, learning_rate, ...).", factory=dict)

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]

    @property
    def seed(self) -> int:
        """The run's seed: TrainingArguments' ``seed``, 42 unless set."""
        return self.training.get("seed", 42)

    @property
    def evaluates(self) -> bool:
        """Whether the run has evaluation data (``val_size`` or ``eval_dataset``)."""
        return bool(self.val_size or self.eval_dataset)

    def to_dict(self) -> dict[str, Any]:
        """The flat form, as it would be written in a YAML recipe."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training"}
        return {**flat, **self.training}

    def training_arguments(self):
        """Build ``transformers.TrainingArguments`` from the training keys."""
        import torch
        from transformers import TrainingArguments

        kwargs = dict(self.training)
        if not torch.cuda.is_available() and not torch.backends.mps.is_available():
            # Without this, TrainingArguments refuses bf16 on a machine that has only a CPU.
            kwargs.setdefault("use_cpu", True)
        # Under DDP, finding unused parameters costs a pass over the graph every step; the models
        # trained here use them all. A model that does not (mixture of experts) can set it true.
        kwargs.setdefault("ddp_find_unused_parameters", False)
        check_one_gpu_a_process(bool(self.training.get("use_cpu")))
        try:
            return TrainingArguments(**kwargs)
        except (ValueError, TypeError) as e:
            raise InfuseError(f"Invalid training arguments: {e}") from None
        except ImportError:  # PackageNotFoundError too: a key that needs a package not installed
            if kwargs.get("deepspeed"):
                raise InfuseError(f"deepspeed: {kwargs['deepspeed']} is set, but DeepSpeed is not installed "
                                  "(pip install deepspeed). Or train without it: --deepspeed null.") from None
            raise


def check_one_gpu_a_process(use_cpu: bool) -> None:
    """torchrun starts ``--nproc_per_node`` processes and each takes a GPU of its own; more processes
    than GPUs would otherwise fail at the first collective, deep inside NCCL ("Duplicate GPU")."""
    import torch

    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()  # 0 without CUDA
    if use_cpu or gpus == 0 or processes <= gpus:
        return
    raise InfuseError(f"torchrun started {processes} processes on this machine, but it has {gpus} GPU(s) and each "
                      f"process needs one of its own. Start them with --nproc_per_node {gpus}, or train on "
                      "CPU processes with --use_cpu true.")


def describe_keys(width: int = 78) -> str:
    """infuse's own config keys with their help and defaults, as ``infuse train --help`` lists them."""
    lines = ["infuse's own keys (every TrainingArguments field is a key too):"]
    for spec in dataclasses.fields(TrainConfig):
        if spec.name == "training":
            continue
        as_yaml = yaml.safe_dump(_default(spec), default_flow_style=True).splitlines()[0]
        text = f"{spec.metadata['help']} (default: {as_yaml})"
        lines.append(f"  {spec.name}")
        lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False)  # all-linear, comma-separated: one word each
    changed = ", ".join(f"{key} {yaml.safe_dump(value, default_flow_style=True).splitlines()[0]}"
                        for key, value in TRAINING_DEFAULTS.items())
    lines += ["TrainingArguments defaults infuse changes (give the key to set another):"]
    lines += textwrap.wrap(changed, width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)


def own_defaults() -> dict[str, Any]:
    return {spec.name: _default(spec) for spec in dataclasses.fields(TrainConfig) if spec.name != "training"}


def _default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def own_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)} - {"training"}


def training_keys() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe, apply ``--key value`` overrides, check everything and return the config."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
    values.update(parse_overrides(overrides or []))
    return config_from_dict(values, origin=str(path) if path else "command line")


def config_from_dict(values: dict[str, Any], origin: str = "config") -> TrainConfig:
    """Split flat keys into infuse's own and TrainingArguments', validate, fill defaults."""
    values = _apply_aliases(dict(values))
    own, training, errors = {}, {}, []
    known_training = training_keys()
    for key, value in values.items():
        if key in own_keys():
            own[key] = value
        elif key in known_training:
            training[key] = value
        else:
            errors.append(_unknown_key_message(key, own_keys() | known_training))
    for key, value in TRAINING_DEFAULTS.items():
        training.setdefault(key, value)
    training = {key: _as_number(key, value, _training_field_types()) for key, value in training.items()}
    own = {key: _as_number(key, value, _own_field_types()) for key, value in own.items()}
    for key in ("dataset", "replay_dataset", "eval_dataset", "modules_to_save"):
        if isinstance(own.get(key), str):
            own[key] = _listed(own[key])
    wrong_types = _type_errors(own, _own_field_types()) + _type_errors(training, _training_field_types())
    if wrong_types:  # the checks below compare and combine values of the right types
        _raise_config_errors(origin, errors + wrong_types)
    config = TrainConfig(**own, training=training)
    errors += _validate(config)
    if config.evaluates and "eval_strategy" not in values:
        # evaluate with every checkpoint: each saved checkpoint then has an eval loss to compare
        saving = config.training.get("save_strategy", "steps")
        config.training["eval_strategy"] = "steps" if saving == "best" else saving
        config.training.setdefault("eval_steps", config.training.get("save_steps"))
    if config.early_stopping_patience:
        config.training.setdefault("load_best_model_at_end", True)
        # The count of evaluations without improvement is in each checkpoint; a resumed run reads it back.
        config.training.setdefault("restore_callback_states_from_checkpoint", True)
    if errors:
        _raise_config_errors(origin, errors)
    return config


def _listed(value: str) -> list[str]:
    """``"a.jsonl,b.jsonl"`` (as ``--dataset a.jsonl,b.jsonl`` gives it) → two entries; a path that
    exists with a comma in its name stays whole."""
    if "," not in value or Path(value).expanduser().exists():
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def _raise_config_errors(origin: str, errors: list[str]) -> None:
    bullet = "\n  - "
    raise InfuseError(f"{origin}: {len(errors)} problem(s) in the config:{bullet}{bullet.join(errors)}")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-4", "--bf16", "--dataset=[a.jsonl, b/]"]`` → typed values (YAML rules)."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise InfuseError(f"Unexpected argument '{arg}': overrides are written --key value.")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            # A bare flag followed by another key (or nothing) means true, as in HfArgumentParser.
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw, i = args[i + 1], i + 1
            else:
                raw = "true"
        values[key.replace("-", "_")] = _parse_value(raw)
        i += 1
    return values


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _own_field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _training_field_types() -> dict[str, str]:
    from transformers import TrainingArguments

    return {f.name: str(f.type) for f in dataclasses.fields(TrainingArguments)}


def _as_number(key: str, value: Any, types: dict[str, str]) -> Any:
    """YAML reads ``2e-4`` (no dot) as a string; turn it into the number the field expects."""
    if not isinstance(value, str) or "float" not in types.get(key, ""):
        return value
    try:
        return float(value)
    except ValueError:
        return value


# Annotations whose values are checked before use: a value of another type fails only later, inside
# the Trainer or the data pipeline, with a message that does not name the key.
_EXPECTED_TYPES = {
    "float": ((int, float), "a number"),
    "int": ((int,), "an integer"),
    "bool": ((bool,), "true or false"),
    "list[str]": ((list,), "a list"),
    "dict[str, str]": ((dict,), "a mapping of names to values ({name: value})"),
}


# Checked with their ranges by ``_validate``, whose messages say more.
_RANGE_CHECKED = {"block_size", "cutoff_len", "lora_rank", "sentence_shuffles", "replay_sentence_shuffles",
                  "sentence_turns", "swa_start"}


def _type_errors(values: dict[str, Any], types: dict[str, str]) -> list[str]:
    errors = []
    for key, value in values.items():
        if key in _RANGE_CHECKED:
            continue
        annotation = types.get(key, "").replace("<class '", "").replace("'>", "")
        optional = annotation.endswith(" | None")
        expected = _EXPECTED_TYPES.get(annotation.removesuffix(" | None"))
        if expected is None or (value is None and optional):
            continue
        kinds, described = expected
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            errors.append(f"{key}: expected {described}{' or null' if optional else ''}, got {value!r}.")
    return errors


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InfuseError(f"Config file {path} not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InfuseError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if not isinstance(data, dict):
        raise InfuseError(f"{path}: a config must be a mapping of keys to values.")
    return data


def _apply_aliases(values: dict[str, Any]) -> dict[str, Any]:
    for old, (new, fixed_value) in TRAINING_ALIASES.items():
        if old in values:
            value = values.pop(old)
            if fixed_value is None:
                values.setdefault(new, value)
            elif value:
                values.setdefault(new, fixed_value)
    return values


def _unknown_key_message(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown key '{key}'.{hint}"


def _validate(config: TrainConfig) -> list[str]:
    errors = []
    choices = {
        "stage": STAGES,
        "finetuning_type": FINETUNING_TYPES,
        "overlong": OVERLONG_POLICIES,
        "bad_rows": BAD_ROW_POLICIES,
        "padding_side": PADDING_SIDES,
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            errors.append(f"{name}: '{getattr(config, name)}' is not one of {', '.join(allowed)}.")
    if bool(config.model_name_or_path) == bool(config.model_config):
        errors.append("give exactly one of model_name_or_path (start from weights) or model_config (new model).")
    if not config.dataset:
        errors.append("dataset: no training data given (a file, folder or URL, or a list of them).")
    if "output_dir" not in config.training:
        errors.append("output_dir: where to write the model is not set.")
    for name in ("block_size", "cutoff_len", "lora_rank"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(f"{name}: expected a positive integer, got {value!r}.")
    for name in ("sentence_shuffles", "replay_sentence_shuffles", "sentence_turns"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            errors.append(f"{name}: expected a number of copies (0 or more), got {value!r}.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if name in config.training and config.training[name] < 1:
            errors.append(f"{name}: expected a positive integer, got {config.training[name]!r}.")
    if config.training.get("learning_rate", 0) < 0:
        errors.append(f"learning_rate: expected 0 or more, got {config.training['learning_rate']!r}.")
    max_steps = config.training.get("max_steps", -1)
    if max_steps != -1 and max_steps < 1:  # the Trainer would read it as "no limit" and train the epochs
        errors.append(f"max_steps: expected a positive number of steps, or -1 to train num_train_epochs; "
                      f"got {max_steps!r}.")
    if not 0 <= config.replay_ratio < 1:
        errors.append(f"replay_ratio: expected a number in [0, 1), got {config.replay_ratio!r}.")
    if config.swa_start is not None and not (isinstance(config.swa_start, float | int) and 0 <= config.swa_start < 1):
        errors.append(f"swa_start: expected a share of the run's steps in [0, 1), got {config.swa_start!r}.")
    if config.finetuning_type == "qlora" and config.quantization_bit not in (4, 8):
        errors.append(f"quantization_bit: qlora supports 4 or 8, got {config.quantization_bit!r}.")
    errors += _evaluation_errors(config)
    if config.replay_ratio and not config.replay_dataset:
        errors.append("replay_ratio is set but replay_dataset is empty.")
    persistent = config.training.get("dataloader_persistent_workers") and config.training.get("dataloader_num_workers")
    if config.replay_dataset and persistent:
        # Workers keep their own copy of the dataset: they would replay the first epoch's blocks every epoch.
        errors.append("dataloader_persistent_workers: cannot be used with replay_dataset, whose blocks change "
                      "each epoch; set it to false or dataloader_num_workers to 0.")
    return errors


def _evaluation_errors(config: TrainConfig) -> list[str]:
    size = config.val_size
    if isinstance(size, bool) or not isinstance(size, int | float) or size < 0 or (size >= 1 and size != int(size)):
        return [f"val_size: expected a share in (0, 1) or a number of samples (1 or more), got {size!r}."]
    errors = []
    if size and config.eval_dataset:
        errors.append("val_size and eval_dataset are both set; evaluate on one of them.")
    if size and config.stage == "pt" and (config.sentence_shuffles or config.sentence_turns):
        errors.append("val_size: held-out blocks would still be trained on through the sentence-shuffled copies "
                      "and sentence turns made of their documents; put the documents to evaluate on in "
                      "eval_dataset instead.")
    patience = config.early_stopping_patience
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        errors.append(f"early_stopping_patience: expected a number of evaluations (1 or more), got {patience!r}.")
    elif patience and not config.evaluates:
        errors.append("early_stopping_patience: stopping on the eval loss needs data to evaluate on: set val_size "
                      "(a share of the training data, held out) or eval_dataset.")
    if config.swa_start is not None and (patience or config.training.get("load_best_model_at_end")):
        errors.append("swa_start and the best checkpoint (early_stopping_patience, load_best_model_at_end) each "
                      "choose the weights to save; keep one of them.")
    if config.training.get("eval_strategy", "no") != "no" and not config.evaluates:
        errors.append(f"eval_strategy: '{config.training['eval_strategy']}' needs data to evaluate on: set "
                      "val_size (a share of the training data, held out) or eval_dataset.")
    return errors
