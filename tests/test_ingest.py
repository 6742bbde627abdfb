"""ingest: web pages, PDF, Markdown, text and JSON rows → clean, deduplicated documents with provenance."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fpdf import FPDF
from rich.console import Console

from infuse.errors import InfuseError
from infuse.ingest import IngestOptions, ingest, load_documents, normalize_whitespace, print_report

# Distinctive strings in the boilerplate around every article: none may reach a document.
NAV = "Quarterly Gazette Navigation Hub"
COOKIE = "We bake crunchy marmalade cookies to personalise your browsing"
SCRIPT_STRINGS = ("QuokkaAnalyticsToken", "trackingPixelZebra", "InvisibleScriptMarker")
SIDEBAR = "Sidebar teaser about walrus fashion week"
FOOTER = "Copyright 2024 Gazette Media Holdings. All rights reserved."
BOILERPLATE = (NAV, COOKIE, *SCRIPT_STRINGS, SIDEBAR, FOOTER, "Accept all cookies", "Privacy", "moon cheese")

ARTICLES = {
    "harbour": (
        "Zorblax Harbour opens to cargo ships",
        [
            "The port authority of Zorblax announced on Tuesday that the new deep-water harbour will "
            "accept its first container ships in April, after eleven years of construction.",
            "Engineers said the breakwater, built from four hundred thousand tonnes of basalt, can "
            "withstand waves of up to fourteen metres during the winter storm season.",
            "Mayor Ilse Varrenkamp told reporters that the harbour will create roughly two thousand "
            "jobs and that the first ship to dock will be the freighter Amber Heron.",
            "Critics of the project point out that the cost tripled to 2.4 billion crowns, and that "
            "the dredging disturbed the breeding grounds of the speckled harbour seal.",
        ],
    ),
    "museum": (
        "Museum of Clockwork Birds doubles its collection",
        [
            "The Museum of Clockwork Birds in Vellmora received a donation of sixty mechanical "
            "songbirds from the estate of the watchmaker Perpetua Okonkwo-Lindqvist.",
            "Curators believe the oldest piece, a brass nightingale with sapphire eyes, was built in "
            "1782 and still sings a melody of forty-one distinct notes when wound.",
            "Restoring the collection will take three conservators about two years, because many of "
            "the bellows are made of kid leather that has dried and cracked.",
            "The new wing opens to visitors next spring, and entry will stay free on the first "
            "Sunday of every month, the museum director Tomasz Ebbesen confirmed.",
        ],
    ),
    "glacier": (
        "Survey finds the Kessrin glacier retreating faster",
        [
            "A survey team from the University of Halvgard measured that the Kessrin glacier lost "
            "ninety-three metres of length last summer, three times the average of the previous decade.",
            "The researchers used drones fitted with laser scanners to map the ice front every week "
            "from June to September, producing a model accurate to within four centimetres.",
            "Meltwater from the glacier feeds the Orvik river, which supplies drinking water to about "
            "eighty thousand people in the valley towns below.",
            "The team recommends building two new reservoirs before 2030, because the river's summer "
            "flow is expected to fall once the glacier has shrunk further.",
        ],
    ),
}

PDF_SENTENCES = [
    "The Basalt Quarry Report counts nine hundred lorries a week.",
    "Page two notes that the quarry closes every Sunday for maintenance.",
]
JSONL_ROWS = [
    {"text": "The ferry timetable for Zorblax adds a night crossing on Fridays.", "title": "Ferries"},
    {"text": "Lighthouse keepers in Vellmora now work in shifts of six hours."},
]


def page(title: str, paragraphs: list[str], date: str | None = None) -> str:
    """A news page whose article is wrapped in every kind of boilerplate a real site has."""
    article = "".join(f"<p>{p}</p>" for p in paragraphs)
    meta = f'<meta property="article:published_time" content="{date}">' if date else ""
    return f"""<!DOCTYPE html>
