"""What the benchmarks share: the default recipe, its tokenizer, and synthetic shards of it."""
import os

from core.recipe import load_recipe
from core.registry import load_plugins

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "two_stage.yaml")


def bytes_tokenizer():
    """The default recipe's tokenizer (``bytes``), as the pipeline measurements use it."""
    return load_plugins()[1].build("tokenizer", "bytes")


def synthetic_shards(folder, samples):
    """``samples`` training images of the default recipe's dataset (whichever plugin it names) in ``folder``."""
    dataset = load_recipe(RECIPE).data.dataset
    args = dict(dataset.args, train_samples=samples, samples_per_shard=max(samples // 4, 1), cache_dir=folder)
    return load_plugins()[1].build("dataset", dataset.name, where="data.dataset", **args).shards("train")
