"""Write your own data as WebDataset shards; ``python -m core.shards``.

    python -m core.shards FORMAT SOURCE --out DIR [--name train] [--max-count 10000] [--max-size 1GB]
                          [--images-root DIR] [--limit N] [--option KEY=VALUE ...] [--eval-every N]
                          [--longest-side 1288 | --dpi N] [--pages 1-3,7,10-]

The last line printed is the shards' brace pattern, e.g. ``/data/out/train-{000000..000012}.tar``:
what the ``shards`` dataset takes as ``data.dataset.train`` (or ``eval``); ``data.dataset.dir=DIR``
takes DIR's ``train-*.tar`` and ``eval-*.tar`` at once. ``--eval-every N`` holds every N-th sample out
as the eval split, ``eval-000000.tar`` ... beside the ``--name`` shards.

Sample schema (one sample = the tar members sharing a key, WebDataset's naming):

* ``{key}.png`` / ``.jpg`` / ``.jpeg`` / ``.webp``: the page image, the original file's bytes, checked
  with Pillow's ``verify()``. A PDF page (``doc.pdf#page=N``, or a ``pdf`` source's page; core/pdf.py)
  is rendered at ``--longest-side`` pixels (default 1288, olmOCR's) or ``--dpi`` and stored as PNG;
  ``--pages`` keeps only those pages. A text-only sample (``llava`` without ``image``) has no image.
* ``{key}.txt``: the target text, UTF-8, as read (a UTF-8 byte-order mark is dropped, and a text file's
  trailing whitespace and newlines: ``load_text``).
* ``{key}.json``: optional metadata, what the source plugin gives (each plugins/sources/ file says what);
  ``{"conversations": [...]}`` takes the place of ``txt`` for ``llava``.
* Keys are unique; ``.``, ``/``, ``\\`` and whitespace in them become ``_`` (a WebDataset key ends at
  the first dot); a later sample whose key is taken is skipped as ``duplicate_key``.

FORMAT is a registered ``source`` plugin; the built-ins, with their accepted keys, are in plugins/sources/.

Shards are ``{name}-000000.tar``, ``{name}-000001.tar``, ... each with at most ``--max-count``
samples and ``--max-size`` bytes (a single sample larger than that gets a shard of its own).
They are written into ``DIR/.{name}.partial-PID`` and moved into DIR only when all are done,
replacing an earlier run's ``{name}-NNNNNN.tar``; an interrupted run leaves nothing in DIR.

Skipped samples are counted by reason (docs/data.md lists them) with the first examples of each. A
``.md`` text's YAML front matter goes into the json member, not into ``txt``. Malformed input stops
the run with one ``error:`` line naming the file, line or item and key, exit code 2.
"""
import argparse
import io
import json
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from core.data import IMAGE_EXTS
from core.errors import ConfigError, cli_main
from core.pdf import (
    DEFAULT_LONGEST_SIDE,
    MIN_SHORT_SIDE,
    PageRange,
    PdfSkip,
    Render,
    as_pdf_page,
    render_png,
)
from core.pluginfiles import resolve_plugin_paths
from core.registry import load_plugins
from core.shardwriter import HeldOut, ShardWriter, check_eval_every, fresh_partial_dir, publish, shard_pattern
from core.sources import Skip, clean_key, count_items, split_front_matter
from core.yamlfile import parse_options

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PIL_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
SHOW_EXAMPLES = 3


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
    left_out: int = 0             # PDF pages outside --pages
    eval_pattern: str = None      # --eval-every: the held-out shards' pattern
    eval_samples: int = 0         # and how many samples they hold (counted in samples too)
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, reason, where):
        """Count a skipped item under ``reason``, keeping the first few places as examples."""
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < SHOW_EXAMPLES:
            examples.append(where)


# ---- one item -> tar members

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


def load_image(image, render=None):
    """path, PDF page (core.pdf.as_pdf_page) or bytes -> (ext, bytes), or a skip reason."""
    page = as_pdf_page(image)
    if page is not None:
        try:
            return "png", render_png(page, render or Render())
        except PdfSkip as skip:
            return skip.reason
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
    """str, Path or None -> (text, front matter or None, None), or (None, None, skip reason).

    A text file's trailing whitespace goes (the newline an editor ends a file with is no part of the page's
    text, and a model would learn to emit it); a ``.md`` file's YAML front matter is split off
    (core.sources.split_front_matter). A string from a manifest is kept exactly."""
    if isinstance(text, Path):
        try:
            data = text.read_bytes()
        except OSError:
            return None, None, "missing_text"
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, None, "non_utf8_text"
        if text.suffix.lower() == ".md":
            front, body = split_front_matter(data)
            return body.rstrip(), front, None
        return data.rstrip(), None, None
    return text, None, None