<html><head><title>{title} | Quarterly Gazette</title>{meta}
<script>var trackingPixelZebra = "QuokkaAnalyticsToken"; function loadAds() {{}}</script>
<style>.menu {{ color: red }}</style></head>
<body>
<header><nav class="menu"><a href="/">{NAV}</a> <a href="/world">World</a>
<a href="/sport">Sport</a></nav></header>
<div id="cookie-banner" class="cookie-consent">{COOKIE}. <button>Accept all cookies</button></div>
<aside class="sidebar"><h3>Trending</h3><ul><li><a href="/a">{SIDEBAR}</a></li>
<li><a href="/b">Another teaser on moon cheese</a></li></ul></aside>
<main><article><h1>{title}</h1>{article}</article></main>
<footer><p>{FOOTER}</p><a href="/privacy">Privacy policy</a> <a href="/terms">Terms of use</a></footer>
<script>console.log("InvisibleScriptMarker");</script>
</body></html>"""


def boilerplate_only_page() -> str:
    return f"""<html><head><title>Nothing here</title><script>var x = "{SCRIPT_STRINGS[0]}";</script></head>
<body><nav><a href="/">Home</a> <a href="/about">About us</a></nav><footer>{FOOTER}</footer></body></html>"""


def write_pdf(path: Path) -> Path:
    pdf = FPDF()
    pdf.set_title("Basalt Quarry Report")
    pdf.set_font("Helvetica", size=12)
    for sentence in PDF_SENTENCES:
        pdf.add_page()
        pdf.multi_cell(0, 10, sentence)
    pdf.output(str(path))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class Handler(SimpleHTTPRequestHandler):
    """Serves the site folder, plus /stream.txt: a body sent without a Content-Length."""

    def do_GET(self):
        if self.path != "/stream.txt":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"x" * 10_000)

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that stops reading at the size limit closes the connection mid-body


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A local web server with three news pages (one also under a second URL), a PDF, a JSONL
    file, a page with no article and a large file. Yields ``url(name)``."""
    root = tmp_path_factory.mktemp("site")
    for name, (title, paragraphs) in ARTICLES.items():
        date = "2024-03-05" if name == "harbour" else None
        (root / f"{name}.html").write_text(page(title, paragraphs, date), encoding="utf-8")
    (root / "mirror").mkdir()
    shutil.copy(root / "harbour.html", root / "mirror" / "harbour-copy.html")
    (root / "empty.html").write_text(boilerplate_only_page(), encoding="utf-8")
    (root / "large.txt").write_text("many words " * 10_000, encoding="utf-8")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    write_pdf(root / "report.pdf")
    write_jsonl(root / "notes.jsonl", JSONL_ROWS)
    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield lambda name: f"{base}/{name}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on a port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.html"


# Tests fail fast: no retries and a short timeout, so a dead URL costs milliseconds.
FAST = IngestOptions(retries=0, timeout=5)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def quiet() -> Console:
    """A console that keeps the progress bar out of the test output."""
    return Console(file=io.StringIO(), width=200)


def by_source(rows: list[dict]) -> dict[str, dict]:
    return {row["source"]: row for row in rows}


