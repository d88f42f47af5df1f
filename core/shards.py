"""Write your own data as WebDataset shards; ``python -m core.shards``.

    python -m core.shards FORMAT SOURCE --out DIR [--name train] [--max-count 10000] [--max-size 1GB]
                          [--images-root DIR] [--limit N] [--evaluator-quirks]

The last line printed is the shards' brace pattern, e.g. ``/data/out/train-{000000..000012}.tar``:
what the ``shards`` dataset takes as ``data.dataset.train`` (or ``eval``).

Sample schema (one sample = the tar members sharing a key, WebDataset's naming):

* ``{key}.png`` / ``.jpg`` / ``.jpeg`` / ``.webp``: the page image, the original file's bytes
  (extension from the file name; for embedded or oddly named images, from the format Pillow
  detects). Every image is checked with Pillow's ``verify()`` first. A text-only sample
  (``llava`` items without ``image``) has no image member.
* ``{key}.txt``: the target text, UTF-8, exactly as read (a UTF-8 byte-order mark is dropped).
* ``{key}.json``: optional metadata: ``{"conversations": [...]}`` for ``llava`` (the turns as
  given, ``{"from": "human"|"gpt", "value": ...}``, ``<image>`` left in place; no ``txt``), ``{"prompt",
  "image", "index"}`` for ``fox``, ``{"page_info"}`` for ``omnidocbench``, the record's other fields
  for ``olmocr`` and the line's ``meta`` object for ``jsonl``.
* Keys are unique; ``.``, ``/``, ``\\`` and whitespace in them become ``_`` (a WebDataset key ends at
  the first dot); a later sample whose key is taken is skipped as ``duplicate_key``.

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

Shards are ``{name}-000000.tar``, ``{name}-000001.tar``, ... each with at most ``--max-count``
samples and ``--max-size`` bytes (a single sample larger than that gets a shard of its own).
They are written into ``DIR/.{name}.partial-PID`` and moved into DIR only when all are done,
replacing every ``{name}-NNNNNN.tar`` of an earlier run; an interrupted run leaves nothing in DIR.

Skipped samples are counted by reason (missing_image, bad_image, unsupported_image_type,
missing_text, non_utf8_text, empty_text, duplicate_key) with the first examples of each.
Malformed input (a line that is not JSON, a field of the wrong type) stops the run with one
``error:`` line naming the file, line or item and key, exit code 2.
"""
import argparse
import base64
import binascii
import gzip
import io
import json
import os
import re
import shutil
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from core.data import IMAGE_EXTS
from core.errors import ConfigError
from core.metric_inputs import omnidocbench_page_text

FORMATS = ("folder", "jsonl", "olmocr", "llava", "fox", "omnidocbench")
PIL_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
OTHER_IMAGE_EXTS = ("tif", "tiff", "bmp", "gif", "jp2", "ppm", "pgm", "pbm")  # Pillow reads them, core.data not
TEXT_EXTS = ("txt", "md")
SHOW_EXAMPLES = 3
BLOCK = tarfile.BLOCKSIZE  # 512: headers and data are padded to blocks
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


@dataclass
class Summary:
    pattern: str = None
    shards: list = field(default_factory=list)
    samples: int = 0
    text_only: int = 0
    empty_kept: int = 0
    bytes: int = 0
    oversize: int = 0             # shards over max_size: each holds one sample larger than it
    replaced: int = 0             # shards of an earlier run replaced or removed
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)


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


