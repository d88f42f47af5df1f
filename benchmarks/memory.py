"""The dry-run's memory estimate (core/memory.py) against the peak a real training step reaches.

    python -m benchmarks.memory [RECIPE] [--stage N ...] [--device cpu|cuda] [key.path=value ...]

For each stage: the model is built and prepared by core.train.prepare_stage (init_from skipped: the
weights' values do not change the memory) and two optimizer steps run through core.train.train_step
on the estimate's full batch (core.memory.full_batch). The measured peak:
- on the CPU, torch's own allocator events from ``torch.profiler`` with ``profile_memory=True``
  (every allocation and free of torch's CPU allocator, in order; the peak of their running sum),
  from the model's construction to the end of the second step: what ``tracemalloc`` cannot see and the
  process's RSS blurs (the C allocator keeps freed pages);
- on a GPU, ``torch.cuda.max_memory_allocated`` over the same steps (the model is built on the CPU
  and moved, so the peak starts from the weights).
A benchmark, not a test: tests/test_memory.py checks the agreement for a tiny model.
"""
import argparse
import contextlib
import io

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import RECIPE
from core import memory
from core.recipe import load_recipe
from core.registry import load_plugins
from core.train import prepare_stage, train_step


def _steps(recipe, registry, pm, index, device):
    with contextlib.redirect_stdout(io.StringIO()):
        prep = prepare_stage(recipe, registry, pm, index, device, say=lambda text: None, init_from=False)
    try:
        stage = prep.stage
        batch = memory.full_batch(recipe, prep.model, prep.tokenizer, stage.batch_size or recipe.data.batch_size,
                                  device=device)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        for _ in range(2):
            train_step(prep, lambda micro: batch)
    finally:
        prep.close()


def measured_peak(recipe, registry, pm, index, device="cpu"):
    """Bytes at the peak of two real training steps of stage ``index`` (see the module doc)."""
    if device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _steps(recipe, registry, pm, index, device)
        return torch.cuda.max_memory_allocated()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _steps(recipe, registry, pm, index, device)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def compare(recipe_path, stages, device="cpu", overrides=()):
    """Rows (stage, estimate bytes, measured bytes) for the recipe's stages."""
    recipe = load_recipe(recipe_path, overrides)
    pm, registry = load_plugins(recipe.plugins)
    rows = []
    for index in stages:
        estimate = memory.estimate(recipe, registry, pm, index).total
        rows.append((recipe.stages[index].name, estimate, measured_peak(recipe, registry, pm, index, device)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="?", default=RECIPE)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    parser.add_argument("--stage", type=int, action="append", help="stage index (default: every stage)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_intermixed_args(argv)
    stages = args.stage or range(len(load_recipe(args.recipe, args.overrides).stages))
    print(f"| stage | estimate (MiB) | measured peak (MiB, {args.device}) | estimate / measured |")
    print("|---|---:|---:|---:|")
    for name, estimate, measured in compare(args.recipe, stages, args.device, args.overrides):
        print(f"| {name} | {estimate / 2 ** 20:.1f} | {measured / 2 ** 20:.1f} | {estimate / measured:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
