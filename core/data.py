"""Streaming and batching: WebDataset shards -> preprocessed, tokenized, padded batches.

Generic over dataset plugins: a dataset plugin only has to hand over shard paths
(tar files of samples with an image under png/jpg/jpeg/webp and the target text
under txt). Preprocessing follows DeepSeek-OCR's global view (architecture §2.5).
"""
import io
import itertools
import os
import random
import tarfile
from collections import Counter

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.errors import ConfigError

IMAGE_MARKER = "<image>"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PAD_COLOR = (127, 127, 127)  # DeepSeek-OCR: tuple(int(0.5 * 255)) -> ~0 after normalisation
IGNORE = -1  # target of positions that carry no loss (prompt, image, padding)


# ---- one sample

def preprocess(image, image_size):
    """PIL image -> float tensor (3, S, S) in [-1, 1]: upright, RGB, padded to square, resized."""
    image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF, not in the pixels
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (image_size, image_size):  # fast path: synthetic images are already S x S
        image = ImageOps.pad(image, (image_size, image_size), method=Image.Resampling.BICUBIC,
                             color=PAD_COLOR, centering=(0.5, 0.5))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(image_size, image_size, 3).permute(2, 0, 1).float()
    return (x / 255 - 0.5) / 0.5  # written as torchvision's ToTensor + Normalize(0.5, 0.5) to match it exactly


def encode_sample(tokenizer, text, prompt, num_image_tokens, max_len):
    """-> (input_ids, targets): next-token pairs where only the answer (text + eos) carries loss."""
    before, marker, after = prompt.partition(IMAGE_MARKER)
    if not marker or IMAGE_MARKER in after:
        raise ConfigError(f"prompt {prompt!r} must contain {IMAGE_MARKER} exactly once")
    prefix = [tokenizer.bos_id, *tokenizer.encode(before), *[tokenizer.image_id] * num_image_tokens,
              *tokenizer.encode(after)]
    room = max_len - len(prefix)  # len(inputs) = len(prefix) + len(answer tokens) must stay <= max_len
    if room < 0:
        raise ConfigError(f"max_len {max_len} is shorter than the prompt and image tokens ({len(prefix)})")
    seq = prefix + tokenizer.encode(text)[:room] + [tokenizer.eos_id]  # truncate the text, never the eos
    targets = seq[1:]
    targets[:len(prefix) - 1] = [IGNORE] * (len(prefix) - 1)  # these positions predict prompt/image tokens
    return seq[:-1], targets


def collate(samples, pad_id=0):
    """List of prepared samples -> batch dict, token rows right-padded to the longest."""
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
        targets[i, :len(s["targets"])] = torch.tensor(s["targets"])
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), "input_ids": input_ids,
            "targets": targets, "texts": [s["text"] for s in samples], "keys": [s["key"] for s in samples]}


# ---- reading shards

def check_shards(shard_paths):
    paths = [shard_paths] if isinstance(shard_paths, str) else list(shard_paths)
    if not paths:
        raise ConfigError("data: the dataset gave no shards")
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"data: shard {path!r} does not exist")
    return paths


def read_shard(path, skipped):
    """Yield raw samples {__key__, __url__, ext: bytes} of one tar, grouped as WebDataset does."""
    sample = None
    try:
        with tarfile.open(path, "r|*") as tar:  # streaming mode: one pass, no index
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
    except (tarfile.TarError, OSError, EOFError):  # truncated or corrupt: keep what came before
        skipped["bad_shard"] += 1
    if sample is not None:
        yield sample


