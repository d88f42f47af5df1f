"""What the synthetic datasets share: their splits, rendered once per set of arguments and cached.

A subclass sets ``name`` and ``format_version`` (bump it when rendering or the shard format changes:
it invalidates old caches), keeps its constructor arguments in ``self.args`` and ``cache_dir``,
``fixed_samples`` (the overfit check: eval reads the train samples), and writes a split's shards
into a folder in ``_write(split, folder)``.
"""
import PIL

from core import ConfigError
from core.shardwriter import cache_key, cached_split

SPLITS = ("train", "eval")


class RenderedDataset:
    name = "rendered"
    format_version = 1
    writes_shards = True  # rendered on first use: python -m core.run --dry-run does not ask for them

    def shards(self, split):
        if split not in SPLITS:
            raise ConfigError(f"data.dataset: {self.name} has no split {split!r}; splits are {', '.join(SPLITS)}")
        if self.fixed_samples:
            split = "train"  # the overfit check evaluates on the very samples it trains on
        return cached_split(self.cache_dir, self.render_args(), split, lambda folder: self._write(split, folder))

    def render_args(self):
        """Everything that decides the pixels: the arguments, the format version and Pillow's version."""
        return dict(self.args, version=self.format_version, pillow=PIL.__version__)

    def cache_key(self):
        return cache_key(self.render_args())
