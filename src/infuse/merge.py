"""``infuse merge``: a LoRA or QLoRA adapter folded into its base, saved as a standalone model that
plain transformers loads, and checked against the model as it was trained before it is kept.

A QLoRA adapter learned to correct the *quantized* base, not the original weights. So its base
is loaded the way it was trained (4-bit, from the run's infuse_run.json), dequantized to the
compute dtype, and only then merged (dequantize-then-merge). The merged model is written to a
temporary dir, reloaded with plain transformers, and its logits on sample prompts are compared
with the quantized base + adapter (for DoRA on a CPU, the dequantized base + adapter: see
``dora_misreads_4bit``): max abs diff and top-1 agreement. Only a model that matches
is moved to ``--output``; anything else (NaN or inf weights, an adapter that overflows the
dtype, a merge into weights the adapter never saw) is refused with the figures.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from infuse import __version__
from infuse.errors import InfuseError
from infuse.models import (
    GENERATION_CONFIG,
    check_adapter_dir,
    check_model_dir,
    compute_dtype,
    dora_reads_4bit_weights,
    inference_tokenizer,
    load_for_inference,
    peft_quietly,
)
from infuse.resume import MANIFEST, SEAL_FILE, run_settings

SAMPLE_PROMPTS = (
    "The history of the city begins with a small settlement on the river",
    "Question: What is the capital of France?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 2023 the company announced new instances equipped with",
)
MERGE_RECORD = "infuse_merge.json"
MIN_TOP1_AGREEMENT = 0.95


@dataclass
class TrainedAs:
    """How the adapter was trained: on a quantized base or not, in which compute dtype."""

    quantization: BitsAndBytesConfig | None
    dtype: torch.dtype | str  # "auto": the dtype the base was saved in
    source: str  # where this was learned from, for messages

    def describe(self) -> str:
        if self.quantization is None:
            return f"base ({_dtype_name(self.dtype)}) + adapter"
        bits = "8-bit" if self.quantization.load_in_8bit else f"4-bit {self.quantization.bnb_4bit_quant_type}"
        return f"{bits} base + adapter, compute {_dtype_name(self.dtype)}"


@dataclass
class MergeCheck:
    """Merged model vs base + adapter as trained, on the sample prompts."""

    max_abs_diff: float
    relative_diff: float  # max abs diff over the largest reference logit
    top1_agreement: float
    positions: int
    tolerance: float  # the largest relative diff accepted
    reference: str

    @property
    def passed(self) -> bool:
        return (self.relative_diff <= self.tolerance and self.top1_agreement >= MIN_TOP1_AGREEMENT)

    def summary(self) -> str:
        return (f"max abs diff {self.max_abs_diff:.3g} ({self.relative_diff:.2%} of the largest logit, "
                f"tolerance {self.tolerance:.2%}), top-1 agreement {self.top1_agreement:.2%} over "
                f"{self.positions} positions, against {self.reference}")


def merge(adapter: str | Path, output: str | Path, base: str | Path | None = None, *,
          device: str | None = None, into: str = "dequantized", console: Console | None = None) -> MergeCheck:
    """Merge ``adapter`` into ``base`` (default: the base its run or adapter_config names), check
    the result and save it to ``output``. ``into="original"`` merges into the unquantized original
    weights instead of the dequantized ones a QLoRA adapter was trained on (the check tells how
    far that drifts). Raises InfuseError, writing nothing, when the check fails."""
    console = console or Console()
    adapter_dir = check_adapter_dir(adapter)
    base_dir = check_model_dir(base or base_of(adapter_dir))
    output_dir = _fresh_output(Path(output))
    if into not in ("dequantized", "original"):
        raise InfuseError(f"--merge-into {into}: expected dequantized or original.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    trained = trained_as(adapter_dir, base_dir)
    console.print(f"Merging [bold]{adapter_dir}[/bold] into [bold]{base_dir}[/bold] "
                  f"(trained as {trained.describe()}).")

    described = trained.describe()
    if dora_misreads_4bit(adapter_dir, trained, device):
        reference = adapted_base(base_dir, adapter_dir, trained, device, "dequantized").eval()
        tokenizer = inference_tokenizer(base_dir, adapter_dir)
        described = f"the dequantized {described} (DoRA misreads bitsandbytes' 4-bit weights on a CPU)"
    else:
        with _adapter_fits(adapter_dir, base_dir):
            reference, tokenizer = load_for_inference(f"{base_dir}+{adapter_dir}", dtype=trained.dtype,
                                                      device=device, quantization=trained.quantization)
    prompts = sample_prompts(tokenizer)
    expected = logits_on(reference, prompts)
    del reference
    gc.collect()

    staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged = adapted_base(base_dir, adapter_dir, trained, device, into).merge_and_unload()
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if (adapter_dir / GENERATION_CONFIG).is_file():  # an SFT run's: it stops at the template's end of turn
            shutil.copy(adapter_dir / GENERATION_CONFIG, staging / GENERATION_CONFIG)
        del merged
        gc.collect()
        check = compare(logits_on(_reload(staging, device), prompts), expected, trained, described)
        console.print(f"Check: {check.summary()}.")
        if not check.passed:
            raise InfuseError(_refusal(check, adapter_dir, into, trained))
        _record(staging, base_dir, adapter_dir, trained, into, check)
        if output_dir.is_dir():
            output_dir.rmdir()  # an empty dir is replaced by the checked result in one rename
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"[green]Saved[/green] the merged model to [bold]{output_dir}[/bold].")
    return check


# ---------------------------------------------------------------- how it was trained


def base_of(adapter_dir: Path) -> str:
    """The base adapter_config.json names (an absolute path where infuse trained it), else the one
    its run recorded."""
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    settings, _ = run_settings(adapter_dir)
    candidates = [path for path in (recorded, (settings or {}).get("model_name_or_path")) if path]
    if not candidates:
        raise InfuseError(f"{adapter_dir}: no --base given and the adapter records no base model. "
                          "Pass --base PATH, the model the adapter was trained on.")
    return next((path for path in candidates if Path(path).expanduser().is_dir()), candidates[0])


def trained_as(adapter_dir: Path, base_dir: Path) -> TrainedAs:
    """Read the quantization and compute dtype of training from the run's infuse_run.json; a base
    saved already quantized (its config.json has a quantization_config) is loaded as it is."""
    config, source = run_settings(adapter_dir)
    if config is None:
        if "quantization_config" in json.loads((base_dir / "config.json").read_text()):
            return TrainedAs(None, "auto", f"{base_dir}/config.json (a quantized checkpoint)")
        return TrainedAs(None, "auto", f"no {MANIFEST} or {SEAL_FILE}: taken as plain LoRA")
    if config.get("finetuning_type") != "qlora":
        return TrainedAs(None, "auto", source)
    dtype = compute_dtype(config)
    if config.get("quantization_bit", 4) == 8:
        return TrainedAs(BitsAndBytesConfig(load_in_8bit=True), dtype, source)
    quantization = BitsAndBytesConfig(load_in_4bit=True,
                                      bnb_4bit_quant_type=config.get("quantization_type", "nf4"),
                                      bnb_4bit_use_double_quant=config.get("double_quantization", True),
                                      bnb_4bit_compute_dtype=dtype)
    return TrainedAs(quantization, dtype, source)


# ---------------------------------------------------------------- merging


def dora_misreads_4bit(adapter_dir: Path, trained: TrainedAs, device: str) -> bool:
    """Whether base + adapter as trained cannot be computed on ``device``: a DoRA adapter over a
    4-bit base where DoRA misreads bitsandbytes' weights (``infuse.models.dora_reads_4bit_weights``).
    Such an adapter was trained on a GPU; the reference is then the dequantized base + adapter, the
    weights it was trained against."""
    four_bit = trained.quantization is not None and trained.quantization.load_in_4bit
    dora = json.loads((adapter_dir / "adapter_config.json").read_text()).get("use_dora", False)
    return four_bit and dora and not dora_reads_4bit_weights(device)


def adapted_base(base_dir: Path, adapter_dir: Path, trained: TrainedAs, device: str, into: str):
    """The base loaded as trained and dequantized (or the original weights for ``into="original"``),
    with the adapter on it (a PeftModel; ``merge_and_unload`` gives the merged model)."""
    from peft import PeftModel

    quantization = trained.quantization if into == "dequantized" else None
    # A fresh load: bitsandbytes repacks 4-bit weights for its CPU kernel on the first forward,
    # after which they no longer dequantize correctly.
    model, _ = load_for_inference(str(base_dir), dtype=trained.dtype, device=device,
                                  quantization=quantization)
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize()
        if trained.dtype != "auto":
            model.to(trained.dtype)
    with _adapter_fits(adapter_dir, base_dir), peft_quietly():
        return PeftModel.from_pretrained(model, adapter_dir)


@contextmanager
def _adapter_fits(adapter_dir: Path, base_dir: Path) -> Iterator[None]:
    """peft's shape and module-name errors, as a message that says which pair does not fit."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as e:
        raise InfuseError(f"The adapter {adapter_dir} does not fit the base {base_dir}: "
                          f"{str(e).strip().splitlines()[0][:300]} Pass --base the model the adapter was "
                          "trained on.") from None


