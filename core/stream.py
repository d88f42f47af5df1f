"""The training stream: shards -> batches for one DDP rank, resumable and exact.

The training stream (``open_batches``, which core/loop.py opens; ``train_batches`` is the same stream built
from the SampleEncoding's fields, for callers with no model at hand: the data benchmark and tests):

* **Splitting.** Shards go to *slots*, one per (DDP rank, DataLoader worker):
  ``slot = rank * workers + worker``. Each epoch the shard list is shuffled with
  a seed every process shares and dealt round-robin over the slots; with fewer
  shards than slots every slot reads all of them and keeps the samples whose
  index modulo the slot count is its own. Either way every sample of an epoch is
  read by exactly one slot. ``resample=True`` instead draws each slot's shards
  with replacement (``ceil(shards / slots)`` per epoch), endlessly.
* **Batches** are built inside each slot from its own samples (after a shuffle
  buffer), so a slot's batches depend only on the seed, the epoch and the slot.
  The DataLoader hands them out round-robin over its workers.
* **Position.** Every batch carries its worker and the worker's position after
  it: (epoch, raw samples consumed in that epoch). The main process records the
  positions of the batches it handed out, not of what workers prefetched, and
  ``load_state_dict`` restarts the workers there (re-reading the skipped tar
  members without decoding them, and rotating the workers so the round-robin
  continues with the right one): the batches after a resume are exactly those
  of an uninterrupted run. A shard may be a URL (``http(s)://``, ``pipe:``; core/shardreader.py):
  a resume opens it again from its start and skips the same raw samples (docs/data.md §1.3).
* **Bad data** is skipped and counted by reason and shard (``core.badsamples.REASONS``), or stops
  the run with a ConfigError naming shard, key and reason (``on_bad_sample: error``).
"""
import hashlib
import itertools
import os
import random

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.badsamples import (
    ON_BAD_SAMPLE,
    ON_LONG_TARGET,
    BadSample,
    check_policy,
    count,
    handle,
    merge_reports,
)
from core.data import SampleEncoding, collate
from core.errors import ConfigError
from core.images import DEFAULT_MAX_IMAGE_PIXELS
from core.shardreader import check_shards, read_shard

# ---- the training stream

