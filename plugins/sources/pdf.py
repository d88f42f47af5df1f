"""The ``pdf`` source of ``python -m core.shards``: a folder of PDFs, each page a sample (docs/data.md §3).

The folder is searched recursively (hidden files and folders skipped). The text of a page sits beside
its PDF, named after it:

* ``doc.page-N.txt`` (or ``.md``): page N of ``doc.pdf``, counted from 1 (``doc.page-007.txt`` is page 7);
* ``doc.txt`` (or ``.md``): the text of a one-page ``doc.pdf``; a longer PDF needs page files
  (``pdf_needs_page``).

A page without a text file is skipped as ``missing_text``, a page file past the PDF's last page as
``pdf_page_out_of_range``, and an encrypted, broken or empty PDF as ``encrypted_pdf``, ``bad_pdf`` or
``empty_pdf``, all counted. Key = the text file's relative path without extension (``doc.page-3``);
json: ``{"pdf": relative path, "page": N}`` (plus a ``.md`` file's ``front_matter``). Pages are
rendered by core/pdf.py (``--longest-side``, ``--dpi``, ``--pages`` of ``python -m core.shards``).
The ``folder`` source reads PDFs by the same rules beside its images.
"""
import os
import re
from pathlib import Path

from core import hookimpl
from core.errors import ConfigError
from core.pdf import PdfPage, PdfSkip, page_count
from core.sources import TEXT_EXTS, Item, Skip, folder_groups, function_source

PAGE_TEXT = re.compile(r"^(?P<doc>.+)\.page-(?P<page>\d+)$")  # "doc.page-3" (a text file's stem) -> doc, 3


def _text(files):
    return next((files[e] for e in TEXT_EXTS if e in files), None)


def pdf_items(groups):
    """Items and Skips for the PDFs in ``groups`` (core.sources.folder_groups); the groups they use (PDFs and
    their texts) are removed, so what is left can be read as images."""
    pdfs = {rel: files["pdf"] for rel, files in groups.items() if "pdf" in files}
    pages = {}  # relative PDF path without extension -> {page: (relative text stem, text path)}
    for rel, files in list(groups.items()):
        m = PAGE_TEXT.match(rel)
        text = _text(files)
        if m and text and m["doc"] in pdfs:
            pages.setdefault(m["doc"], {})[int(m["page"])] = (rel, text)
            del groups[rel]
    items = []
    for rel, pdf in pdfs.items():
        files = groups[rel]
        whole = _text(files)
        for ext in ("pdf", *TEXT_EXTS):  # an image of the same stem stays for the folder source (a duplicate_key)
            files.pop(ext, None)
        if not files:
            del groups[rel]
        try:
            count = page_count(pdf)
        except PdfSkip as skip:
            items.append(Skip(skip.reason, f"{pdf} ({skip.detail})" if skip.detail else pdf))
            continue
        named = pages.get(rel, {})
        if not named and whole is not None:
            if count > 1:
                items.append(Skip("pdf_needs_page", f"{whole}: {pdf} has {count} pages; name texts "
                                                    f"{os.path.basename(rel)}.page-N.txt"))
            else:
                items.append(Item(rel, pdf, image=PdfPage(pdf, 1), text=Path(whole), meta=_meta(rel, 1)))
            continue
        for n in range(1, count + 1):
            key, text = named.get(n, (f"{rel}.page-{n}", None))
            items.append(Item(key, f"{pdf}#page={n}", image=PdfPage(pdf, n), text=Path(text) if text else None,
                              meta=_meta(rel, n)))
        items += [Skip("pdf_page_out_of_range", f"{text} ({pdf} has {count} pages)")
                  for n, (_, text) in sorted(named.items()) if n > count]
    return items


def _meta(rel, page):
    return {"pdf": f"{rel}.pdf", "page": page}


def read_pdf(source, images_root=None):
    if images_root is not None:
        raise ConfigError("--images-root: not used with the pdf format (texts sit beside their PDFs)")
    groups = folder_groups(source)
    if not any("pdf" in files for files in groups.values()):
        raise ConfigError(f"{source}: no *.pdf file in this folder (images with texts: the folder format)")
    return pdf_items(groups)


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "pdf", function_source(read_pdf, needs="folder"))
