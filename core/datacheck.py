"""The ``data`` section checked before anything trains: ``check_data``, which ``--dry-run`` and a run's start call.

Each dataset (``data.dataset``, ``data.text_dataset``, one with a stage's ``dataset`` changes) is built as the
run builds it, so an argument its constructor does not take is one error line naming the recipe key, and the
splits the run will read are asked for their shards: a pattern that matches nothing or a shard that is not
there is one error line too, not a failure after the first stage. A dataset that writes its shards on first
use (``writes_shards``, core/contracts.py: the synthetic ones render them) is not asked, so a dry run renders
nothing.

Then the first ``SCAN`` images of the train split are measured from their headers: those far wider or
taller than the model's view (core.images.far_aspect) are padded to it, so their text shrinks; one warning
line says how many, once per run (not per sample, and not per DataLoader worker).
"""
import io
import itertools

from core.badsamples import BadSample
from core.data import image_ext
from core.distributed import print0
from core.errors import ConfigError
from core.images import far_aspect, open_header, upright_size
from core.registry import plugin_call
from core.shardreader import check_shards, is_url, read_shard
from core.stageconfig import dataset_key, stage_dataset

SCAN = 64  # train images measured for the aspect warning


def needed_splits(recipe):
    """{recipe key: (dataset Component, [split, ...])}: the datasets the run builds and the splits it reads."""
    trains = any(stage.steps for stage in recipe.stages)
    evaluates = recipe.eval is not None or any(s.probe_every or s.monitor_every for s in recipe.stages if s.steps)
    reads = [s for s, used in (("train", trains), ("eval", evaluates)) if used]
    splits = {"data.dataset": (recipe.data.dataset, reads)}
    if recipe.data.text_dataset is not None:
        texts = any(s.steps and s.text_ratio for s in recipe.stages)
        splits["data.text_dataset"] = (recipe.data.text_dataset, ["train"] if texts else [])
    splits.update({dataset_key(recipe, i): (stage_dataset(recipe, i), ["train"])
                   for i, s in enumerate(recipe.stages) if s.steps and s.dataset})
    return splits


def check_data(recipe, registry, model, show=False):
    """Build the recipe's datasets and list the shards of every split the run reads (ConfigError naming the
    key if one cannot be used), then warn once if train images are far from ``model``'s view. ``show``
    prints what each split holds (--dry-run)."""
    train = None
    for key, (component, splits) in needed_splits(recipe).items():
        dataset = registry.build("dataset", component.name, where=key, **component.args)
        if getattr(dataset, "writes_shards", False):
            if show:
                print(f"{key}: {component.name} writes its shards when the run first reads them")
            continue
        for split in splits:
            paths = shard_list(key, dataset, split)
            if show:
                print(f"{key} {split}: {len(paths)} shard(s): {paths[0]}" + (" ..." if len(paths) > 1 else ""))
            if key == "data.dataset" and split == "train":
                train = paths
    if train:
        warn_aspects(train, model)


def shard_list(key, dataset, split):
    """The dataset's shards of ``split``, every local one there (core.shardreader.check_shards)."""
    paths = plugin_call(key, dataset.shards, split)
    try:
        return check_shards(paths)
    except ConfigError as e:
        raise ConfigError(f"{key}.{split}: {str(e).removeprefix('data: ')}") from None


def warn_aspects(paths, model, key="data.dataset"):
    """One warning line when some of the first SCAN images of the local ``paths`` are far from the view."""
    sizes = itertools.islice(((raw["__key__"], size) for raw in _raws(paths) if (size := _size(raw))), SCAN)
    seen = far = 0
    example = None
    for sample, size in sizes:
        seen += 1
        aspects = far_aspect(*size, model.image_size, model.tiling)
        if aspects:
            far += 1
            example = example or (sample, *aspects)
    if far:
        sample, aspect, view = example
        print0(f"warning: {key}: {far} of the first {seen} train images are far wider or taller than the model's "
               f"view {view} (e.g. {sample!r} is {aspect}, width:height): padded to it, their text shrinks; a "
               f"model.encoder.image_size of their shape reads them better (recipes/pages.yaml: pages)")


def _raws(paths):
    return itertools.chain.from_iterable(read_shard(path) for path in paths if not is_url(path))


def _size(raw):
    """The upright (width, height) of a raw sample's image from its header, or None (no image, unreadable:
    training counts those as bad samples)."""
    ext = image_ext(raw)
    if ext is None:
        return None
    try:
        with open_header(io.BytesIO(raw[ext]), None) as image:
            return upright_size(image)
    except (BadSample, OSError, ValueError, SyntaxError):  # Pillow's ways of saying a file is damaged
        return None
