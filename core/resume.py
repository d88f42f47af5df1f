"""Training state for ``run.resume=auto``: everything besides the weights that the next step depends on.

Optimizer moments, scheduler position, RNG states (python, torch) and the data
streams' positions are saved with every checkpoint: tensors in
``train_XXXXXX.safetensors``, the rest as JSON under ``train_state`` in the
meta json. No pickle. A resumed stage then takes the same batches, the same
learning rates and the same updates as the run that was interrupted.

Under torchrun the weights, optimizer and scheduler are the same on every rank
(DDP averages the gradients), but each rank reads its own shards and draws its
own random numbers, so the RNG states and stream positions of every rank are
gathered to rank 0, which writes them (``ranks`` in the JSON, ``rng.torch.R``
tensors), and each rank takes back its own. A checkpoint therefore resumes only
with the world size that wrote it (``check_world_size``).
"""
import random

import torch

from core import distributed
from core.errors import ConfigError


def capture(optimizer, scheduler, streams, step, sharded=False):
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
    ranks = distributed.gather_objects((torch.get_rng_state(), mine))
    for r, (rng, _) in enumerate(ranks):
        tensors[f"rng.torch.{r}"] = rng
    state = {"step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
             "scheduler": scheduler.state_dict(), "ranks": [rank_state for _, rank_state in ranks],
             "sharded": sharded}
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
    for name, stream in streams.items():
        if stream is not None:
            stream.load_state_dict(mine["streams"][name])
    return state["step"]