def test_web_pages_pdf_and_jsonl_become_clean_documents(site, closed_port_url, tmp_path):
    urls = [site(f"{name}.html") for name in ARTICLES]
    mirror = site("mirror/harbour-copy.html")
    missing = site("missing.html")
    sources = [*urls, mirror, site("report.pdf"), site("notes.jsonl"), closed_port_url, missing]

    report = ingest(sources, tmp_path / "docs.jsonl", FAST, console=quiet())
    rows = read_jsonl(tmp_path / "docs.jsonl")
    docs = by_source(rows)

    # 3 pages + 1 PDF + 2 JSONL rows; the mirrored page is dropped as a duplicate of the first.
    assert report.documents == len(rows) == 6
    assert report.duplicates == 1
    assert report.duplicate_of == [(mirror, urls[0])]
    assert mirror not in docs
    assert report.characters == sum(len(row["text"]) for row in rows)
    assert {f.source: f.reason for f in report.failures} == {
        closed_port_url: "could not connect (Connection refused)",
        missing: "HTTP 404 File not found",
    }
    for row in rows:
        assert {"text", "source", "title", "sha256", "chars"} <= row.keys()
        assert row["sha256"] == hashlib.sha256(row["text"].encode("utf-8")).hexdigest()
        assert row["chars"] == len(row["text"])
        for junk in BOILERPLATE:
            assert junk not in row["text"], (row["source"], junk)
    for url, (title, paragraphs) in zip(urls, ARTICLES.values(), strict=True):
        assert docs[url]["title"] == title
        assert docs[url]["text"].startswith(title)
        for paragraph in paragraphs:
            assert paragraph in docs[url]["text"]
        assert docs[url]["content_type"] == "text/html"
        assert docs[url]["fetched_at"].endswith("+00:00")
    assert docs[urls[0]]["date"] == "2024-03-05"

    pdf = docs[site("report.pdf")]
    assert pdf["text"] == "\n\n".join(PDF_SENTENCES)
    assert (pdf["page_count"], pdf["title"]) == (2, "Basalt Quarry Report")
    assert pdf["content_type"] == "application/pdf"
    assert docs[site("notes.jsonl") + ":1"]["text"] == JSONL_ROWS[0]["text"]
    assert docs[site("notes.jsonl") + ":1"]["title"] == "Ferries"
    assert docs[site("notes.jsonl") + ":2"]["text"] == JSONL_ROWS[1]["text"]


def test_summary_lists_counts_failures_and_empty_pages(site, closed_port_url, tmp_path):
    sources = [site("harbour.html"), site("mirror/harbour-copy.html"), site("empty.html"), closed_port_url]
    report = ingest(sources, tmp_path / "docs.jsonl", FAST, console=quiet())
    assert report.empty == [site("empty.html")]
    assert (report.documents, report.duplicates, len(report.failures)) == (1, 1, 1)

    console = Console(record=True, width=300)
    print_report(report, console)
    summary = console.export_text()
    assert f"1 document written to {tmp_path / 'docs.jsonl'} ({report.characters:,} characters" in summary
    assert "duplicates removed: 1" in summary
    assert f"empty (no text found): 1\n  {site('empty.html')}" in summary
    assert f"failures: 1\n  {closed_port_url}: could not connect (Connection refused)" in summary


def test_url_failures_name_the_url_and_the_reason(site, tmp_path):
    options = IngestOptions(retries=0, timeout=5, max_bytes=50_000)
    sources = [site("museum.html"), site("large.txt"), site("stream.txt"), site("logo.png"), "https://"]
    report = ingest(sources, tmp_path / "docs.jsonl", options, console=quiet())
    reasons = {f.source: f.reason for f in report.failures}
    assert reasons[site("large.txt")].startswith("larger than the size limit of 50,000 bytes (110,000 bytes)")
    assert reasons[site("stream.txt")].startswith("larger than the size limit of 50,000 bytes (more)")
    assert reasons[site("logo.png")] == "unsupported content type 'image/png'"
    assert "https://" in reasons
    assert report.documents == 1


