"""Training state for ``run.resume=auto``: everything besides the weights that the next step depends on.

Optimizer moments, scheduler position, RNG states (python, torch) and the data
streams' positions are saved with every checkpoint: tensors in
``train_XXXXXX.safetensors``, the rest as JSON under ``train_state`` in the
meta json. No pickle. A resumed stage then takes the same batches, the same
learning rates and the same updates as the run that was interrupted.
"""
import random

import torch


def capture(optimizer, scheduler, streams, step):
    """-> (tensors, state) for the checkpoint; ``streams`` maps a name to a batch iterator."""
    opt = optimizer.state_dict()
    tensors, scalars = {"rng.torch": torch.get_rng_state()}, {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    version, internal, gauss = random.getstate()
    state = {"step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
             "scheduler": scheduler.state_dict(), "python_random": [version, list(internal), gauss],
             "streams": {name: s.state_dict() for name, s in streams.items() if s is not None}}
    return tensors, state


def restore(optimizer, scheduler, streams, tensors, state):
    """Put back what ``capture`` saved; returns the number of steps already done."""
    per_param = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    for name, stream in streams.items():
        if stream is not None:
            stream.load_state_dict(state["streams"][name])
    return state["step"]
