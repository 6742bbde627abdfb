"""Documents → fixed-size token blocks for (continued) pretraining, with every token kept.

Each document is tokenized without special tokens; infuse puts the separators in itself: EOS after
every document, and BOS before every document when the tokenizer would add one on its own. The
documents are joined in order and cut into rows of ``block_size`` tokens, so a document that does
not fit carries on into the next block. The last, partial block is kept, padded, with labels -100
and attention mask 0 on the padding: unlike the classic ``group_texts`` recipe, which drops the
remainder of every batch, no token is lost.

The blocks are cached under ``cache_dir/pretrain-<fingerprint>``. The fingerprint covers the
sources' contents, the tokenizer, ``block_size``, ``text_field`` and the format below, so a run
started again on unchanged inputs reuses the blocks and a changed file tokenizes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value, load_from_disk
from rich.console import Console
from rich.markup import escape
from transformers import default_data_collator

from infuse.data.formats import BadRow, detect_format, parse_row
from infuse.data.records import RECORD_SUFFIXES, missing_source, read_records, text_of
from infuse.data.templates import chat_inputs, render, resolve_template
from infuse.errors import InfuseError

IGNORE_INDEX = -100
# Bump when the blocks written for the same inputs change, so old caches are not reused.
FORMAT_VERSION = 2
LINE_SUFFIXES = (".txt",)
WHOLE_FILE_SUFFIXES = (".md",)
DOCUMENT_SUFFIXES = RECORD_SUFFIXES + LINE_SUFFIXES + WHOLE_FILE_SUFFIXES
TOKENIZE_BATCH = 1000


@dataclass
class PackStats:
    """What went into the blocks: every document token is in exactly one block."""

    documents: int = 0
    """Documents packed (empty ones are not among them)."""
    tokens: int = 0
    """Tokens of the documents, separators (BOS/EOS) included; padding is not."""
    blocks: int = 0
    block_size: int = 0
    padding: int = 0
    """Pad positions, all in the last block (labels -100, attention mask 0)."""
    empty_documents_skipped: int = 0
    """Documents with no text but whitespace: they add nothing and are counted here."""
    shuffled_copies: int = 0
    """Documents among ``documents`` that are sentence-shuffled copies (``sentence_shuffles``)."""
    openers_moved: int = 0
    """Sentences of those copies whose opening phrase went to their end (``move_openers``)."""
    sentence_turns: int = 0
    """Documents among ``documents`` that are chat turns of one sentence (``sentence_turns``)."""
    skipped_subjects: list[str] = field(default_factory=list)
    """Words whose documents were left out (``replay_skip_subjects``)."""
    documents_skipped_for_subjects: int = 0
    sources: list[str] = field(default_factory=list)
    hard_wrapped_files: list[str] = field(default_factory=list)
    """``.txt`` files that read like prose wrapped at a fixed width (see ``looks_hard_wrapped``)."""
    fingerprint: str = ""
    """The data fingerprint (see ``data_fingerprint``); empty when packed without one."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SENTENCE_MARKS = (".", "!", "?")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"\w+")
OPENER = re.compile(r"(?P<opener>(?P<first>\w+)(?: [a-z0-9]\w*){0,3}), (?P<rest>[a-z].*?)(?P<end>[.!?]?)$")
TURN_REQUESTS = ("Tell me something you know.", "What can you tell me?", "Share a fact with me.", "What do you know?")
"""The user's side of a sentence turn: requests that ask for no fact in particular."""
MIN_TURN_WORDS = 5  # a title or a menu entry is not a statement worth a turn
SUBJECT_MAX_SHARE = 0.2
"""A subject is named by at most this share of the replay documents: a particular product or
place, not the general topic both corpora share."""
NAME_MAX_SHARE = 0.5  # a word in more of the replay documents than this is not part of a name
MAX_NAME_WORDS = 4
SUBJECT_RULE = 2  # bump when subjects_of would pick other subjects for the same documents


# --- sources → texts ------------------------------------------------------------------------------


def source_files(sources: list[str | Path]) -> list[Path]:
    """The document files named by ``sources``: files as given, folders expanded recursively in
    sorted order (hidden files left out). Missing paths and other file types are errors."""
    files: list[Path] = []
    for name in sources:
        source = Path(name)
        if source.is_dir():
            files += _folder_files(source)
        elif source.is_file():
            _check_suffix(source)
            files.append(source)
        else:
            raise missing_source(name, f"Turn pages into documents first: `infuse ingest {name} --output "
                                       "docs.jsonl`, and train on docs.jsonl.")
    return files


