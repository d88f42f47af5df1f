"""What the benchmarks share: the default recipe, its tokenizer, and synthetic shards of it."""
import os

from core.recipe import load_recipe
from core.registry import load_plugins
from plugins.datasets.synthetic_ocr import SyntheticOCR

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "two_stage.yaml")


def bytes_tokenizer():
    """The default recipe's tokenizer (``bytes``), as the pipeline measurements use it."""
    return load_plugins()[1].build("tokenizer", "bytes")


def synthetic_shards(folder, samples):
    args = dict(load_recipe(RECIPE).data.dataset.args, train_samples=samples, samples_per_shard=max(samples // 4, 1))
    return SyntheticOCR(cache_dir=folder, **args).shards("train")
