"""Readers for ``python -m core.shards``: a SOURCE in one of the FORMATS -> Items (or Skips).

Each reader yields one ``Item`` per sample it finds (paths and texts not yet read) or a
``Skip`` with its reason; core/shards.py reads, checks and writes them. Malformed input (a
line that is not JSON, a field of the wrong type) raises ConfigError naming file, line, key.

Formats (SOURCE):

* ``folder``: a folder of images (png, jpg, jpeg, webp), searched recursively (hidden files and
  folders skipped), each with a text file of the same stem: ``page1.png`` + ``page1.txt`` (or
  ``page1.md``; ``.txt`` wins if both exist). Key = the relative path without extension.
* ``jsonl``: a manifest (``.jsonl`` or ``.jsonl.gz``), one ``{"image": path, "text": "...",
  "id": optional, "meta": optional object}`` per line. Key = ``id``, else the image path without
  extension.
* ``olmocr``: olmOCR-mix style records, a JSONL file or a folder of them (``*.jsonl``,
  ``*.jsonl.gz``, recursive). Accepted keys, the first present wins: image path ``image``,
  ``image_path``, ``page_image``, ``png_path`` (a ``data:image/...;base64,`` value is decoded);
  embedded image ``png_base64``, ``image_base64``; text ``text``, ``markdown``,
  ``natural_text``, ``response.natural_text`` (``response`` an object or a JSON string; a null
  text counts as empty); key ``id``, else ``<file stem>_<line>``. The other fields go to the
  json member. olmOCR-mix itself ships PDFs: render the pages to PNG first and add an image key;
  a record without one is skipped as ``missing_image``.
* ``llava``: LLaVA-Instruct JSON (a list, or JSONL) of ``{"id", "image", "conversations"}``.
  Key = ``id``, else the image path without extension, else the item index.
* ``fox``: Fox GT JSON (a list of ``{"image", "conversations": [human, gpt]}``): ``txt`` = the
  gpt turn (the GT), json ``prompt`` = the human turn without its ``<image>`` line. Key = the
  image name without extension, ``<stem>_<index>`` for an image listed more than once.
* ``omnidocbench``: OmniDocBench.json: image ``page_info.image_path``, ``txt`` = the page text as
  the evaluator assembles it (``core.metric_inputs.omnidocbench_page_text``), json
  ``{"page_info"}``. Key = the image stem.

Relative image paths are looked up under ``--images-root``, else beside the SOURCE file. ``fox``
and ``omnidocbench`` are eval sets: a sample with empty text is kept (its page still counts);
the other formats skip it.
"""
import base64
import binascii
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.data import IMAGE_EXTS
from core.errors import ConfigError
from core.jsonfiles import jsonl_records, read_json
from core.metric_inputs import omnidocbench_page_text

TEXT_EXTS = ("txt", "md")
OTHER_IMAGE_EXTS = ("tif", "tiff", "bmp", "gif", "jp2", "ppm", "pgm", "pbm")  # Pillow reads them, core.data not
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
OLMOCR_IMAGE_PATH = ("image", "image_path", "page_image", "png_path")
OLMOCR_IMAGE_B64 = ("png_base64", "image_base64")
OLMOCR_TEXT = ("text", "markdown", "natural_text")


@dataclass
class Item:
    """One sample as a reader sees it, before its files are read and checked."""
    key: str                      # raw key (cleaned by clean_key)
    where: str                    # for messages: "manifest.jsonl:3", "fox.json item 4", a path
    image: object = None          # a path (str), embedded bytes, or None (no image)
    text: object = None           # a str, a Path to a text file, or None (no text)
    meta: dict = None             # -> {key}.json
    needs_image: bool = True      # False: a missing image makes a text-only sample
    needs_text: bool = True
    empty_ok: bool = False        # eval formats keep samples whose text is empty


@dataclass
class Skip:
    reason: str
    where: str


# ---- small helpers