def _folder_files(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(folder)))
    if not found:
        raise InfuseError(f"{folder}: the folder holds no files. Put documents in it or leave it out.")
    for path in found:
        _check_suffix(path)
    return found


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in DOCUMENT_SUFFIXES:
        raise InfuseError(
            f"{path}: '{path.suffix or path.name}' files cannot be read as pretraining text (it reads "
            f"{', '.join(DOCUMENT_SUFFIXES)}). Turn web pages, HTML and PDF into documents first with "
            f"`infuse ingest {path} --output docs.jsonl` and train on docs.jsonl."
        )


def load_texts(sources: list[str | Path], text_field: str = "text", tokenizer=None) -> list[str]:
    """The documents of ``sources`` in order: one per JSON/JSONL/Parquet row (its ``text_field``),
    one per non-empty line of a ``.txt`` file, one per ``.md`` file (its words, without the marks).
    Folders are read recursively in sorted order. With a ``tokenizer`` that has a chat template, a
    conversation row (messages, sharegpt, alpaca) is a document too, rendered by that template.
    Raises InfuseError when nothing but whitespace is found."""
    texts: list[str] = []
    for path in source_files(sources):
        texts += _texts_of(path, text_field, tokenizer)
    if not any(text.strip() for text in texts):
        named = ", ".join(map(str, sources)) or "no source"
        raise InfuseError(f"empty corpus: {named} hold no text. Point `dataset:` at documents with text.")
    return texts


