"""Streaming and batching: WebDataset shards -> preprocessed, tokenized, padded batches.

Generic over dataset plugins: a dataset plugin only has to hand over shard paths
(tar files of samples with an image under png/jpg/jpeg/webp and the target text
under txt). Preprocessing follows DeepSeek-OCR's global view (architecture §2.5).

The training stream over these samples (splitting, position, bad data) is core/stream.py.
"""
import io
import json
import itertools
import os
import tarfile
import zlib

import torch
from PIL import Image, ImageOps

from core.conversation import IGNORE, IMAGE_MARKER, encode_conversation
from core.errors import ConfigError
from core.tiles import cut_tiles

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PAD_COLOR = (127, 127, 127)  # DeepSeek-OCR: tuple(int(0.5 * 255)) -> ~0 after normalisation
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (89,478,485)

REASONS = {  # why a sample was not used (or, truncated_target, was used cut short)
    "truncated_shard": "the tar breaks off or is corrupt; the samples before the break were used",
    "wrong_keys": "neither an image (png, jpg, jpeg, webp) nor a txt member",
    "missing_image": "no image member (png, jpg, jpeg, webp)",
    "missing_text": "no txt member",
    "bad_text": "the txt member is not UTF-8",
    "empty_image": "the image member is empty (0 bytes or 0 pixels)",
    "image_too_large": "more pixels than data.max_image_pixels (decompression-bomb guard)",
    "bad_image": "the image does not decode",
    "long_target": "the text does not fit data.max_len; skipped (data.on_long_target: skip)",
    "long_image": "the prompt with the image's vision tokens (global view + crops) leaves no room in data.max_len",
    "truncated_target": "the text did not fit data.max_len and was cut (data.on_long_target: truncate); used",
    "text_only": "a sample without an image; text-only samples feed a stage's text_ratio from data.text_dataset",
    "image_sample": "a sample with an image in the text-only stream (data.text_dataset)",
    "bad_conversation": "the json conversation is malformed (turns, roles, <image> marker)",
    "bad_json": "the json member does not parse",
}
ON_BAD_SAMPLE = ("skip", "error")
ON_LONG_TARGET = ("truncate", "skip")


class BadSample(Exception):
    """One sample that cannot be used: ``reason`` is a key of REASONS, ``detail`` a short what-and-why."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, " ".join(str(detail).split())[:200]


# ---- one sample

def upright_rgb(image):
    image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF, not in the pixels
    return image if image.mode == "RGB" else image.convert("RGB")


def image_hw(image_size):
    """An encoder's ``image_size`` -> (height, width): an int is DeepSeek-OCR's square global view,
    [height, width] a rectangle (a text strip; plugins/encoders/deepencoder.py)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _normalised(image):
    """An RGB PIL image (W x H) -> (3, H, W) in [-1, 1]."""
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float()
    return (x / 255 - 0.5) / 0.5  # written as torchvision's ToTensor + Normalize(0.5, 0.5) to match it exactly


def _global_view(image, image_size):
    height, width = image_hw(image_size)
    if image.size != (width, height):  # fast path: synthetic images are already the view's size
        # DeepSeek-OCR pads to a square; an [h, w] image_size pads to that aspect ratio the same way
        image = ImageOps.pad(image, (width, height), method=Image.Resampling.BICUBIC,
                             color=PAD_COLOR, centering=(0.5, 0.5))
    return _normalised(image)


def preprocess(image, image_size):
    """PIL image -> float tensor (3, H, W) in [-1, 1]: upright, RGB, padded to the view's aspect ratio
    (a square for an int ``image_size``, DeepSeek-OCR's global view), resized."""
    return _global_view(upright_rgb(image), image_size)


