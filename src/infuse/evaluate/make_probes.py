"""``infuse probes make``: cloze probes from documents, for a knowledge score without hand-written
probes. A sentence that ends in a name or a number is cut just before it; the model has to
complete the prompt, and the cut-off words are the answer::

    "The Orion cluster is built from accelerators of the type Zephyr-9."
    → {"prompt": "The Orion cluster is built from accelerators of the type", "answers": ["Zephyr-9"]}

The same documents always give the same probes, in document order, taken round-robin across
documents so that ``--max`` keeps every document represented.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from infuse.data.pretrain import load_texts
from infuse.data.records import is_record_file, read_records, text_of
from infuse.errors import InfuseError
from infuse.evaluate.probes import normalise

MIN_PROMPT_WORDS = 4
MAX_PROMPT_WORDS = 60
MAX_ANSWER_WORDS = 4
SENTENCE_END = re.compile(r"(?<=[.!])\s+(?=[A-Z0-9\"“])")
# A word that can be (part of) a name or a number: capitalised, or holding a digit.
NAME_WORD = re.compile(r"(?:[A-Z][\w'’&+-]*|[$€£]?[\w.,/+-]*\d[\w.,/%+-]*)")


def cloze(sentence: str) -> tuple[str, str] | None:
    """(prompt, answer) when ``sentence`` ends in a name or number after enough words, else None."""
    sentence = sentence.strip()
    if not sentence.endswith((".", "!")) or sentence.endswith(("...", "..")):
        return None
    words = sentence[:-1].split()
    span = 0
    while span < min(MAX_ANSWER_WORDS, len(words)) and NAME_WORD.fullmatch(words[-1 - span]):
        span += 1
    prompt_words = words[: len(words) - span]
    if span == 0 or not MIN_PROMPT_WORDS <= len(prompt_words) <= MAX_PROMPT_WORDS:
        return None
    if prompt_words[-1].endswith((",", ";", ":", "(", ")", '"')):
        return None  # the answer starts a new clause or quotation: the prompt does not lead to it
    answer = " ".join(words[-span:]).strip(",;:")
    prompt = " ".join(prompt_words)
    if normalise(answer) in normalise(prompt):
        return None  # the answer is already in the prompt: copying it would not show knowledge
    return prompt, answer


def sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after '.' or '!' where the next one starts with a capital or digit."""
    return [s for line in text.splitlines() for s in SENTENCE_END.split(line.strip()) if s]


def documents(paths: list[str | Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(text, source) of every document; record rows keep their ``source`` field when they have one."""
    for path in map(Path, paths):
        if not path.exists():
            raise InfuseError(f"{path}: no such file. Give documents.jsonl from `infuse ingest`, or text.")
        if is_record_file(path):
            for row, where in read_records(path):
                yield text_of(row, where, text_field), str(row.get("source") or where)
        else:
            for index, text in enumerate(load_texts([path], text_field)):
                yield text, f"{path}[{index}]"


def make_probes(paths: list[str | Path], max_probes: int | None = None, group: str = "new",
                text_field: str = "text") -> list[dict]:
    """Cloze probes (mode ``completion``) from the documents in ``paths``."""
    per_document = []
    for text, source in documents(paths, text_field):
        found = [pair for pair in map(cloze, sentences(text)) if pair]
        per_document.append([(prompt, answer, source) for prompt, answer in found])
    probes, seen = [], set()
    for prompt, answer, source in _round_robin(per_document):
        if prompt in seen:
            continue
        seen.add(prompt)
        probes.append({"id": f"{group}-cloze-{len(probes) + 1:04d}", "group": group, "mode": "completion",
                       "prompt": prompt, "answers": [answer], "wrong": [], "source": source})
        if max_probes is not None and len(probes) >= max_probes:
            break
    return probes


def _round_robin(lists: list[list]) -> Iterator:
    for depth in range(max((len(items) for items in lists), default=0)):
        for items in lists:
            if depth < len(items):
                yield items[depth]


def write_probes(probes: list[dict], output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes), encoding="utf-8")
    return output