def members(item, render=None):
    """Item -> ([(ext, bytes)], None) or (None, skip reason)."""
    out, meta = [], item.meta
    if item.image is not None and item.text is None and item.needs_text:
        return None, "missing_text"  # before the image is read: a PDF page would be rendered for nothing
    if item.image is not None:
        loaded = load_image(item.image, render)
        if isinstance(loaded, str):
            return None, loaded
        out.append(loaded)
    elif item.needs_image:
        return None, "missing_image"
    if item.text is not None:
        text, front, reason = load_text(item.text)
        if reason:
            return None, reason
        if front is not None:
            meta = {**(meta or {}), "front_matter": front}
        if not text.strip() and not item.empty_ok:
            return None, "empty_text"
        try:
            out.append(("txt", text.encode("utf-8")))
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
            return None, "non_utf8_text"
    elif item.needs_text:
        return None, "missing_text"
    if meta is not None:
        try:
            out.append(("json", json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")))
        except UnicodeEncodeError:
            return None, "non_utf8_text"
    return out, None


def write_shards(fmt, source, out, name="train", max_count=10000, max_size=10**9, images_root=None,
                 limit=None, options=None, progress=True, registry=None, render=None, eval_every=None):
    """Read SOURCE in format ``fmt`` (a registered ``source``, built with ``options``) and write shards named
    ``name`` into ``out``, at most ``max_count`` samples and ``max_size`` bytes each, PDF pages drawn as
    ``render`` (core.pdf.Render) says, every ``eval_every``-th sample to the eval split; returns a Summary
    (see the module doc)."""
    render = render or Render()
    check_eval_every(eval_every, name)
    items = read_source(registry or load_plugins()[1], fmt, source, images_root, options)
    out = os.path.abspath(os.path.expanduser(out))
    try:
        os.makedirs(out, exist_ok=True)
        tmp = str(fresh_partial_dir(out, f".{name}"))
    except OSError as e:
        raise ConfigError(f"{out}: cannot write shards there ({e.strerror or e})") from e
    summary = Summary()
    writer = ShardWriter(tmp, name, int(max_count), int(max_size))
    if eval_every:
        writer = HeldOut(writer, ShardWriter(tmp, "eval", int(max_count), int(max_size)), eval_every)
    try:
        with tqdm(items, total=count_items(items), desc=f"{fmt} -> {name}", unit="sample", disable=not progress,
                  file=sys.stderr) as bar:  # closed (its line ended) before an error line is printed
            _write_items(bar, writer, summary, render, limit, out)
        writer.close()
        if not summary.samples:
            raise ConfigError(f"{source}: no usable sample ({_skips_inline(summary)})")
        summary.oversize = writer.oversize
        summary.replaced = _publish_all(writer, out, name, summary)
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary.shards = [os.path.join(out, os.path.basename(p)) for p in writer.paths]
    summary.bytes = sum(os.path.getsize(p) for p in summary.shards)
    summary.pattern = shard_pattern(out, name, len((writer.main if eval_every else writer).paths))
    return summary


def read_source(registry, fmt, source, images_root=None, options=None):
    """The items of SOURCE as the ``fmt`` source plugin reads them; a ConfigError for a missing SOURCE or one
    of the wrong kind (a file where the format reads a folder, or the reverse)."""
    reader = registry.build("source", fmt, where="FORMAT", **(options or {}))
    if not os.path.exists(source):
        raise ConfigError(f"{source}: no such file or folder")
    if reader.needs == "file" and not os.path.isfile(source):
        raise ConfigError(f"{source}: the {fmt} format needs a file")
    if reader.needs == "folder" and not os.path.isdir(source):
        raise ConfigError(f"{source}: the {fmt} format needs a folder")
    return reader.read(source, images_root)


def _write_items(items, writer, summary, render, limit, out):
    """Each item's members into ``writer`` under its cleaned key, until ``limit`` samples; skips counted."""
    seen = set()
    for item in items:
        if isinstance(item, Skip):
            summary.skip(item.reason, item.where)
            continue
        page = as_pdf_page(item.image)
        if page is not None and render.pages is not None and (page.page or 1) not in render.pages:
            summary.left_out += 1
            continue
        key = clean_key(item.key)
        if key in seen:
            summary.skip("duplicate_key", f"{item.where} (key {key!r})")
            continue
        parts, reason = members(item, render)
        if reason:
            summary.skip(reason, _example(item, reason))
            continue
        seen.add(key)
        try:
            writer.write(key, parts)
        except OSError as e:  # disk full, quota: one line, and the partial folder goes
            raise ConfigError(f"{out}: cannot write a shard ({e.strerror or e})") from e
        summary.samples += 1
        summary.text_only += not any(ext in IMAGE_EXTS for ext, _ in parts)
        summary.empty_kept += any(ext == "txt" and not data.strip() for ext, data in parts)
        if summary.skipped and summary.samples % 100 == 0:
            items.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
        if limit is not None and summary.samples >= int(limit):
            break


def _publish_all(writer, out, name, summary):
    """Publish the shards, and a HeldOut writer's eval shards (their pattern and count into ``summary``);
    returns how many shards of an earlier run were replaced."""
    if not isinstance(writer, HeldOut):
        return publish(writer.paths, out, name)
    if not writer.held_count:
        raise ConfigError(f"--eval-every {writer.every}: only {writer.written} sample(s), so none was held out; "
                          f"give a smaller N")
    summary.eval_samples = writer.held_count
    summary.eval_pattern = shard_pattern(out, "eval", len(writer.held.paths))
    return publish(writer.main.paths, out, name) + publish(writer.held.paths, out, "eval")


def _example(item, reason):
    """Where a skipped item came from, with the file that failed when that is not already named."""
    named = item.image is not None and not isinstance(item.image, bytes) and str(item.image) != item.where
    if ("image" in reason or "pdf" in reason) and named:
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
    if summary.left_out:
        lines.append(f"  {summary.left_out:,} PDF page(s) left out by --pages")
    if summary.replaced:
        lines.append(f"  replaced {summary.replaced} shard(s) of an earlier run with the same --name")
    total = sum(summary.skipped.values())
    lines.append(f"skipped {total:,} sample(s)" + (":" if total else ""))
    for reason, n in summary.skipped.most_common():
        lines.append(f"  {reason}: {n:,}  e.g. " + "; ".join(summary.examples[reason]))
    if summary.eval_pattern:
        lines.append(f"held out for eval (--eval-every): {summary.eval_samples:,} of the samples, in "
                     f"{summary.eval_pattern}")
    split = name if name in ("train", "eval") else "train"
    folder = f", or data.dataset.dir={os.path.dirname(summary.pattern)}" if name in ("train", "eval") else ""
    lines.append(f"shards (data.dataset.{split} of the shards dataset{folder}):")
    lines.append(summary.pattern)
    return "\n".join(lines)


def check_flags(args):
    """The command line's own values, each error naming its flag (write_shards takes them as given)."""
    if not args.name or re.search(r"[/\\{}*?\[\]]", args.name) or args.name.startswith("."):
        raise ConfigError(f"--name {args.name!r}: a plain file name prefix, without / \\ {{ }} * ? [ ]")
    if args.max_count < 1:
        raise ConfigError(f"--max-count {args.max_count}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    if args.images_root is not None and not os.path.isdir(args.images_root):
        raise ConfigError(f"--images-root {args.images_root}: no such folder")


def command(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.shards", description=__doc__.split("\n")[0])
    parser.add_argument("format", help="input format: a registered source (folder, pdf, jsonl, olmocr, llava, fox, "
                                       "omnidocbench, ...; python -m core.run --list-plugins)")
    parser.add_argument("source", help="input file or folder")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--name", default="train", help="shard name prefix (default train)")
    parser.add_argument("--max-count", type=int, default=10000, help="samples per shard at most (default 10000)")
    parser.add_argument("--max-size", default="1GB", help="bytes per shard at most, e.g. 500MB, 2GiB (default 1GB)")
    parser.add_argument("--images-root", help="folder that relative image paths are under "
                                              "(default: the SOURCE file's folder)")
    parser.add_argument("--limit", type=int, help="stop after writing this many samples")
    parser.add_argument("--eval-every", type=int, metavar="N", help="hold every N-th sample out as the eval split: "
                                                                   "eval-NNNNNN.tar beside the --name shards")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="an argument of the FORMAT's reader, e.g. corrected=true (omnidocbench)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="load this plugin too (a module name or a .py file), e.g. a source of your own")
    parser.add_argument("--longest-side", type=int, help=f"render PDF pages with this many pixels on their longer "
                                                           f"side (default {DEFAULT_LONGEST_SIDE}, olmOCR's; a long "
                                                           f"thin page keeps a short side of {MIN_SHORT_SIDE})")
    parser.add_argument("--dpi", type=float, help="render PDF pages at this resolution instead (72 = 1 px per point)")
    parser.add_argument("--pages", type=PageRange, help="only these pages of each PDF, counted from 1: 1-3,7,10-")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_flags(args)
    longest = args.longest_side if args.longest_side is not None or args.dpi is not None else DEFAULT_LONGEST_SIDE
    render = Render(dpi=args.dpi, longest_side=longest, pages=args.pages)
    registry = load_plugins(resolve_plugin_paths(args.plugin, os.getcwd()))[1]
    summary = write_shards(args.format, args.source, args.out, name=args.name, max_count=args.max_count,
                           max_size=parse_size(args.max_size), images_root=args.images_root, limit=args.limit,
                           options=parse_options(args.option), progress=not args.quiet, registry=registry,
                           render=render, eval_every=args.eval_every)
    print(format_summary(summary, args.name))
    return 0


def main(argv=None):
    return cli_main(command, argv)  # errors as one line and an exit code


if __name__ == "__main__":
    sys.exit(main())