def image_views(image, image_size, tiling=None):
    """PIL image -> (global view (3, S, S), tiles (n, 3, t, t) or None, grid (across, down) or None).

    The global view is always the padded square (architecture.md §2.5); with a ``tiling``
    (core.tiles.Tiling) an image larger than a tile also gets DSO's crops (§2.4), which are
    resized and cut, not padded.
    """
    image = upright_rgb(image)
    grid = tiling.grid(*image.size) if tiling is not None else None
    if grid is None:
        return _global_view(image, image_size), None, None
    tiles = torch.stack([_normalised(t) for t in cut_tiles(image, tiling.tile_size, grid)])
    return _global_view(image, image_size), tiles, grid


def prompt_prefix(tokenizer, prompt, num_image_tokens, max_len):
    """The token ids before the answer: bos, the prompt with ``num_image_tokens`` image placeholders."""
    before, marker, after = prompt.partition(IMAGE_MARKER)
    if not marker or IMAGE_MARKER in after:
        raise ConfigError(f"prompt {prompt!r} must contain {IMAGE_MARKER} exactly once")
    prefix = [tokenizer.bos_id, *tokenizer.encode(before), *[tokenizer.image_id] * num_image_tokens,
              *tokenizer.encode(after)]
    if max_len - len(prefix) < 0:
        raise ConfigError(f"max_len {max_len} is shorter than the prompt and image tokens ({len(prefix)})")
    return prefix


def _pair(prefix, answer, eos_id, max_len):
    """-> (inputs, targets, cut): the answer truncated (never the eos) so len(inputs) <= max_len."""
    room = max_len - len(prefix)
    seq = prefix + answer[:room] + [eos_id]
    targets = seq[1:]
    targets[:len(prefix) - 1] = [IGNORE] * (len(prefix) - 1)  # these positions predict prompt/image tokens
    return seq[:-1], targets, len(answer) > room


def encode_sample(tokenizer, text, prompt, num_image_tokens, max_len):
    """-> (input_ids, targets): next-token pairs where only the answer (text + eos) carries loss."""
    prefix = prompt_prefix(tokenizer, prompt, num_image_tokens, max_len)
    return _pair(prefix, tokenizer.encode(text), tokenizer.eos_id, max_len)[:2]


def collate(samples, pad_id=0):
    """List of prepared samples -> batch dict, token rows right-padded to the longest.

    Crops (samples with ``tiles`` and ``grid``): ``tiles`` is every sample's tiles concatenated in
    sample order (None if no sample has any) and ``grids`` the per-sample (across, down) or None,
    which is how VisionLanguageModel.forward takes them.
    """
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
        targets[i, :len(s["targets"])] = torch.tensor(s["targets"])
    images = [s["pixel_values"] for s in samples]
    if any(x is None for x in images) and not all(x is None for x in images):
        raise ValueError("a batch mixes image and text-only samples")  # each stream keeps to one kind
    tiles = [s["tiles"] for s in samples if s.get("tiles") is not None]
    return {"pixel_values": None if images[0] is None else torch.stack(images), "input_ids": input_ids,
            "targets": targets, "texts": [s["text"] for s in samples], "keys": [s["key"] for s in samples],
            "tiles": torch.cat(tiles) if tiles else None, "grids": [s.get("grid") for s in samples]}


# ---- reading shards

def check_shards(shard_paths):
    paths = [shard_paths] if isinstance(shard_paths, str) else list(shard_paths)
    if not paths:
        raise ConfigError("data: the dataset gave no shards")
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"data: shard {path!r} does not exist")
    return paths


