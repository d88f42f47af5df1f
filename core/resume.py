"""Training state for ``run.resume=auto``: everything besides the weights that the next step depends on.

Optimizer moments, scheduler position, RNG states (python, numpy when installed, torch), the data
streams' positions and the stage's own settings are saved with every checkpoint: tensors in
``train_XXXXXX.safetensors``, the rest as JSON under ``train_state`` in the
meta json. No pickle. A resumed stage then takes the same batches, the same
learning rates and the same updates as the run that was interrupted.

A resumed stage whose recipe settings changed since the checkpoint (``check_stage``): the
optimizer's hyperparameters and the schedule, lengths and intervals are taken from the recipe
and said (``apply_stage`` sets them on the restored optimizer, so the log's lr is the one in
use); what the saved state cannot follow (another optimizer, freeze policies, regularisers,
batch size, text_ratio) is refused in one line naming the key.

Under torchrun the weights, optimizer and scheduler are the same on every rank
(DDP averages the gradients), but each rank reads its own shards and draws its
own random numbers, so the RNG states and stream positions of every rank are
gathered to rank 0, which writes them (``ranks`` in the JSON, ``rng.torch.R``
tensors), and each rank takes back its own. A checkpoint therefore resumes only
with the world size that wrote it (``check_world_size``).
"""
import contextlib
import random

import attrs
import torch

from core import distributed
from core.errors import ConfigError

try:  # numpy is not a dependency; a plugin that draws from its global RNG is seeded and resumed too
    import numpy
except ImportError:  # pragma: no cover - numpy comes with most torch installs
    numpy = None

# stage keys whose change the saved optimizer state cannot follow: a resume refuses them
FIXED_ON_RESUME = {
    "optimizer": "the saved optimizer state belongs to the other optimizer",
    "muon_parts": "the saved optimizer state holds Muon's and AdamW's parameters as the old parts split them",
    "freeze": "the saved optimizer state holds the parameters the old policies left trainable",
    "regularisers": "the saved regulariser heads and loss terms belong to the old list",
    "adapters": "the saved weights and optimizer state belong to the old adapters",
    "batch_size": "the saved data position counts batches of the old size",
    "text_ratio": "the saved text-stream position belongs to the old mixing",
    "model": "the saved weights belong to the model the stage built",
    "dataset": "the saved data position belongs to the old dataset's shards",
}
IGNORED_ON_RESUME = ("init_from",)  # a resumed stage takes its weights from the checkpoint


