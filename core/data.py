"""One sample -> tokens: the prompt layout, the answer's targets, the schema of a raw sample, batching.

Generic over dataset plugins: a dataset plugin only has to hand over shard paths (tar files of
samples with an image under png/jpg/jpeg/webp and the target text under txt, or a LLaVA-style
``json`` conversation). ``SampleEncoding`` is everything a sample needs to become a training pair
(tokenizer, prompt, image size, token counts, crops, limits); the training stream
(core/stream.py) and the evaluation use it alike.
"""
import itertools
import json
from collections.abc import Sequence

import attrs
import torch

from core.badsamples import (
    ON_BAD_SAMPLE,
    BadSample,
    check_policy,
    format_report,
    handle,
)
from core.conversation import IGNORE, IMAGE_MARKER, encode_conversation
from core.distributed import print0
from core.errors import ConfigError
from core.images import DEFAULT_MAX_IMAGE_PIXELS, image_views, open_image
from core.shardreader import check_shards, read_shard

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


# ---- token layout

def prompt_prefix(tokenizer, prompt, num_image_tokens, max_len=None):
    """The token ids before the answer: bos, the prompt with ``num_image_tokens`` image placeholders;
    a ConfigError if they leave no room in ``max_len`` tokens (None: no limit, as when generating)."""
    before, marker, after = prompt.partition(IMAGE_MARKER)
    if not marker or IMAGE_MARKER in after:
        raise ConfigError(f"prompt {prompt!r} must contain {IMAGE_MARKER} exactly once")
    prefix = [tokenizer.bos_id, *tokenizer.encode(before), *[tokenizer.image_id] * num_image_tokens,
              *tokenizer.encode(after)]
    if max_len is not None and max_len < len(prefix):
        raise ConfigError(f"max_len {max_len} is shorter than the prompt and image tokens ({len(prefix)})")
    return prefix


def answer_pair(prefix, answer, eos_id, max_len):
    """-> (inputs, targets, cut): the answer truncated (never the eos) so len(inputs) <= max_len."""
    room = max_len - len(prefix)
    seq = prefix + answer[:room] + [eos_id]
    targets = seq[1:]
    targets[:len(prefix) - 1] = [IGNORE] * (len(prefix) - 1)  # these positions predict prompt/image tokens
    return seq[:-1], targets, len(answer) > room


def encode_sample(tokenizer, text, prompt, num_image_tokens, max_len):
    """-> (input_ids, targets): next-token pairs where only the answer (text + eos) carries loss."""
    prefix = prompt_prefix(tokenizer, prompt, num_image_tokens, max_len)
    return answer_pair(prefix, tokenizer.encode(text), tokenizer.eos_id, max_len)[:2]


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


def to_device(batch, device):
    """A collated batch with its tensors on ``device`` (copied asynchronously where the device allows)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- a raw sample's schema

def image_ext(raw):
    return next((e for e in IMAGE_EXTS if e in raw), None)


def encode_raw(raw, tokenizer, prefix, num_image_tokens, max_len, text_only=False):
    """A raw sample -> (inputs, targets, cut, text, image member or None), by its schema (docs/data.md,
    "How training reads a sample"):

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
            inputs, targets, has_image, cut = encode_conversation(tokenizer, conversation, num_image_tokens, max_len)
        except ConfigError as e:
            raise BadSample("bad_conversation", str(e)) from None
        if has_image != (ext is not None):  # placeholders without pixels, or pixels without placeholders
            raise BadSample("bad_conversation", f"the sample {'has' if ext else 'has no'} image but the first human "
                                                f"turn {'lacks' if ext else 'holds'} {IMAGE_MARKER}")
        answers = [t.get("value", t.get("content", "")) for t in conversation[1::2]]
        return inputs, targets, cut, answers[0] if answers else "", ext
    if text_only:
        if "txt" not in raw:
            raise _wrong_keys(raw)
        text = _non_empty(_utf8(raw["txt"]))
        inputs, targets, cut = answer_pair([tokenizer.bos_id], tokenizer.encode(text), tokenizer.eos_id, max_len)
        return inputs, targets, cut, text, None  # bos predicts nothing masked: every text token is a target
    text = _non_empty(sample_text(raw))
    if prefix is None:  # crops: this image's vision tokens and the prompt leave no room for an answer
        raise BadSample("long_image", f"the prompt and {num_image_tokens} vision tokens do not fit max_len {max_len}")
    answer = tokenizer.encode(text)
    inputs, targets, cut = answer_pair(prefix, answer, tokenizer.eos_id, max_len)
    return inputs, targets, cut, text, ext


def sample_meta(raw):
    """The sample's ``json`` member parsed (None without one); BadSample("bad_json") if it does not parse."""
    if "json" not in raw:
        return None
    try:
        return json.loads(_utf8(raw["json"]))
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
        raise BadSample("bad_json", f"{type(e).__name__}: {e}") from None


