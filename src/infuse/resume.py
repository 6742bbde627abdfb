"""Which checkpoint a run continues from, and whether it is safe to.

The Trainer writes ``checkpoint-N`` folders in place, so a process killed mid-save leaves a
folder that looks like a checkpoint but is not one. After the Trainer has finished writing a
checkpoint, infuse seals it with ``infuse_seal.json``: the run's fingerprint (every setting and
data hash that shapes the training trajectory). Only sealed checkpoints are resumed from, and
only when their fingerprint matches the run being started; a run made longer (more steps or
epochs) still matches. A checkpoint where training stopped leaves nothing to train
(``ResumePlan.finished``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from infuse.errors import InfuseError

SEAL_FILE = "infuse_seal.json"
MANIFEST = "infuse_run.json"  # what a finished run writes to its output_dir
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Settings that do not change what is trained: changing them between a crash and a restart
# is fine (for example logging more often, or keeping more checkpoints).
NEUTRAL_KEYS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "disable_tqdm",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "log_level",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "run_name", "cache_dir",
    "preprocessing_num_workers", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_pin_memory", "push_to_hub", "hub_model_id",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "eval_accumulation_steps",
}


# A run may be made longer: resumed with more epochs or steps than it was started with, it trains
# on from its checkpoint. Anything else about its length is a change like any other.
LENGTH_KEYS = ("num_train_epochs", "max_steps")


@dataclass
class ResumePlan:
    checkpoint: str | None
    ignored: list[str]  # checkpoint folders left unsealed by a process that died while saving
    finished: bool = False  # training stopped at the checkpoint: nothing is left to train
    lengthened: str = ""  # "num_train_epochs: 1 -> 3" when the run is made longer than the checkpoint's


def resume_fingerprint(config, data_fingerprint: str, eval_fingerprint: str, processes: int = 1) -> dict[str, Any]:
    """What a checkpoint and the run that resumes it must share (``config`` a TrainConfig; see
    ``trajectory_fingerprint``)."""
    return trajectory_fingerprint(config.to_dict(), data_fingerprint, eval_fingerprint, processes)


def trajectory_fingerprint(settings: dict[str, Any], data_fingerprint: str, eval_fingerprint: str,
                           processes: int) -> dict[str, Any]:
    """The settings (a config's flat form), the training data and the number of processes. Each
    process takes its own batch a step, so with another number the steps done would stand for other
    samples. The evaluation files count too where the eval loss picks the saved weights
    (``load_best_model_at_end``, which early stopping turns on); elsewhere they change no training
    step, so they may be added to a run in progress or changed."""
    if settings.get("load_best_model_at_end"):
        fingerprint = {**run_fingerprint(settings, data_fingerprint), "eval_data": eval_fingerprint}
    else:
        kept = {key: value for key, value in settings.items() if key != "eval_dataset"}
        fingerprint = run_fingerprint(kept, data_fingerprint)
    return {**fingerprint, "processes": processes}


def run_fingerprint(config: dict[str, Any], data_fingerprint: str) -> dict[str, Any]:
    """The settings and data identity that decide the training trajectory, as a comparable dict."""
    settings = {k: v for k, v in sorted(config.items()) if k not in NEUTRAL_KEYS}
    return {"settings": json.loads(json.dumps(settings, default=str)), "data": data_fingerprint}


def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders in step order."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def is_sealed(checkpoint: Path) -> bool:
    return (checkpoint / SEAL_FILE).is_file() and (checkpoint / "trainer_state.json").is_file()


def plan_resume(output_dir: Path, fingerprint: dict[str, Any], requested: str | bool | None,
                overwrite: bool) -> ResumePlan:
    """Decide where training starts.

    ``requested`` is TrainingArguments' ``resume_from_checkpoint``: a path, True (latest), or None
    (auto: latest sealed checkpoint of this output_dir if there is one).
    """
    found = checkpoints(output_dir)
    ignored = [str(p) for p in found if not is_sealed(p)]
    if overwrite:
        for path in found:
            shutil.rmtree(path)
        return ResumePlan(None, [])
    if isinstance(requested, str) and requested.lower() not in ("true", "false"):
        checkpoint = Path(requested)
        if not is_sealed(checkpoint):
            raise InfuseError(
                f"resume_from_checkpoint: {checkpoint} is not a complete checkpoint (no {SEAL_FILE} or "
                "trainer_state.json; it was probably being written when the process died). "
                "Pick an earlier checkpoint-N folder, or leave resume_from_checkpoint unset to use the latest "
                "complete one."
            )
    else:
        sealed = [p for p in found if is_sealed(p)]
        if requested is False or str(requested).lower() == "false" or not sealed:
            return ResumePlan(None, ignored)
        checkpoint = sealed[-1]
    lengthened = check_same_run(checkpoint, fingerprint)
    return ResumePlan(str(checkpoint), ignored, finished=training_stopped(checkpoint) and not lengthened,
                      lengthened=lengthened)


def run_settings(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The settings a run's output folder or checkpoint was trained with, and the file they were
    read from: the run's manifest, or a checkpoint's seal; (None, "") where there is neither."""
    for name, settings_of in ((MANIFEST, lambda record: record["config"]),
                              (SEAL_FILE, lambda record: record["fingerprint"]["settings"])):
        path = folder / name
        if path.is_file():
            return settings_of(json.loads(path.read_text())), str(path)
    return None, ""


def training_stopped(checkpoint: Path) -> bool:
    """Whether the Trainer's loop ended at ``checkpoint``: its last step, or early stopping."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return control.get("should_training_stop", False) or 0 < state.get("max_steps", 0) <= state["global_step"]


def sealed_processes(output_dir: Path) -> int:
    """How many processes trained the latest complete checkpoint in ``output_dir`` (1 if none)."""
    sealed = [p for p in checkpoints(output_dir) if is_sealed(p)]
    if not sealed:
        return 1
    return json.loads((sealed[-1] / SEAL_FILE).read_text())["fingerprint"].get("processes", 1)


def check_same_run(checkpoint: Path, fingerprint: dict[str, Any]) -> str:
    """Stop when the checkpoint was written by a run with other settings or other data; a run made
    longer is the same run, and its new length is returned ("max_steps: 8 -> 16")."""
    seal = json.loads((checkpoint / SEAL_FILE).read_text())["fingerprint"]
    lengthened = longer_run(seal["settings"], fingerprint["settings"])
    if lengthened and fingerprint["settings"].get("swa_start") is not None:
        raise InfuseError(f"{checkpoint}: a run that averages its weights (swa_start) cannot be made longer "
                          f"({lengthened}): the average the checkpoint holds is over a share of the shorter "
                          "run's steps. Train the longer run afresh: another output_dir, or --overwrite_output_dir.")
    if lengthened:  # compared on everything else
        same_length = {key: value for key, value in fingerprint["settings"].items() if key in LENGTH_KEYS}
        kept = {key: value for key, value in seal["settings"].items() if key not in LENGTH_KEYS}
        seal = {**seal, "settings": {**kept, **same_length}}
    changes = describe_changes(seal, fingerprint)
    if changes:
        listed = "; ".join(changes)
        raise InfuseError(
            f"{checkpoint} was written by a run with different settings or data ({listed}). "
            "Resuming would silently skip or repeat training. Restore the old settings to continue "
            "that run, choose another output_dir, or pass --overwrite_output_dir to start afresh."
        )
    return lengthened


def longer_run(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The change of length from settings ``old`` to ``new`` if it only makes the run longer: more
    ``max_steps``, or more ``num_train_epochs`` where no ``max_steps`` bounds the run; else ""."""
    def length(settings: dict[str, Any]) -> tuple[float, float]:  # TrainingArguments' defaults: -1, 3
        return float(settings.get("max_steps") or -1), float(settings.get("num_train_epochs") or 3.0)

    (old_steps, old_epochs), (new_steps, new_epochs) = length(old), length(new)
    if old_steps > 0 and new_steps > old_steps and new_epochs == old_epochs:
        return f"max_steps: {old_steps:g} -> {new_steps:g}"
    if old_steps <= 0 and new_steps <= 0 and new_epochs > old_epochs:
        return f"num_train_epochs: {old_epochs:g} -> {new_epochs:g}"
    return ""


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two run fingerprints. A key of infuse's own that only one of them has
    (one infuse version knows it, the other does not) is a change only if it is off its default."""
    from infuse.config import own_defaults

    defaults = json.loads(json.dumps(own_defaults()))
    changes = []
    old_settings, new_settings = old["settings"], new["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        before, after = old_settings.get(key, "<unset>"), new_settings.get(key, "<unset>")
        if "<unset>" in (before, after) and key in defaults and defaults[key] in (before, after):
            continue
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
    if old["data"] != new["data"]:
        changes.append(f"training data changed (fingerprint {old['data'][:12]} -> {new['data'][:12]})")
    if old.get("processes", 1) != new.get("processes", 1):  # a seal of an older infuse has none: one process
        changes.append(f"processes: {old.get('processes', 1)} -> {new.get('processes', 1)}, each taking "
                       "per_device_train_batch_size samples a step")
    if old.get("eval_data") != new.get("eval_data"):
        changes.append("evaluation data changed (it picks the saved weights: load_best_model_at_end)")
    return changes


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has finished writing it."""

    def __init__(self, fingerprint: dict[str, Any]):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = saved_checkpoint(args, state)
            if folder.is_dir():
                seal = {"global_step": state.global_step, "fingerprint": self.fingerprint}
                tmp = folder / (SEAL_FILE + ".tmp")
                tmp.write_text(json.dumps(seal, indent=1))
                tmp.replace(folder / SEAL_FILE)  # atomic: a seal is whole or absent
        return control


def saved_checkpoint(args, state) -> Path:
    """The folder the Trainer has just written for ``state.global_step`` (in an ``on_save`` callback)."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"