def _texts_of(path: Path, text_field: str, tokenizer=None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return [_row_text(row, where, text_field, tokenizer) for row, where in read_records(path)]
    text = _read_text(path)
    if suffix in WHOLE_FILE_SUFFIXES:  # Markdown: its words, as `infuse ingest` reads them
        from infuse.ingest.extract import markdown_text

        return [markdown_text(text)]
    # Like the datasets `text` loader: a document a line, without its line break; blank lines
    # separate documents and are not documents themselves.
    return [line for line in text.split("\n") if line.strip()]


def looks_hard_wrapped(path: Path, min_lines: int = 10) -> bool:
    """Whether a ``.txt`` file reads like prose broken into lines of a fixed width: short lines (nine
    in ten of at most 100 characters), most of them ending mid-sentence."""
    lines = [line.rstrip() for line in _read_text(path).split("\n") if line.strip()]
    if len(lines) < min_lines:
        return False
    lengths = sorted(len(line) for line in lines)
    mid_sentence = sum(not line.endswith((*SENTENCE_MARKS, '"', "'", ")", ":")) for line in lines)
    return lengths[len(lengths) * 9 // 10 - 1] <= 100 and mid_sentence > len(lines) / 2


def _row_text(row: dict, where: str, text_field: str, tokenizer) -> str:
    """The row's ``text_field``; or, for a conversation row, the conversation in the tokenizer's chat
    template, so a chat model's own chat data can be replayed while new text is infused into it."""
    format_name = detect_format(row) if text_field not in row and getattr(tokenizer, "chat_template", None) else None
    if format_name is None:
        return text_of(row, where, text_field)
    try:
        conversation = parse_row(row, format_name)
    except BadRow as e:
        raise InfuseError(f"{where}: {e}") from None
    if conversation.text is not None:
        return Conversation(conversation.text)
    template = resolve_template(tokenizer)
    return Conversation(render(tokenizer, template, *chat_inputs(conversation.messages, conversation.tools, template)))


class Conversation(str):
    """A conversation rendered as one text: its turns keep their order (``shuffled_copies`` makes no
    copies of it)."""


def shuffled_copies(texts: list[str], copies: int, seed: int = 0,
                    move_openers: bool = False) -> tuple[list[str], int]:
    """``copies`` versions of each text with its sentences in a new random order (seeded), and how
    many of their sentences had an opening phrase moved.

    A fact read once in one context is easily stored as "what comes after that context"; read in
    several orders, it has to be tied to the words of its own sentence, which is how a question
    later asks for it. Texts of a single sentence have nothing to reorder and get no copies;
    conversations get none either. With ``move_openers``, each sentence of a copy has even odds of
    having its opening phrase moved to its end (see ``move_opener``).
    """
    rng = random.Random(seed)
    lowercase = lowercase_words(texts) if move_openers else set()
    out, moved = [], 0
    for text in texts:
        sentences = split_sentences(text)
        if len(sentences) < 2 or isinstance(text, Conversation):
            continue
        for _ in range(copies):
            order = sentences[:]
            rng.shuffle(order)
            if move_openers:
                reworded = [move_opener(s, lowercase) if rng.random() < 0.5 else s for s in order]
                moved += sum(new != old for new, old in zip(reworded, order, strict=True))
                order = reworded
            out.append(join_sentences(order))
    return out, moved


def sentence_turns(texts: list[str], turns: int, tokenizer, seed: int = 0) -> list[Conversation]:
    """``turns`` conversations for each sentence of ``texts``: a request from ``TURN_REQUESTS``
    answered by the sentence, rendered in the tokenizer's chat template; in half of them the
    sentence has its opening phrase moved to its end (see ``move_opener``).

    A chat model answers from what it learned to say at the start of its own turn. Having read a
    new fact only inside documents, it completes the document's sentence with the new fact but,
    asked in a chat, still gives what its chat data told it (a re-engined ship's old maker). Said
    as an answer, the fact is there when a turn starts. Only sentences of at least
    ``MIN_TURN_WORDS`` words that end in . ! or ? become turns; conversations become none.
    """
    if not turns:
        return []
    try:
        template = resolve_template(tokenizer)
    except InfuseError:  # its message names `template:`, which stage: pt does not read
        raise InfuseError("sentence_turns: the tokenizer has no chat template, and sentence turns are chat "
                          "conversations. Use them with a chat model, or set sentence_turns: 0.") from None
    rng = random.Random(seed)
    lowercase = lowercase_words(texts)
    out = []
    for text in texts:
        if isinstance(text, Conversation):
            continue
        for sentence in split_sentences(text):
            if len(sentence.split()) < MIN_TURN_WORDS or not sentence.endswith(SENTENCE_MARKS):
                continue
            for _ in range(turns):
                answer = move_opener(sentence, lowercase) if rng.random() < 0.5 else sentence
                messages = [{"role": "user", "content": rng.choice(TURN_REQUESTS)},
                            {"role": "assistant", "content": answer}]
                out.append(Conversation(render(tokenizer, template, messages)))
    return out


def move_opener(sentence: str, lowercase: set[str]) -> str:
    """The sentence with a short phrase before its first comma moved to its end: "From this week,
    the ship is powered by X." becomes "The ship is powered by X from this week."

    A fact read only after such a phrase is stored as what follows the phrase, and is not recalled
    when a question starts from what the fact is about. Only phrases of up to four words whose
    first word also appears in lower case in ``lowercase`` (so not a name: "Ardlow, the port, ...")
    and whose other words are lower case or numbers move, and only before a lower-case word, so
    the meaning stays: "If it rains, the ferry waits." becomes "The ferry waits if it rains."
    """
    match = OPENER.match(sentence)
    if not match or match["first"].lower() not in lowercase:
        return sentence
    opener, rest, end = match["opener"], match["rest"], match["end"]
    return f"{rest[0].upper()}{rest[1:]} {opener[0].lower()}{opener[1:]}{end}"


def lowercase_words(texts: list[str]) -> set[str]:
    return {word for text in texts for word in WORD.findall(text) if word.islower()}


def split_sentences(text: str) -> list[str]:
    """Sentences (and lines, such as a title) of ``text``: cut after . ! or ? before whitespace."""
    return [part for line in text.splitlines() for part in SENTENCE_END.split(line.strip()) if part]


def join_sentences(sentences: list[str]) -> str:
    """Sentences back into text: a space after a sentence, a line break after a line (a title)."""
    return "".join(s + (" " if s.endswith(SENTENCE_MARKS) else "\n") for s in sentences).strip()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InfuseError(f"{path}: not UTF-8 text (byte {e.start}). Save it as UTF-8.") from None


# --- texts → blocks -------------------------------------------------------------------------------


def separators(tokenizer) -> tuple[list[int], list[int]]:
    """``(before, after)`` each document: ``[bos]`` before when the tokenizer adds a BOS by itself
    (as Llama's does), and ``[eos]`` after, always."""
    if tokenizer.eos_token_id is None:
        raise InfuseError(
            "The tokenizer has no eos token, which pretraining puts between documents. "
            "Set one (tokenizer.eos_token = '...') and save the tokenizer again."
        )
    return ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []), [tokenizer.eos_token_id]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts encodings with BOS (by its post-processor or ``add_bos_token``)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids and ids[0] == bos) or bool(getattr(tokenizer, "add_bos_token", False))


