"""Conversations → ``input_ids`` + ``labels`` in which only what the assistant says is trained.

Which characters belong to an assistant is found by rendering prefixes of the conversation with
the chat template, so it works for any template, without ``{% generation %}`` markers in it:

    prompt = render(messages[:i], add_generation_prompt=True)   # ... <|im_start|>assistant\\n
    upto   = render(messages[:i + 1])                           # ... answer<|im_end|>\\n

``upto[len(prompt):]`` is what the model must say at turn ``i``: the answer and the end-of-turn
marker (the whitespace after the marker is not trained; it is never generated). The whole
conversation is tokenized once and a token is trained where it overlaps such a span. This needs
every prefix rendering to be a prefix of the whole rendering; a template that breaks that is an
error, not a silent mislabel.

Rows of raw ``text`` are already in a template. In ``[INST]`` text (Llama 2, the guanaco style
``<s>[INST] q [/INST] a </s>``) what follows each ``[/INST]`` up to and including the next eos is
trained, so the model learns to answer and stop, not to write questions. Text without
``[/INST]`` is trained in full, like pretraining text.

Padding is masked by position (collators), never by token id: with ``pad = eos`` the eos that
ends an answer is still trained.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import DataCollatorWithFlattening

from infuse.config import OVERLONG_POLICIES
from infuse.data.evaluation import eval_counts, hold_out
from infuse.data.formats import BadRow, BadRows, Conversation, LoadStats, load_conversations
from infuse.data.templates import apply_template, chat_inputs, end_of_turn, missing_markers, render
from infuse.errors import InfuseError

IGNORE_INDEX = -100
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"
CHATML_ASSISTANT, CHATML_END = "<|im_start|>assistant\n", "<|im_end|>"

Span = tuple[int, int]


@dataclass
class SFTStats:
    """What tokenization kept, cut and dropped, and how much of it is trained."""

    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    end_of_turn: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "longest_sample": self.longest,
            "truncated": self.truncated,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "skipped_rows": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "skipped_examples": list(self.skipped_examples),
            "end_of_turn": self.end_of_turn,
        }


@dataclass(frozen=True)
class LossScope:
    """Which part of a conversation is trained. By default every assistant answer with its
    end-of-turn marker; ``mask_history`` keeps only the last answer (earlier turns are context, say
    from another model); ``train_on_prompt`` also trains what comes before the answers (system,
    user and tool turns, role headers), from the start or, with ``mask_history``, from the end of
    the answer before the last."""

    train_on_prompt: bool = False
    mask_history: bool = False

    def select(self, spans: list[Span]) -> list[Span]:
        if not spans:
            return spans
        if self.train_on_prompt:
            start = spans[-2][1] if self.mask_history and len(spans) > 1 else 0
            return [(start, spans[-1][1])]
        return spans[-1:] if self.mask_history else spans


# --- one conversation -----------------------------------------------------------------------------


def tokenize_conversation(conversation: Conversation, tokenizer, template: str, scope: LossScope = LossScope()
                          ) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation; labels are -100 except on the tokens ``scope``
    trains (by default assistant answers and their end-of-turn markers). Raises BadRow if the
    template cannot render the conversation."""
    # Only the last answer trained: the earlier ones need not be found, which a template that
    # rewrites earlier turns (drops their reasoning) would not allow.
    text, spans = trained_spans(conversation, tokenizer, template,
                                only_last=scope.mask_history and not scope.train_on_prompt)
    spans = scope.select(spans)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # only fast (Rust) tokenizers report character offsets
        raise InfuseError(f"{type(tokenizer).__name__} cannot map tokens to characters; SFT needs a fast "
                          "tokenizer (a tokenizer.json in the tokenizer folder).") from None
    input_ids = list(encoding["input_ids"])
    return input_ids, labels_for(input_ids, encoding["offset_mapping"], spans)


