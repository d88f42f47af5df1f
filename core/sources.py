"""Reading other formats into shards: what a ``source`` plugin yields, and the helpers they share.

``python -m core.shards FORMAT SOURCE`` looks FORMAT up among the registered ``source`` plugins
(core/contracts.py ``Source``; the built-ins are in plugins/sources/). A source yields one
``Item`` per sample it finds (paths and texts not yet read) or a ``Skip`` with its reason;
core/shards.py reads, checks and writes them. Malformed input (a line that is not JSON, a
field of the wrong type) raises ConfigError naming file, line and key.

Relative image paths are looked up under ``--images-root``, else beside the SOURCE file.
"""
import base64
import binascii
import inspect
import os
import re
from dataclasses import dataclass

import yaml

from core.errors import ConfigError
from core.jsonfiles import jsonl_records, read_json

TEXT_EXTS = ("txt", "md")
OTHER_IMAGE_EXTS = ("tif", "tiff", "bmp", "gif", "jp2", "ppm", "pgm", "pbm")  # Pillow reads them, training not


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


class FunctionSource:
    """A ``source`` made of a function ``read(source, images_root, **options)``."""

    def __init__(self, read, needs, options):
        self._read, self.needs, self.options = read, needs, options

    def read(self, source, images_root=None):
        return self._read(source, images_root, **self.options)


def function_source(read, needs):
    """The factory to register for ``read``: ``registry.add("source", "jsonl", function_source(read_jsonl, "file"))``.

    Its keyword arguments are ``read``'s after (source, images_root), so ``--option`` names are checked."""
    def factory(**options):
        return FunctionSource(read, needs, options)
    params = list(inspect.signature(read).parameters.values())[2:]
    factory.__signature__ = inspect.Signature(params)
    return factory


# ---- helpers the sources share

def clean_key(raw):
    """A WebDataset key: no dots (the key ends at the first one), no folders, no whitespace."""
    key = re.sub(r"[./\\\s]", "_", str(raw))
    if not key or key.startswith("__"):  # the shard reader skips members starting with "__"
        key = "k" + key
    return key


def path_key(path):
    """'sub/page.1.png' -> 'sub/page.1': the path without its last extension (cleaned later); a PDF page
    'doc.pdf#page=3' -> 'doc_p3', so the pages of one PDF get keys of their own."""
    page = re.fullmatch(r"(.*\.pdf)#page=(\d+)", str(path), re.IGNORECASE)
    if page:
        return f"{path_key(page[1])}_p{int(page[2])}"
    path = str(path).replace("\\", "/")
    folder, _, base = path.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return f"{folder}/{stem}" if folder else stem


def folder_groups(source):
    """A folder searched recursively (hidden files and folders skipped) -> {relative path without its last
    extension: {extension (lowercased): path}}, in sorted order; what the folder and pdf sources pair up."""
    groups = {}
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or "." not in name:
                continue
            stem, ext = name.rsplit(".", 1)
            rel = os.path.relpath(os.path.join(folder, stem), source).replace(os.sep, "/")
            groups.setdefault(rel, {})[ext.lower()] = os.path.join(folder, name)
    return groups


def split_front_matter(text):
    """-> (front matter dict or None, the text after it): a markdown file's YAML front matter, read as
    olmOCR's FrontMatterParser reads it (docs/data.md §4): the text starts with a ``---`` line, the front
    matter runs to the next line starting with ``---``, and the text after that line is stripped of
    surrounding whitespace. Only a block that parses as a YAML mapping counts (a page may well begin with
    a markdown rule); otherwise the text is returned unchanged."""
    if not text.startswith("---\n"):
        return None, text
    end = text.find("\n---", 4)
    if end == -1:
        return None, text
    try:
        front = yaml.safe_load(text[4:end])
    except yaml.YAMLError:
        return None, text
    if not isinstance(front, dict):
        return None, text
    return front, text[end + 4:].split("\n", 1)[1].strip() if "\n" in text[end + 4:] else ""


def resolve(path, base):
    """``path`` with ~ expanded, relative to ``base`` unless absolute."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base, path)


def image_base(source, images_root):
    return images_root if images_root is not None else os.path.dirname(os.path.abspath(source))


def json_items(path):
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


def string(value, where, key, optional=True):
    """value if it is a string (or None when optional), else a ConfigError naming where and key."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value


def sample_id(value, where):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: id must be a string or an integer, not {type(value).__name__}")
    return str(value)


def count_items(items):
    return len(items) if isinstance(items, list) else None


def data_url(value):
    """'data:image/png;base64,...' -> bytes, or None if value is not a data URL."""
    if isinstance(value, str) and value.startswith("data:image/") and ";base64," in value[:64]:
        return b64(value.split(",", 1)[1])
    return None


def b64(value):
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return b""  # not base64: Pillow then reports a bad image


def check_turns(conversations, where):
    if not isinstance(conversations, list) or not conversations:
        raise ConfigError(f"{where}: conversations must be a non-empty list of turns")
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConfigError(f"{where}: conversations[{t}] must be an object")
        speaker, text = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        string(turn.get(speaker), where, f"conversations[{t}].{speaker}", optional=False)
        string(turn.get(text), where, f"conversations[{t}].{text}", optional=False)
    return conversations
