"""Sources → documents: web pages, HTML, PDF, Markdown, text and JSON rows as clean text with provenance.

``infuse ingest SOURCE... --output docs.jsonl`` calls :func:`ingest` and :func:`print_report`;
other steps that read documents (pretraining data) can call :func:`load_documents` directly.
"""

from infuse.ingest.extract import normalize_whitespace
from infuse.ingest.pipeline import Document, IngestOptions, ingest, load_documents
from infuse.ingest.report import Failure, IngestReport, Skipped, print_report

__all__ = [
    "Document",
    "Failure",
    "IngestOptions",
    "IngestReport",
    "Skipped",
    "ingest",
    "load_documents",
    "normalize_whitespace",
    "print_report",
]
