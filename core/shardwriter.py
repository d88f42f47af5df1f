"""Writing shards: WebDataset tars of bounded count and size, published only when complete.

``ShardWriter`` writes ``{name}-000000.tar``, ``{name}-000001.tar``, ... of at most ``max_count``
samples and ``max_size`` bytes, sizes computed exactly (headers, padding, end blocks). Members
are read-only, owned by nobody, dated 0, so the same samples give the same bytes. Writers work
in a private ``fresh_partial_dir`` and rename it (or its files) into place when done, so a
reader never sees half a shard set. ``python -m core.shards`` and the synthetic dataset use it;
``HeldOut`` splits one stream of samples into two writers (``--eval-every``).
"""
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

from core.errors import ConfigError

BLOCK = tarfile.BLOCKSIZE  # 512: headers and data are padded to blocks


class ShardWriter:
    """Tars of at most max_count samples and max_size bytes (exact: headers, padding and the end blocks);
    ``max_size`` None: no size limit. ``first``: the number of the first shard (writers in parallel
    processes each write their own)."""

    def __init__(self, folder, name, max_count, max_size, first=0):
        self.folder, self.name, self.max_count, self.first = folder, name, max_count, first
        self.max_size = float("inf") if max_size is None else max_size
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
            path = os.path.join(self.folder, f"{self.name}-{self.first + len(self.paths):06d}.tar")
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


class HeldOut:
    """Two ShardWriters as one: every ``every``-th sample (the every-th, 2*every-th, ...) goes to ``held``, the
    rest to ``main`` (``python -m core.shards --eval-every``: an eval split spread over the source)."""

    def __init__(self, main, held, every):
        self.main, self.held, self.every, self.written, self.held_count = main, held, every, 0, 0

    def write(self, key, parts):
        self.written += 1
        hold = self.written % self.every == 0
        (self.held if hold else self.main).write(key, parts)
        self.held_count += hold

    def close(self):
        self.main.close()
        self.held.close()

    @property
    def paths(self):
        return self.main.paths + self.held.paths

    @property
    def oversize(self):
        return self.main.oversize + self.held.oversize


def shard_pattern(folder, name, count):
    """The brace pattern of ``count`` shards ``folder/{name}-NNNNNN.tar`` (one shard: its path)."""
    if count == 1:
        return os.path.join(folder, f"{name}-000000.tar")
    return os.path.join(folder, f"{name}-{{000000..{count - 1:06d}}}.tar")


def check_eval_every(every, name):
    """``--eval-every``: None, or N >= 2 beside shards not named eval (they hold the rest)."""
    if every is not None and (int(every) < 2 or name == "eval"):
        raise ConfigError(f"--eval-every {every}: every N-th sample (N at least 2) goes to eval-*.tar, beside "
                          f"the --name shards (not eval)")


def publish(paths, out, name):
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


def _alive(pid):
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def fresh_partial_dir(parent, stem):
    """An empty private folder ``parent/{stem}.partial-PID``, after removing those of dead processes.

    Written into and renamed (or emptied) when done, so readers never see half a result."""
    for stale in Path(parent).glob(f"{stem}.partial-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier run
    tmp = Path(parent) / f"{stem}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def cache_key(args):
    """The folder name of what ``args`` render: a hash of them (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]


def cached_split(cache_dir, args, split, write):
    """The shard paths of ``split`` rendered once per ``args`` and cached: ``cache_dir/<hash of args>/split``.

    ``write(folder)`` fills a private temporary folder that is then renamed into place, so readers never see
    half a split; ``args`` must hold everything that decides the bytes (their hash names the cache).
    A folder the user cannot write is their setting: a ConfigError naming data.dataset.cache_dir."""
    final = Path(os.path.expanduser(str(cache_dir))) / cache_key(args) / split
    if not final.is_dir():
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = fresh_partial_dir(final.parent, split)
        except OSError as e:
            raise ConfigError(f"data.dataset.cache_dir: cannot write {final.parent} ({e.strerror or e})") from e
        write(tmp)
        (tmp / "meta.json").write_text(json.dumps(dict(args, split=split), indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: its shards are identical
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
    return [str(p) for p in sorted(final.glob("*.tar"))]
