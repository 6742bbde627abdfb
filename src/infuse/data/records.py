"""Rows from JSON, JSON Lines and Parquet files, each with the place it came from.

Every reader yields ``(row, where)`` pairs where ``where`` is ``"file:line"`` (JSON Lines),
``"file[index]"`` (a JSON array or Parquet), so errors further down can point at the exact row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from infuse.errors import InfuseError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")

Row = tuple[dict, str]


def missing_source(source: str | Path, fetch_hint: str) -> InfuseError:
    """The error for a data source that is neither a file nor a folder. URLs are not read during
    training: a run hashes its files to know whether it may resume, and a page can change."""
    text = str(source)
    if "://" in text:
        return InfuseError(f"{text}: training reads files and folders, not URLs. {fetch_hint}")
    return InfuseError(f"{text}: no such file or folder. Check the path in the config.")


def is_record_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in RECORD_SUFFIXES


def read_records(path: str | Path, on_bad_line: Callable[[str, str], None] | None = None) -> Iterator[Row]:
    """Yield every row of a ``.jsonl``, ``.json`` or ``.parquet`` file with its location. A JSON Lines
    line that is not a JSON object is an error, or, with ``on_bad_line``, passed to it as
    ``(where, problem)`` and left out."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, on_bad_line)
    elif suffix == ".json":
        yield from _read_json(path, on_bad_line)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise InfuseError(f"{path}: not a record file; expected one of {', '.join(RECORD_SUFFIXES)}.")


def _read_jsonl(path: Path, on_bad_line: Callable[[str, str], None] | None = None) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte order mark some editors write is not text
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            text = line.rstrip("\r\n")  # with its break, a line cut short reads as an error on the next
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                at = "the end of the line" if e.pos >= len(text) else f"column {e.colno} of {len(text)}"
                problem = (f"this line is not valid JSON ({e.msg} at {at}). "
                           "Each line of a .jsonl file must be one JSON object.")
                if on_bad_line is None:
                    raise InfuseError(f"{where}: {problem} Fix or remove the line.") from None
                on_bad_line(where, problem)
                continue
            yield _as_object(row, where), where


def _read_json(path: Path, on_bad_line: Callable[[str, str], None] | None = None) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file holding JSON Lines is common enough to accept.
        if e.msg == "Extra data":
            yield from _read_jsonl(path, on_bad_line)
            return
        raise InfuseError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}). "
            "Expected an array of objects, or one object per line."
        ) from None
    rows = data if isinstance(data, list) else [data]
    for index, row in enumerate(rows):
        where = f"{path}[{index}]"
        yield _as_object(row, where), where


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InfuseError(f"{path}: cannot read as Parquet ({e}).") from None
    for index, row in enumerate(table.to_pylist()):
        yield row, f"{path}[{index}]"


def _as_object(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise InfuseError(f"{where}: expected a JSON object, found {type(row).__name__}.")
    return row


def text_of(row: dict, where: str, text_field: str = "text") -> str:
    """The text field of a row, or a clear error naming the row and the fields it has."""
    if text_field not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise InfuseError(
            f"{where}: no '{text_field}' field (fields found: {fields}). "
            f"Name the field that holds the text with --text-field (or `text_field:` in a config)."
        )
    value = row[text_field]
    if not isinstance(value, str):
        raise InfuseError(f"{where}: field '{text_field}' should be a string, found {type(value).__name__}.")
    return value
