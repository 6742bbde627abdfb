"""Bytes of one source → its text, title and metadata, one extractor per kind of document.

Extractors are looked up by kind (``html``, ``pdf``, ``markdown``, ``text``); a file's kind comes
from its suffix, a URL's from the server's content type. JSON, JSON Lines and Parquet rows
(kind ``records``) are read by :mod:`infuse.data.records`, each row becoming one document.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import trafilatura

from infuse.data.records import read_records, text_of
from infuse.errors import InfuseError

SUFFIX_KINDS = {
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".pdf": "pdf",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".json": "records",
    ".jsonl": "records",
    ".parquet": "records",
}

CONTENT_TYPE_KINDS = {
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/plain": "text",
    "application/json": "records",
    "application/x-ndjson": "records",
    "application/jsonl": "records",
    "application/x-jsonlines": "records",
    "application/vnd.apache.parquet": "records",
}

# Servers label many files with these; the URL's own suffix then says more (raw file hosts serve
# .jsonl and .md as text/plain, simple servers send .jsonl as application/octet-stream).
GENERIC_CONTENT_TYPES = ("", "text/plain", "application/octet-stream", "binary/octet-stream")


@dataclass
class Payload:
    """The raw bytes of one source, with where they came from."""

    data: bytes
    source: str
    """The URL or path shown to the user and written as the document's ``source``."""
    charset: str | None = None
    """The encoding the server declared, if any."""


@dataclass
class Extracted:
    """Text taken out of a source, before whitespace normalisation and deduplication."""

    text: str
    source: str
    title: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Extractor = Callable[[Payload], list[Extracted]]


def kind_for_path(path: str | Path) -> str | None:
    """The extractor kind for a file, from its suffix; None when the type is not supported."""
    return SUFFIX_KINDS.get(Path(path).suffix.lower())


def kind_for_response(url: str, content_type: str) -> str | None:
    """The extractor kind for a downloaded body, from its content type and URL."""
    if content_type in GENERIC_CONTENT_TYPES:
        by_suffix = kind_for_path(urlparse(url).path)
        if by_suffix:
            return by_suffix
    return CONTENT_TYPE_KINDS.get(content_type)


