"""Sources → clean, deduplicated documents with provenance → one JSON Lines file.

Reads like the run itself: expand what was named, read each source (with a progress bar),
normalise whitespace, drop exact duplicates, write, report. A failing source is recorded and the
rest go on, unless ``strict`` is set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infuse import __version__
from infuse.errors import InfuseError
from infuse.ingest.extract import (
    EXTRACTORS,
    Extracted,
    Payload,
    extract_records,
    extract_records_from_bytes,
    kind_for_response,
    normalize_whitespace,
    records_suffix,
    sha256_of,
)
from infuse.ingest.fetch import fetch, make_session
from infuse.ingest.report import Failure, IngestReport
from infuse.ingest.sources import Source, expand_sources


@dataclass
class IngestOptions:
    """How sources are read."""

    text_field: str = "text"
    """The field that holds the text in JSON, JSON Lines and Parquet rows."""
    timeout: float = 20.0
    """Seconds to wait for a server to connect or to send the next bytes."""
    retries: int = 2
    """Extra tries for a URL after a failed connection or a 429/5xx answer (with backoff)."""
    user_agent: str = f"infuse/{__version__} (+https://github.com/infuse-llm)"
    """Sent with every request, so site owners can see who is fetching their pages."""
    max_bytes: int = 20_000_000
    """A URL whose body is larger than this fails instead of being downloaded."""
    strict: bool = False
    """Stop at the first failing source instead of reporting it and going on."""


@dataclass
class Document:
    """One cleaned document and where it came from."""

    text: str
    source: str
    """The URL, path or ``file:line`` the text was read from."""
    title: str | None
    sha256: str
    """Hex SHA-256 of ``text`` (UTF-8); equal texts are written once."""
    chars: int
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra provenance: ``fetched_at`` and ``content_type`` for URLs, ``page_count`` for PDFs,
    ``date`` and ``author`` when the page states them."""

    def to_json(self) -> dict[str, Any]:
        """The document as one JSON Lines row: text, source, title, sha256, chars, then the extras."""
        row = {"text": self.text, "source": self.source, "title": self.title, "sha256": self.sha256}
        return {**row, "chars": self.chars, **self.meta}


def ingest(
    sources: Iterable[str],
    output: str | Path,
    options: IngestOptions | None = None,
    console: Console | None = None,
) -> IngestReport:
    """Read ``sources`` and write their documents to the JSON Lines file ``output``.

    Returns the report (counts, failures, empty pages); print it with ``print_report``. Raises
    InfuseError when nothing could be ingested, or at the first failure with ``strict``; the
    output file is then left untouched.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = IngestReport()
    # Written next to the output and renamed at the end, so a failed run leaves no half file.
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as f:
            for document in load_documents(sources, options, report, console):
                f.write(json.dumps(document.to_json(), ensure_ascii=False) + "\n")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output)
    report.output = output
    return report


def load_documents(
    sources: Iterable[str],
    options: IngestOptions | None = None,
    report: IngestReport | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> Iterator[Document]:
    """Yield the clean, deduplicated documents of ``sources`` (URLs, files, folders, globs, @lists).

    Counts, failures, empty and skipped sources go into ``report`` as the documents are read.
    Raises InfuseError at the end when no document came out at all.
    """
    options = options or IngestOptions()
    report = report if report is not None else IngestReport()
    expansion = expand_sources(sources)
    report.sources += len(expansion.sources)
    report.skipped.extend(expansion.skipped)
    for failure in expansion.failures:
        _record_failure(report, failure, options.strict)
    seen: dict[str, str] = {}
    session = make_session(options.user_agent, options.retries)
    with _progress_bar(console, progress) as bar, session:
        task = bar.add_task("ingest", total=len(expansion.sources), current="")
        for source in expansion.sources:
            bar.update(task, current=_shorten(source.location))
            yield from _documents_of(source, options, session, report, seen)
            bar.advance(task)
    if report.documents == 0:
        raise InfuseError(_nothing_ingested(report))


def _documents_of(
    source: Source,
    options: IngestOptions,
    session: requests.Session,
    report: IngestReport,
    seen: dict[str, str],
) -> Iterator[Document]:
    try:
        extracted = _extract(source, options, session)
    except InfuseError as e:
        _record_failure(report, Failure(source.location, str(e)), options.strict)
        return
    if not extracted:
        report.empty.append(source.location)
    for item in extracted:
        text = normalize_whitespace(item.text)
        if not text:
            report.empty.append(item.source)
            continue
        digest = sha256_of(text)
        if digest in seen:
            report.duplicates += 1
            report.duplicate_of.append((item.source, seen[digest]))
            continue
        seen[digest] = item.source
        report.documents += 1
        report.characters += len(text)
        title = item.title.strip() if item.title else _fallback_title(source, item)
        yield Document(text, item.source, title or None, digest, len(text), item.meta)


def _extract(source: Source, options: IngestOptions, session: requests.Session) -> list[Extracted]:
    if source.is_url:
        return _extract_url(source.location, options, session)
    path = Path(source.location)
    if source.kind == "records":
        return extract_records(path, options.text_field)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InfuseError(f"cannot read the file ({e.strerror})") from None
    return EXTRACTORS[source.kind](Payload(data, source.location))


def _extract_url(url: str, options: IngestOptions, session: requests.Session) -> list[Extracted]:
    fetched = fetch(session, url, options.timeout, options.max_bytes)
    kind = kind_for_response(fetched.url, fetched.content_type)
    payload = Payload(fetched.data, url, fetched.charset)
    if kind == "records":
        suffix = records_suffix(fetched.url, fetched.content_type)
        extracted = extract_records_from_bytes(payload, suffix, options.text_field)
    elif kind is None:
        raise InfuseError(f"unsupported content type '{fetched.content_type or 'none'}'")
    else:
        extracted = EXTRACTORS[kind](payload)
    provenance = {"fetched_at": fetched.fetched_at, "content_type": fetched.content_type}
    if fetched.url != url:
        provenance["final_url"] = fetched.url
    for item in extracted:
        item.meta = {**item.meta, **provenance}
    return extracted


def _record_failure(report: IngestReport, failure: Failure, strict: bool) -> None:
    if strict:
        raise InfuseError(
            f"cannot ingest {failure.source}: {failure.reason}. Stopped there because strict mode is on; "
            "without it, failing sources are reported and the others are still ingested."
        )
    report.failures.append(failure)


def _nothing_ingested(report: IngestReport) -> str:
    parts = [f"{f.source} ({f.reason})" for f in report.failures]
    parts += [f"{source} (no text found)" for source in report.empty]
    if report.skipped:
        parts.append(f"{len(report.skipped)} files skipped as unsupported or hidden")
    found = "; ".join(parts) if parts else "no sources were given"
    return (
        f"no documents were ingested: every source failed or was empty. {found}. "
        "Fix or replace these sources and run again."
    )


def _fallback_title(source: Source, item: Extracted) -> str | None:
    """A page or file without a title of its own is named after its file; JSON rows get none."""
    if item.source != source.location:
        return None
    if source.is_url:
        parsed = urlparse(source.location)
        return Path(parsed.path).name or parsed.netloc
    return Path(source.location).stem


def _progress_bar(console: Console | None, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}", markup=False),
        console=console,
        disable=not enabled,
    )


def _shorten(location: str, width: int = 60) -> str:
    return location if len(location) <= width else "..." + location[-(width - 3) :]
