"""The ``olmocr`` source of ``python -m core.shards``: olmOCR-mix, in either of its layouts (docs/data.md §4).

* **olmOCR-mix-1025 as the olmocr toolkit prepares it** (``olmocr/data/prepare_olmocrmix.py``): a
  folder, searched recursively, of ``<id>.md`` files each beside its one-page ``<id>.pdf`` (a symlink
  into the extracted PDF tarballs). The ``.md`` starts with a YAML front matter (primary_language,
  is_rotation_valid, rotation_correction, is_table, is_diagram) and the page's text follows it. The
  page is rendered (core/pdf.py, ``--longest-side`` / ``--dpi``), turned by ``rotation_correction``
  as olmOCR turns it (Pillow's ROTATE_n), ``txt`` = the text after the front matter, json =
  ``{"front_matter": {...}, "pdf": relative path}``; not trained on. A page without text (olmOCR
  writes the front matter alone) is ``empty_text``, an ``.md`` without its PDF ``missing_image``.
* **olmOCR-mix-1025 as distributed** (the dataset repository: ``{subset}_{split}.parquet`` files and
  ``pdf_tarballs/*.tar.gz``; needs pyarrow, ``pip install -e ".[olmocr]"``): one sample per parquet
  row, its PDF read out of the tarball its ``pdf_relpath`` names, the same front matter fields
  (columns here), ``natural_text`` as ``txt``; json adds ``pdf`` (the relpath) and ``url``. Rows come
  in tarball order, so each tarball is read once.
* **The older JSONL records** (olmOCR-mix-0225 style), a JSONL file or a folder of them (``*.jsonl``,
  ``*.jsonl.gz``). Accepted keys, the first present wins: image path ``image``, ``image_path``,
  ``page_image``, ``png_path`` (a ``data:image/...;base64,`` value is decoded); embedded image
  ``png_base64``, ``image_base64``; a PDF page ``pdf`` or ``pdf_path`` with ``page_number`` or
  ``page`` (from 1); text ``text``, ``markdown``, ``natural_text``, ``response.natural_text``
  (``response`` an object or a JSON string; a null text counts as empty); key ``id``, else
  ``<file stem>_<line>``. The other fields go to the json member.
"""
import json
import os
import tarfile
from pathlib import Path

from core import hookimpl
from core.errors import ConfigError
from core.jsonfiles import jsonl_records
from core.pdf import PdfPage
from core.sources import (
    Item,
    Skip,
    b64,
    data_url,
    function_source,
    image_base,
    resolve,
    sample_id,
    split_front_matter,
    string,
)

OLMOCR_IMAGE_PATH = ("image", "image_path", "page_image", "png_path")
OLMOCR_IMAGE_B64 = ("png_base64", "image_base64")
OLMOCR_PDF, OLMOCR_PAGE = ("pdf", "pdf_path"), ("page_number", "page")
OLMOCR_TEXT = ("text", "markdown", "natural_text")
ROTATIONS = (0, 90, 180, 270)
FRONT_MATTER = ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")
PREPARE = ("python -m olmocr.data.prepare_olmocrmix --dataset-path allenai/olmOCR-mix-1025 --subset 00_documents "
           "--split train --destination DIR (then this folder: DIR/processed_00_documents_train)")


def _files(source, suffixes):
    return sorted(str(p) for p in Path(source).rglob("*")
                  if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith("."))


def read_olmocr(source, images_root=None):
    if os.path.isfile(source):
        yield from _records(source, images_root)
        return
    if not os.path.isdir(source):
        raise ConfigError(f"{source}: no such file or folder")
    records, pages = _files(source, (".jsonl", ".jsonl.gz")), _files(source, (".md",))
    parquets = _files(source, (".parquet",))
    if not records and not pages and not parquets:
        raise ConfigError(f"{source}: no *.md page (with its .pdf), *.parquet (with pdf_tarballs/) nor *.jsonl / "
                          f"*.jsonl.gz file in this folder")
    for path in records:
        yield from _records(path, images_root)
    for path in pages:
        yield _page(Path(path), Path(source))
    if parquets:
        yield from _release(source, parquets)


