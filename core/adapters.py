"""Adapters: a stage that trains small added weights (LoRA and the like) instead of the model.

A stage's ``adapters`` are plugins of the kind ``adapter`` (core/hookspecs.py: ``vlmkit_adapter_attach``,
``vlmkit_adapter_merge``). In such a stage every base parameter starts frozen (a freeze policy's
``trainable`` opens some on purpose), the adapters are attached after the freeze policies, and what
trains is what they added plus what was opened.

Its checkpoint holds exactly that (``saved``: megabytes, not the model) and names its base in the meta
json (``adapter.base``): the seed the stage built its model with and the ``init_from`` file and parts
it loaded, the file's path relative to the checkpoint's folder (a run folder can move) and its sha256.
Rebuilding it (``rebuild``: resume, ``python -m core.generate``, ``core.merge``, an ``init_from`` that
names it) builds the model with that seed, loads the base (itself rebuilt if it is an adapter
checkpoint), attaches the same adapters and loads the saved tensors.
"""
import hashlib
import os

import attrs
import torch

from core import checkpoint
from core.distributed import print0
from core.errors import ConfigError
from core.model import build_model
from core.recipe import Component, model_config_from_meta
from core.hooks import attach as attach_hooks
from core.resume import rng_kept, seed_all
from core.weights import first_keys


@attrs.define
class Adapted:
    """A model with its stage's adapters attached."""
    objects: list  # the adapter plugin objects, which merge what they attached
    components: list  # their recipe entries (core.recipe.Component)
    where: str
    added: list  # parameter names the adapters added
    saved: list  # what an adapter checkpoint holds: ``added`` and the base parameters opened on purpose
    base: dict | None = None  # {"seed", "init_from" (absolute path or None), "parts", "sha256"}
    checked: bool = False  # whether every added parameter has had a gradient (``check_used``)


