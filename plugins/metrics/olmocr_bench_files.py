"""olmOCR-Bench's files: its test JSONL, its PDFs, and a candidate's folder of readings (docs/metrics-olmocr-bench.md).

Registers the metric input ``olmocr_bench``: ``--gt`` (or ``--tests``) is the benchmark folder (every
``*.jsonl`` in it is a source of tests, ``pdfs/`` holds the PDFs, searched recursively) or some of its
``.jsonl`` files (then only the PDFs their tests name; all of them are the folder); ``--pred`` is a
candidate's folder of readings, searched recursively, named
``<pdf path without .pdf>_pg<page>_repeat<N>.md``. Each PDF without a ``baseline`` test gets one on
page 1, from the source ``baseline``, as the benchmark adds it. A sample is one page: the ground truth
carries the page's tests (``meta["olmocr_bench"]``), the prediction every repeat of the page
(``Readings``; as a string it is the first one).
"""
import glob
import os
import re

from core.hookspecs import hookimpl
from core.errors import ConfigError
from core.jsonfiles import jsonl_records, read_text
from core.pairs import GroundTruth
from plugins.metrics.olmocr_bench_checks import load_test

BASELINE = "baseline"


class Readings(str):
    """A page's readings (one per repeat file) as one string, the first reading, with ``repeats`` = all of them."""

    def __new__(cls, repeats):
        obj = super().__new__(cls, repeats[0] if repeats else "")
        obj.repeats = list(repeats)
        return obj


def _layout(path):
    """(the JSONL files, the PDF folder, whether only the PDFs the tests name count) of ``--gt``: the folder,
    one of its .jsonl files, or several of them (a shell's ``BENCH/*.jsonl``; all of a folder's are the folder)."""
    if isinstance(path, (list, tuple)):
        for file in path:
            if not os.path.isfile(file):
                raise ConfigError(f"{file}: no such .jsonl test file")
        folders = {os.path.dirname(os.path.abspath(file)) for file in path}
        if len(folders) != 1:
            raise ConfigError(f"--tests: the test files come from {len(folders)} folders; give one benchmark's")
        (folder,) = folders
        files = sorted(os.path.abspath(file) for file in path)
        whole = files == sorted(os.path.abspath(f) for f in glob.glob(os.path.join(folder, "*.jsonl")))
        return files, os.path.join(folder, "pdfs"), not whole
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise ConfigError(f"{path}: no *.jsonl test file in this folder (olmOCR-Bench's layout: *.jsonl + pdfs/)")
        return files, os.path.join(path, "pdfs"), False
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such benchmark folder or .jsonl file")
    return [path], os.path.join(os.path.dirname(os.path.abspath(path)), "pdfs"), True


def _pdf_names(pdf_dir):
    if not os.path.isdir(pdf_dir):
        raise ConfigError(f"{pdf_dir}: no such folder (olmOCR-Bench's PDFs, which also decide the baseline tests)")
    return sorted(os.path.relpath(p, pdf_dir).replace(os.sep, "/")
                  for p in glob.glob(os.path.join(pdf_dir, "**", "*.pdf"), recursive=True))


def load_pages(path):
    """-> ({(pdf, page): [{"source": jsonl name, "test": raw test}, ...]}, the PDF folder), pages sorted.

    Every test is checked (``load_test``) with its file:line; ids must be unique across the files."""
    files, pdf_dir, only_named = _layout(path)
    tests, seen = [], {}
    for file in files:
        for n, record in jsonl_records(file):
            where = f"{file}:{n}"
            test = load_test(record, where)
            if test["id"] in seen:
                raise ConfigError(f"{where}: test id {test['id']!r} again (first at {seen[test['id']]})")
            seen[test["id"]] = where
            tests.append((os.path.basename(file), record, test))
    pdfs = _pdf_names(pdf_dir)
    if only_named:
        named = {t["pdf"] for _, _, t in tests}
        pdfs = [p for p in pdfs if p in named]
    has_baseline = {t["pdf"] for _, _, t in tests if t["type"] == BASELINE}
    tests += [(BASELINE, record, record) for record in
              ({"id": f"{pdf}_baseline", "pdf": pdf, "page": 1, "type": BASELINE} for pdf in pdfs
               if pdf not in has_baseline)]
    pages = {}
    for source, record, test in tests:
        pages.setdefault((test["pdf"], test["page"]), []).append({"source": source, "test": record})
    return dict(sorted(pages.items())), pdf_dir


def page_id(pdf, page):
    return f"{pdf[:-4] if pdf.lower().endswith('.pdf') else pdf}_pg{page}"


def candidate_readings(folder, pages):
    """{(pdf, page): [texts]} from a candidate folder, found as the benchmark finds them: a PDF's files match
    ``<pdf without extension>_pg<digits>_repeat<digits>.md`` (relative path); a page's are those whose name
    holds ``_pg<page>_``."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a folder (a candidate's readings: <pdf>_pg<page>_repeat<N>.md)")
    files = [os.path.relpath(p, folder).replace(os.sep, "/")
             for p in glob.glob(os.path.join(folder, "**", "*.md"), recursive=True)]
    by_pdf = {}
    for pdf in {pdf for pdf, _ in pages}:
        pattern = re.compile(rf"^{re.escape(os.path.splitext(pdf)[0])}_pg\d+_repeat\d+\.md$")
        by_pdf[pdf] = sorted(f for f in files if pattern.match(f))
    return {(pdf, page): [read_text(os.path.join(folder, f)) for f in by_pdf[pdf]
                          if f"_pg{page}_" in os.path.basename(f)] for pdf, page in pages}


class OlmOCRBenchInput:
    """``--gt BENCH|BENCH/x.jsonl --pred CANDIDATE_FOLDER`` (or ``--tests BENCH/*.jsonl``): one pair per page
    with tests, in (pdf, page) order."""
    needs_gt = True
    several_gt = True

    def read(self, pred_path, gt_path=None):
        pages, _ = load_pages(gt_path)
        readings = candidate_readings(pred_path, pages)
        return [(page_id(pdf, page), Readings(readings[(pdf, page)]),
                 GroundTruth("", {"olmocr_bench": {"pdf": pdf, "page": page, "tests": tests}}), None)
                for (pdf, page), tests in pages.items()]


@hookimpl
def vlmkit_register(registry):
    registry.add("metric_input", "olmocr_bench", OlmOCRBenchInput)
