"""Turn what the user named (URLs, files, folders, globs, ``@list.txt``) into a flat list of sources.

A file named directly must be of a supported type; inside folders and globs, other files are
skipped and counted, because a folder of documents often holds images or notes as well.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from infuse.ingest.extract import SUFFIX_KINDS, kind_for_path
from infuse.ingest.report import Failure, Skipped

URL_SCHEMES = ("http://", "https://")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class Source:
    """One thing to read: a URL (its kind is decided by the server's content type) or a file."""

    location: str
    kind: str | None = None
    """The extractor for a file (``html``, ``pdf``, ``markdown``, ``text``, ``records``); None for URLs."""

    @property
    def is_url(self) -> bool:
        return is_url(self.location)


@dataclass
class Expansion:
    sources: list[Source] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


def expand_sources(named: Iterable[str]) -> Expansion:
    """Expand URLs, files, folders (recursively), globs and ``@list.txt`` files, in the order named."""
    expansion = Expansion()
    for entry in named:
        _expand(entry.strip(), expansion, base=None, lists=frozenset())
    return expansion


def _expand(entry: str, out: Expansion, base: Path | None, lists: frozenset[Path]) -> None:
    if is_url(entry):
        out.sources.append(Source(entry))
    elif entry.startswith("@"):
        _expand_list(entry, out, base, lists)
    elif any(c in entry for c in GLOB_CHARACTERS) and not _resolve(entry, base).exists():
        _expand_glob(entry, out, base)
    else:
        _expand_path(_resolve(entry, base), out, named=True)


def _resolve(entry: str, base: Path | None) -> Path:
    # Entries of an @list are relative to the list's own folder, so a list travels with its files.
    path = Path(entry).expanduser()
    if base is None or path.is_absolute():
        return path
    return Path(os.path.normpath(base / path))


def _expand_list(entry: str, out: Expansion, base: Path | None, lists: frozenset[Path]) -> None:
    path = _resolve(entry[1:], base)
    if path.resolve() in lists:
        out.failures.append(Failure(entry, "this list includes itself; remove the loop"))
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        out.failures.append(Failure(entry, f"cannot read the list of sources ({_why(e)})"))
        return
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            _expand(line, out, path.parent, lists | {path.resolve()})


def _expand_glob(pattern: str, out: Expansion, base: Path | None) -> None:
    matches = sorted(glob.glob(str(_resolve(pattern, base)), recursive=True))
    if not matches:
        out.failures.append(Failure(pattern, "no files match this pattern"))
    for match in matches:
        _expand_path(Path(match), out, named=False)


def _expand_path(path: Path, out: Expansion, named: bool) -> None:
    if path.is_dir():
        _expand_folder(path, out)
    elif not path.is_file():
        out.failures.append(Failure(str(path), "no such file or folder"))
    elif kind := kind_for_path(path):
        out.sources.append(Source(str(path), kind))
    elif named:
        out.failures.append(Failure(str(path), _unsupported(path)))
    else:
        out.skipped.append(Skipped(str(path), _unsupported(path)))


def _expand_folder(folder: Path, out: Expansion) -> None:
    for root, dirs, files in os.walk(folder):
        # Hidden folders (.git, .cache) are tool state, not documents: skip them whole.
        for name in sorted(d for d in dirs if d.startswith(".")):
            out.skipped.append(Skipped(os.path.join(root, name), "hidden folder"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            if name.startswith("."):
                out.skipped.append(Skipped(str(path), "hidden file"))
            else:
                _expand_path(path, out, named=False)


def _unsupported(path: Path) -> str:
    suffix = path.suffix or "(no extension)"
    return f"unsupported file type {suffix}; supported: {', '.join(sorted(SUFFIX_KINDS))}"


def _why(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)