def test_folders_globs_and_lists_expand_to_files(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".git").mkdir()
    (docs / ".git" / "notes.txt").write_text("tool state, not a document")
    (docs / "guide.md").write_text("---\ntitle: 'The Guide'\n---\n# Heading\n\nGuide body.<!-- hidden -->\n")
    (docs / "sub" / "facts.txt").write_text("Facts about otters.\n")
    (docs / "sub" / "photo.png").write_bytes(b"\x89PNG")
    (docs / "page.html").write_text(page(*ARTICLES["museum"]), encoding="utf-8")
    more = tmp_path / "more"
    more.mkdir()
    (more / "one.txt").write_text("First extra text.")
    (more / "two.txt").write_text("Second extra text.")
    (more / "skip.md").write_text("# Not matched by the glob")
    listed = tmp_path / "lists"
    listed.mkdir()
    (listed / "readme.md").write_text("No front matter.\n\n## Listed Title\n\nListed body.")
    (listed / "sources.txt").write_text("# a comment\n\nreadme.md\n  ../docs/sub/facts.txt  \n# readme2.md\n")
    unsupported = tmp_path / "data.csv"
    unsupported.write_text("a,b\n")

    sources = [str(docs), str(more / "*.txt"), f"@{listed / 'sources.txt'}", str(unsupported)]
    sources += [str(tmp_path / "nowhere.txt"), str(tmp_path / "*.nothing")]
    report = ingest(sources, tmp_path / "out.jsonl", FAST, console=quiet())
    rows = by_source(read_jsonl(tmp_path / "out.jsonl"))

    assert set(rows) == {
        str(docs / "guide.md"),
        str(docs / "page.html"),
        str(docs / "sub" / "facts.txt"),
        str(more / "one.txt"),
        str(more / "two.txt"),
        str(listed / "readme.md"),
    }
    # facts.txt is reached through the folder and the list: read twice, written once.
    assert report.duplicate_of == [(str(docs / "sub" / "facts.txt"),) * 2]
    assert report.sources == 7
    assert rows[str(docs / "guide.md")] | {"sha256": None} == {
        "text": "Heading\n\nGuide body.",
        "source": str(docs / "guide.md"),
        "title": "The Guide",
        "sha256": None,
        "chars": len("Heading\n\nGuide body."),
    }
    assert rows[str(listed / "readme.md")]["title"] == "Listed Title"
    assert rows[str(docs / "sub" / "facts.txt")]["title"] == "facts"
    assert rows[str(docs / "page.html")]["title"] == ARTICLES["museum"][0]
    assert NAV not in rows[str(docs / "page.html")]["text"]
    assert {(s.source, s.reason.split(";")[0]) for s in report.skipped} == {
        (str(docs / ".git"), "hidden folder"),
        (str(docs / "sub" / "photo.png"), "unsupported file type .png"),
    }
    assert {f.source: f.reason.split(";")[0] for f in report.failures} == {
        str(unsupported): "unsupported file type .csv",
        str(tmp_path / "nowhere.txt"): "no such file or folder",
        str(tmp_path / "*.nothing"): "no files match this pattern",
    }


def test_whitespace_is_normalised_before_deduplication(tmp_path):
    assert normalize_whitespace("  a \t\t b  \r\n\n\n\n c\u00a0\u00a0d \n \n") == "a b\n\nc d"
    assert normalize_whitespace("one\n\ntwo\nthree") == "one\n\ntwo\nthree"
    (tmp_path / "a.txt").write_text("Otters   hold\thands\n\n\n\n\nwhile they sleep.  \n")
    (tmp_path / "b.txt").write_text("  Otters hold hands \n \n while they sleep.")
    sources = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    report = ingest(sources, tmp_path / "out.jsonl", FAST, console=quiet())
    [row] = read_jsonl(tmp_path / "out.jsonl")
    assert row["text"] == "Otters hold hands\n\nwhile they sleep."
    assert (report.documents, report.duplicates, report.duplicate_of[0][0]) == (1, 1, str(tmp_path / "b.txt"))


def test_text_field_names_the_column_in_json_rows(tmp_path):
    rows = [{"content": "Badgers dig setts under oak trees.", "id": 1}, {"content": "   ", "id": 2}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    report = ingest([str(path)], tmp_path / "out.jsonl", IngestOptions(text_field="content"), console=quiet())
    [row] = read_jsonl(tmp_path / "out.jsonl")
    assert (row["text"], row["source"], row["title"]) == (rows[0]["content"], f"{path}:1", None)
    assert report.empty == [f"{path}:2"]

    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "Moles are nearly blind."}])
    report = ingest([str(path), str(good)], tmp_path / "out.jsonl", FAST, console=quiet())
    [failure] = report.failures
    assert failure.source == str(path)
    assert failure.reason.startswith(f"{path}:1: no 'text' field (fields found: content, id)")
    assert report.documents == 1


