"""What one training step needs in memory, before the run: ``python -m core.run RECIPE --dry-run``.

Per stage: weights, gradients, optimizer states and activations at the recipe's batch size and
``data.max_len``, and the total per process under the recipe's parallelism (DESIGN.md, "Memory").

Activations are measured, not a formula: the stage is prepared as training prepares it
(``core.train.prepare_model``: freeze policies, adapters, regularisers, activation checkpointing,
the optimizer) on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no memory), and
two optimizer steps on a full batch (every row ``data.max_len`` tokens, every answer position a
target) run through ``core.train.train_step`` under ``run.precision``. ``PeakTracker`` counts the
bytes of every storage from the op that creates it to its release; the estimate is the peak. Token
ids and targets stay real tensors (ops on them alone run for real), so the shapes that depend on
them (positions with a target, image placeholders) are the real batch's; an op whose output shape
depends on float values (CTC's alignment table) runs for real on zeros of its inputs' shapes.

Weights, gradients and optimizer states are counted from the prepared model and optimizer;
activations are the traced peak less those three. Under ``run.parallel: fsdp`` with N processes the
three are divided by N and the two largest blocks' whole parameters are added (FSDP gathers one block
and prefetches the next); under DDP with N > 1 DDP's gradient buckets (a copy of the trainable
gradients) are added. Those two additions are formulas, not traced.
"""
import contextlib
import io
import weakref

import attrs
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from core import data
from core.images import image_hw
from core.model import build_model
from core.stageconfig import stage_model
from core.train import prepare_model, train_step

_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