def normalize_whitespace(text: str) -> str:
    """Squeeze runs of spaces and tabs inside lines, collapse 3+ newlines to one blank line, strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[^\S\n]+", " ", text)  # any whitespace but newline: tabs, NBSP, ...
    text = re.sub(r" ?\n ?", "\n", text)  # no spaces around line breaks (blank lines become empty)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def extract_html(payload: Payload) -> list[Extracted]:
    """Main text of a web page with trafilatura: menus, cookie banners, scripts and footers removed.

    ``favor_precision`` makes trafilatura drop borderline blocks (teasers, link lists) rather than
    keep them; comments sections are left out too. Paragraphs stay on lines of their own.
    """
    document = trafilatura.bare_extraction(
        payload.data,
        url=payload.source if payload.source.startswith(("http://", "https://")) else None,
        with_metadata=True,
        favor_precision=True,
        include_comments=False,
        include_tables=True,
        deduplicate=False,
    )
    if document is None or not (document.text or "").strip():
        return []
    meta = {key: value for key in ("date", "author") if (value := getattr(document, key, None))}
    return [Extracted(document.text, payload.source, document.title, meta)]


def extract_pdf(payload: Payload) -> list[Extracted]:
    """Text of every page of a PDF (pypdf), pages separated by a blank line."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(payload.data))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except Exception as e:  # pypdf raises many types on damaged or encrypted files
        raise InfuseError(f"cannot read this PDF ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {"page_count": len(pages)}
    pages_without_text = sum(1 for page in pages if not page.strip())
    if pages_without_text:
        # Scanned pages have no text layer; say how many so the user can run OCR on them.
        meta["pages_without_text"] = pages_without_text
    return [Extracted("\n\n".join(pages), payload.source, title or None, meta)]


def extract_markdown(payload: Payload) -> list[Extracted]:
    """Markdown as the text a reader sees (``markdown_text``), less front matter and HTML comments;
    title from front matter or the first heading."""
    text = _decode(payload).replace("\r\n", "\n")
    title = None
    front = re.match(r"\A---\n(.*?)\n---\n", text, re.DOTALL)
    if front:
        text = text[front.end() :]
        title = _front_matter_title(front.group(1))
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    if title is None and heading:
        title = markdown_text(heading.group(1))
    return [Extracted(markdown_text(text), payload.source, title)]


def markdown_text(text: str) -> str:
    """The words of Markdown without its marks, as the text a model should learn from: headings,
    paragraphs and table rows a block each (a paragraph's line breaks joined), list items a line
    each, emphasis, link and code marks dropped (their words kept), images by their alt text, raw
    HTML left out, code blocks kept as written."""
    from markdown_it import MarkdownIt

    blocks: list[tuple[str, bool]] = []  # (text, whether it is a list item)
    depth, row = 0, None
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "list_item_open":
            depth += 1
        elif token.type == "list_item_close":
            depth -= 1
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            blocks.append((" | ".join(row), False))
            row = None
        elif token.type in ("fence", "code_block"):
            blocks.append((token.content.rstrip("\n"), False))
        elif token.type == "inline":
            words = "".join(_inline_words(token.children or [])).strip()
            if row is not None:
                row.append(words)
            elif words:
                blocks.append((words, depth > 0))
    joined = ""
    for index, (words, item) in enumerate(blocks):
        if index:
            joined += "\n" if item and blocks[index - 1][1] else "\n\n"
        joined += words
    return joined


def _inline_words(children) -> list[str]:
    words = {"text": lambda t: t.content, "code_inline": lambda t: t.content, "image": lambda t: t.content,
             "softbreak": lambda t: " ", "hardbreak": lambda t: "\n"}
    return [words[child.type](child) for child in children if child.type in words]


def extract_text(payload: Payload) -> list[Extracted]:
    return [Extracted(_decode(payload), payload.source)]


def extract_records(path: Path, text_field: str) -> list[Extracted]:
    """One document per JSON / JSON Lines / Parquet row, from the row's ``text_field``.

    Each document's source is the row's place (``file:line`` or ``file[index]``); a row without the
    field, or a line that is not JSON, fails the whole file with that place in the message.
    """
    extracted = []
    for row, where in read_records(path):
        title = row.get("title")
        title = title if isinstance(title, str) else None
        extracted.append(Extracted(text_of(row, where, text_field), where, title))
    return extracted


def extract_records_from_bytes(payload: Payload, suffix: str, text_field: str) -> list[Extracted]:
    """Rows of a downloaded JSON / JSON Lines / Parquet body, with places named after the URL."""
    with tempfile.TemporaryDirectory(prefix="infuse-ingest-") as folder:
        path = Path(folder) / f"download{suffix}"
        path.write_bytes(payload.data)
        try:
            extracted = extract_records(path, text_field)
        except InfuseError as e:
            raise InfuseError(str(e).replace(str(path), payload.source)) from None
    for item in extracted:
        item.source = item.source.replace(str(path), payload.source)
    return extracted


def records_suffix(url: str, content_type: str) -> str:
    """The file suffix that tells :func:`read_records` how to parse a downloaded body."""
    suffix = Path(urlparse(url).path).suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        return suffix
    if content_type == "application/vnd.apache.parquet":
        return ".parquet"
    # A .json body that turns out to hold one object per line is read as JSON Lines anyway.
    return ".jsonl" if content_type in ("application/x-ndjson", "application/jsonl") else ".json"


EXTRACTORS: dict[str, Extractor] = {
    "html": extract_html,
    "pdf": extract_pdf,
    "markdown": extract_markdown,
    "text": extract_text,
}


def _decode(payload: Payload) -> str:
    encoding = payload.charset or "utf-8-sig"
    try:
        return payload.data.decode(encoding)
    except LookupError:
        raise InfuseError(f"unknown text encoding '{encoding}' declared by the server") from None
    except UnicodeDecodeError as e:
        raise InfuseError(
            f"not valid {e.encoding} text (byte {payload.data[e.start]:#04x} at offset {e.start}); "
            "convert the file to UTF-8"
        ) from None


def _front_matter_title(front_matter: str) -> str | None:
    match = re.search(r"^title:\s*(.+?)\s*$", front_matter, re.MULTILINE)
    return match.group(1).strip("'\"") if match else None
