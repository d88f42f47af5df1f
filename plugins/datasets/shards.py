"""Generic dataset: WebDataset shards you already have, given per split as brace patterns, or as a folder.

    data: {dataset: {name: shards, train: "data/train-{000000..000009}.tar", eval: "data/eval-000000.tar"}}
    data: {dataset: {name: shards, dir: data}}     # data/train-*.tar and data/eval-*.tar

``dir`` is the folder ``python -m core.shards --out DIR`` wrote: a split is its ``{split}-*.tar`` files
(``--name train``, and ``--eval-every N`` or a second run with ``--name eval``, write them); a split's
pattern, when given, is read instead.

A pattern is expanded as WebDataset expands it (``webdataset.shardlists.expand_urls``: ``::`` separates
patterns, ``${NAME}`` is the environment variable ``WDS_NAME``, then braces), so it may be a URL that
WebDataset opens: ``https://host/train-{000000..000009}.tar``, ``pipe:curl -s https://host/x.tar``,
``pipe:aws s3 cp s3://bucket/train-{000000..000009}.tar -`` (docs/data.md, "Shards from anywhere", and §1).
A local pattern may also hold glob wildcards; a split may be a list of patterns.
"""
import glob
import os

from webdataset.shardlists import expand_urls

from core import ConfigError, hookimpl
from core.shardreader import check_shards, is_url, local_path


class Shards:
    def __init__(self, train=None, eval=None, dir=None):
        self.patterns = {"train": train, "eval": eval}
        if dir is not None and not os.path.isdir(os.path.expanduser(str(dir))):
            raise ConfigError(f"dir {dir!r} is not a folder (python -m core.shards FORMAT SOURCE --out DIR writes one)")
        self.dir = dir

    def shards(self, split):
        where = f"data.dataset.{split}"
        if split not in self.patterns:
            raise ConfigError(f"data.dataset: shards has no split {split!r}; splits are train, eval")
        patterns = self.patterns[split]
        if not patterns and self.dir is not None:
            return self._in_dir(split)
        if not patterns:
            raise ConfigError(f"{where}: no shards given for the {split} split")
        paths = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            for path in _expand(str(pattern), where):
                if is_url(path):
                    paths.append(path)  # fetched when read: one that fails is counted then (unreadable_shard)
                elif glob.has_magic(path):
                    matched = sorted(glob.glob(local_path(path)))
                    if not matched:
                        raise ConfigError(f"{where}: no file matches {pattern!r}")
                    paths += matched
                elif not os.path.isfile(local_path(path)):
                    origin = f" (from {pattern!r})" if path != pattern else ""
                    raise ConfigError(f"{where}: shard {path!r} does not exist{origin}")
                else:
                    paths.append(path)
        try:
            return check_shards(paths)
        except ConfigError as e:
            raise ConfigError(f"{where}: {str(e).removeprefix('data: ')}") from None


    def _in_dir(self, split):
        pattern = os.path.join(os.path.expanduser(str(self.dir)), f"{split}-*.tar")
        paths = sorted(glob.glob(pattern))
        if not paths:
            hint = " (python -m core.shards --eval-every N holds eval samples out)" if split == "eval" else ""
            raise ConfigError(f"data.dataset.dir: no {split} shards, {pattern!r} matches no file{hint}")
        return check_shards(paths)


def _expand(pattern, where):
    try:
        expanded = expand_urls(pattern)
    except AssertionError as e:  # webdataset's envlookup asserts on a missing WDS_ variable
        raise ConfigError(f"{where}: {pattern!r}: {e}") from None
    return [p if is_url(p) else os.path.expanduser(p) for p in expanded]


@hookimpl
def vlmkit_register(registry):
    registry.add("dataset", "shards", Shards)
