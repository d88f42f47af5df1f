"""Several processes, one model: ``torchrun --nproc_per_node=N -m core.run RECIPE``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; this module starts the process
group (NCCL on GPUs, gloo on CPUs), wraps the model in DDP (or, with
``run.parallel: fsdp``, core/fsdp.py shards it) and averages the
gradients of trainable parts that live outside it (regulariser heads). Data
are split by rank in core/stream.py; only rank 0 prints, logs, writes
checkpoints and evaluates. Without WORLD_SIZE > 1 every function is a no-op.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from core import fsdp


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
    ids = [model.image_newline.device.index] if model.image_newline.device.type == "cuda" else None
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
        fsdp.set_gradient_sync(module, False)
        try:
            yield
        finally:
            fsdp.set_gradient_sync(module, True)


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


def shutdown():
    if active():
        dist.destroy_process_group()