def decode(raw, skipped):
    """Raw sample -> (PIL image, text), or None (counted in skipped by reason)."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    reason = "missing_image" if ext is None else "missing_text" if "txt" not in raw else None
    if reason is None:
        try:
            text = raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            reason = "bad_text"
    if reason is None:
        try:
            image = Image.open(io.BytesIO(raw[ext]))
            image.load()
            return image, text
        except Exception:  # Pillow raises many types for bad bytes; one bad image must not stop training
            reason = "bad_image"
    skipped[reason] += 1
    return None


def eval_samples(shard_paths, limit=None):
    """-> [{key, image, text}] in shard order (bad samples skipped)."""
    out, skipped = [], Counter()
    for path in check_shards(shard_paths):
        for raw in read_shard(path, skipped):
            if limit is not None and len(out) >= limit:
                return out
            decoded = decode(raw, skipped)
            if decoded:
                out.append({"key": raw["__key__"], "image": decoded[0], "text": decoded[1]})
    return out


# ---- the training stream

class _Stream(IterableDataset):
    """Endless batches: per epoch a fresh shard order and a shuffle buffer; workers split shards."""

    def __init__(self, paths, tokenizer, image_size, prompt, num_image_tokens, max_len, batch_size, seed,
                 shuffle_buffer):
        self.paths, self.tokenizer, self.image_size, self.prompt = paths, tokenizer, image_size, prompt
        self.num_image_tokens, self.max_len, self.batch_size = num_image_tokens, max_len, batch_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def _raw_samples(self, epoch, worker, workers, skipped):
        shards = list(self.paths)
        random.Random(f"{self.seed}:{epoch}").shuffle(shards)  # same order in every worker
        if len(shards) >= workers:
            yield from itertools.chain.from_iterable(read_shard(p, skipped) for p in shards[worker::workers])
        else:  # fewer shards than workers: every worker reads all of them and keeps its share of samples
            raws = itertools.chain.from_iterable(read_shard(p, skipped) for p in shards)
            yield from itertools.islice(raws, worker, None, workers)

    def _shuffled(self, raws, rng):
        buffer = []  # raw bytes, decoded after shuffling so the buffer stays small for big images
        for raw in raws:
            buffer.append(raw)
            if len(buffer) >= max(self.shuffle_buffer, 1):
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _prepare(self, raw, skipped):
        decoded = decode(raw, skipped)
        if decoded is None:
            return None
        image, text = decoded
        input_ids, targets = encode_sample(self.tokenizer, text, self.prompt, self.num_image_tokens,
                                           self.max_len)
        return {"key": raw["__key__"], "text": text, "pixel_values": preprocess(image, self.image_size),
                "input_ids": input_ids, "targets": targets}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skipped, batch = Counter(), []
        for epoch in itertools.count():
            rng = random.Random(f"{self.seed}:{epoch}:{worker}")
            good, bad_before = 0, sum(skipped.values())
            for raw in self._shuffled(self._raw_samples(epoch, worker, workers, skipped), rng):
                sample = self._prepare(raw, skipped)
                if sample is None:
                    continue
                good += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    out = collate(batch, self.tokenizer.pad_id)
                    out["_skipped"] = dict(skipped)  # counts since the last batch, summed by Batches
                    skipped, batch = Counter(), []
                    yield out
            if good == 0:
                if workers > 1 and sum(skipped.values()) == bad_before:
                    return  # this worker's share is empty (more workers than samples); the others go on
                raise ConfigError(f"data: no usable sample in {len(self.paths)} shard(s) starting "
                                  f"{self.paths[0]!r} (skipped: {dict(skipped)})")


def _one_thread(_worker_id):
    torch.set_num_threads(1)  # workers decode images; torch threads would fight the trainer for cores


class Batches:
    """Iterator of training batches; .stats counts skipped samples by reason."""

    def __init__(self, stream, num_workers):
        self.stats = Counter()
        if num_workers:
            stream = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                worker_init_fn=_one_thread)
        self._it = iter(stream)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self.stats.update(batch.pop("_skipped"))
        return batch


def train_batches(shard_paths, tokenizer, image_size, prompt, num_image_tokens, max_len, batch_size, seed=0,
                  shuffle_buffer=1000, num_workers=0):
    """Endless iterator of batches (see collate); deterministic for a seed and worker count."""
    encode_sample(tokenizer, "", prompt, num_image_tokens, max_len)  # bad prompt or max_len: fail here, not in a worker
    stream = _Stream(check_shards(shard_paths), tokenizer, image_size, prompt, num_image_tokens, max_len,
                     batch_size, seed, shuffle_buffer)
    return Batches(stream, num_workers)