def trained_spans(conversation: Conversation, tokenizer, template: str,
                  only_last: bool = False) -> tuple[str, list[Span]]:
    """The text to tokenize and the character spans of it that are trained: every assistant answer's,
    or with ``only_last`` the last one's."""
    if conversation.text is not None:
        return conversation.text, text_spans(conversation.text, tokenizer.eos_token, tokenizer.bos_token)
    messages, tools = chat_inputs(conversation.messages, conversation.tools, template)
    full = _render(tokenizer, template, messages, tools)
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    spans = []
    for i in answers[-1:] if only_last else answers:
        upto = full if i == len(messages) - 1 else _render(tokenizer, template, messages[: i + 1], tools)
        _check_prefix(upto, full, i)
        spans.append((_answer_start(tokenizer, template, messages, tools, i, upto), len(upto.rstrip())))
    return full, spans


def _answer_start(tokenizer, template: str, messages: list[dict], tools, i: int, upto: str) -> int:
    """Where the assistant's words of turn ``i`` begin in ``upto`` (after the role header)."""
    before = ""
    if i > 0:
        prompt = _render(tokenizer, template, messages[:i], tools, add_generation_prompt=True)
        if upto.startswith(prompt):
            return len(prompt)
        # The generation prompt differs from the header written before a stored answer (some
        # templates add a thinking block to it): look for the answer after the earlier turns.
        before = _render(tokenizer, template, messages[:i], tools)
        _check_prefix(before, upto, i - 1)
    answer = messages[i]["content"].strip()
    start = upto.find(answer, len(before))
    if start < 0:
        raise InfuseError(
            f"the chat template changes the text of assistant turn {i}, so its tokens cannot be found "
            "to train them. Use `template: chatml` or `template: llama2`."
        )
    return start


def _check_prefix(part: str, whole: str, index: int) -> None:
    if not whole.startswith(part):
        raise InfuseError(
            f"the chat template renders the conversation up to message {index} differently from the same "
            "messages inside the whole conversation (it rewrites earlier turns, e.g. moves the system prompt "
            "or drops old reasoning), so the assistant tokens cannot be located. Use `template: chatml` or "
            "`template: llama2`, or a template that renders each turn the same wherever it stands."
        )


def _render(tokenizer, template: str, messages: list[dict], tools,
            add_generation_prompt: bool = False) -> str:
    try:
        return render(tokenizer, template, messages, tools, add_generation_prompt)
    except InfuseError as e:
        raise BadRow(str(e)) from None


def text_spans(text: str, eos: str | None, bos: str | None = None) -> list[Span]:
    """Trained spans of raw text: each answer after ``[/INST]`` up to and including eos, each
    ChatML assistant turn's words and its ``<|im_end|>``, or all of the text if it has neither."""
    if INST_CLOSE not in text:
        return chatml_spans(text) or [(0, len(text))]
    spans = []
    for close in _find_all(text, INST_CLOSE):
        start = close + len(INST_CLOSE)
        limit = text.find(INST_OPEN, start)
        limit = len(text) if limit < 0 else limit
        eos_at = text.find(eos, start, limit) if eos else -1
        if eos_at >= 0:
            end = eos_at + len(eos)
        else:  # an answer without eos: train up to the next question, not its bos
            tail = text[start:limit].rstrip()
            end = start + len(tail.removesuffix(bos).rstrip() if bos else tail)
        if text[start:end].replace(eos or "", "").strip():  # an empty answer teaches nothing
            spans.append((start, end))
    return spans


def chatml_spans(text: str) -> list[Span]:
    """The assistant turns of text written in ChatML, each from its first word through its ``<|im_end|>``."""
    spans = []
    for header in _find_all(text, CHATML_ASSISTANT):
        start = header + len(CHATML_ASSISTANT)
        end = text.find(CHATML_END, start)
        end = len(text) if end < 0 else end + len(CHATML_END)
        if text[start:end].replace(CHATML_END, "").strip():
            spans.append((start, end))
    return spans


