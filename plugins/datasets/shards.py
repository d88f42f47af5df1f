"""Generic dataset: WebDataset shards you already have, given per split as brace patterns.

    data: {dataset: {name: shards, train: "data/train-{000000..000009}.tar", eval: "data/eval-000000.tar"}}

A pattern may also hold glob wildcards, or be a list of patterns.
"""
import glob
import os

from braceexpand import braceexpand

from core import ConfigError, hookimpl


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
            for path in braceexpand(os.path.expanduser(str(pattern))):
                if glob.has_magic(path):
                    matched = sorted(glob.glob(path))
                    if not matched:
                        raise ConfigError(f"{where}: no file matches {pattern!r}")
                    paths += matched
                elif not os.path.isfile(path):
                    origin = f" (from {pattern!r})" if path != pattern else ""
                    raise ConfigError(f"{where}: shard {path!r} does not exist{origin}")
                else:
                    paths.append(path)
        return paths


@hookimpl
def vlmkit_register(registry):
    registry.add("dataset", "shards", Shards)