def parse_size(text):
    """'1GB' -> 10**9; K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS:
        raise ConfigError(f"--max-size {text!r}: expected a size like 500MB, 1GB, 2GiB or a number of bytes")
    size = int(float(m.group(1)) * UNITS[unit])
    if size < 1:
        raise ConfigError(f"--max-size {text!r} must be at least 1 byte")
    return size


def clean_key(raw):
    """A WebDataset key: no dots (the key ends at the first one), no folders, no whitespace."""
    key = re.sub(r"[./\\\s]", "_", str(raw))
    if not key or key.startswith("__"):  # core.data skips members starting with "__"
        key = "k" + key
    return key


def _path_key(path):
    """'sub/page.1.png' -> 'sub/page.1': the path without its last extension (cleaned later)."""
    path = str(path).replace("\\", "/")
    folder, _, base = path.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return f"{folder}/{stem}" if folder else stem


def _resolve(path, base):
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base, path)


def _image_base(source, images_root):
    return images_root if images_root is not None else os.path.dirname(os.path.abspath(source))


def _json_items(path):
    """(where, index, item) of a JSON list (or of a JSONL file), each item an object."""
    if str(path).endswith((".jsonl", ".jsonl.gz")):
        for n, record in jsonl_records(path):
            yield f"{path}:{n}", n, record
        return
    items = read_json(path)
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a JSON list of items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: item {i}: expected a JSON object, not {type(item).__name__}")
        yield f"{path} item {i}", i, item


def _string(value, where, key, optional=True):
    """value if it is a string (or None when optional), else a ConfigError naming where and key."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value


def _id(value, where):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: id must be a string or an integer, not {type(value).__name__}")
    return str(value)


def count_items(items):
    return len(items) if isinstance(items, list) else None


# ---- readers: SOURCE -> Items (or Skips)

def read_folder(source, images_root=None):
    if images_root is not None:
        raise ConfigError("--images-root: not used with the folder format (images sit beside their texts)")
    if not os.path.isdir(source):
        raise ConfigError(f"{source}: the folder format needs a folder")
    groups = {}  # relative path without extension -> {ext: path}
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or "." not in name:
                continue
            stem, ext = name.rsplit(".", 1)
            rel = os.path.relpath(os.path.join(folder, stem), source).replace(os.sep, "/")
            groups.setdefault(rel, {})[ext.lower()] = os.path.join(folder, name)
    items = []
    for rel, files in groups.items():
        images = [files[e] for e in IMAGE_EXTS if e in files]
        text = next((files[e] for e in TEXT_EXTS if e in files), None)
        if not images:
            other = next((files[e] for e in OTHER_IMAGE_EXTS if e in files), None)
            if other:
                items.append(Skip("unsupported_image_type", other))
            elif text:
                items.append(Skip("missing_image", text))
            continue
        for image in images:  # page.png + page.jpg: the second is a duplicate_key
            items.append(Item(rel, image, image=image, text=Path(text) if text else None))
    return items


def read_jsonl(source, images_root=None):
    base = _image_base(source, images_root)
    for n, record in jsonl_records(source):
        where = f"{source}:{n}"
        image = _string(record.get("image"), where, "image")
        text = _string(record.get("text"), where, "text")
        meta = record.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise ConfigError(f"{where}: meta must be a JSON object, not {type(meta).__name__}")
        key = _id(record.get("id"), where) or (_path_key(image) if image else f"line_{n}")
        yield Item(key, where, image=_resolve(image, base) if image else None, text=text, meta=meta)


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


def _data_url(value):
    """'data:image/png;base64,...' -> bytes, or None if value is not a data URL."""
    if isinstance(value, str) and value.startswith("data:image/") and ";base64," in value[:64]:
        return _b64(value.split(",", 1)[1])
    return None


def _b64(value):
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return b""  # not base64: Pillow then reports a bad image