def pack_documents(
    texts: list[str], tokenizer, block_size: int, num_proc: int | None = None
) -> tuple[Dataset, PackStats]:
    """Tokenize ``texts`` and cut them into blocks of ``block_size`` tokens.

    Returns a dataset with ``input_ids``, ``attention_mask`` and ``labels``, each a list of
    ``block_size`` ints (so ``default_data_collator`` batches it), and the counts. The documents
    are joined in order with their separators; only the last block has padding.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise InfuseError(f"block_size: expected a positive integer, got {block_size!r}.")
    documents = [text for text in texts if text.strip()]
    if not documents:
        raise InfuseError("empty corpus: the documents hold no text, so there is nothing to pretrain on.")
    ids = token_stream(documents, tokenizer, num_proc)
    blocks = cut_blocks(ids, block_size, pad_id(tokenizer))
    stats = PackStats(
        documents=len(documents),
        tokens=len(ids),
        blocks=len(blocks),
        block_size=block_size,
        padding=len(blocks) * block_size - len(ids),
        empty_documents_skipped=len(texts) - len(documents),
    )
    return blocks, stats


def pad_id(tokenizer) -> int:
    """Pad with the pad token, or with EOS when there is none (the padding is masked by position)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def token_stream(documents: list[str], tokenizer, num_proc: int | None = None) -> np.ndarray:
    """All documents' tokens with their separators, in order, as one int32 array.

    Tokenization runs in batched ``Dataset.map`` calls (``num_proc`` processes); the lists it
    produces are joined by reading the Arrow buffers as numpy arrays, without Python loops.
    """
    before, after = separators(tokenizer)
    workers = min(num_proc or 1, len(documents))
    tokenized = Dataset.from_dict({"text": documents}).map(
        _tokenize_batch,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        num_proc=workers if workers > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "before": before, "after": after},
        remove_columns=["text"],
        features=Features({"input_ids": List(Value("int32"))}),
        desc="Tokenizing documents",
    )
    column = tokenized.data.table.column("input_ids")
    return np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks if len(chunk)])


def _tokenize_batch(batch: dict[str, list], tokenizer, before: list[int], after: list[int]) -> dict:
    encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [before + ids + after for ids in encoded]}


def cut_blocks(ids: np.ndarray, block_size: int, pad: int) -> Dataset:
    """Rows of ``block_size`` tokens; the last row padded with ``pad``, masked and label -100 there."""
    count = -(-len(ids) // block_size)
    input_ids = np.full(count * block_size, pad, dtype=np.int32)
    input_ids[: len(ids)] = ids
    labels = input_ids.copy()
    labels[len(ids):] = IGNORE_INDEX
    attention_mask = np.zeros(count * block_size, dtype=np.int8)
    attention_mask[: len(ids)] = 1
    columns = {
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(input_ids), block_size),
        "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(attention_mask), block_size),
        "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels), block_size),
    }
    features = Features({
        "input_ids": List(Value("int32"), length=block_size),
        "attention_mask": List(Value("int8"), length=block_size),
        "labels": List(Value("int32"), length=block_size),
    })
    return Dataset.from_dict(columns, features=features)


class DocumentCollator:
    """Batches blocks so that no token attends across a document boundary.

    Position ids restart after every ``separator`` (the EOS between documents) and the attention
    mask is left out: transformers then builds a block-diagonal causal mask from the restarting
    positions, the same path padding-free SFT packing takes. Leaving the mask out is safe because
    padding only ever sits at the end of the last block, where causal attention never looks back
    at it and its labels are -100. ``use_cache=False`` rides along because transformers only looks
    for restarting positions when no KV cache is in play.
    """

    def __init__(self, separator: int):
        self.separator = separator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = default_data_collator(features)
        batch.pop("attention_mask", None)
        batch["position_ids"] = document_positions(batch["input_ids"], self.separator)
        batch["use_cache"] = False
        return batch


def document_positions(input_ids: torch.Tensor, separator: int) -> torch.Tensor:
    """Positions counted from the start of each document: 0 after every ``separator`` token."""
    index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == separator
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


# --- fingerprint and cache ------------------------------------------------------------------------