def frozen_by_design(model):
    """Names of the parameters frozen before any policy ran (a component's own choice)."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def attach(registry, pm, model, components, where, frozen, multipliers=None):
    """Build ``components`` (a stage's ``adapters``) and attach them to ``model``; returns an Adapted, or None
    without adapters. ``multipliers`` ({name: lr multiplier}) are renamed in place when a wrapped layer renames
    its parameters, and take the adapters' own."""
    if not components:
        return None
    objects = registry.build_all("adapter", components, where)
    names = {id(p): n for n, p in model.named_parameters()}
    opened = [p for p in model.parameters() if p.requires_grad]
    try:
        with attach_hooks(pm, objects, where):
            answers = pm.hook.vlmkit_adapter_attach(model=model, frozen=frozenset(frozen))
    except ConfigError as e:  # the adapter's own word on the model (a target that matches nothing): say where
        raise ConfigError(f"{where}: {e}") from e
    for p in opened:  # an adapter library may freeze everything it did not add
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    added = [n for n, p in params.items() if id(p) not in names]
    if not added:
        raise ConfigError(f"{where}: the adapters added no parameter to the model")
    if multipliers is not None:
        renamed = {n: multipliers.pop(names[id(p)]) for n, p in params.items() if names.get(id(p)) in multipliers}
        multipliers.update(renamed)
        for answer in answers:
            multipliers.update(answer)
    saved = sorted(set(added) | {n for n, p in params.items() if p.requires_grad})
    return Adapted(objects, list(components), where, added, saved)


def merge(pm, model, adapted):
    """Fold the adapters into the weights they wrap: ``model`` is a plain model again."""
    with attach_hooks(pm, adapted.objects, adapted.where):
        pm.hook.vlmkit_adapter_merge(model=model)
    left = [n for n in adapted.added if n in dict(model.named_parameters())]
    if left:
        raise ConfigError(f"{adapted.where}: merging left adapter parameters in the model: {first_keys(left)}")


def check_used(adapted, model):
    """After the first backward of an image batch: every added parameter must have a gradient, else its layer is
    never called (a component that reads the layer's weight directly) and the adapter would never train."""
    if adapted is None or adapted.checked:
        return
    params = dict(model.named_parameters())
    idle = [n for n in adapted.added if params[n].requires_grad and params[n].grad is None]
    if idle:
        raise ConfigError(f"{adapted.where}: no gradient reached {first_keys(idle)}: the model does not call "
                          f"those layers (a component reads their weights directly); leave them out of targets")
    adapted.checked = True


def checkpoint_parts(adapted, state, extra_modules, train_state):
    """(model file tensors, train state) of an adapter checkpoint from the model's whole ``state`` dict: the model
    file holds the adapter and the parameters opened on purpose, what inference needs; regulariser heads are
    training state and go with the optimizer's in the train file (core.checkpoint.save_checkpoint)."""
    heads = {f"{prefix}.{k}": v for prefix, module in extra_modules.items() for k, v in module.state_dict().items()}
    tensors, json_state = train_state
    return {k: state[k] for k in adapted.saved}, ({**tensors, **heads}, json_state)


def checkpoint_meta(adapted, stage_dir):
    """{"adapter": ...} for the meta json: the adapters and the base they were trained on."""
    base = dict(adapted.base)
    if base["init_from"] is not None:  # relative: the run folder may move as a whole
        base["init_from"] = os.path.relpath(base["init_from"], stage_dir)
    return {"adapter": {"adapters": [attrs.asdict(c) for c in adapted.components], "base": base}}


def base_of(init_from, parts, seed):
    """The ``base`` of an adapter stage that built its model with ``seed`` and loaded ``parts`` of ``init_from``."""
    return {"seed": seed, "init_from": init_from, "parts": list(parts or []),
            "sha256": _sha256(init_from) if init_from else None}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def load_start(recipe, registry, pm, index, model, run_dir=None, point=None, say=print0, init_from=True):
    """Load the weights stage ``index`` starts from: its ``init_from`` (an adapter checkpoint merged first), or,
    resuming an adapter stage, the base its checkpoint names. Returns an adapter stage's base record, else None."""
    stage, seed = recipe.stages[index], recipe.run.seed + 1000 * index
    if point is not None:  # the checkpoint has the weights; an adapter checkpoint only its own
        info = point.meta.get("adapter")
        return info and load_base(model, info["base"], os.path.dirname(point.model_file), registry, pm)
    if stage.init_from is None or not init_from:
        return base_of(None, [], seed) if stage.adapters else None
    parts = stage.init_from.parts
    path = checkpoint.resolve(stage.init_from.path, run_dir, parts)
    keys = load_parts(model, path, parts, registry, pm)
    say(f"stage {stage.name}: {'+'.join(parts)} ({len(keys)} tensors) from {path}")
    return base_of(path, parts, seed) if stage.adapters else None


def build_like(model_config, registry, pm, adapted):
    """A fresh model with ``adapted``'s adapters attached (None: without), e.g. what FSDP's whole copy loads into."""
    model = build_model(model_config, registry)[0]
    if adapted is not None:
        frozen = frozen_by_design(model)
        model.requires_grad_(False)
        attach(registry, pm, model, adapted.components, adapted.where, frozen)
    return model


def load_base(model, base, folder, registry, pm):
    """Load an adapter checkpoint's recorded base into ``model`` (built with ``base["seed"]``); ``folder`` is the
    checkpoint's, which a relative ``init_from`` is taken from. Returns the base with an absolute path."""
    path = base.get("init_from")
    if path is None:
        return dict(base)
    path = os.path.normpath(os.path.join(folder, path))
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: the adapter's base checkpoint {path} does not exist")
    if base.get("sha256") and _sha256(path) != base["sha256"]:
        raise ConfigError(f"{folder}: the adapter's base checkpoint {path} has changed since the adapter was "
                          f"trained on it (sha256 differs)")
    load_parts(model, path, base["parts"], registry, pm)
    return {**base, "init_from": path}


def load_parts(model, path, parts, registry, pm):
    """``checkpoint.load_parts`` for any checkpoint: an adapter checkpoint is rebuilt and merged first."""
    meta = checkpoint.read_meta(path)
    if "adapter" not in meta:
        return checkpoint.load_parts(model, path, parts)
    rebuilt, _, adapted = rebuild(path, meta, registry, pm)
    merge(pm, rebuilt, adapted)
    return checkpoint.load_parts(model, path, parts, saved=rebuilt.state_dict())


def load_resumed(model, point, adapted, heads):
    """The weights of a resumed stage: the whole model from its checkpoint, or the tensors of an adapter checkpoint
    (its base is loaded, its adapters attached), then the regulariser ``heads`` (an adapter checkpoint keeps them
    in its train file). ``point``: a checkpoint.ResumePoint."""
    if adapted is None:
        checkpoint.load_parts(model, point.model_file, list(checkpoint.PARTS))
    else:
        load_saved(model, point.model_file, adapted)
    for prefix, module in heads.items():
        checkpoint.load_prefixed(module, point.model_file, prefix, saved=point.tensors if adapted is not None else None)


def load_saved(model, path, adapted):
    """Put an adapter checkpoint's tensors into ``model`` (its adapters attached). Every added parameter must be
    in the file, and every tensor of the file must fit the model."""
    saved = checkpoint.read_tensors(path)
    own = model.state_dict()
    problems = [f"{k} is not in the model" for k in saved if k not in own]
    problems += [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in saved.items()
                 if k in own and v.shape != own[k].shape]
    problems += [f"{k} is missing" for k in adapted.added if k not in saved]
    if problems:
        raise ConfigError(f"{path}: does not fit the model with {adapted.where}: {first_keys(problems, 3)}")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)


def rebuild(path, meta, registry, pm):
    """-> (model, tokenizer, Adapted): an adapter checkpoint's model, base and adapters, on the CPU. The base's
    random init is drawn in forked RNGs, so the caller's random streams do not move."""
    info = meta["adapter"]
    config = model_config_from_meta(meta["model"], path)
    with rng_kept():
        seed_all(info["base"]["seed"])
        model, tokenizer = build_model(config, registry)
    frozen = frozen_by_design(model)
    load_base(model, info["base"], os.path.dirname(os.path.abspath(path)), registry, pm)
    model.requires_grad_(False)
    components = [Component(c["name"], c.get("args", {})) for c in info["adapters"]]
    with rng_kept():
        adapted = attach(registry, pm, model, components, f"{path}: adapters", frozen)
    load_saved(model, path, adapted)
    return model, tokenizer, adapted