def seed_all(seed):
    """Seed every global RNG a stage or a plugin may draw from: python's ``random``, numpy's, torch's."""
    random.seed(seed)
    if numpy is not None:
        numpy.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_kept():
    """Draws inside the block leave the global RNGs (python's, numpy's, torch's CPU one) where they were:
    rebuilding a checkpoint's base model seeds and draws without moving the run's own streams."""
    python, numpy_state = random.getstate(), numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def capture(optimizer, scheduler, streams, step, sharded=False, stage=None):
    """-> (tensors, state) for the checkpoint; ``streams`` maps a name to a batch iterator.

    ``sharded``: the model ran under FSDP, whose optimizer groups differ from DDP's (core/distributed.py).

    Collective under torchrun: every rank must call it at the same step."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):  # FSDP's shards of the moments gathered whole: DDP's format
                tensors[f"optimizer.{index}.{key}"] = distributed.full(value)
            else:
                scalars[f"{index}.{key}"] = value
    version, internal, gauss = random.getstate()
    mine = {"python_random": [version, list(internal), gauss],
            "streams": {name: s.state_dict() for name, s in streams.items() if s is not None}}
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        mine["numpy_random"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    ranks = distributed.gather_objects((torch.get_rng_state(), mine))
    for r, (rng, _) in enumerate(ranks):
        tensors[f"rng.torch.{r}"] = rng
    state = {"step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
             "scheduler": scheduler.state_dict(), "ranks": [rank_state for _, rank_state in ranks],
             "sharded": sharded, **({"stage": attrs.asdict(stage)} if stage is not None else {})}
    return tensors, state


def saved_world_size(state):
    """How many processes wrote ``state``."""
    return len(state["ranks"])


def check_world_size(state, world_size, path, sharded=False):
    """A checkpoint resumes only as it was written: the same number of processes, sharded or not."""
    saved = saved_world_size(state)
    if saved != world_size:
        raise ConfigError(f"run.resume: {path} was written by {saved} process(es) and this run has {world_size}; "
                          f"resume with the same number (each rank continues its own data position and RNG)")
    written_sharded = state["sharded"]
    if written_sharded != sharded:  # the optimizer's parameter groups differ between the two
        label = {True: "sharded (run.parallel=fsdp under torchrun)", False: "unsharded (ddp, or one process)"}
        raise ConfigError(f"run.parallel: {path} was written {label[written_sharded]} and this run is "
                          f"{label[sharded]}; resume it the way it was written")


def restore(optimizer, scheduler, streams, tensors, state):
    """Put back what ``capture`` saved (this rank's RNG and data positions); returns the steps already done."""
    per_param = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    per_param = {i: {k: distributed.like(v, params[i]) for k, v in values.items()} for i, values in per_param.items()}
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    rank = distributed.rank()
    mine, rng = state["ranks"][rank], tensors[f"rng.torch.{rank}"]
    torch.set_rng_state(rng)
    version, internal, gauss = mine["python_random"]
    random.setstate((version, tuple(internal), gauss))
    if numpy is not None and "numpy_random" in mine:
        name, keys, pos, has_gauss, cached = mine["numpy_random"]
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    for name, stream in streams.items():
        if stream is not None:
            stream.load_state_dict(mine["streams"][name])
    return state["step"]


def check_stage(state, stage, where, path):
    """{key: (saved, recipe)} of the stage settings that changed since the checkpoint and are applied;
    a ConfigError for one the saved state cannot follow (FIXED_ON_RESUME). A checkpoint written before
    stage settings were saved has nothing to compare: {}."""
    changed = changed_settings(state, stage)
    for key, (old, new) in changed.items():
        if key in FIXED_ON_RESUME:
            raise ConfigError(f"run.resume: {where}.{key} is {new!r} in the recipe but {old!r} in {path}; "
                              f"{FIXED_ON_RESUME[key]}: put it back, or start a new run.dir")
    return changed


def changed_settings(state, stage):
    """{key: (saved, recipe)} of the stage settings that differ from those the checkpoint was written with."""
    saved = state.get("stage")
    if saved is None:
        return {}
    return {k: (saved.get(k), v) for k, v in attrs.asdict(stage).items()
            if k not in IGNORED_ON_RESUME and saved.get(k) != v}


def apply_stage(optimizer, scheduler, stage):
    """Set the recipe's lr, muon_lr, betas and weight decay on a restored optimizer (load_state_dict put
    back the saved ones) and the matching base lrs on its scheduler, whose lambda reads the recipe's
    schedule; unchanged settings give exactly the values an uninterrupted run has."""
    bases = []
    for group in optimizer.param_groups:
        base = (stage.muon_lr if group.get("kind") == "muon" else stage.lr) * group.get("lr_multiplier", 1.0)
        group["initial_lr"] = base
        group["betas"] = tuple(stage.betas)
        group["weight_decay"] = stage.weight_decay
        bases.append(base)
    scheduler.base_lrs = bases
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, base, factor in zip(optimizer.param_groups, bases, factors):
        group["lr"] = base * factor  # LambdaLR's own formula


def used_lr(optimizer):
    """{"lr": ..., "muon_lr": ...}: the learning rates the optimizer applies now, its groups' lr multipliers
    taken out (what log.jsonl shows)."""
    out = {}
    for group in sorted(optimizer.param_groups, key=lambda g: g.get("lr_multiplier", 1.0) != 1.0):
        multiplier = group.get("lr_multiplier", 1.0)
        if multiplier:  # a group at lr multiplier 0 says nothing about the stage's lr
            out.setdefault("muon_lr" if group.get("kind") == "muon" else "lr", group["lr"] / multiplier)
    return out