def _page(md, root):
    """One olmOCR-mix-1025 page: <id>.md (front matter + text) beside <id>.pdf."""
    rel = md.relative_to(root).with_suffix("").as_posix()
    pdf = md.with_suffix(".pdf")
    if not pdf.exists():
        return Skip("missing_image", f"{md}: no {pdf.name} beside it")
    try:
        front, text = split_front_matter(md.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        return Skip("non_utf8_text", str(md))
    if front is None:
        raise ConfigError(f"{md}: no YAML front matter (olmOCR's .md pages begin with ---, primary_language, "
                          f"is_rotation_valid, rotation_correction, is_table, is_diagram, ---)")
    rotation = _rotation(front, md)
    if front.get("primary_language") == "None":  # prepare_olmocrmix writes Python's None as text
        front["primary_language"] = None
    return Item(rel, str(md), image=PdfPage(str(pdf), None, rotate=rotation), text=text,
                meta={"front_matter": front, "pdf": f"{rel}.pdf"})


def _rotation(front, where):
    rotation = front.get("rotation_correction")
    rotation = 0 if rotation is None else rotation  # olmOCR's own default for a missing value
    if isinstance(rotation, bool) or rotation not in ROTATIONS:
        raise ConfigError(f"{where}: rotation_correction must be 0, 90, 180 or 270, not {rotation!r}")
    return rotation


def _release(source, parquets):
    """olmOCR-mix-1025 as distributed: parquet rows, their PDFs in pdf_tarballs/*.tar.gz (docs/data.md §4)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{source}: reading olmOCR-mix's parquet files needs pyarrow: pip install -e \".[olmocr]\" "
                          f"(or unpack it with olmocr's prepare script: {PREPARE})") from None
    tarballs = _Tarballs(source)
    try:
        for path in parquets:
            table = pq.ParquetFile(path)
            missing = {"id", "pdf_relpath", "natural_text"} - set(table.schema_arrow.names)
            if missing:
                raise ConfigError(f"{path}: not an olmOCR-mix parquet (no {', '.join(sorted(missing))} column)")
            row_number = 0
            for batch in table.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    row_number += 1
                    yield _row(row, f"{path} row {row_number}", tarballs)
    finally:
        tarballs.close()


def _row(row, where, tarballs):
    relpath = string(row["pdf_relpath"], where, "pdf_relpath", optional=False)
    chunk, colon, member = relpath.partition(":")
    if not colon:
        raise ConfigError(f"{where}: pdf_relpath {relpath!r} is not TARBALL:MEMBER")
    front = {k: row.get(k) for k in FRONT_MATTER if k in row}
    rotation = _rotation(front, where)
    data = tarballs.get(chunk, member, where)
    if data is None:
        return Skip("missing_image", f"{where}: {relpath} is not in its tarball")
    meta = {"front_matter": front, "pdf": relpath, **({"url": row["url"]} if row.get("url") else {})}
    return Item(str(row["id"]), where, image=PdfPage(relpath, None, rotation, data=data),
                text=row["natural_text"] or "", meta=meta)


class _Tarballs:
    """The PDFs of pdf_tarballs/*.tar.gz, each tarball streamed once while rows come in its order (as
    olmocr's repackage_olmocrmix.py writes them); members read past are kept until a row asks for them."""

    def __init__(self, root):
        self.root, self.name, self.tar, self.members, self.ahead = root, None, None, None, {}

    def get(self, chunk, member, where):
        if chunk != self.name:
            self.close()
            path = os.path.join(self.root, chunk)
            if not os.path.isfile(path):
                return None
            self.name, self.tar = chunk, tarfile.open(path, "r|*")
            self.members = iter(self.tar)
        if member in self.ahead:
            return self.ahead.pop(member)
        try:
            for info in self.members:
                if info.isreg():
                    data = self.tar.extractfile(info).read()
                    if info.name == member:
                        return data
                    self.ahead[info.name] = data
                self.tar.members = []
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ConfigError(f"{where}: {os.path.join(self.root, chunk)}: cannot read it ({type(e).__name__}: "
                              f"{e})") from None
        return None

    def close(self):
        if self.tar is not None:
            self.tar.close()
        self.name, self.tar, self.members, self.ahead = None, None, None, {}


def _records(path, images_root):
    base = image_base(path, images_root)
    stem = Path(path).name.split(".")[0]
    for n, record in jsonl_records(path):
        where = f"{path}:{n}"
        rest = dict(record)
        image = None
        for key in OLMOCR_IMAGE_PATH:
            value = rest.pop(key, None)
            if value is not None and image is None:
                value = string(value, where, key)
                image = data_url(value) or resolve(value, base)
        for key in OLMOCR_IMAGE_B64:
            value = rest.pop(key, None)
            if value is not None and image is None:
                image = b64(string(value, where, key))
        pdf = next((string(rest[k], where, k) for k in OLMOCR_PDF if rest.get(k) is not None), None)
        page = next((rest[k] for k in OLMOCR_PAGE if rest.get(k) is not None), None)
        if image is None and pdf is not None:
            if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
                raise ConfigError(f"{where}: page_number must be a page number from 1, not {page!r}")
            image = PdfPage(resolve(pdf, base), page)
            for key in OLMOCR_PDF + OLMOCR_PAGE:
                rest.pop(key, None)
        text, found = None, False
        for key in OLMOCR_TEXT:
            if key in rest:
                value = string(rest.pop(key), where, key)
                if not found:
                    text, found = value or "", True
        response = rest.get("response")
        if isinstance(response, str) and response.lstrip().startswith("{"):
            try:
                response = json.loads(response)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ConfigError(f"{where}: response is a string but not valid JSON ({type(e).__name__}: {e})") from e
        if isinstance(response, dict) and "natural_text" in response:
            response = dict(response)
            value = string(response.pop("natural_text"), where, "response.natural_text")
            if not found:
                text, found = value or "", True
            rest["response"] = response
        key = sample_id(rest.pop("id", None), where) or f"{stem}_{n}"
        yield Item(key, where, image=image, text=text if found else None, meta=rest or None)


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "olmocr", function_source(read_olmocr, needs="either"))