def _conversation(raw):
    meta = sample_meta(raw)
    return meta.get("conversations") if isinstance(meta, dict) else None


def _wrong_keys(raw):
    members = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"
    return BadSample("wrong_keys", f"members: {members}")


def _non_empty(text):
    """Training skips an empty target (as core.shards does): it would teach the model to stop at once.
    Evaluation keeps empty pages (a benchmark's blank page still scores)."""
    if not text.strip():
        raise BadSample("empty_text", "the txt member is empty" if not text else "the txt member is only whitespace")
    return text


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


def decode(raw, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Raw sample -> (PIL image, text); BadSample (reason, detail) if it cannot be used."""
    text = sample_text(raw)
    return open_image(raw[image_ext(raw)], max_pixels), text


@attrs.define(frozen=True)
class SampleEncoding:
    """How a raw sample becomes a training pair: the context every sample of a stream shares.

    ``num_image_tokens`` is the global view's count; with a ``tiling`` (the model's crops) each
    image's prompt holds its own count (``model.num_image_tokens(grid)``). ``text_only``: the
    stream of ``data.text_dataset`` (plain language modelling, no image).
    """
    tokenizer: object
    prompt: str
    image_size: int | Sequence[int]  # the encoder's: a square's side or [height, width] (core.images.image_hw)
    num_image_tokens: int
    max_len: int
    tiling: object = None
    text_only: bool = False
    on_long_target: str = "truncate"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    _prefixes: dict = attrs.field(factory=dict, eq=False, repr=False)

    def check(self):
        """Fail in the main process, at once, on what would fail for every sample."""
        prompt_prefix(self.tokenizer, self.prompt, self.num_image_tokens, self.max_len)
        return self

    def prefix(self, grid=None):
        """(prefix ids, image token count) for an image with crop grid ``grid``; prefix None when that grid's
        tokens leave no room for an answer (its samples are skipped as ``long_image``)."""
        if grid not in self._prefixes:
            count = self.num_image_tokens + (self.tiling.local_tokens(grid) if grid is not None else 0)
            room = self.max_len if grid is None else self.max_len - 1  # a crop grid must leave 1 answer token
            try:
                prefix = prompt_prefix(self.tokenizer, self.prompt, count, room)
            except ConfigError:
                prefix = None
            self._prefixes[grid] = prefix, count
        return self._prefixes[grid]

    def views(self, image):
        try:
            return image_views(image, self.image_size, self.tiling)
        except Exception as e:  # e.g. a malformed EXIF block
            raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None

    def prepare(self, raw):
        """A raw sample -> (sample dict for collate, cut); BadSample if it cannot be used."""
        ext, views = image_ext(raw), None
        if self.tiling is not None and ext is not None and not self.text_only:
            views = self.views(open_image(raw[ext], self.max_image_pixels))  # the grid sets the token count
        prefix, count = self.prefix(views and views[2])
        inputs, targets, cut, text, ext = encode_raw(raw, self.tokenizer, prefix, count, self.max_len,
                                                     text_only=self.text_only)
        if cut and self.on_long_target == "skip":
            raise BadSample("long_target", f"does not fit max_len {self.max_len}")
        if ext is not None and views is None:
            views = self.views(open_image(raw[ext], self.max_image_pixels))
        pixels, tiles, grid = views or (None, None, None)
        sample = {"key": raw["__key__"], "text": text, "pixel_values": pixels, "input_ids": inputs,
                  "targets": targets}
        if self.tiling is not None:
            sample.update(tiles=tiles, grid=grid)
        return sample, cut


# ---- evaluation samples

class SampleList(list):
    """eval_samples' result: a list of {key, image, text, meta} with ``.report`` ({reason: {shard: count}})."""
    report = None


def eval_samples(shard_paths, limit=None, on_bad_sample="skip", max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                 say=None):
    """-> SampleList of {key, image, text, meta (the json member or None)} in shard order; bad samples skipped
    and counted in ``.report``
    (and printed with ``say``, default print0, when there are any), or a ConfigError with on_bad_sample="error"."""
    check_policy("on_bad_sample", on_bad_sample, ON_BAD_SAMPLE)
    out, report = SampleList(), {}
    for raw in itertools.chain.from_iterable(read_shard(p) for p in check_shards(shard_paths)):
        if limit is not None and len(out) >= limit:
            break
        try:
            image, text = decode(raw, max_image_pixels)
            meta = sample_meta(raw)
        except BadSample as bad:
            handle(bad, raw, report, on_bad_sample)
            continue
        out.append({"key": raw["__key__"], "image": image, "text": text, "meta": meta})
    out.report = report
    if report:
        (say or print0)(format_report(report, f"eval split ({len(out)} samples read)"))
    return out