class PeakTracker(TorchDispatchMode):
    """Counts live storage bytes (created by an op inside, released when the storage is freed) and their peak.

    Used inside a FakeTensorMode: ops without a fake argument run for real (token ids, small integer and
    scalar factories), and an op the fake mode cannot shape without data runs for real on zeros."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode, self.live, self.peak = fake_mode, 0, 0
        self._seen = WeakIdKeyDictionary()

    def _release(self, nbytes):
        self.live -= nbytes

    def _count(self, out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = weakref.ref(storage, lambda _, n=nbytes: self._release(n))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        real = not any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)
        if real and (tensors or _small_factory(args, kwargs)):
            with no_dispatch():
                out = func(*args, **kwargs)
        else:
            if func is torch.ops.aten.index.Tensor:  # a real boolean mask: its positions, so the shape is known
                with no_dispatch():
                    args = (args[0], [i.nonzero(as_tuple=True)[0] if _real_mask(i) else i for i in args[1]])
            try:
                out = func(*args, **kwargs)
            except _DATA_DEPENDENT:
                with no_dispatch():
                    zeros = tree_map_only(FakeTensor, lambda t: torch.zeros(t.shape, dtype=t.dtype), (args, kwargs))
                    out = func(*zeros[0], **zeros[1])
                out = tree_map_only(torch.Tensor, self.fake_mode.from_tensor, out)
        self._count(out)
        return out


@contextlib.contextmanager
def _staying_put():
    """``Module.to`` returns a module that is already where (and what dtype) it is asked to be, unchanged. torch swaps
    fake parameters even then, which fails (the fake mode holds weak references to them); training code and
    libraries (peft) call ``.to`` on what they build. Only inside the trace."""
    to = torch.nn.Module.to

    def stay(module, *args, **kwargs):
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        if all((device is None or t.device == device) and (dtype is None or t.dtype == dtype)
               for t in [*module.parameters(), *module.buffers()]):
            return module
        return to(module, *args, **kwargs)
    torch.nn.Module.to = stay
    try:
        yield
    finally:
        torch.nn.Module.to = to


def _small_factory(args, kwargs):
    """A tensor made from nothing that stays real: integer or boolean, or a scalar (an optimizer's step count)."""
    dtype = kwargs.get("dtype")
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        return True
    return bool(args) and isinstance(args[0], (list, tuple)) and len(args[0]) == 0


def _real_mask(index):
    return index is not None and not isinstance(index, FakeTensor) and index.dtype == torch.bool


def full_length_tokens(tokenizer, prompt, num_image_tokens, max_len, batch_size, seed=0):
    """{input_ids, targets} of ``batch_size`` rows of exactly ``max_len`` tokens: the prompt with its image
    placeholders, then random answer ids below ``<|image|>`` (their values do not change the cost)."""
    prefix = torch.tensor(data.prompt_prefix(tokenizer, prompt, num_image_tokens, max_len))
    generator = torch.Generator().manual_seed(seed)
    answer = torch.randint(0, tokenizer.image_id, (batch_size, max_len + 1 - len(prefix)), generator=generator)
    rows = torch.cat([prefix.expand(batch_size, -1), answer], dim=1)
    targets = rows[:, 1:].clone()
    targets[:, :len(prefix) - 1] = -1  # as core.data: loss on the answer only
    return {"input_ids": rows[:, :-1].contiguous(), "targets": targets}


def full_batch(recipe, model, tokenizer, batch_size, device="cpu"):
    """The largest batch the recipe makes: ``batch_size`` rows of ``data.max_len`` tokens, each image with the
    crop grid of the most vision tokens that still fits (core/images.py), texts as long as the answers. Pixels
    (zeros) on ``device``, token ids and targets on the CPU."""
    max_len, prompt = recipe.data.max_len, recipe.data.prompt
    fits = [g for g in (model.tiling.grids() if model.tiling else ())
            if len(data.prompt_prefix(tokenizer, prompt, model.num_image_tokens(g), 10 ** 9)) < max_len]
    grid = max(fits, key=model.num_image_tokens, default=None)
    batch = full_length_tokens(tokenizer, prompt, model.num_image_tokens(grid), max_len, batch_size)
    answers = [row[row != -1] for row in batch["targets"]]
    tiles = None
    if grid is not None:
        tile = model.tiling.tile_size
        tiles = torch.zeros(batch_size * grid[0] * grid[1], 3, tile, tile, device=device)
    pixels = torch.zeros(batch_size, 3, *image_hw(model.image_size), device=device)
    return {**batch, "pixel_values": pixels, "tiles": tiles,
            "grids": [grid] * batch_size, "texts": [tokenizer.decode(a.tolist()) for a in answers],
            "keys": [f"full{i}" for i in range(batch_size)]}


@attrs.define
class Estimate:
    """Bytes per process of one training step of a stage; ``activations`` is what the trace adds to the rest."""
    stage: str
    batch_size: int
    tokens: int
    precision: str
    world_size: int
    parallel: str
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    parallel_extra: int  # FSDP's gathered blocks or DDP's buckets (formulas)

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations + self.parallel_extra


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def trace_stage(recipe, registry, pm, index):
    """(peak bytes, prepared counts) of two training steps of stage ``index`` on fake tensors: see the module doc."""
    stage = recipe.stages[index]
    with torch.device("meta"):  # pretrained files named in the recipe are not read on the meta device
        model, tokenizer = build_model(stage_model(recipe, index), registry)
    batch = full_batch(recipe, model, tokenizer, stage.batch_size or recipe.data.batch_size, device="meta")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = PeakTracker(fake)
    with _staying_put(), fake, tracker, contextlib.redirect_stdout(io.StringIO()):
        model.to_empty(device="cpu")
        prep = prepare_model(recipe, registry, pm, index, model, tokenizer, "cpu")
        try:
            batch.update({k: torch.zeros(v.shape) for k, v in batch.items() if torch.is_tensor(v) and v.is_meta})
            for _ in range(2):  # the second step holds the optimizer states the first creates
                train_step(prep, lambda micro: batch)
            extra = [p for m in prep.extra_modules.values() for p in m.parameters()]
            counts = {"params": list(model.parameters()) + extra, "buffers": list(model.buffers()),
                      "trainable": prep.trainable, "batch": batch,
                      "optimizer": [v for s in prep.optimizer.state.values() for v in s.values() if torch.is_tensor(v)],
                      "blocks": [b for m in model.modules() if isinstance(m, torch.nn.ModuleList) for b in m]}
        finally:
            prep.close()
    return tracker.peak, counts


def estimate(recipe, registry, pm, index, world_size=1):
    """The Estimate of stage ``index`` with ``world_size`` processes under ``run.parallel``."""
    stage = recipe.stages[index]
    peak, counts = trace_stage(recipe, registry, pm, index)
    weights, gradients = _nbytes(counts["params"]), _nbytes(counts["trainable"])
    optimizer, buffers = _nbytes(counts["optimizer"]), _nbytes(counts["buffers"])
    activations = max(0, peak - weights - buffers - gradients - optimizer)
    extra, share = 0, 1
    if world_size > 1 and recipe.run.parallel == "fsdp":
        share = world_size
        blocks = sorted((_nbytes(b.parameters()) for b in counts["blocks"]), reverse=True)
        extra = sum(blocks[:2])
    elif world_size > 1:
        extra = gradients
    return Estimate(stage.name, counts["batch"]["input_ids"].shape[0], counts["batch"]["input_ids"].shape[1],
                    recipe.run.precision, world_size, recipe.run.parallel,
                    sum(p.numel() for p in counts["params"]), sum(p.numel() for p in counts["trainable"]),
                    weights // share + buffers, gradients // share, optimizer // share, activations, extra)


def _size(nbytes):
    """Bytes as a right-aligned figure in GiB, MiB or KiB."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:>8.2f} {unit}"
    return f"{nbytes / 2 ** 10:>8.2f} KiB"


def format_estimate(e, title):
    """Lines for --dry-run."""
    where = "1 process" if e.world_size == 1 else f"{e.world_size} processes ({e.parallel})"
    lines = [f"{title}: memory of a training step per process ({where}, batch {e.batch_size} x {e.tokens} tokens, "
             f"{e.precision}; traced on fake tensors, core/memory.py)",
             f"  weights      {_size(e.weights)}  ({e.parameters:,} parameters and the buffers)",
             f"  gradients    {_size(e.gradients)}  ({e.trainable:,} trainable)",
             f"  optimizer    {_size(e.optimizer)}",
             f"  activations  {_size(e.activations)}  (and temporaries: the traced peak less the above)"]
    if e.parallel_extra:
        what = "2 largest blocks gathered whole" if e.parallel == "fsdp" else "DDP's gradient buckets"
        lines.append(f"  {e.parallel:<11}  {_size(e.parallel_extra)}  ({what})")
    lines.append(f"  total        {_size(e.total)}")
    return "\n".join(lines)
