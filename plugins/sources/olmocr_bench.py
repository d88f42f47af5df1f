"""The ``olmocr_bench`` source of ``python -m core.shards``: olmOCR-Bench's pages as an eval split.

SOURCE is the benchmark's folder (its ``*.jsonl`` tests and ``pdfs/``) or one of its ``.jsonl``
files, read as the ``olmocr_bench`` metric input reads them (plugins/metrics/olmocr_bench_files.py):
every page with a test, a baseline test added on page 1 of each PDF without one. A page becomes a
sample: the image rendered from its PDF (``--longest-side``, ``--dpi``), an empty ``txt`` (the
benchmark has no reference text: its tests are the truth) and json ``{"olmocr_bench": {"pdf",
"page", "tests"}}``, which the ``olmocr_bench`` metric runs on the model's reading when a training
run evaluates on these shards (``eval: {metrics: [olmocr_bench]}``). Key = ``<pdf without
.pdf>_pg<page>``, cleaned.
"""
import os

from core import hookimpl
from core.errors import ConfigError
from core.pdf import PdfPage
from core.sources import Item, function_source
from plugins.metrics.olmocr_bench_files import load_pages, page_id


def read_olmocr_bench(source, images_root=None):
    if images_root is not None:
        raise ConfigError("--images-root: not used with the olmocr_bench format (the PDFs are in its pdfs/ folder)")
    pages, pdf_dir = load_pages(source)
    return [Item(page_id(pdf, page), f"{pdf} page {page}", image=PdfPage(os.path.join(pdf_dir, pdf), page), text="",
                 meta={"olmocr_bench": {"pdf": pdf, "page": page, "tests": tests}}, empty_ok=True)
            for (pdf, page), tests in pages.items()]


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "olmocr_bench", function_source(read_olmocr_bench, needs="either"))