def _reload(folder: Path, device: str) -> torch.nn.Module:
    """The saved merged model, loaded the way any user would: plain transformers, no peft."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=device).eval()


# ---------------------------------------------------------------- checking


def sample_prompts(tokenizer: Any) -> list[list[int]]:
    """Token ids of the sample prompts, plus one chat turn when the tokenizer has a template."""
    prompts = [list(tokenizer(text).input_ids) for text in SAMPLE_PROMPTS]
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                             add_generation_prompt=True, tokenize=True)
        prompts.append(list(chat["input_ids"] if hasattr(chat, "keys") else chat))
    return prompts


@torch.no_grad()
def logits_on(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits [positions, vocab] of each prompt, one prompt at a time (no padding)."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def compare(merged: list[torch.Tensor], reference: list[torch.Tensor], trained: TrainedAs,
            described: str) -> MergeCheck:
    """Max abs diff, its share of the largest reference logit, and top-1 agreement; ``described``
    names the reference."""
    got, want = torch.cat(merged), torch.cat(reference)
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    finite = bool(torch.isfinite(got).all() and torch.isfinite(want).all())
    return MergeCheck(
        max_abs_diff=diff if finite else float("nan"),
        relative_diff=diff / scale if finite and scale > 0 else float("inf"),
        top1_agreement=(got.argmax(-1) == want.argmax(-1)).float().mean().item() if finite else 0.0,
        positions=want.shape[0], tolerance=tolerance(trained), reference=described)


def tolerance(trained: TrainedAs) -> float:
    """The relative logit difference a faithful merge stays under. Half precision rounds the merged
    weights; bitsandbytes' 4-bit kernels compute in reduced precision (about 0.3% of the logits on
    CPU), so a quantized reference is only that exact. A merge into weights the adapter never
    saw, or a broken adapter, lands well above."""
    if trained.quantization is not None or trained.dtype in (torch.bfloat16, torch.float16):
        return 0.02
    return 1e-3


def _refusal(check: MergeCheck, adapter_dir: Path, into: str, trained: TrainedAs) -> str:
    causes = _broken_tensors(adapter_dir)
    if causes:
        why = f"The adapter holds non-finite weights ({causes}): it is corrupt; retrain or restore it."
    elif into == "original" and trained.quantization is not None:
        why = ("The adapter was trained on the quantized base, so merging it into the original weights "
               "changes the model; merge with --merge-into dequantized (the default).")
    else:
        why = ("The merged weights do not reproduce the adapter: it may overflow the dtype or not belong "
               "to this base. Check --base, or merge in float32 on a machine with the memory for it.")
    return f"Refusing to save the merged model of {adapter_dir}: {check.summary()}. {why}"


def _broken_tensors(adapter_dir: Path) -> str:
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return ""
    bad = [name for name, tensor in load_file(weights).items() if not torch.isfinite(tensor).all()]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


# ---------------------------------------------------------------- output


def _fresh_output(output: Path) -> Path:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InfuseError(f"--output {output} already exists and is not empty; merging never overwrites. "
                          "Choose a new dir or remove it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _record(folder: Path, base_dir: Path, adapter_dir: Path, trained: TrainedAs, into: str,
            check: MergeCheck) -> None:
    """infuse_merge.json: where the model came from and how well it matched, next to the weights."""
    record = {"infuse_version": __version__, "base": str(base_dir), "adapter": str(adapter_dir),
              "trained_as": trained.describe(), "trained_as_source": trained.source, "merged_into": into,
              "check": asdict(check) | {"passed": check.passed}}
    (folder / MERGE_RECORD).write_text(json.dumps(record, indent=2))


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
