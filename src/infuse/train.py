"""One training run, read top to bottom: config → data → model → Trainer → artefacts.

``output_dir`` receives the model (full fine-tuning) or the adapter (LoRA/QLoRA) as
safetensors, the tokenizer, ``infuse_run.json`` (resolved config, data statistics, library
versions, losses) and TensorBoard logs. Running the same command again after a crash continues
from the last complete checkpoint (see ``infuse.resume``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, default_data_collator

from infuse import __version__
from infuse.averaging import WeightAveraging
from infuse.config import TrainConfig
from infuse.data.pretrain import largest_token_id
from infuse.errors import InfuseError
from infuse.logs import quiet_progress_bars
from infuse.models import (
    check_model_source,
    check_vocabulary,
    describe_model,
    load_model,
    load_tokenizer,
)
from infuse.progress import RichProgress
from infuse.resume import (
    MANIFEST,
    ResumePlan,
    SealCheckpoints,
    describe_changes,
    plan_resume,
    resume_fingerprint,
    trajectory_fingerprint,
)

LIBRARIES = ("infuse-llm", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
             "tokenizers", "bitsandbytes", "safetensors")


@dataclass
class TrainData:
    dataset: Any
    collator: Any
    stats: dict[str, Any]
    fingerprint: str  # of what is trained on
    eval_dataset: Any = None
    eval_fingerprint: str = ""  # of eval_dataset's files; a val_size split is in the settings


def run(config: TrainConfig, console: Console | None = None,
        callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the manifest written to ``output_dir``. Under torchrun
    every process runs this: the first one prints, and writes what they all would."""
    started = time.time()
    output_dir = Path(config.output_dir)
    args = config.training_arguments()
    console = (console or Console()) if args.process_index == 0 else Console(quiet=True)

    # The first process tokenizes (into the cache), clears or picks the checkpoint and saves a new
    # base; the others start once it is done and find all of it in place.
    with args.main_process_first(desc="preparing the data and the base model"):
        _, model_config = check_model_source(config)
        tokenizer = load_tokenizer(config)
        data = build_data(config, tokenizer, console)
        check_vocabulary(config, model_config, largest_token_id(data.dataset, data.eval_dataset))
        fingerprint, plan, done = output_plan(config, data.fingerprint, data.eval_fingerprint, args.world_size,
                                              clear=config.overwrite_output_dir)
        config = materialize_base(config, tokenizer, output_dir, console)
    if done:
        console.print(f"{output_dir} holds this run, trained to its last step and saved: nothing to do. "
                      "Pass --overwrite_output_dir true to train it again.")
        return done
    announce(plan, config, console)

    model = load_model(config, tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    if config.finetuning_type == "full" and rows > model_config.vocab_size:
        console.print(f"The model's embeddings grew from {model_config.vocab_size:,} to {rows:,} rows for the "
                      "tokenizer's tokens; the new rows are trained.", highlight=False)
    describe_model(model, console)
    if config.stage == "sft":  # attention per packed sample, logits only where trained: same loss, less work
        from infuse.packing import attention_calls, prepare_sft_batches

        data.stats["train"]["speedups"] = prepare_sft_batches(
            model, data.collator, config.training.get("label_smoothing_factor", 0.0))
        attention_calls.clear()

    averaging = [WeightAveraging(config.swa_start, plan.checkpoint)] if config.swa_start is not None else []
    stopping = [EarlyStoppingCallback(config.early_stopping_patience)] if config.early_stopping_patience else []
    trainer = RunTrainer(
        finished=plan.finished,
        model=model,
        args=args,
        train_dataset=data.dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data.collator,
        processing_class=tokenizer,
        # Extra callbacks run first, so a test can stop the process before a checkpoint is sealed.
        # The average goes into a checkpoint before its seal does.
        callbacks=[*(callbacks or []), *averaging, *stopping, SealCheckpoints(fingerprint), RichProgress(console),
                   EpochData(data.dataset)],
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress prints the logs; this would print them again
    if plan.finished:  # no bar for no steps, nor the train_loss of 0 the Trainer logs for them
        trainer.remove_callback(RichProgress)
    with quiet_progress_bars():  # a checkpoint's "Writing model shards" bar would cut through the training bar
        result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        if averaging:
            data.stats["train"]["weight_averaging"] = averaging[0].summary()
        if stopping:
            data.stats["train"]["early_stopping"] = report_early_stop(trainer.state, config.early_stopping_patience,
                                                                      console)
        if config.stage == "sft":
            data.stats["train"]["speedups"]["attention_calls"] = dict(attention_calls)
            stop_at_end_of_turn(trainer.model, tokenizer, data.stats["train"]["end_of_turn"],
                                output_dir if args.should_save else None)
        metrics = {**train_metrics(result, trainer, plan.finished),
                   **final_evaluation(trainer, data, console, averaged=bool(averaging))}
        trainer.save_model(str(output_dir))
    manifest = build_manifest(config, data, trainer, metrics, plan, started)
    if args.should_save:
        tokenizer.save_pretrained(str(output_dir))
        (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    # The Trainer averages the loss over the steps of this call: after a resume, those since the checkpoint.
    since = f" since {Path(plan.checkpoint).name}" if plan.checkpoint else ""
    loss = f" (train loss {metrics['train_loss']:.4f}{since})" if "train_loss" in metrics else ""
    console.print(f"[green]Saved[/green] {describe_artefact(config)} to [bold]{output_dir}[/bold]{loss}.")
    return manifest


def announce(plan: ResumePlan, config: TrainConfig, console: Console) -> None:
    for folder in plan.ignored:
        console.print(f"[yellow]Ignoring {folder}: incomplete (the process died while writing it).")
    if plan.finished:  # it stopped after its last checkpoint, or the evaluation files changed
        console.print(f"Resuming from [bold]{plan.checkpoint}[/bold], where training stopped: nothing is left "
                      "to train; evaluating and saving.")
    elif plan.checkpoint:
        console.print(f"Resuming from [bold]{plan.checkpoint}[/bold]")
    if plan.lengthened:
        console.print(f"The run is made longer ({plan.lengthened}).")
        schedule = config.training.get("lr_scheduler_type", "linear")
        if schedule not in ("constant", "constant_with_warmup"):
            console.print(f"[yellow]The {schedule} learning-rate schedule is planned over the new length: from "
                          "the checkpoint's step on, the rate follows that plan, not the shorter run's.")


def train_metrics(result, trainer: Trainer, finished: bool) -> dict[str, Any]:
    """The Trainer's metrics of this call, none where it trained no step: for no step it reports (and
    logs) a train_loss of 0."""
    if not finished:
        return result.metrics
    trainer.state.log_history = [entry for entry in trainer.state.log_history if "train_loss" not in entry]
    return {}


class RunTrainer(Trainer):
    """transformers' Trainer, minus the steps it adds to a run resumed from the checkpoint where
    training stopped: it trains a batch before it checks whether to stop, so one more step after
    ``max_steps`` in the middle of an epoch, and after early stopping, up to the next evaluation."""

    def __init__(self, *args, finished: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.finished = finished
        if finished:
            self.add_callback(NothingAtEpochEnd())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.finished:  # no batch, and the loop ends before it asks for another
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)


class NothingAtEpochEnd(TrainerCallback):
    """Keeps the end of the epoch a finished run was resumed in from evaluating and saving the
    weights it resumed with once more (``eval_strategy``/``save_strategy: epoch``)."""

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_evaluate = control.should_save = False


def output_plan(config: TrainConfig, data_fingerprint: str, eval_fingerprint: str, processes: int,
                clear: bool) -> tuple[dict[str, Any], ResumePlan, dict[str, Any] | None]:
    """What a run does with its ``output_dir``: its fingerprint (sealed into its checkpoints), the
    checkpoint it resumes (``clear`` deletes them all first), and the manifest of this very run
    when it is already finished there (see ``finished_run``)."""
    output_dir = Path(config.output_dir)
    fingerprint = resume_fingerprint(config, data_fingerprint, eval_fingerprint, processes)
    plan = plan_resume(output_dir, fingerprint, config.training.get("resume_from_checkpoint"), clear)
    done = finished_run(output_dir, on_saved_base(config, output_dir), plan, data_fingerprint, eval_fingerprint,
                        processes)
    return fingerprint, plan, done


def finished_run(output_dir: Path, config: TrainConfig, plan: ResumePlan, data_fingerprint: str,
                 eval_fingerprint: str, processes: int) -> dict[str, Any] | None:
    """The manifest in ``output_dir`` if it records this very run (``config`` on its saved base,
    training and evaluation data) and no checkpoint is left to train on from: written after the
    final save, so the run's artefacts are all there, with or without checkpoints. A finished run
    of other settings or data, with no checkpoint to resume, is not trained over (InfuseError), as
    another run's checkpoint is not resumed."""
    path = output_dir / MANIFEST
    if config.overwrite_output_dir or (plan.checkpoint and not plan.finished) or not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if (manifest.get("config") == json.loads(json.dumps(config.to_dict(), default=str))
            and manifest.get("data_fingerprint") == data_fingerprint
            and manifest.get("eval_data_fingerprint") == (eval_fingerprint or None)):
        return manifest

    changes = describe_changes(
        trajectory_fingerprint(manifest.get("config", {}), manifest.get("data_fingerprint", ""),
                               manifest.get("eval_data_fingerprint") or "", manifest.get("processes", 1)),
        resume_fingerprint(config, data_fingerprint, eval_fingerprint, processes))
    if plan.checkpoint is None and changes:
        raise InfuseError(f"{output_dir} holds a finished run with other settings or data ({'; '.join(changes)}); "
                          "training here would replace its model. Choose another output_dir, or pass "
                          "--overwrite_output_dir true to replace it.")
    return None


class EpochData(TrainerCallback):
    """Tells a dataset that changes with the epoch (the replay mix) which epoch begins, also after
    a resume in the middle of one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(math.floor(state.epoch + 1e-6))


def build_data(config: TrainConfig, tokenizer, console: Console) -> TrainData:
    """Tokenized training data for the config's stage."""
    if config.stage == "pt":
        return build_pretrain_data(config, tokenizer, console)
    from infuse.data.sft import build_sft_data

    return build_sft_data(config, tokenizer, console)


def build_pretrain_data(config: TrainConfig, tokenizer, console: Console) -> TrainData:
    from infuse.data.evaluation import eval_counts, hold_out
    from infuse.data.pretrain import DocumentCollator, build_pretrain_dataset, mix_replay

    seed = config.seed

    def pack(sources: list[str], **options):
        return build_pretrain_dataset(sources, tokenizer, config.block_size, text_field=config.text_field,
                                      cache_dir=cache_dir(config), num_proc=config.preprocessing_num_workers,
                                      console=console, seed=seed, move_openers=config.move_openers, **options)

    dataset, stats = pack(config.dataset, sentence_shuffles=config.sentence_shuffles, turns=config.sentence_turns)
    summary = {"train": stats.to_dict()}
    fingerprint, evaluation, eval_fingerprint = stats.fingerprint, None, ""
    if config.val_size:
        dataset, evaluation = hold_out(dataset, config.val_size, seed, "blocks", console)
        summary["eval"] = eval_counts(evaluation, config)
    elif config.eval_dataset:
        evaluation, eval_stats = pack(config.eval_dataset, label="Evaluation data")
        summary["eval"] = {**eval_stats.to_dict(), **eval_counts(evaluation, config)}
        eval_fingerprint = eval_stats.fingerprint
    if config.replay_dataset:
        replay, replay_stats = pack(
            config.replay_dataset, sentence_shuffles=config.replay_sentence_shuffles,
            skip_subjects_of=config.dataset if config.replay_skip_subjects else None, label="Replay data",
        )
        dataset, mix = mix_replay(dataset, replay, config.replay_ratio, seed=seed)
        summary["replay"] = {**replay_stats.to_dict(), **mix}
        console.print(f"Replay: {mix['replay_blocks']} blocks of general text mixed with "
                      f"{mix['train_blocks']} new blocks each epoch (ratio {config.replay_ratio}), drawn "
                      f"afresh from {mix['replay_available']} replay blocks.")
        fingerprint = f"{fingerprint}+{replay_stats.fingerprint}"
    collator = DocumentCollator(tokenizer.eos_token_id) if config.isolate_documents else default_data_collator
    return TrainData(dataset, collator, summary, fingerprint, evaluation, eval_fingerprint)


def cache_dir(config: TrainConfig) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else Path.home() / ".cache" / "infuse"


def materialize_base(config: TrainConfig, tokenizer, output_dir: Path, console: Console) -> TrainConfig:
    """An adapter needs a base that exists on disk: a model built from ``model_config`` is saved
    once to ``output_dir/base`` and trained from there (and reused on resume)."""
    trained = on_saved_base(config, output_dir)
    if trained is config:
        return config
    base = Path(trained.model_name_or_path)
    if not (base / "config.json").is_file():
        model = load_model(replace(config, finetuning_type="full"), tokenizer)
        model.save_pretrained(str(base))
        tokenizer.save_pretrained(str(base))
        console.print(f"Built a new base model from {config.model_config} and saved it to {base}.")
    return trained


def on_saved_base(config: TrainConfig, output_dir: Path) -> TrainConfig:
    """The config as the run trains and records it: an adapter of a model built from
    ``model_config`` is trained on the base saved to ``output_dir/base``."""
    if not config.model_config or config.finetuning_type == "full":
        return config
    return replace(config, model_name_or_path=str(output_dir / "base"), model_config=None)


def stop_at_end_of_turn(model, tokenizer, marker: str, output_dir: Path | None) -> None:
    """Add the template's end-of-turn token (``<|im_end|>``) to ``generation_config.eos_token_id``, so
    ``generate`` on the saved model stops where the answers it learnt end. An adapter's generation
    config is written next to it, to ``output_dir`` (the adapter files themselves carry none)."""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation = getattr(base, "generation_config", None)
    if len(ids) != 1 or generation is None:
        return  # a marker of several tokens cannot be an eos id; report_sft_data has warned
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if ids[0] not in eos:
        eos.append(ids[0])
    generation.eos_token_id = eos
    if base is not model and output_dir is not None:
        generation.save_pretrained(str(output_dir))


def report_early_stop(state, patience: int, console: Console) -> dict[str, Any]:
    """Whether the run stopped before its last step, and which checkpoint's weights it keeps."""
    summary = {"patience": patience, "stopped_early": state.global_step < state.max_steps,
               "last_step": state.global_step, "best_checkpoint": state.best_model_checkpoint,
               "best_metric": state.best_metric}
    if summary["stopped_early"]:
        console.print(f"Stopped early at step {state.global_step:,} of {state.max_steps:,}: the eval loss did not "
                      f"improve for {patience} evaluation(s).", highlight=False)
    if state.best_model_checkpoint:
        console.print(f"Keeping the best evaluated weights: {state.best_model_checkpoint} (eval loss "
                      f"{state.best_metric:.4f}).", highlight=False)
    return summary


def final_evaluation(trainer: Trainer, data: TrainData, console: Console, averaged: bool) -> dict[str, float]:
    """The eval loss of the weights being saved (for ``swa_start``, the average), and its perplexity.
    An evaluation scheduled at the last step already scored them, unless the saved weights are
    another step's (the best checkpoint) or an average."""
    if data.eval_dataset is None:
        return {}
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    last_weights = not averaged and not trainer.args.load_best_model_at_end
    if last_weights and evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        loss = evaluations[-1]["eval_loss"]
    else:
        loss = trainer.evaluate()["eval_loss"]
    perplexity = math.exp(min(loss, 50.0))
    counts = data.stats["eval"]
    console.print(f"Evaluation: loss {loss:.4f}, perplexity {perplexity:.2f} on {counts['rows']:,} rows "
                  f"({counts['scored_tokens']:,} tokens scored).", highlight=False)
    return {"eval_loss": loss, "eval_perplexity": perplexity}


def describe_artefact(config: TrainConfig) -> str:
    return "the model" if config.finetuning_type == "full" else f"the {config.finetuning_type} adapter"


def build_manifest(config: TrainConfig, data: TrainData, trainer: Trainer, metrics: dict[str, Any],
                   plan: ResumePlan, started: float) -> dict[str, Any]:
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "infuse_version": __version__,
        "stage": config.stage,
        "config": config.to_dict(),
        "data": data.stats,
        "data_fingerprint": data.fingerprint,
        "eval_data_fingerprint": data.eval_fingerprint or None,
        "trainable_parameters": trainable,
        "processes": trainer.args.world_size,  # data parallel: each takes per_device_train_batch_size a step
        "resumed_from": plan.checkpoint,
        "lengthened": plan.lengthened or None,
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "libraries": library_versions(),
        "wall_seconds": round(time.time() - started, 2),
    }


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise InfuseError(f"{path} not found: {output_dir} is not a finished infuse run.")
    return json.loads(path.read_text())
