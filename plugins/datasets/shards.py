"""Generic dataset: WebDataset shards you already have, given per split as brace patterns.

    data: {dataset: {name: shards, train: "data/train-{000000..000009}.tar", eval: "data/eval-000000.tar"}}

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
    def __init__(self, train=None, eval=None):
        self.patterns = {"train": train, "eval": eval}

    def shards(self, split):
        where = f"data.dataset.{split}"
        if split not in self.patterns:
            raise ConfigError(f"data.dataset: shards has no split {split!r}; splits are train, eval")
        patterns = self.patterns[split]
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


def _expand(pattern, where):
    try:
        expanded = expand_urls(pattern)
    except AssertionError as e:  # webdataset's envlookup asserts on a missing WDS_ variable
        raise ConfigError(f"{where}: {pattern!r}: {e}") from None
    return [p if is_url(p) else os.path.expanduser(p) for p in expanded]


@hookimpl
def vlmkit_register(registry):
    registry.add("dataset", "shards", Shards)
