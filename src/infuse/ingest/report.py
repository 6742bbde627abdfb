"""What an ingest run did: counts, and every source that failed, was empty or was skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

# Long lists of skipped files or duplicates are cut in the printed summary (the report keeps all);
# failures and empty pages are always printed in full because each one is something to fix.
SHOWN_PER_LIST = 10


@dataclass(frozen=True)
class Failure:
    """A source that gave no documents because something went wrong."""

    source: str
    """The URL, path or ``file:line`` that failed."""
    reason: str
    """What went wrong, in words the user can act on."""


@dataclass(frozen=True)
class Skipped:
    """A file found inside a folder or glob that was left out on purpose."""

    source: str
    reason: str


@dataclass
class IngestReport:
    """Counts and lists from one ingest run; filled in while the documents are read."""

    output: Path | None = None
    """The JSON Lines file written, when the documents were written to one."""
    sources: int = 0
    """Sources read after expanding folders, globs and @lists."""
    documents: int = 0
    """Documents kept (after removing duplicates and empty texts)."""
    characters: int = 0
    """Characters of text in the kept documents."""
    duplicates: int = 0
    """Documents dropped because an earlier document had exactly the same normalised text."""
    duplicate_of: list[tuple[str, str]] = field(default_factory=list)
    """(dropped source, source it repeats) for every duplicate."""
    failures: list[Failure] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    """Pages, files and rows that held no text once extracted."""
    skipped: list[Skipped] = field(default_factory=list)
    """Files of an unsupported type (or hidden) found inside folders and globs."""


def print_report(report: IngestReport, console: Console | None = None) -> None:
    """Print the summary of ``report``: what was written, and every failure and empty page."""
    console = console or Console()
    target = f" to {escape(str(report.output))}" if report.output else ""
    console.print(
        f"[bold]{_count(report.documents, 'document')}[/] written{target} "
        f"({_count(report.characters, 'character')} from {_count(report.sources, 'source')})"
    )
    console.print(f"duplicates removed: {report.duplicates:,}")
    for dropped, kept in report.duplicate_of[:SHOWN_PER_LIST]:
        console.print(f"  {escape(dropped)} repeats {escape(kept)}", highlight=False)
    _print_more(console, len(report.duplicate_of))
    console.print(f"empty (no text found): {len(report.empty):,}")
    for source in report.empty:
        console.print(f"  {escape(source)}", highlight=False)
    console.print(f"skipped: {len(report.skipped):,}")
    for skipped in report.skipped[:SHOWN_PER_LIST]:
        console.print(f"  {escape(skipped.source)}: {escape(skipped.reason)}", highlight=False)
    _print_more(console, len(report.skipped))
    style = "red" if report.failures else ""
    console.print(f"failures: {len(report.failures):,}", style=style)
    for failure in report.failures:
        console.print(f"  {escape(failure.source)}: {escape(failure.reason)}", highlight=False)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _print_more(console: Console, total: int) -> None:
    if total > SHOWN_PER_LIST:
        console.print(f"  ... and {total - SHOWN_PER_LIST:,} more")
