"""``infuse preflight CONFIG.yaml``: what training would see, checked without training.

It loads the tokenizer and the model's config (never its weights), reads and tokenizes the data
exactly as ``infuse train`` does, and prints it:

- ``stage: sft``: two or three samples with trained tokens in green and masked ones dim; counts
  of samples, tokens, trained tokens, truncated, dropped and skipped samples; whether each
  sample trains the end-of-turn marker; whether the template round-trips (the rendered text,
  tokenized and decoded, is the same text); whether batches keep every trained label.
- ``stage: pt``: documents, tokens, blocks and padding; the replay mix; the first block.
- both: the model's context against ``block_size``/``cutoff_len``, the data's token ids against
  the model's vocabulary, the number of optimizer steps, and what training would do with
  ``output_dir`` (start, resume, finish, nothing, or stop on a checkpoint of other settings).

A fatal problem (nothing to learn to stop on, text the tokenizer cannot reproduce, trained
labels lost in batches, samples longer than the model's context, ...) makes ``preflight`` return
False; the command then exits non-zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from infuse.config import TrainConfig
from infuse.errors import InfuseError
from infuse.models import (
    check_model_source,
    check_vocabulary,
    context_limit,
    fit_to_tokenizer,
    load_tokenizer,
)

SHOWN_SAMPLES = 3
SHOWN_HEAD, SHOWN_TAIL = 500, 250  # characters of a long sample shown before and after the cut
TRAINED_STYLE, MASKED_STYLE = "bold green", "dim"


@dataclass
class Findings:
    """What preflight found wrong: problems make the run useless, warnings deserve a look."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """The data as training would see it: its largest token id, the rows a step is counted in
    (blocks or samples), and the fingerprints a checkpoint of the run records."""

    max_token_id: int
    rows: int
    fingerprint: str
    eval_fingerprint: str


def preflight(config: TrainConfig, console: Console) -> bool:
    """Check and show the data, template and tokenizer of ``config``; True when training can go on."""
    findings = Findings()
    try:
        config.training_arguments()  # the Trainer's own checks: an optimizer or schedule it does not know
        tokenizer = load_tokenizer(config)
        console.print(describe_tokenizer(tokenizer), highlight=False)
        model_config = check_model(config, tokenizer, console, findings)
        if config.stage == "pt":
            prepared = preflight_pretrain(config, tokenizer, console, findings)
        else:
            prepared = preflight_sft(config, tokenizer, console, findings)
        if model_config is not None:
            try:
                check_vocabulary(config, model_config, prepared.max_token_id)
            except InfuseError as e:
                findings.problems.append(str(e))
        console.print(describe_steps(config, prepared.rows), highlight=False)
        console.print(describe_output(config, prepared), highlight=False)
    except InfuseError as e:
        findings.problems.append(str(e))
    return report(findings, console)


def describe_tokenizer(tokenizer) -> str:
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    return (f"Tokenizer: {type(tokenizer).__name__}, {len(tokenizer):,} tokens; bos {tokenizer.bos_token!r}, "
            f"eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}{' (= eos)' if pad_is_eos else ''}, "
            f"padding side {tokenizer.padding_side}.")


def report(findings: Findings, console: Console) -> bool:
    """Print the warnings and problems; True when there is no problem."""
    for warning in findings.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    for problem in findings.problems:
        console.print(f"[bold red]problem:[/bold red] {escape(problem)}", highlight=False)
    if findings.problems:
        console.print(f"[bold red]Preflight failed[/bold red]: {len(findings.problems)} problem(s) would "
                      "make this run useless; fix them before training.")
        return False
    console.print("[bold green]Preflight passed[/bold green]: no problem found for `infuse train`.")
    return True


# --- the model ------------------------------------------------------------------------------------


def check_model(config: TrainConfig, tokenizer, console: Console, findings: Findings):
    """The model's config (never its weights) as training will use it, its context checked against
    block_size/cutoff_len; None when there is no usable model."""
    try:
        source, model_config = check_model_source(config)
    except InfuseError as e:
        findings.problems.append(str(e))
        return None
    configured = getattr(model_config, "vocab_size", None)
    if config.model_config:  # training builds it with the tokenizer's vocabulary and special ids
        fit_to_tokenizer(model_config, tokenizer)
    vocab = getattr(model_config, "vocab_size", None)
    vocabulary = f"vocabulary {vocab}"
    if vocab != configured:
        vocabulary += f" ({configured} in {source}, grown to the tokenizer's)"
    key = "block_size" if config.stage == "pt" else "cutoff_len"
    name, limit = context_limit(model_config)
    console.print(f"Model: {model_config.model_type} from {source}; context {name} {limit} for {key} "
                  f"{getattr(config, key)}; {vocabulary}.", highlight=False)
    return model_config


def describe_steps(config: TrainConfig, samples: int) -> str:
    """How many optimizer steps the Trainer would take for ``samples`` rows (blocks or samples)."""
    training = config.training
    batch = training.get("per_device_train_batch_size", 8) * training.get("gradient_accumulation_steps", 1)
    per_epoch = math.ceil(samples / batch)
    max_steps = training.get("max_steps", -1)
    epochs = training.get("num_train_epochs", 3)
    total = max_steps if max_steps and max_steps > 0 else math.ceil(per_epoch * epochs)
    unit = "block" if config.stage == "pt" else "sample"
    return (f"Training would take {counted(total, 'optimizer step')}: {counted(samples, unit)}, {batch} a step "
            f"(on one device), {counted(per_epoch, 'step')} an epoch.")


def counted(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def describe_output(config: TrainConfig, prepared: Prepared) -> str:
    """What ``infuse train`` would do with ``output_dir``. A checkpoint of other settings or data
    raises InfuseError, as training would stop on it."""
    from infuse.resume import checkpoints, sealed_processes
    from infuse.train import output_plan

    output_dir = Path(config.output_dir)
    if config.overwrite_output_dir:
        return (f"Output: {output_dir}: training would start at step 0 (overwrite_output_dir deletes its "
                f"{len(checkpoints(output_dir))} checkpoint(s)).")
    processes = sealed_processes(output_dir)  # preflight is one process; the run may be started with more
    _, plan, done = output_plan(config, prepared.fingerprint, prepared.eval_fingerprint, processes, clear=False)
    if done:
        return (f"Output: {output_dir} holds this run, trained to its last step and saved: `infuse train` "
                "would do nothing (--overwrite_output_dir true trains it again).")
    ignored = f" ({len(plan.ignored)} incomplete checkpoint(s) ignored)" if plan.ignored else ""
    if plan.checkpoint is None:
        return f"Output: {output_dir}: no checkpoint to resume; training would start at step 0{ignored}."
    with_processes = f" with {processes} processes, as it was started" if processes > 1 else ""
    if plan.finished:
        return (f"Output: {output_dir}: training stopped at {plan.checkpoint}; `infuse train`{with_processes} "
                f"would evaluate and save from it{ignored}.")
    state = json.loads((Path(plan.checkpoint) / "trainer_state.json").read_text())
    where = (f"step {state['global_step']:,}, the run made longer: {plan.lengthened}" if plan.lengthened
             else f"step {state['global_step']:,} of {state['max_steps']:,}")
    return (f"Output: {output_dir}: `infuse train`{with_processes} would resume from {plan.checkpoint} "
            f"({where}){ignored}.")


# --- pretraining ----------------------------------------------------------------------------------


def preflight_pretrain(config: TrainConfig, tokenizer, console: Console,
                       findings: Findings) -> Prepared:
    """Pack the documents as training would (reusing and filling its cache)."""
    from infuse.data.pretrain import largest_token_id
    from infuse.train import build_pretrain_data

    data = build_pretrain_data(config, tokenizer, console)
    stats = data.stats["train"]
    kept = stats["tokens"] / max(stats["blocks"] * stats["block_size"], 1)
    console.print(f"Every token is kept: {stats['tokens']:,} document tokens fill {kept:.1%} of the "
                  f"{stats['blocks']:,} blocks; the rest is {stats['padding']:,} padding positions, never "
                  "trained.", highlight=False)
    if stats["blocks"] == 1 and stats["padding"] > stats["block_size"] // 2:
        findings.warnings.append(f"the data fills less than half of one block of {stats['block_size']}: "
                                 "lower block_size, or add documents.")
    first = data.dataset[0]
    real = [token for token, mask in zip(first["input_ids"], first["attention_mask"], strict=True) if mask]
    show_text("First block", tokenizer.decode(real[:200]), console)
    return Prepared(largest_token_id(data.dataset, data.eval_dataset), len(data.dataset), data.fingerprint,
                    data.eval_fingerprint)


def show_text(title: str, text: str, console: Console) -> None:
    console.print(f"[bold]{title}[/bold]:")
    console.print(Text(clip(text)), highlight=False)


def clip(text: str, head: int = SHOWN_HEAD, tail: int = SHOWN_TAIL) -> str:
    if len(text) <= head + tail:
        return text
    return f"{text[:head]} … [{len(text) - head - tail:,} characters] … {text[-tail:]}"


# --- supervised fine-tuning -----------------------------------------------------------------------


def preflight_sft(config: TrainConfig, tokenizer, console: Console, findings: Findings) -> Prepared:
    """Tokenize the conversations as training would, show samples and check them."""
    from infuse.data.pretrain import largest_token_id
    from infuse.data.sft import evaluation_samples, prepare_template, read_sft_samples
    from infuse.data.templates import end_of_turn

    template = prepare_template(config, tokenizer, console, warn=findings.warnings.append)
    packing = "on" if config.packing else "off"
    console.print(f"Template: {config.template}; end of turn {end_of_turn(tokenizer, template)!r}; cutoff_len "
                  f"{config.cutoff_len} (overlong: {config.overlong}); packing {packing}.", highlight=False)
    samples = read_sft_samples(config.dataset, config, tokenizer, template, console)
    dataset, stats, skipped = samples.dataset, samples.stats, samples.loaded.skipped + samples.stats.skipped
    console.print(f"Truncated samples: {stats.truncated}; dropped samples: {sum(stats.dropped.values())}; "
                  f"skipped rows: {sum(skipped.values())}.", highlight=False)
    for index in shown_indices(len(dataset)):
        show_sample(index, len(dataset), dataset[index], tokenizer, console)
    check_end_of_turn(dataset, tokenizer, stats.end_of_turn, config.cutoff_len, console, findings)
    check_round_trip(samples.conversations, tokenizer, template, console, findings)
    check_batches(dataset, tokenizer, config.packing, console, findings)
    dataset, evaluation, _, eval_fingerprint = evaluation_samples(dataset, config, tokenizer, template, console)
    return Prepared(largest_token_id(dataset, evaluation), len(dataset), stats.fingerprint, eval_fingerprint)


def shown_indices(count: int, shown: int = SHOWN_SAMPLES) -> list[int]:
    """The first, middle and last sample: short and long ones, from different parts of the data."""
    shown = min(shown, count)
    return sorted({round(i * (count - 1) / max(shown - 1, 1)) for i in range(shown)})


def show_sample(index: int, count: int, sample: dict, tokenizer, console: Console) -> None:
    """One sample as training sees it: trained text in green, masked text dim. Without colours (a
    file, a pipe) trained text is written between ⟦ and ⟧."""
    from infuse.data.sft import IGNORE_INDEX, render_sample

    labels = sample["labels"]
    trained = sum(label != IGNORE_INDEX for label in labels[1:])
    plain = console.color_system is None
    legend = ("trained text between ⟦ ⟧" if plain else
              f"[{TRAINED_STYLE}]trained[/{TRAINED_STYLE}], [{MASKED_STYLE}]masked[/{MASKED_STYLE}]")
    console.print(f"[bold]Sample {index + 1} of {count:,}[/bold]: {len(labels)} tokens, {trained} trained "
                  f"({legend}).")
    text = Text()
    for piece, is_trained in clip_pieces(render_sample(sample["input_ids"], labels, tokenizer)):
        if is_trained and plain:
            piece = f"⟦{piece}⟧"
        text.append(piece, style=TRAINED_STYLE if is_trained else MASKED_STYLE)
    console.print(text, highlight=False)


def clip_pieces(pieces: list[tuple[str, bool]], head: int = SHOWN_HEAD, tail: int = SHOWN_TAIL
                ) -> list[tuple[str, bool]]:
    """The pieces of a long sample cut to its first ``head`` and last ``tail`` characters (the end
    shows whether the end-of-turn marker is trained), the cut marked in the text."""
    total = sum(len(text) for text, _ in pieces)
    if total <= head + tail:
        return pieces
    hidden_trained, position = 0, 0
    for text, trained in pieces:  # trained characters in the part cut out, so the cut hides none unsaid
        start, end = position, position + len(text)
        position = end
        hidden_trained += trained * max(0, min(end, total - tail) - max(start, head))
    trained_note = f", {hidden_trained:,} of them trained" if hidden_trained else ""
    clipped, position = [], 0
    for text, trained in pieces:
        start, end = position, position + len(text)
        position = end
        keep = text[: max(0, head - start)] if start < head else ""
        cut_mark = start < head <= end
        if cut_mark:
            keep += f" … [{total - head - tail:,} characters{trained_note}] … "
        keep += text[max(0, total - tail - start):] if end > total - tail else ""
        if keep:
            clipped.append((keep, trained))
    return clipped


def check_end_of_turn(dataset, tokenizer, marker: str, cutoff_len: int, console: Console,
                      findings: Findings) -> None:
    """Each sample should train the template's end-of-turn marker (or eos, for raw text rows), or
    the model never learns to stop. None doing so is a problem; some not doing so, a warning."""
    from infuse.data.sft import IGNORE_INDEX

    ends = tokenizer(marker, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    missing = cut = eos_only = 0
    for input_ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True):
        trained = [label if label != IGNORE_INDEX else None for label in labels]
        if contains(trained, ends):
            continue
        if eos and contains(trained, eos):
            eos_only += 1
            continue
        missing += 1
        cut += len(input_ids) == cutoff_len
    count = len(dataset)
    instead = f"; eos {tokenizer.eos_token!r} instead in {eos_only:,} (raw text rows)" if eos_only else ""
    console.print(f"End of turn {marker!r} trained in {count - missing - eos_only:,} of {count:,} samples{instead}.",
                  highlight=False)
    if missing == count:
        findings.problems.append(
            f"no sample trains the end-of-turn marker {marker!r} (nor eos), so the model would never learn "
            "to stop. For raw text rows, write each answer in [INST] form ending with eos; otherwise check "
            "that the template closes assistant turns and that cutoff_len does not cut them off."
        )
    elif missing:
        where = f" ({cut} of them cut at cutoff_len)" if cut else ""
        findings.warnings.append(f"{missing} sample(s) do not train the end-of-turn marker "
                                 f"{marker!r}{where}.")


def contains(sequence: list, part: list) -> bool:
    """Whether ``part`` occurs in ``sequence`` as a contiguous run."""
    width = len(part)
    return any(sequence[i:i + width] == part for i in range(len(sequence) - width + 1))


def check_round_trip(conversations, tokenizer, template: str, console: Console, findings: Findings) -> None:
    """decode(tokenize(render(messages))) must give back render(messages): otherwise the model is
    trained on other text than the template writes, and what it generates decodes differently."""
    from infuse.data.templates import chat_inputs, render

    checked, broken = 0, []
    for conversation in conversations:
        if conversation.text is not None:
            text = conversation.text
        else:
            try:
                text = render(tokenizer, template, *chat_inputs(conversation.messages, conversation.tools, template))
            except InfuseError:
                continue  # a row the template refuses is a bad row, counted above
        decoded = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"],
                                   skip_special_tokens=False)
        checked += 1
        if decoded != text:
            broken.append((conversation.where, text, decoded))
    console.print(f"Round trip text → tokens → text: {checked - len(broken):,} of {checked:,} conversations "
                  "come back unchanged.", highlight=False)
    if broken:
        where, text, decoded = broken[0]
        message = (f"{len(broken)} sample(s) do not survive tokenize → decode, e.g. {where}: "
                   f"{first_difference(text, decoded)}")
        if all(" ".join(t.split()) == " ".join(d.split()) for _, t, d in broken):
            findings.warnings.append(message + " (whitespace only).")
        else:
            findings.problems.append(message + ". The tokenizer changes the text (a normalizer, unknown "
                                     "characters); use the model's own tokenizer, or clean the data.")


def first_difference(text: str, decoded: str, context: int = 30) -> str:
    same = min(len(text), len(decoded))
    at = next((i for i in range(same) if text[i] != decoded[i]), same)
    start = max(0, at - context)
    return f"{text[start:at + context]!r} comes back as {decoded[start:at + context]!r}"


def check_batches(dataset, tokenizer, packing: bool, console: Console, findings: Findings) -> None:
    """Batch a few samples with the collator training uses and check no trained label is lost
    (as it would be if padding were masked by id with pad = eos) and no padding is trained."""
    from infuse.data.sft import IGNORE_INDEX, make_collator

    features = [dataset[i] for i in range(min(4, len(dataset)))]
    batch = make_collator(tokenizer, packing)(features)
    trained = sum(sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features)
    # Position 0 of a row is never predicted, whatever its label; packing masks each sample's first.
    kept = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    kind = "packed" if packing else f"padded ({tokenizer.padding_side})"
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    note = "; pad = eos, and padding is masked by position" if pad_is_eos and not packing else ""
    console.print(f"A {kind} batch of {len(features)} samples keeps {kept} of their {trained} trained "
                  f"labels{note}.", highlight=False)
    if kept != trained:
        findings.problems.append(
            f"batching changes the trained labels ({trained} in the samples, {kept} in the batch): padding "
            "is masked by token id (pad = eos masks the eos that ends each answer) or padding is trained."
        )