def test_a_line_that_is_not_json_fails_its_file_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Fine first line."}\n{"text": oops}\n')
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "Hedgehogs eat beetles."}])
    report = ingest([str(bad), str(good)], tmp_path / "out.jsonl", FAST, console=quiet())
    # The whole file fails: a file is ingested completely or not at all.
    assert [row["text"] for row in read_jsonl(tmp_path / "out.jsonl")] == ["Hedgehogs eat beetles."]
    [failure] = report.failures
    assert failure.reason.startswith(f"{bad}:2: this line is not valid JSON")

    strict = IngestOptions(strict=True)
    with pytest.raises(InfuseError, match=f"{bad}:2: this line is not valid JSON"):
        ingest([str(bad), str(good)], tmp_path / "strict.jsonl", strict, console=quiet())
    assert not (tmp_path / "strict.jsonl").exists()


def test_strict_mode_stops_at_the_first_failure(site, closed_port_url, tmp_path):
    strict = IngestOptions(retries=0, timeout=5, strict=True)
    with pytest.raises(InfuseError, match=f"cannot ingest {closed_port_url}: could not connect"):
        ingest([site("harbour.html"), closed_port_url], tmp_path / "out.jsonl", strict, console=quiet())
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_nothing_ingested_is_an_error_listing_every_failure(site, closed_port_url, tmp_path):
    sources = [closed_port_url, site("empty.html"), str(tmp_path / "nowhere.md")]
    with pytest.raises(InfuseError) as raised:
        ingest(sources, tmp_path / "out.jsonl", FAST, console=quiet())
    message = str(raised.value)
    assert message.startswith("no documents were ingested: every source failed or was empty.")
    assert f"{closed_port_url} (could not connect (Connection refused))" in message
    assert f"{site('empty.html')} (no text found)" in message
    assert f"{tmp_path / 'nowhere.md'} (no such file or folder)" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_load_documents_yields_documents_for_other_steps(tmp_path):
    (tmp_path / "a.md").write_text("# Voles\n\nVoles build runways through grass.")
    [document] = load_documents([str(tmp_path)], FAST, progress=False)
    assert (document.title, document.chars) == ("Voles", len("Voles\n\nVoles build runways through grass."))
    assert document.to_json()["source"] == str(tmp_path / "a.md")


def test_a_damaged_pdf_is_reported_once_in_infuses_words(tmp_path):
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4\ngarbage")
    done = subprocess.run([sys.executable, "-m", "infuse.cli", "ingest", str(tmp_path / "bad.pdf"), "--output",
                           str(tmp_path / "docs.jsonl")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot read this PDF" in done.stderr
    assert "EOF marker" not in done.stderr  # pypdf's own log line, besides infuse's report


def test_markdown_becomes_the_text_a_reader_sees():
    from infuse.ingest.extract import markdown_text

    source = ("# The *Kestrel* tier\n\nThe **Kestrel K2** storage [tier](https://example.com) runs `zfs`\n"
              "on every node.\n\n- Falcon F4 is priced at $5.\n- Osprey O1 is free.\n\n| model | price |\n"
              "|---|---|\n| F4 | $5 |\n\n![A heron at dawn](heron.png)\n\n```\nzpool status\n```\n<div>raw</div>\n")
    assert markdown_text(source) == (
        "The Kestrel tier\n\nThe Kestrel K2 storage tier runs zfs on every node.\n\n"
        "Falcon F4 is priced at $5.\nOsprey O1 is free.\n\nmodel | price\n\nF4 | $5\n\n"
        "A heron at dawn\n\nzpool status")
