"""The ``jsonl`` source of ``python -m core.shards``.

``jsonl``: a manifest (``.jsonl`` or ``.jsonl.gz``), one ``{"image": path, "text": "...",
"id": optional, "meta": optional object}`` per line. Key = ``id``, else the image path without
extension. A PDF page is an image too: ``"image": "doc.pdf#page=3"``, or ``"image": "doc.pdf",
"page": 3`` (pages from 1; a bare one-page ``doc.pdf`` is its page; core/pdf.py).
"""
from core import hookimpl
from core.errors import ConfigError
from core.jsonfiles import jsonl_records
from core.sources import (
    Item,
    function_source,
    image_base,
    path_key,
    resolve,
    sample_id,
    string,
)


def read_jsonl(source, images_root=None):
    base = image_base(source, images_root)
    for n, record in jsonl_records(source):
        where = f"{source}:{n}"
        image = string(record.get("image"), where, "image")
        text = string(record.get("text"), where, "text")
        page = record.get("page")
        if page is not None:
            if isinstance(page, bool) or not isinstance(page, int) or page < 1:
                raise ConfigError(f"{where}: page must be a page number from 1, not {page!r}")
            if not image or not image.lower().endswith(".pdf"):
                raise ConfigError(f"{where}: page {page} given for {image!r}, which is not a .pdf path")
        meta = record.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise ConfigError(f"{where}: meta must be a JSON object, not {type(meta).__name__}")
        if page is not None:
            image = f"{image}#page={page}"
        key = sample_id(record.get("id"), where) or (path_key(image) if image else f"line_{n}")
        yield Item(key, where, image=resolve(image, base) if image else None, text=text, meta=meta)


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "jsonl", function_source(read_jsonl, needs="file"))