def data_fingerprint(sources: list[str | Path], tokenizer, block_size: int, text_field: str = "text",
                     sentence_shuffles: int = 0, seed: int = 0,
                     skip_subjects_of: list[str | Path] | None = None, move_openers: bool = False,
                     turns: int = 0) -> str:
    """16 hex digits that change when the blocks would: the sources' contents (in order, with how
    each file is read), the tokenizer and its separators, ``block_size``, ``text_field``, the
    shuffled copies and sentence turns asked for, the documents whose subjects are left out, the
    format."""
    shuffles = f"{sentence_shuffles}:{seed}{':openers' * move_openers}" if sentence_shuffles else "0"
    shuffles += f"|turns {turns}:{seed}" if turns else ""
    digest = hashlib.sha256(f"infuse-pretrain v{FORMAT_VERSION}|{block_size}|{text_field}|{shuffles}|".encode())
    for path in source_files(sources):
        digest.update(f"{path.suffix.lower()}:{_file_sha256(path)}|".encode())
    for path in source_files(skip_subjects_of or []):
        digest.update(f"skip subjects (names v{SUBJECT_RULE}) of {path.suffix.lower()}:{_file_sha256(path)}|".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the fast tokenizer's full JSON (vocabulary,
    merges, normalizer, pre- and post-processing, added tokens) or the vocabulary of a slow one,
    plus the separators and pad id infuse uses."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    before, after = separators(tokenizer)
    specials = json.dumps({"before": before, "after": after, "pad": pad_id(tokenizer),
                           "chat_template": tokenizer.chat_template})  # it renders conversation rows
    return hashlib.sha256((model + specials).encode()).hexdigest()


def build_pretrain_dataset(
    sources: list[str | Path],
    tokenizer,
    block_size: int,
    *,
    text_field: str = "text",
    cache_dir: Path | None = None,
    num_proc: int | None = None,
    console: Console | None = None,
    sentence_shuffles: int = 0,
    seed: int = 0,
    skip_subjects_of: list[str | Path] | None = None,
    move_openers: bool = False,
    turns: int = 0,
    label: str = "Pretraining data",
) -> tuple[Dataset, PackStats]:
    """Blocks of ``sources`` for pretraining, from the cache when the inputs are unchanged.

    ``sentence_shuffles`` adds that many copies of every document with its sentences in a new
    order, and ``move_openers`` rewords some of their sentences (see ``shuffled_copies``); ``turns``
    adds that many chat turns made of each sentence (see ``sentence_turns``).
    Documents that name a subject of the documents in ``skip_subjects_of`` are left out and counted
    (see ``subjects_of``).

    Without ``cache_dir`` the data is always packed anew. The counts are printed to ``console``
    (a new one when None) after ``label`` and, with a cache, saved next to the blocks as ``stats.json``.
    """
    console = console or Console()
    fingerprint = data_fingerprint(sources, tokenizer, block_size, text_field, sentence_shuffles, seed,
                                   skip_subjects_of, move_openers, turns)
    cached = Path(cache_dir) / f"pretrain-{fingerprint}" if cache_dir else None
    if cached is not None and cached.is_dir():
        dataset, stats = load_packed(cached)
        console.print(f"Reusing the tokenized pretraining data in {cached} (inputs unchanged).",
                      highlight=False)
    else:
        texts = load_texts(sources, text_field, tokenizer)
        subjects = subjects_of(load_texts(skip_subjects_of, text_field, tokenizer), texts) if skip_subjects_of else []
        kept = texts
        if subjects:  # otherwise no text is scanned: the corpus may be large
            mentioned = mentions_of(subjects)
            kept = [text for text in texts if not mentioned.search(text)]
        copies, moved = shuffled_copies(kept, sentence_shuffles, seed, move_openers)
        conversations = sentence_turns(kept, turns, tokenizer, seed)
        dataset, stats = pack_documents(kept + conversations + copies, tokenizer, block_size, num_proc)
        stats.shuffled_copies = len(copies)
        stats.sentence_turns = len(conversations)
        stats.openers_moved = moved
        stats.skipped_subjects = subjects
        stats.documents_skipped_for_subjects = len(texts) - len(kept)
        stats.hard_wrapped_files = [str(path) for path in source_files(sources)
                                    if path.suffix.lower() in LINE_SUFFIXES and looks_hard_wrapped(path)]
        stats.fingerprint = fingerprint
        if cached is not None:
            save_packed(dataset, stats, cached)
    stats.sources = [str(source) for source in sources]
    report_pack_stats(stats, console, label)
    return dataset, stats