def read_olmocr(source, images_root=None):
    for path in _olmocr_files(source):
        base = _image_base(path, images_root)
        stem = Path(path).name.split(".")[0]
        for n, record in jsonl_records(path):
            where = f"{path}:{n}"
            rest = dict(record)
            image = None
            for key in OLMOCR_IMAGE_PATH:
                value = rest.pop(key, None)
                if value is not None and image is None:
                    value = _string(value, where, key)
                    image = _data_url(value) or _resolve(value, base)
            for key in OLMOCR_IMAGE_B64:
                value = rest.pop(key, None)
                if value is not None and image is None:
                    image = _b64(_string(value, where, key))
            text, found = None, False
            for key in OLMOCR_TEXT:
                if key in rest:
                    value = _string(rest.pop(key), where, key)
                    if not found:
                        text, found = value or "", True
            response = rest.get("response")
            if isinstance(response, str) and response.lstrip().startswith("{"):
                try:
                    response = json.loads(response)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: response is a string but not valid JSON ({e.msg})") from e
            if isinstance(response, dict) and "natural_text" in response:
                response = dict(response)
                value = _string(response.pop("natural_text"), where, "response.natural_text")
                if not found:
                    text, found = value or "", True
                rest["response"] = response
            key = _id(rest.pop("id", None), where) or f"{stem}_{n}"
            yield Item(key, where, image=image, text=text if found else None, meta=rest or None)


def _turns(conversations, where):
    if not isinstance(conversations, list) or not conversations:
        raise ConfigError(f"{where}: conversations must be a non-empty list of turns")
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConfigError(f"{where}: conversations[{t}] must be an object")
        speaker, text = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        _string(turn.get(speaker), where, f"conversations[{t}].{speaker}", optional=False)
        _string(turn.get(text), where, f"conversations[{t}].{text}", optional=False)
    return conversations


def read_llava(source, images_root=None):
    base = _image_base(source, images_root)
    items = []
    for where, i, item in _json_items(source):
        image = item.get("image")
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if isinstance(image, list):
            items.append(Skip("multiple_images", where))
            continue
        image = _string(image, where, "image")
        conversations = _turns(item.get("conversations"), where)
        key = _id(item.get("id"), where) or (_path_key(image) if image else f"item_{i}")
        items.append(Item(key, where, image=_resolve(image, base) if image else None,
                          meta={"conversations": conversations}, needs_image=image is not None,
                          needs_text=False))
    return items


def fox_prompt(value):
    """The human turn without its '<image>' line: '<image>\\nOCR this' -> 'OCR this'."""
    return re.sub(r"<image>\n?", "", value).strip()


def read_fox(source, images_root=None):
    base = _image_base(source, images_root)
    items = list(_json_items(source))
    repeats = Counter(item.get("image") for _, _, item in items if isinstance(item.get("image"), str))
    out = []
    for where, i, item in items:
        image = _string(item.get("image"), where, "image", optional=False)
        turns = item.get("conversations")
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2])):
            raise ConfigError(f"{where}: conversations must be a list [human turn, gpt turn]")
        prompt = _string(turns[0].get("value"), where, "conversations[0].value", optional=False)
        gt = _string(turns[1].get("value"), where, "conversations[1].value", optional=False)
        key = _path_key(image) if repeats[image] == 1 else f"{_path_key(image)}_{i}"
        out.append(Item(key, where, image=_resolve(image, base), text=gt, empty_ok=True,
                        meta={"prompt": fox_prompt(prompt), "image": image, "index": i}))
    return out


def read_omnidocbench(source, images_root=None, evaluator_quirks=False):
    base = _image_base(source, images_root)
    out = []
    for where, i, page in _json_items(source):
        where = f"{source} page {i}"
        info = page.get("page_info")
        image = info.get("image_path") if isinstance(info, dict) else None
        if not isinstance(image, str) or not image:
            raise ConfigError(f"{where}: page_info.image_path must be a non-empty string")
        try:
            text = omnidocbench_page_text(page, evaluator_quirks)
        except ValueError as e:
            raise ConfigError(f"{where} ({image}): {e}") from e
        out.append(Item(Path(image.replace("\\", "/")).stem, where, image=_resolve(image, base), text=text,
                        meta={"page_info": info}, empty_ok=True))
    return out


READERS = {"folder": read_folder, "jsonl": read_jsonl, "olmocr": read_olmocr, "llava": read_llava,
           "fox": read_fox, "omnidocbench": read_omnidocbench}
