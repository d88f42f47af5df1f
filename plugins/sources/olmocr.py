"""The ``olmocr`` source of ``python -m core.shards``.

``olmocr``: olmOCR-mix style records, a JSONL file or a folder of them (``*.jsonl``,
``*.jsonl.gz``, recursive). Accepted keys, the first present wins: image path ``image``,
``image_path``, ``page_image``, ``png_path`` (a ``data:image/...;base64,`` value is decoded);
embedded image ``png_base64``, ``image_base64``; text ``text``, ``markdown``,
``natural_text``, ``response.natural_text`` (``response`` an object or a JSON string; a null
text counts as empty); key ``id``, else ``<file stem>_<line>``. The other fields go to the
json member. olmOCR-mix itself ships PDFs: render the pages to PNG first and add an image key;
a record without one is skipped as ``missing_image``.
"""
import json
import os
from pathlib import Path

from core import hookimpl
from core.errors import ConfigError
from core.jsonfiles import jsonl_records
from core.sources import Item, b64, data_url, image_base, resolve, sample_id, string


OLMOCR_IMAGE_PATH = ("image", "image_path", "page_image", "png_path")
OLMOCR_IMAGE_B64 = ("png_base64", "image_base64")
OLMOCR_TEXT = ("text", "markdown", "natural_text")


def _olmocr_files(source):
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise ConfigError(f"{source}: no such file or folder")
    files = sorted(str(p) for p in Path(source).rglob("*")
                   if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")) and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"{source}: no *.jsonl or *.jsonl.gz file in this folder")
    return files


def read_olmocr(source, images_root=None):
    for path in _olmocr_files(source):
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
                    raise ConfigError(f"{where}: response is a string but not valid JSON ({e})") from e
            if isinstance(response, dict) and "natural_text" in response:
                response = dict(response)
                value = string(response.pop("natural_text"), where, "response.natural_text")
                if not found:
                    text, found = value or "", True
                rest["response"] = response
            key = sample_id(rest.pop("id", None), where) or f"{stem}_{n}"
            yield Item(key, where, image=image, text=text if found else None, meta=rest or None)


class OlmocrSource:
    needs = "either"

    def read(self, source, images_root=None):
        return read_olmocr(source, images_root)


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "olmocr", OlmocrSource)