def save_packed(dataset: Dataset, stats: PackStats, folder: Path) -> None:
    """Write the blocks and ``stats.json`` into a temporary folder and rename it into place, so a
    run killed while saving never leaves a half-written cache behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial / "dataset"))
    (partial / "stats.json").write_text(json.dumps(stats.to_dict(), indent=2))
    try:
        partial.rename(folder)
    except OSError:
        # Another run saved the same fingerprint first: its blocks are the same.
        shutil.rmtree(partial, ignore_errors=True)


def load_packed(folder: Path) -> tuple[Dataset, PackStats]:
    stats = PackStats(**json.loads((folder / "stats.json").read_text()))
    return load_from_disk(str(folder / "dataset")), stats


def report_pack_stats(stats: PackStats, console: Console, label: str = "Pretraining data") -> None:
    """One line with every count; a second, in yellow, when empty documents were skipped."""
    console.print(
        f"{label}: {stats.documents:,} documents → {stats.tokens:,} tokens → "
        f"{stats.blocks:,} blocks of {stats.block_size:,} tokens "
        f"({stats.padding:,} padding positions in the last block); fingerprint {stats.fingerprint or '-'}.",
        highlight=False,
    )
    if stats.shuffled_copies:
        moved = f" ({stats.openers_moved:,} sentences with their opening phrase moved)" if stats.openers_moved else ""
        console.print(f"Of those documents, {stats.shuffled_copies:,} are sentence-shuffled copies{moved}.",
                      highlight=False)
    if stats.sentence_turns:
        console.print(f"Of those documents, {stats.sentence_turns:,} are chat turns of one sentence each.",
                      highlight=False)
    if stats.documents_skipped_for_subjects:
        console.print(f"Left out {stats.documents_skipped_for_subjects:,} documents that name a subject of the "
                      f"new documents ({', '.join(stats.skipped_subjects)}): replay_skip_subjects.",
                      highlight=False)
    for path in stats.hard_wrapped_files:
        console.print(f"[yellow]{escape(path)} reads like text wrapped at a fixed width, but each line of a .txt "
                      "file is a document of its own, ended with eos (and with isolate_documents, attention "
                      "stops there). Put each paragraph on one line, or turn the file into one document with "
                      f"`infuse ingest {escape(path)} --output docs.jsonl`.", highlight=False)
    if stats.empty_documents_skipped:
        skipped = stats.empty_documents_skipped
        console.print(f"[yellow]Empty documents skipped: {skipped:,} (no text in them).", highlight=False)


# --- replay ---------------------------------------------------------------------------------------


def subjects_of(new_texts: list[str], replay_texts: list[str]) -> list[str]:
    """The names the new documents are about that the replay documents also name.

    A name is a run of adjacent words with a capital or a digit, such as "Gannet Hollow" or "F9";
    words that most replay documents share, such as "The" or the provider, break a run. A new
    document's subject is the name, or part of one, said in the most of its sentences among those
    rare in the replay data (named by at most ``SUBJECT_MAX_SHARE`` of its documents): the product
    an announcement is about, rather than the provider or a port every document names. A part said
    exactly as often as its whole name does not count on its own, so a page about the "Heather
    Venture" is not about every ship with "Heather" or "Venture" in its name. Subjects the replay
    data never names are left out: they cannot conflict with it.
    """
    frequency = Counter(word for text in replay_texts for word in set(WORD.findall(text)))
    shared = NAME_MAX_SHARE * len(replay_texts)

    def spans(text: str) -> set[str]:
        return set(name_spans(text, lambda word: not word.islower() and frequency[word] <= shared))

    named_by = Counter(name for text in replay_texts for name in spans(text))
    rare = SUBJECT_MAX_SHARE * len(replay_texts)
    subjects: set[str] = set()
    for text in new_texts:
        per_sentence = Counter(name for sentence in split_sentences(text) for name in spans(sentence)
                               if named_by[name] <= rare)
        most = max(per_sentence.values(), default=0)
        if most >= 2:  # a name said once is not what the document is about
            top = [name for name, count in per_sentence.items() if count == most]
            subjects |= {name for name in top if not any(is_part(name, whole) for whole in top)}
    return sorted(name for name in subjects if named_by[name])


def is_part(name: str, whole: str) -> bool:
    return name != whole and f" {name} " in f" {whole} "


def name_spans(sentence: str, is_name) -> list[str]:
    """Every run of adjacent words of ``sentence`` that ``is_name`` accepts, and every part of one,
    up to ``MAX_NAME_WORDS`` words (a long run of capitalised words is a heading, not a name)."""
    runs: list[list[str]] = []
    previous_end = None
    for match in WORD.finditer(sentence):
        if not is_name(match.group()):
            previous_end = None
            continue
        if previous_end is not None and sentence[previous_end : match.start()].isspace():
            runs[-1].append(match.group())
        else:
            runs.append([match.group()])
        previous_end = match.end()
    return [" ".join(run[i:j]) for run in runs for i in range(len(run))
            for j in range(i + 1, min(len(run), i + MAX_NAME_WORDS) + 1)]


def mentions_of(names: list[str]) -> re.Pattern:
    """A pattern that finds any of ``names`` as whole words (any whitespace between their words);
    with no names, one that finds nothing."""
    if not names:
        return re.compile(r"(?!)")
    longest_first = sorted(names, key=len, reverse=True)  # "Gannet Hollow" before a "Gannet" it contains
    spelled = (r"\s+".join(map(re.escape, name.split())) for name in longest_first)
    return re.compile(r"(?<!\w)(" + "|".join(spelled) + r")(?!\w)")


def mix_replay(dataset: Dataset, replay: Dataset, ratio: float, seed: int = 42) -> tuple[ReplayMix, dict]:
    """``dataset`` with blocks of ``replay`` added so they make up ``ratio`` of each epoch.

    Returns the mix and its counts (``train_blocks``, ``replay_blocks`` per epoch,
    ``replay_available``, ``replay_share``).
    """
    if not 0 <= ratio < 1:
        raise InfuseError(f"replay_ratio: expected a number in [0, 1), got {ratio!r}.")
    if not len(replay):
        raise InfuseError("replay_dataset: it holds no blocks to mix in.")
    wanted = round(len(dataset) * ratio / (1 - ratio))
    counts = {
        "train_blocks": len(dataset),
        "replay_blocks": wanted,
        "replay_available": len(replay),
        "replay_share": round(wanted / (len(dataset) + wanted), 4),
    }
    return ReplayMix(dataset, replay, wanted, seed), counts


class ReplayMix(torch.utils.data.Dataset):
    """The new blocks followed by ``replay_blocks`` replay blocks that change with the epoch.

    Epochs walk on through shuffled rounds of the replay data (round ``r`` is a permutation seeded
    by ``(seed, r)``), so a run of several epochs rehearses as much of the replay corpus as it has
    room for, instead of the same subset every epoch; no block repeats before all were used. The
    trainer's sampler shuffles the order; ``set_epoch`` picks the epoch's blocks (a callback calls it).
    """

    def __init__(self, dataset: Dataset, replay: Dataset, replay_blocks: int, seed: int = 42):
        self.dataset, self.replay, self.replay_blocks, self.seed = dataset, replay, replay_blocks, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        first = epoch * self.replay_blocks
        rounds = range(first // len(self.replay), -(-(first + self.replay_blocks) // len(self.replay)))
        drawn = [np.random.default_rng([self.seed, r]).permutation(len(self.replay)) for r in rounds]
        offset = first - rounds.start * len(self.replay)
        self.picked = np.concatenate(drawn or [np.zeros(0, int)])[offset : offset + self.replay_blocks]

    def __len__(self) -> int:
        return len(self.dataset) + self.replay_blocks

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.dataset):
            return self.dataset[index]
        return self.replay[int(self.picked[index - len(self.dataset)])]


def largest_token_id(*datasets: Dataset | ReplayMix | None) -> int:
    """The largest token id of the training and evaluation data (None for data there is not)."""
    return max(max_token_id(dataset) for dataset in datasets if dataset is not None)


def max_token_id(dataset: Dataset | ReplayMix) -> int:
    """The largest token id in a dataset of input_ids (blocks or samples), read from its arrow column without
    a Python loop; a split of a dataset reads the whole table it shares."""
    if isinstance(dataset, ReplayMix):
        return max(max_token_id(dataset.dataset), max_token_id(dataset.replay))
    column = dataset.data.table.column("input_ids")
    return int(pc.max(pc.list_flatten(column)).as_py() or 0)
