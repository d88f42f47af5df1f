"""Several processes, one model: ``torchrun --nproc_per_node=N -m core.run RECIPE``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; this module starts the process
group (NCCL on GPUs, gloo on CPUs), wraps the model in DDP (or, with
``run.parallel: fsdp``, shards it with FSDP2: the second half of this file) and averages the
gradients of trainable parts that live outside it (regulariser heads). Data
are split by rank in core/stream.py; only rank 0 prints, logs and writes
checkpoints; every rank decodes its share of the evaluation and the probe, and rank 0 scores
them (core/evaluate.py). Without WORLD_SIZE > 1 every function is a no-op.
"""
import contextlib
import gc
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel


def setup(device):
    """Start the process group when launched by torchrun; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model, find_unused_parameters):
    """DDP around ``model`` when distributed. find_unused_parameters only when some batches skip a part
    (text-only batches skip the vision tower; DESIGN.md): it costs a graph walk every step."""
    if not active():
        return model
    device = model.view_separator.device  # every layout has it (image_newline only DeepSeek-OCR's)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


@contextlib.contextmanager
def no_sync(engine):
    """Skip the gradient reduction for a micro-batch that is not the last (grad_accum): DDP's no_sync
    (through a torch.compile wrapper if there is one), or FSDP2's requires_gradient_sync off."""
    module = getattr(engine, "_orig_mod", engine)
    if not active():
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        set_gradient_sync(module, False)
        try:
            yield
        finally:
            set_gradient_sync(module, True)


def average_gradients(params):
    """Average the gradients of parameters DDP does not hold (each rank computed its own)."""
    if not active():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """True in the process that prints, logs and writes: rank 0, or the only process. Before the process
    group starts (while plugins load) torchrun's RANK says which process this is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def print0(*args, **kwargs):
    """print() on the main process only: every library and plugin message goes through here, so a run
    under torchrun says each thing once (nanochat's print0)."""
    if is_main():
        print(*args, **{"flush": True, **kwargs})


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (JSON-able values and CPU tensors); [obj] alone."""
    if not active():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier():
    if active():
        dist.barrier()


def shutdown(completed=True):
    """Leave the process group while the interpreter is whole. Unreachable objects of the run (an FSDP module's
    pending collective work holds tensors) are freed first: freed at interpreter exit instead, a gloo thread
    that still holds them aborts the process ("terminate called without an active exception"). A run that
    ``completed`` waits for every rank first (a failed one does not: the others may never get there)."""
    if active():
        gc.collect()
        if completed:
            dist.barrier()
        dist.destroy_process_group()


# ---- run.parallel: fsdp: the model sharded across the torchrun ranks with FSDP2 (``fully_shard``)
#
# Each block (every module in one of the model's ``nn.ModuleList``s: decoder blocks, SAM and
# CLIP blocks) is its own shard group, the root takes the rest, so a rank holds 1/N of the
# weights, gradients and optimizer moments and gathers one block at a time. Parameters become
# DTensors; everything here that needs whole tensors (checkpoints, the collapse monitor, probe
# decoding, the final evaluation) gathers them, which is a collective: every rank calls it at the
# same point. Regulariser heads live outside the model and stay plain, replicated tensors
# (average_gradients above), so gradient clipping combines the two norms.
# Without torchrun there is nothing to shard over and the model runs as it is.


def shard(model):
    """fully_shard every block, inner lists before the lists that hold them, then the root (FSDP2 wants it last)."""
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    for block in reversed(blocks):
        fully_shard(block)
    fully_shard(model)
    # The model returns its logits among other tensors, some of them views; only an in-place op on one
    # would lose FSDP's pre-backward hook, and the training loop combines them out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def is_sharded(tensor):
    return isinstance(tensor, DTensor)


def full(tensor):
    """The whole tensor behind a DTensor (an all-gather: collective), a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value, param):
    """A whole optimizer-state tensor cut the way ``param`` is sharded (moments have the parameter's shape;
    AdamW's step count is a scalar and stays plain)."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def full_state(model, rank0_only):
    """The model's state dict with whole tensors. ``rank0_only``: on the CPU of rank 0 alone (the other
    ranks get {}), which is what a checkpoint needs; else on every rank, for a plain copy."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def plain_copy(model, build):
    """An unsharded model with the sharded one's weights, in eval mode, on every rank: what the collapse
    monitor, probe decoding and evaluation run on (they call parts of the model outside its forward,
    where FSDP's hooks would not gather them). ``build`` makes a fresh model; its random init is drawn
    in a forked RNG, so training draws the same numbers as a run that builds no copy."""
    state = full_state(model, rank0_only=False)
    with torch.random.fork_rng(devices=[]):
        copy = build()
    copy.load_state_dict(state)
    return copy.to(next(iter(state.values())).device).eval()


def clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ over sharded (DTensor) and plain gradients together.

    The sharded norm is a partial sum across ranks until full_tensor reduces it; the plain
    gradients (regulariser heads) are whole on every rank already. Returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = [full(torch.nn.utils.get_total_norm(group)).reshape(()) for group in (sharded, plain) if group]
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()  # clip_grad_norm_'s rule, in float32 as it
    for g in grads:
        g.mul_(coef)
    return total


def set_gradient_sync(model, sync):
    """FSDP's no_sync: without sync, gradients accumulate unreduced until the last micro-batch."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
