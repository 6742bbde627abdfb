"""Probes: the questions a comparison asks, read from ``probes.jsonl`` (format in the README), and
the rule that says whether an answer is right.

A generation is correct when it contains any of ``answers`` and a hallucination hit when it
contains any of ``wrong``; both matches ignore case and runs of whitespace.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infuse.data.records import read_records
from infuse.errors import InfuseError

MODES = ("chat", "completion")
REQUIRED = ("prompt",)


@dataclass(frozen=True)
class Probe:
    """One question: ``prompt`` goes to the model as a chat turn or as raw text (``mode``)."""

    id: str
    group: str
    mode: str
    prompt: str
    answers: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()
    where: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        row = asdict(self)
        row.pop("where")
        row["answers"], row["wrong"] = list(self.answers), list(self.wrong)
        return row


def load_probes(path: str | Path) -> list[Probe]:
    """Every probe of a ``.jsonl``/``.json`` file; an error names the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise InfuseError(f"--probes {path}: no such file. Write probes as JSON lines (README: Probes and world "
                          "folders), or make cloze probes from documents: "
                          "`infuse probes make docs.jsonl --output FILE`.")
    probes = [probe_from_row(row, where, index) for index, (row, where) in enumerate(read_records(path))]
    if not probes:
        raise InfuseError(f"{path}: holds no probes.")
    seen: dict[str, str] = {}
    for probe in probes:
        if probe.id in seen:
            raise InfuseError(f"{probe.where}: probe id '{probe.id}' is used again (first at "
                              f"{seen[probe.id]}). Give every probe its own id.")
        seen[probe.id] = probe.where
    return probes


def probe_from_row(row: dict, where: str, index: int = 0) -> Probe:
    """A Probe from one JSON object; ``id`` defaults to the row number, ``group`` to ``default``,
    ``mode`` to ``completion``."""
    for name in REQUIRED:
        if not isinstance(row.get(name), str) or not row[name].strip():
            found = ", ".join(sorted(row)) or "none"
            raise InfuseError(f"{where}: a probe needs a non-empty string '{name}' (fields found: {found}).")
    mode = row.get("mode", "completion")
    if mode not in MODES:
        raise InfuseError(f"{where}: unknown mode {mode!r}; a probe's mode is 'chat' (asked through the "
                          "model's chat template) or 'completion' (the prompt is continued as raw text).")
    return Probe(
        id=str(row.get("id", index)),
        group=_string(row, "group", where, "default"),
        mode=mode,
        prompt=row["prompt"],
        answers=_strings(row, "answers", where),
        wrong=_strings(row, "wrong", where),
        where=where,
    )


def _string(row: dict, name: str, where: str, default: str) -> str:
    value = row.get(name, default)
    if not isinstance(value, str) or not value:
        raise InfuseError(f"{where}: '{name}' should be a non-empty string, found {value!r}.")
    return value


def _strings(row: dict, name: str, where: str) -> tuple[str, ...]:
    value = row.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InfuseError(f"{where}: '{name}' should be a list of non-empty strings, found {value!r}.")
    return tuple(value)


def normalise(text: str) -> str:
    """Lower case with every run of whitespace made one space, for containment matching."""
    return re.sub(r"\s+", " ", text).strip().lower()


def contains_any(text: str, needles: tuple[str, ...] | list[str]) -> bool:
    """Whether ``text`` contains any of ``needles``, ignoring case and whitespace runs."""
    haystack = normalise(text)
    return any(normalise(needle) in haystack for needle in needles)