def _read_json(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return json.loads(data.decode("utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def _jsonl_records(path):
    """Yield (line number, object) of a JSONL file (or .jsonl.gz); bad lines are ConfigErrors naming file:line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not UTF-8 ({e.reason})") from e
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(record, dict):
                    raise ConfigError(f"{path}:{n}: expected a JSON object, not {type(record).__name__}")
                yield n, record
    except (OSError, EOFError) as e:
        raise ConfigError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from e


def _json_items(path):
    """(where, index, item) of a JSON list (or of a JSONL file), each item an object."""
    if str(path).endswith((".jsonl", ".jsonl.gz")):
        for n, record in _jsonl_records(path):
            yield f"{path}:{n}", n, record
        return
    items = _read_json(path)
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


def _total(items):
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
    for n, record in _jsonl_records(source):
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
        for n, record in _jsonl_records(path):
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


# ---- one item -> tar members

def load_image(image):
    """path or bytes -> (ext, bytes), or a skip reason."""
    if isinstance(image, bytes):
        data, ext = image, None
    else:
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError:
            return "missing_image"
        ext = image.rsplit(".", 1)[-1].lower() if "." in os.path.basename(image) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF warnings: the bytes are kept
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()
    except Exception:  # Pillow raises many types for bad bytes
        return "bad_image"
    if ext not in IMAGE_EXTS:
        ext = PIL_EXT.get(fmt)
        if ext is None:
            return "unsupported_image_type"
    return ext, data


def load_text(text):
    """str, Path or None -> (text, None), or (None, skip reason)."""
    if isinstance(text, Path):
        try:
            data = text.read_bytes()
        except OSError:
            return None, "missing_text"
        try:
            return data.decode("utf-8-sig"), None
        except UnicodeDecodeError:
            return None, "non_utf8_text"
    return text, None


def members(item):
    """Item -> ([(ext, bytes)], None) or (None, skip reason)."""
    out = []
    if item.image is not None:
        loaded = load_image(item.image)
        if isinstance(loaded, str):
            return None, loaded
        out.append(loaded)
    elif item.needs_image:
        return None, "missing_image"
    if item.text is not None:
        text, reason = load_text(item.text)
        if reason:
            return None, reason
        if not text.strip() and not item.empty_ok:
            return None, "empty_text"
        try:
            out.append(("txt", text.encode("utf-8")))
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
            return None, "non_utf8_text"
    elif item.needs_text:
        return None, "missing_text"
    if item.meta is not None:
        try:
            out.append(("json", json.dumps(item.meta, ensure_ascii=False).encode("utf-8")))
        except UnicodeEncodeError:
            return None, "non_utf8_text"
    return out, None


# ---- the tar writer

class ShardWriter:
    """Tars of at most max_count samples and max_size bytes (exact: headers, padding and the end blocks)."""

    def __init__(self, folder, name, max_count, max_size):
        self.folder, self.name, self.max_count, self.max_size = folder, name, max_count, max_size
        self.tar, self.count, self.paths, self.oversize = None, 0, [], 0

    def _info(self, name, size):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
        return info

    @staticmethod
    def _final_size(offset):
        """File size once closed at this offset: two zero blocks, then padded to tarfile's 10240-byte records."""
        return -(-(offset + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def _member_bytes(self, name, size):
        header = self._info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        return len(header) + -(-size // BLOCK) * BLOCK

    def write(self, key, parts):
        size = sum(self._member_bytes(f"{key}.{ext}", len(data)) for ext, data in parts)
        offset = self.tar.offset if self.tar else 0
        if self.tar and (self.count >= self.max_count or self._final_size(offset + size) > self.max_size):
            self.close()
        if self.tar is None:
            path = os.path.join(self.folder, f"{self.name}-{len(self.paths):06d}.tar")
            self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8")
            self.paths.append(path)
            if self._final_size(size) > self.max_size:
                self.oversize += 1
        for ext, data in parts:
            self.tar.addfile(self._info(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.count += 1

    def close(self):
        if self.tar:
            self.tar.close()
        self.tar, self.count = None, 0


# ---- the whole run

def _alive(pid):
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def _shard_pattern(folder, name, count):
    if count == 1:
        return os.path.join(folder, f"{name}-000000.tar")
    return os.path.join(folder, f"{name}-{{000000..{count - 1:06d}}}.tar")


def write_shards(fmt, source, out, name="train", max_count=10000, max_size=10**9, images_root=None,
                 limit=None, evaluator_quirks=False, progress=True):
    """Read SOURCE in format ``fmt`` and write shards into ``out``; returns a Summary (see the module doc)."""
    if fmt not in READERS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not name or re.search(r"[/\\{}*?\[\]]", name) or name.startswith("."):
        raise ConfigError(f"--name {name!r}: a plain file name prefix, without / \\ {{ }} * ? [ ]")
    if int(max_count) < 1:
        raise ConfigError(f"--max-count {max_count}: must be at least 1")
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1")
    max_size = parse_size(max_size) if isinstance(max_size, str) else int(max_size)
    if not os.path.exists(source):
        raise ConfigError(f"{source}: no such file or folder")
    if fmt in ("jsonl", "llava", "fox", "omnidocbench") and not os.path.isfile(source):
        raise ConfigError(f"{source}: the {fmt} format needs a file")
    if images_root is not None and not os.path.isdir(images_root):
        raise ConfigError(f"--images-root {images_root}: no such folder")
    kwargs = {"evaluator_quirks": evaluator_quirks} if fmt == "omnidocbench" else {}
    items = READERS[fmt](source, images_root, **kwargs)

    out = os.path.abspath(os.path.expanduser(out))
    try:
        os.makedirs(out, exist_ok=True)
        for stale in Path(out).glob(f".{name}.partial-*"):
            if not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier run
        tmp = os.path.join(out, f".{name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from e

    summary, seen = Summary(), set()
    writer = ShardWriter(tmp, name, int(max_count), max_size)

    def skip(reason, where):
        summary.skipped[reason] += 1
        examples = summary.examples.setdefault(reason, [])
        if len(examples) < SHOW_EXAMPLES:
            examples.append(where)

    try:
        with tqdm(items, total=_total(items), desc=f"{fmt} -> {name}", unit="sample", disable=not progress,
                  file=sys.stderr) as bar:  # closed (its line ended) before an error line is printed
            for item in bar:
                if isinstance(item, Skip):
                    skip(item.reason, item.where)
                    continue
                key = clean_key(item.key)
                if key in seen:
                    skip("duplicate_key", f"{item.where} (key {key!r})")
                    continue
                parts, reason = members(item)
                if reason:
                    skip(reason, _example(item, reason))
                    continue
                seen.add(key)
                try:
                    writer.write(key, parts)
                except OSError as e:  # disk full, quota: one line, and the partial folder goes
                    raise ConfigError(f"--out {out}: cannot write a shard ({e.strerror or e})") from e
                summary.samples += 1
                summary.text_only += not any(ext in IMAGE_EXTS for ext, _ in parts)
                summary.empty_kept += any(ext == "txt" and not data.strip() for ext, data in parts)
                if summary.skipped and summary.samples % 100 == 0:
                    bar.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
                if limit is not None and summary.samples >= int(limit):
                    break
        writer.close()
        if not summary.samples:
            raise ConfigError(f"{source}: no usable sample ({_skips_inline(summary)})")
        summary.oversize = writer.oversize
        summary.replaced = _publish(writer.paths, out, name)
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary.shards = [os.path.join(out, os.path.basename(p)) for p in writer.paths]
    summary.bytes = sum(os.path.getsize(p) for p in summary.shards)
    summary.pattern = _shard_pattern(out, name, len(summary.shards))
    return summary


def _publish(paths, out, name):
    """Move the finished shards into out, over an earlier run's, and remove that run's extra shards.

    Returns how many shards of an earlier run were replaced or removed."""
    old = [p for p in Path(out).iterdir() if re.fullmatch(re.escape(name) + r"-\d{6}\.tar", p.name)]
    ours = {os.path.basename(p) for p in paths}
    try:
        for path in paths:
            os.replace(path, os.path.join(out, os.path.basename(path)))
        for path in old:
            if path.name not in ours:
                path.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot move the shards there ({e.strerror or e})") from e
    return len(old)


def _example(item, reason):
    """Where a skipped item came from, with the file that failed when that is not already named."""
    if "image" in reason and isinstance(item.image, str) and item.image != item.where:
        return f"{item.where}: {item.image}"
    if "text" in reason and isinstance(item.text, Path):
        return str(item.text)
    return item.where


def _skips_inline(summary):
    if not summary.skipped:
        return "the source holds no samples"
    return "skipped: " + ", ".join(f"{r} {n} (e.g. {summary.examples[r][0]})" for r, n in summary.skipped.most_common())


def _human(n):
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_summary(summary, name="train"):
    lines = [f"wrote {summary.samples:,} samples in {len(summary.shards)} shard(s), {summary.bytes:,} bytes "
             f"({_human(summary.bytes)}), to {os.path.dirname(summary.pattern)}"]
    if summary.text_only:
        lines.append(f"  {summary.text_only:,} of them text-only (no image)")
    if summary.empty_kept:
        lines.append(f"  {summary.empty_kept:,} of them with empty text (kept: an eval set's page still counts)")
    if summary.oversize:
        lines.append(f"  {summary.oversize} shard(s) exceed --max-size: each holds one sample larger than it")
    if summary.replaced:
        lines.append(f"  replaced {summary.replaced} shard(s) of an earlier run with the same --name")
    total = sum(summary.skipped.values())
    lines.append(f"skipped {total:,} sample(s)" + (":" if total else ""))
    for reason, n in summary.skipped.most_common():
        lines.append(f"  {reason}: {n:,}  e.g. " + "; ".join(summary.examples[reason]))
    split = name if name in ("train", "eval") else "train"
    lines.append(f"shards (data.dataset.{split} of the shards dataset):")
    lines.append(summary.pattern)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.shards", description=__doc__.split("\n")[0])
    parser.add_argument("format", choices=FORMATS, help="input format")
    parser.add_argument("source", help="input file or folder")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--name", default="train", help="shard name prefix (default train)")
    parser.add_argument("--max-count", type=int, default=10000, help="samples per shard at most (default 10000)")
    parser.add_argument("--max-size", default="1GB", help="bytes per shard at most, e.g. 500MB, 2GiB (default 1GB)")
    parser.add_argument("--images-root", help="folder that relative image paths are under "
                                              "(default: the SOURCE file's folder)")
    parser.add_argument("--limit", type=int, help="stop after writing this many samples")
    parser.add_argument("--evaluator-quirks", action="store_true",
                        help="omnidocbench: repeat a block shared by two truncation relations, as the evaluator does")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = write_shards(args.format, args.source, args.out, name=args.name, max_count=args.max_count,
                               max_size=parse_size(args.max_size), images_root=args.images_root,
                               limit=args.limit, evaluator_quirks=args.evaluator_quirks,
                               progress=not args.quiet)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