def _find_all(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at >= 0:
        found.append(at)
        at = text.find(needle, at + len(needle))
    return found


def labels_for(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Labels that copy ``input_ids`` where a token overlaps a trained span, -100 elsewhere."""
    labels = [IGNORE_INDEX] * len(input_ids)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            labels[index] = input_ids[index]
    return labels


# --- the dataset ----------------------------------------------------------------------------------


def build_sft_dataset(
    conversations: list[Conversation],
    tokenizer,
    template: str,
    cutoff_len: int,
    overlong: str = "error",
    bad_rows: str = "error",
    console: Console | None = None,
    scope: LossScope = LossScope(),
):
    """Tokenize ``conversations`` into a ``datasets.Dataset`` of ``input_ids`` and ``labels``
    (trained as ``scope`` says).

    ``overlong`` says what happens to samples longer than ``cutoff_len`` tokens: ``truncate``
    (keep the first ``cutoff_len``), ``drop``, or ``error`` (one error listing them all). A sample
    left with no trained token after truncation is dropped; one that has none to begin with is a
    bad row. Everything cut, dropped or skipped is counted in the returned ``SFTStats``.
    """
    from datasets import Dataset

    if overlong not in OVERLONG_POLICIES:
        raise InfuseError(f"overlong: '{overlong}' is not one of {', '.join(OVERLONG_POLICIES)}.")
    stats = SFTStats(end_of_turn=end_of_turn(tokenizer, template))
    policy = BadRows(bad_rows, stats.skipped, stats.skipped_examples)
    digest = hashlib.sha256(f"{template}|{scope}".encode())
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    too_long: list[tuple[str, int]] = []
    with _progress(console) as progress:
        for conversation in progress.track(conversations, total=len(conversations)):
            sample = _tokenize_or_skip(conversation, tokenizer, template, policy, scope)
            if sample is not None:
                sample = _fit(sample, conversation.where, cutoff_len, overlong, stats, too_long)
            if sample is not None:
                _add(columns, sample, stats, digest)
    if too_long:
        raise InfuseError(_overlong_message(too_long, cutoff_len))
    if not columns["input_ids"]:
        raise InfuseError(nothing_left(stats.skipped + stats.dropped, stats.skipped_examples))
    stats.fingerprint = digest.hexdigest()[:16]
    return Dataset.from_dict(columns), stats


def nothing_left(counts: Counter, examples: list[str]) -> str:
    """The error for data of which no sample is left, with why each row went."""
    reasons = f" ({_counts(counts)})" if counts else ""
    shown = "".join(f"\n  e.g. {example}" for example in examples[:3])
    return f"No SFT sample is left to train on: every row was skipped or dropped{reasons}.{shown}"


def _tokenize_or_skip(conversation: Conversation, tokenizer, template: str, policy: BadRows, scope: LossScope):
    try:
        input_ids, labels = tokenize_conversation(conversation, tokenizer, template, scope)
    except BadRow as e:
        policy.handle(conversation.where, str(e), reason="template")
        return None
    except InfuseError as e:  # a template that cannot work: say where it showed
        raise InfuseError(f"{conversation.where}: {e}") from None
    if not trains_something(labels):
        policy.handle(conversation.where, "no token of this sample would be trained (no assistant answer).",
                      reason="nothing_trained")
        return None
    return input_ids, labels


def trains_something(labels: list[int]) -> bool:
    """Whether any token is predicted (the first one never is: nothing comes before it)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def _fit(sample, where: str, cutoff_len: int, overlong: str, stats: SFTStats, too_long: list):
    """Apply the overlong policy; None when the sample is dropped."""
    input_ids, labels = sample
    if len(input_ids) <= cutoff_len:
        return sample
    if overlong == "error":
        too_long.append((where, len(input_ids)))
        return None
    if overlong == "drop":
        stats.dropped["overlong"] += 1
        return None
    stats.truncated += 1
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if not trains_something(labels):
        # The answer lay entirely beyond the cut: a sample that teaches nothing is not kept.
        stats.dropped["nothing_trained_after_truncation"] += 1
        return None
    return input_ids, labels


def _add(columns: dict, sample, stats: SFTStats, digest) -> None:
    input_ids, labels = sample
    columns["input_ids"].append(input_ids)
    columns["labels"].append(labels)
    stats.samples += 1
    stats.tokens += len(input_ids)
    stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    stats.longest = max(stats.longest, len(input_ids))
    digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())


def _overlong_message(too_long: list[tuple[str, int]], cutoff_len: int) -> str:
    longest = max(length for _, length in too_long)
    shown = ", ".join(f"{where} ({length} tokens)" for where, length in too_long[:3])
    return (
        f"{len(too_long)} sample(s) are longer than cutoff_len {cutoff_len} (the longest has {longest} "
        f"tokens), e.g. {shown}. Raise cutoff_len, or set `overlong: truncate` (keep the first "
        f"{cutoff_len} tokens) or `overlong: drop` (leave them out); both are counted in the run report."
    )


def _progress(console: Console | None) -> Progress:
    # Drawn in a terminal only: a transient bar leaves a blank line in a log file.
    return Progress(TextColumn("[bold]tokenize"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=console is None or not console.is_terminal)


# --- batches --------------------------------------------------------------------------------------


class PackedCollator(DataCollatorWithFlattening):
    """Padding-free batches: the samples of a batch concatenated into one row.

    ``position_ids`` restart at 0 for every sample and no ``attention_mask`` is returned, which is
    how transformers' attention (sdpa, eager, flash) recognises packed samples and keeps each one
    from attending to the others. The first label of every sample is -100, so the last token of
    one sample is never asked to predict the first token of the next. Where each sample starts is
    also given as ``cu_seq_lens_q``/``_k`` (flash attention's names), which flash attention and
    ``infuse.packing.sample_attention`` use to attend within each sample without a mask.

    The batch also says ``use_cache=False``: transformers looks for packed samples only when the
    forward pass has no KV cache, and a model whose config turns the cache on would otherwise let
    the samples of a row attend to each other.

    With ``trained_logits_only`` the model is asked for logits only where a label is trained (see
    ``keep_trained_logits``); set it only for a model that ``infuse.packing.logits_where_trained``
    accepts (``infuse.packing.prepare_sft_batches`` does that).
    """

    def __init__(self, trained_logits_only: bool = False):
        super().__init__(return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=True)
        self.trained_logits_only = trained_logits_only

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        batch["use_cache"] = False
        return keep_trained_logits(batch) if self.trained_logits_only else batch


@dataclass
class PaddedCollator:
    """Padded batches with an attention mask; labels of padding are -100 by position, so a pad
    token that equals eos does not hide the real eos that ends an answer.

    With ``padding_side="left"`` the batch also carries ``position_ids`` that start at 0 on each
    sample's first real token, and that token's label is -100 (it would be predicted from
    padding), so every sample gets the loss it has alone, as with right padding.
    ``trained_logits_only`` as in ``PackedCollator``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    trained_logits_only: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            ids, labels = list(feature["input_ids"]), list(feature["labels"])
            pad = width - len(ids)
            if self.padding_side == "left":
                labels[0] = IGNORE_INDEX
            real = (ids, [1] * len(ids), labels)
            padding = ([self.pad_token_id] * pad, [0] * pad, [IGNORE_INDEX] * pad)
            for key, values, fill in zip(batch, real, padding, strict=True):
                batch[key].append(fill + values if self.padding_side == "left" else values + fill)
        tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        if self.padding_side == "left":
            tensors["position_ids"] = (tensors["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return keep_trained_logits(tensors) if self.trained_logits_only else tensors


def keep_trained_logits(batch: dict[str, Any]) -> dict[str, Any]:
    """Add what makes a transformers causal LM project and score only the positions whose next label
    is trained: ``logits_to_keep``, a boolean mask of them (the model then returns their logits
    flattened, in row order), and ``shift_labels``, the labels they predict in the same order
    (``ForCausalLMLoss`` then uses them instead of shifting ``labels``, and the Trainer counts them
    for ``num_items_in_batch``). Every other position predicts -100, so the loss is the same; the
    LM head and softmax skip the prompts. ``labels`` stay in the batch: the model computes a loss
    only when it gets them."""
    following = batch["labels"][:, 1:]
    trained = following != IGNORE_INDEX
    batch["logits_to_keep"] = torch.nn.functional.pad(trained, (0, 1), value=False)
    batch["shift_labels"] = following[trained]
    return batch


def make_collator(tokenizer, packing: bool = True):
    """The packed (padding-free) collator, or the padded one when ``packing`` is off."""
    if packing:
        return PackedCollator()
    if tokenizer.pad_token_id is None:
        raise InfuseError("packing: false needs a pad token, and the tokenizer has none.")
    return PaddedCollator(tokenizer.pad_token_id, padding_side=tokenizer.padding_side)


# --- what training sees ---------------------------------------------------------------------------


def render_sample(input_ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """The sample as ``(text, trained)`` pieces, consecutive tokens of the same kind decoded together
    (for showing trained and masked text in different colours)."""
    pieces = []
    pairs = zip(input_ids, labels, strict=True)
    for trained, group in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        ids = [token for token, _ in group]
        pieces.append((tokenizer.decode(ids, skip_special_tokens=False), trained))
    return pieces


def build_sft_data(config, tokenizer, console: Console | None = None):
    """The training data of an SFT run from a ``TrainConfig``: the template is set on ``tokenizer``
    (saved with the model), rows read, tokenized, reported, and the evaluation samples held out or
    read. Returns ``infuse.train.TrainData``."""
    from infuse.train import TrainData

    console = console or Console()
    template = prepare_template(config, tokenizer, console)
    samples = read_sft_samples(config.dataset, config, tokenizer, template, console)
    summary = {"train": {**samples.counts(), "template": config.template, "packing": config.packing}}
    dataset, evaluation, eval_summary, eval_fingerprint = evaluation_samples(samples.dataset, config, tokenizer,
                                                                             template, console)
    if evaluation is not None:
        summary["eval"] = eval_summary
    return TrainData(dataset, make_collator(tokenizer, config.packing), summary, samples.stats.fingerprint,
                     evaluation, eval_fingerprint)


def prepare_template(config, tokenizer, console: Console, warn: Callable[[str], None] | None = None) -> str:
    """Set the config's template on ``tokenizer`` and return it. Turn markers it writes that the
    tokenizer lacks (chatml on a Llama 2 tokenizer) are added as special tokens where the run trains
    the embeddings (full weights, or a model built from model_config): as one token the end of turn
    can be an eos id that generation stops on, where as text it is several tokens no stop rule sees.
    An adapter cannot train new rows of the base's embeddings; there the markers stay text, and
    ``warn`` (else the console) is told."""
    template = apply_template(tokenizer, config.template)
    missing = missing_markers(tokenizer, config.template, template)
    if not missing:
        return template
    from infuse.models import grows_with_tokenizer

    names = ", ".join(missing)
    if grows_with_tokenizer(config):
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        trained = ", which are trained" if config.finetuning_type == "full" else ""
        console.print(f"Added {names} to the tokenizer as special tokens ({len(tokenizer):,} tokens now): the "
                      f"template writes them, and the model gets embedding rows for them{trained}.", highlight=False)
    else:
        warning = (f"{names}, written by the template, {'is' if len(missing) == 1 else 'are'} not one token of "
                   f"this tokenizer, and a {config.finetuning_type} adapter cannot add tokens: the model learns to "
                   "end its answers with several tokens, which generation does not stop on. Use a template whose "
                   "end of turn the tokenizer has (llama2 ends answers with eos), or finetuning_type: full, "
                   "which adds them as tokens.")
        if warn is None:
            console.print(f"[yellow]{escape(warning)}", highlight=False)
        else:
            warn(warning)
    return template


@dataclass
class SFTSamples:
    """The conversations read from a config's files and the samples made of them, with the counts of
    what was skipped, cut and dropped on the way."""

    conversations: list[Conversation]
    loaded: LoadStats
    dataset: Any  # a datasets.Dataset of input_ids and labels (datasets is imported where it is used)
    stats: SFTStats

    def counts(self) -> dict[str, Any]:
        """Every count, rows skipped while reading and while tokenizing added together."""
        skipped = self.loaded.skipped + self.stats.skipped
        return {**self.loaded.to_dict(), **self.stats.to_dict(), "skipped_rows": sum(skipped.values()),
                "skipped_by_reason": dict(skipped),
                "skipped_examples": self.loaded.skipped_examples + self.stats.skipped_examples}


def read_sft_samples(sources: list[str], config, tokenizer, template: str, console: Console) -> SFTSamples:
    """The conversations in ``sources`` as training samples, as the config says; reported to ``console``."""
    conversations, loaded = load_conversations(sources, config.dataset_format, config.bad_rows, config.placeholders)
    if not conversations:
        raise InfuseError(nothing_left(loaded.skipped, loaded.skipped_examples))
    dataset, stats = build_sft_dataset(conversations, tokenizer, template, config.cutoff_len, config.overlong,
                                       config.bad_rows, console, loss_scope(config))
    report_sft_data(loaded, stats, tokenizer, template, conversations, console)
    return SFTSamples(conversations, loaded, dataset, stats)


def loss_scope(config) -> LossScope:
    return LossScope(config.train_on_prompt, config.mask_history)


def evaluation_samples(dataset, config, tokenizer, template: str, console: Console):
    """``(train, eval, eval counts, eval fingerprint)``: ``val_size`` of ``dataset`` held out, or the
    samples of ``eval_dataset`` read like the training data; eval is None when the config has neither."""
    if config.val_size:
        dataset, evaluation = hold_out(dataset, config.val_size, config.seed, "samples", console)
        return dataset, evaluation, eval_counts(evaluation, config), ""
    if config.eval_dataset:
        console.print("Evaluation data:", highlight=False)
        evaluation = read_sft_samples(config.eval_dataset, config, tokenizer, template, console)
        counts = {**evaluation.counts(), **eval_counts(evaluation.dataset, config)}
        return dataset, evaluation.dataset, counts, evaluation.stats.fingerprint
    return dataset, None, {}, ""


def report_sft_data(loaded, stats: SFTStats, tokenizer, template: str, conversations,
                    console: Console) -> None:
    """Print what was read and what will be trained, with every cut, drop and skip counted."""
    share = stats.trained_tokens / max(stats.tokens, 1)
    formats = ", ".join(sorted(set(loaded.formats.values())))
    console.print(f"SFT data: {loaded.rows} rows ({formats}) → {stats.samples} samples, "
                  f"{stats.tokens:,} tokens, {stats.trained_tokens:,} trained ({share:.0%}); "
                  f"longest {stats.longest} tokens.")
    skipped = loaded.skipped + stats.skipped
    for label, counts in (("Skipped rows", skipped), ("Dropped samples", stats.dropped)):
        if counts:
            console.print(f"[yellow]{label}: {sum(counts.values())} ({_counts(counts)}).")
    for example in (loaded.skipped_examples + stats.skipped_examples)[:3]:
        console.print(f"[yellow]  e.g. {escape(example)}")
    if stats.truncated:
        console.print(f"[yellow]Truncated to cutoff_len: {stats.truncated} samples.")
    if loaded.unfilled_placeholders:
        console.print(f"[yellow]Placeholders left unfilled: {_counts(loaded.unfilled_placeholders)}; "
                      "give their values with `placeholders: {name: value}`.")
    if any(c.text and INST_CLOSE in c.text for c in conversations) and INST_CLOSE not in template:
        console.print("[yellow]The data is written in [INST] form but the template is not; set "
                      "`template: llama2` so prompts at inference look like the training data.")


def _counts(counts: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