class _TarInfo(tarfile.TarInfo):
    """tarfile ends a stream silently where a header is cut off or missing; this notes that it happened."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.vlmkit_cut = True  # a complete tar ends with zero blocks (EOFHeaderError), not with nothing
            raise


def read_shard(path):
    """Yield the raw samples {__key__, __url__, ext: bytes} of one tar, grouped as WebDataset does.

    Where the tar breaks off or is corrupt, the sample being read is dropped (it may lack members) and
    one {__key__, __url__, __bad__: "truncated_shard", __detail__} item follows the samples before it.
    """
    sample = None
    try:
        with tarfile.open(path, "r|*", tarinfo=_TarInfo) as tar:  # streaming mode: one pass, no index
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot
                if not member.isreg() or not dot or stem.startswith("__"):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": path}
                sample[ext.lower()] = tar.extractfile(member).read()
            if getattr(tar, "vlmkit_cut", False):
                raise tarfile.ReadError("the tar ends without its end-of-archive blocks")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        where = "in this sample" if sample else "before the first sample"
        yield {"__key__": sample["__key__"] if sample else "", "__url__": path, "__bad__": "truncated_shard",
               "__detail__": f"the tar breaks off {where}: {type(e).__name__}: {e}"}
        return
    if sample is not None:
        yield sample


def image_ext(raw):
    return next((e for e in IMAGE_EXTS if e in raw), None)


def encode_raw(raw, tokenizer, prefix, num_image_tokens, max_len, text_only=False):
    """A raw sample -> (inputs, targets, cut, text, image member or None), by its schema (README, "Your own data"):

    - ``json`` with ``conversations`` (LLaVA style): rendered by core.conversation, the image (if any)
      in place of the first turn's <image>;
    - ``txt`` with an image: OCR, ``prefix`` (bos + prompt with placeholders) then the text + eos
      (``prefix`` None: the image's tokens leave no room, ``long_image``);
    - ``txt`` alone, in a text stream (``text_only``): plain language modelling, bos + text + eos.
    A text stream skips image samples (``image_sample``) and an image stream text-only ones
    (``text_only``): each kind is used by its own stream (a stage's ``text_ratio``).
    """
    if "__bad__" in raw:
        raise BadSample(raw["__bad__"], raw.get("__detail__", ""))
    ext = image_ext(raw)
    if text_only and ext is not None:
        raise BadSample("image_sample", "an image sample in the text-only stream")
    conversation = _conversation(raw)
    if conversation is not None:
        if ext is None and not text_only:
            raise BadSample("text_only", "a conversation without an image")
        try:
            inputs, targets, _, cut = encode_conversation(tokenizer, conversation, num_image_tokens, max_len)
        except ConfigError as e:
            raise BadSample("bad_conversation", str(e)) from None
        answers = [t.get("value", t.get("content", "")) for t in conversation[1::2]]
        return inputs, targets, cut, answers[0] if answers else "", ext
    if text_only:
        if "txt" not in raw:
            raise _wrong_keys(raw)
        text = _utf8(raw["txt"])
        inputs, targets, cut = _pair([tokenizer.bos_id], tokenizer.encode(text), tokenizer.eos_id, max_len)
        return inputs, targets, cut, text, None  # bos predicts nothing masked: every text token is a target
    text = sample_text(raw)
    if prefix is None:  # crops: this image's vision tokens and the prompt leave no room for an answer
        raise BadSample("long_image", f"the prompt and {num_image_tokens} vision tokens do not fit max_len {max_len}")
    answer = tokenizer.encode(text)
    inputs, targets, cut = _pair(prefix, answer, tokenizer.eos_id, max_len)
    return inputs, targets, cut, text, ext


def _conversation(raw):
    if "json" not in raw:
        return None
    try:
        meta = json.loads(_utf8(raw["json"]))
    except ValueError as e:
        raise BadSample("bad_json", str(e)) from None
    return meta.get("conversations") if isinstance(meta, dict) else None


def _wrong_keys(raw):
    members = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"
    return BadSample("wrong_keys", f"members: {members}")


def _utf8(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", f"not UTF-8 ({e.reason} at byte {e.start})") from None


def sample_text(raw):
    """The sample's target text; BadSample for a broken tar, wrong or missing members, or non-UTF-8 text."""
    if "__bad__" in raw:
        raise BadSample(raw["__bad__"], raw.get("__detail__", ""))
    ext, has_text = image_ext(raw), "txt" in raw
    if ext is None and not has_text:
        raise _wrong_keys(raw)
    if ext is None:
        raise BadSample("missing_image", "no png, jpg, jpeg or webp member")
    if not has_text:
        raise BadSample("missing_text", "no txt member")
    return _utf8(raw["txt"])


def open_image(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Image bytes -> loaded PIL image; BadSample if empty, too large (checked before decoding) or broken."""
    if not data:
        raise BadSample("empty_image", "0 bytes")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow warns above its limit and raises above twice it: we check ourselves
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.UnidentifiedImageError:
        raise BadSample("bad_image", "cannot identify image file") from None
    except Image.DecompressionBombError as e:  # a format plugin that checks on its own
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # Pillow raises many types for bad bytes; one bad image must not stop training
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    width, height = image.size
    if width == 0 or height == 0:
        raise BadSample("empty_image", f"{width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise BadSample("image_too_large", f"{width}x{height} = {width * height:,} pixels > data.max_image_pixels "
                                           f"{max_pixels:,}")
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    return image


def decode(raw, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Raw sample -> (PIL image, text); BadSample (reason, detail) if it cannot be used."""
    text = sample_text(raw)
    return open_image(raw[image_ext(raw)], max_pixels), text


def _count(report, reason, shard, n=1):
    by_shard = report.setdefault(reason, {})
    by_shard[shard] = by_shard.get(shard, 0) + n


def merge_reports(into, other):
    """Add ``other`` ({reason: {shard: count}}) into ``into``; returns ``into``."""
    for reason, by_shard in other.items():
        for shard, n in by_shard.items():
            _count(into, reason, shard, n)
    return into


def _bad(bad, raw, report, policy):
    """Count a bad sample, or stop the run (policy "error"; a chosen on_long_target: skip only counts)."""
    if policy == "error" and bad.reason not in ("long_target", "truncated_target"):
        key = f", sample {raw['__key__']!r}" if raw.get("__key__") else ""
        detail = f" ({bad.detail})" if bad.detail else ""
        raise ConfigError(f"data: shard {raw['__url__']!r}{key}: {bad.reason}{detail} "
                          f"[data.on_bad_sample: error]")
    _count(report, bad.reason, raw["__url__"])


def _check_policy(key, value, options):
    if value not in options:
        raise ConfigError(f"data.{key}: expected {' or '.join(options)}, not {value!r}")


def format_report(report, title):
    """The report as a short table: a title line with totals, then reason, count, shard per line."""
    used = sum(report.get("truncated_target", {}).values())
    skipped = sum(n for reason, by in report.items() if reason != "truncated_target" for n in by.values())
    parts = [f"{skipped} sample(s) skipped"] + ([f"{used} target(s) truncated"] if used else [])
    rows = sorted((reason, n, shard) for reason, by in report.items() for shard, n in by.items())
    width = max([len("reason")] + [len(r) for r, _, _ in rows])
    lines = [f"data report, {title}: {', '.join(parts)}", f"  {'reason':<{width}}  {'count':>6}  shard"]
    lines += [f"  {reason:<{width}}  {n:>6}  {shard}" for reason, n, shard in rows]
    return "\n".join(lines)


class SampleList(list):
    """eval_samples' result: a list of {key, image, text} with ``.report`` ({reason: {shard: count}})."""
    report = None


def eval_samples(shard_paths, limit=None, on_bad_sample="skip", max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                 say=print):
    """-> SampleList of {key, image, text} in shard order; bad samples skipped and counted in ``.report``
    (and printed with ``say`` when there are any), or a ConfigError with on_bad_sample="error"."""
    _check_policy("on_bad_sample", on_bad_sample, ON_BAD_SAMPLE)
    out, report = SampleList(), {}
    for raw in itertools.chain.from_iterable(read_shard(p) for p in check_shards(shard_paths)):
        if limit is not None and len(out) >= limit:
            break
        try:
            image, text = decode(raw, max_image_pixels)
        except BadSample as bad:
            _bad(bad, raw, report, on_bad_sample)
            continue
        out.append({"key": raw["__key__"], "image": image, "text": text})
    out.report = report
    if report and say:
        say(format_report(report, f"eval split ({len(out)} samples read)"))
    return out