def dist_rank_world(rank=None, world_size=None):
    """(rank, world size): each as given, else torch.distributed's if initialised, else env RANK / WORLD_SIZE,
    else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        found = []
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1")):
            value = os.environ.get(name, default)
            try:
                found.append(int(value))
            except ValueError:
                raise ConfigError(f"environment: {name}={value!r} is not an integer") from None
    rank = found[0] if rank is None else rank
    world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"data: rank {rank} is outside world size {world_size} (RANK / WORLD_SIZE)")
    return rank, world_size


class _Stream(IterableDataset):
    """The batches of one rank's slots (see the module docstring); an item per batch, tagged for Batches."""

    def __init__(self, paths, encoding, batch_size, seed, shuffle_buffer, resample, epochs, on_bad_sample,
                 rank, world_size, workers):
        self.paths, self.encoding = paths, encoding  # encoding: core.data.SampleEncoding
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.resample, self.epochs, self.on_bad_sample = resample, epochs, on_bad_sample
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.slots = world_size * workers
        self.by_index = not resample and len(paths) < self.slots  # fewer shards than slots: split samples
        self.starts = [[0, 0, False]] * workers  # per worker: epoch, raw samples consumed in it, finished
        self.offset = 0  # DataLoader worker i plays worker (i + offset) % workers: a resume continues the rotation

    # raw samples of one slot and epoch, in the order the slot consumes them

    def _items(self, epoch, slot):
        if self.resample:
            rng = random.Random(f"{self.seed}:resample:{epoch}:{slot}")
            picks = rng.choices(self.paths, k=-(-len(self.paths) // self.slots))
            return itertools.chain.from_iterable(read_shard(p) for p in picks)
        shards = list(self.paths)
        random.Random(f"{self.seed}:{epoch}").shuffle(shards)  # the same order in every process
        if not self.by_index:
            return itertools.chain.from_iterable(read_shard(p) for p in shards[slot::self.slots])
        raws = itertools.chain.from_iterable(read_shard(p) for p in shards)
        return itertools.islice(raws, slot, None, self.slots)

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

    def _prepare(self, raw, report):
        try:
            sample, cut = self.encoding.prepare(raw)
        except BadSample as bad:
            handle(bad, raw, report, self.on_bad_sample)
            return None
        if cut:
            count(report, "truncated_target", raw["__url__"])
        return sample

    def _item(self, batch, worker, position, report, **flags):
        out = collate(batch, self.encoding.tokenizer.pad_id) if batch else {}
        out.update(_worker=worker, _pos=list(position), _report=report, **flags)
        return out

    def worker_batches(self, worker, start):
        """Batches of one worker (this rank's slot ``rank * workers + worker``) from position ``start``."""
        slot = self.rank * self.workers + worker
        epoch, skip, finished = start
        if finished:
            return
        batch, report = [], {}
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(f"{self.seed}:shuffle:{epoch}:{slot}")
            consumed = good = 0
            for raw in self._shuffled(self._items(epoch, slot), rng):
                consumed += 1
                if consumed <= skip:
                    continue  # fast-forward of a resume: the raw bytes are read, nothing is decoded
                sample = self._prepare(raw, report)
                if sample is None:
                    continue
                good += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._item(batch, worker, (epoch, consumed, False), report)
                    batch, report = [], {}
            whole, skip = skip == 0, 0
            epoch += 1
            if whole and consumed == 0 and self.by_index:
                break  # more slots than samples: this slot's share is empty in every epoch
            if whole and good == 0 and self.epochs is None:
                # nothing usable in a whole epoch: say so (Batches stops when every worker does), and hand out
                # what is pending so the position stays exact (a short batch only in this case)
                yield self._item(batch, worker, (epoch, 0, False), report, _barren=True)
                batch, report = [], {}
        yield self._item(batch, worker, (epoch, 0, True), report)  # the last (short) batch and counts

    def __iter__(self):
        info = get_worker_info()
        worker = (info.id + self.offset) % self.workers if info else 0
        try:
            yield from self.worker_batches(worker, self.starts[worker])
        except ConfigError as e:  # one line in the main process, not a DataLoader traceback
            yield {"_worker": worker, "_error": str(e)}


def _one_thread(_worker_id):
    torch.set_num_threads(1)  # workers decode images; torch threads would fight the trainer for cores


class Batches:
    """Iterator of training batches with a resumable position and a report of skipped samples.

    ``state_dict()`` / ``load_state_dict(state)``: the position of the batches handed out so far (JSON-able);
    ``report()``: {reason: {shard: count}} over those batches, all workers of this rank together.
    """

    def __init__(self, stream, num_workers):
        self._stream, self.num_workers = stream, num_workers
        self._positions = [[0, 0, False] for _ in range(stream.workers)]
        self._next = 0  # the worker whose batch comes next in the DataLoader's round-robin
        self._report, self._barren, self._it = {}, 0, None

    def __iter__(self):
        return self

    def _start(self):
        stream = self._stream
        stream.starts, stream.offset = [list(p) for p in self._positions], self._next
        if self.num_workers:
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=_one_thread)
            self._it = iter(loader)
        else:
            self._it = iter(stream)

    def __next__(self):
        if self._it is None:
            self._start()
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                self.close()
                if self._stream.epochs is None:
                    raise self._unusable() from None
                raise
            worker = item.pop("_worker")
            if "_error" in item:
                self.close()
                raise ConfigError(item["_error"])
            self._positions[worker] = item.pop("_pos")
            merge_reports(self._report, item.pop("_report"))
            self._next = (worker + 1) % self._stream.workers
            if item.pop("_barren", False):
                self._barren += 1
                live = sum(not p[2] for p in self._positions)
                if self._barren >= 2 * max(live, 1):
                    self.close()
                    raise self._unusable()
            elif item:
                self._barren = 0
            if item:
                return item

    def _unusable(self):
        paths = self._stream.paths
        return ConfigError(f"data: no usable sample in {len(paths)} shard(s) starting {paths[0]!r} "
                           f"(rank {self._stream.rank}; skipped so far: {self.stats})")

    def report(self):
        """{reason: {shard: count}} of the samples behind the batches handed out (see core.badsamples.REASONS)."""
        return {reason: dict(by) for reason, by in self._report.items()}

    @property
    def stats(self):
        """{reason: count} summed over shards."""
        return {reason: sum(by.values()) for reason, by in self._report.items()}

    def _identity(self):
        s = self._stream
        digest = hashlib.sha1("\n".join(os.path.basename(p) for p in s.paths).encode()).hexdigest()[:12]
        return {"seed": s.seed, "rank": s.rank, "world_size": s.world_size, "num_workers": self.num_workers,
                "resample": s.resample, "batch_size": s.batch_size, "shuffle_buffer": s.shuffle_buffer,
                "shards": len(s.paths), "shards_digest": digest,
                # crops change what a sample becomes
                "crops": [t.tile_size, t.min_tiles, t.max_tiles] if (t := s.encoding.tiling) else None}

    def state_dict(self):
        """The position after the last batch handed out: a small JSON-able dict."""
        return {"version": 1, **self._identity(), "next_worker": self._next,
                "workers": [list(p) for p in self._positions], "report": self.report()}

    def load_state_dict(self, state):
        """Continue from ``state`` (from state_dict of an iterator with the same data settings)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ConfigError("data state: not a state_dict of core.stream.Batches (version 1)")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ConfigError(f"data state: {key} is {state.get(key)!r} in the saved state but {value!r} here")
        workers = state["workers"]
        if len(workers) != self._stream.workers:
            raise ConfigError(f"data state: {len(workers)} worker positions for {self._stream.workers} workers")
        self.close()
        self._positions = [[int(e), int(n), bool(f)] for e, n, f in workers]
        self._next = int(state["next_worker"]) % self._stream.workers
        self._report = merge_reports({}, state.get("report", {}))
        self._barren = 0

    def close(self):
        """Stop the workers (a later next() restarts them from the current position)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def train_batches(shard_paths, tokenizer, image_size, prompt, num_image_tokens, max_len, batch_size, seed=0,
                  shuffle_buffer=1000, num_workers=0, *, resample=False, epochs=None, on_bad_sample="skip",
                  on_long_target="truncate", max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, rank=None, world_size=None,
                  text_only=False, tiling=None):
    """``open_batches`` with the SampleEncoding given as its fields: an iterator of batches (see collate,
    Batches); endless unless ``epochs`` is given (then the last batch of each worker may be short).
    Deterministic for a seed, rank, world size and worker count.

    ``tiling`` (core.images.Tiling, the model's ``tiling``): DeepSeek-OCR's crops; ``num_image_tokens`` is then
    the global view's count and each sample's prompt holds its own image's count (model.num_image_tokens(grid))."""
    encoding = SampleEncoding(tokenizer, prompt, image_size, num_image_tokens, max_len, tiling, text_only,
                              on_long_target, max_image_pixels)
    return open_batches(shard_paths, encoding, batch_size, seed, shuffle_buffer, num_workers, resample=resample,
                        epochs=epochs, on_bad_sample=on_bad_sample, rank=rank, world_size=world_size)


def open_batches(shard_paths, encoding, batch_size, seed=0, shuffle_buffer=1000, num_workers=0, *, resample=False,
                 epochs=None, on_bad_sample="skip", rank=None, world_size=None):
    """The training stream over ``shard_paths``, each sample encoded as ``encoding`` (core.data.SampleEncoding)
    says: a resumable iterator of batches (Batches; see train_batches for the arguments)."""
    encoding.check()  # fail here, not in a worker
    check_policy("on_bad_sample", on_bad_sample, ON_BAD_SAMPLE)
    check_policy("on_long_target", encoding.on_long_target, ON_LONG_TARGET)
    if batch_size < 1:
        raise ConfigError(f"data.batch_size: must be at least 1, not {batch_size}")
    rank, world_size = dist_rank_world(rank, world_size)
    stream = _Stream(check_shards(shard_paths), encoding, batch_size, seed, shuffle_buffer, resample, epochs,
                     on_bad_sample, rank, world_size, max(num_workers, 1))
    return Batches(stream, num_workers)
