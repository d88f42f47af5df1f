"""The training step of a recipe's stage, timed and FLOP-counted, and the machine's matmul peak.

    python -m benchmarks.train_step [RECIPE] [--stage N] [--steps N]

The step is what core.train runs (core.train.prepare_stage and train_step): forward, the stage's
regularisers, backward, grad clipping, the optimizer, on one ready batch from the recipe's data (so data
loading is not in it; benchmarks/data.py measures that), or with ``full_length`` on rows of exactly
``data.max_len`` tokens (random answer ids, core.memory.full_length_tokens), the cost at a sequence length
whatever the data's texts are. FLOPs are counted by torch.utils.flop_counter over one forward + backward
(matmuls, convolutions and attention; elementwise work counts zero, as in every MFU figure), and the achieved
FLOP/s is that count over the measured step time. The peak is the best of square fp32 matmuls
(bf16 on a GPU) with the threads torch uses, the number an MFU ratio is taken against.
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RECIPE, synthetic_shards
from core import data, stream
from core.memory import full_length_tokens
from core.recipe import load_recipe
from core.registry import load_plugins
from core.train import loss_terms, prepare_stage, sample_encoding, train_step

def matmul_peak(device="cpu", seconds=1.0, sizes=(1024, 2048, 4096)):
    """(best FLOP/s, dtype name, size) of n x n matmuls; fp32 on the CPU, bf16 on a GPU."""
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    best = (0.0, None)
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        _sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        _sync(device)
        rate = 2 * n ** 3 * count / (time.perf_counter() - start)
        best = max(best, (rate, n))
    return best[0], str(dtype).removeprefix("torch."), best[1]


def _sync(device):
    if device != "cpu":
        torch.cuda.synchronize()


class TrainStep:
    """One stage's training step on a fixed batch: ``run()`` does one; ``flops()`` counts one fwd + bwd.

    Built by core.train.prepare_stage and stepped by core.train.train_step, the trainer's own setup and
    step (freeze, regularisers, activation checkpointing, parameter groups, optimizer, grad clipping)."""

    def __init__(self, shard_paths, recipe_path=RECIPE, stage_index=0, device="cpu", overrides=(), full_length=False):
        recipe = load_recipe(recipe_path, overrides)
        if device != "cpu":  # GPU steps run under bf16 autocast, as recipes with run.precision: bf16
            recipe.run.precision = "bf16"
        pm, registry = load_plugins(recipe.plugins)
        self.prep = prepare_stage(recipe, registry, pm, stage_index, device, say=lambda text: None, init_from=False)
        model, tokenizer, stage = self.prep.model, self.prep.tokenizer, self.prep.stage
        self.batch_size = stage.batch_size or recipe.data.batch_size
        encoding = sample_encoding(recipe.data, model, tokenizer)
        batches = stream.open_batches(shard_paths, encoding, self.batch_size)
        batch = next(batches)
        batches.close()
        if full_length:  # every row data.max_len long: the step's cost at a given sequence length
            batch.update(full_length_tokens(tokenizer, recipe.data.prompt, model.num_image_tokens(),
                                            recipe.data.max_len, self.batch_size))
        self.batch = data.to_device(batch, device)
        self.device = device
        self.shape = dict(image_size=model.image_size, num_image_tokens=model.num_image_tokens(),
                          max_len=recipe.data.max_len, prompt=recipe.data.prompt)

    def run(self):
        train_step(self.prep, lambda micro: self.batch)

    def flops(self):
        """FLOPs of one forward + backward, as torch's FLOP counter sees them."""
        counter = FlopCounterMode(display=False)
        with counter:
            sum(loss_terms(self.prep, self.batch).values()).backward()
        self.prep.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def seconds(self, steps, warmup=3):
        for _ in range(warmup):
            self.run()
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.run()
        _sync(self.device)
        return (time.perf_counter() - start) / steps

    def close(self):
        self.prep.close()


def measure(shard_paths, steps=20, recipe_path=RECIPE, stage_index=0, device="cpu", overrides=(), full_length=False):
    """{seconds, samples_per_s, flops, flops_per_s, batch_size, peak_memory (GPU bytes, else None), tokens,
    image_size, num_image_tokens, max_len, prompt} of one step of the recipe's stage."""
    step = TrainStep(shard_paths, recipe_path, stage_index, device, overrides, full_length)
    flops = step.flops()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    seconds = step.seconds(steps)
    step.close()
    memory = torch.cuda.max_memory_allocated() if device != "cpu" else None
    return dict(seconds=seconds, samples_per_s=step.batch_size / seconds, flops=flops, flops_per_s=flops / seconds,
                batch_size=step.batch_size, peak_memory=memory, tokens=step.batch["input_ids"].numel(), **step.shape)


def main(argv=None):
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="?", default=RECIPE)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    peak, dtype, n = matmul_peak()
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-step-") as tmp:
        result = measure(synthetic_shards(tmp, 256), args.steps, args.recipe, args.stage)
    print(f"matmul peak ({dtype}, {n}x{n}, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"train step: {result['seconds'] * 1000:.1f} ms, {result['samples_per_s']:.0f} samples/s, "
          f"{result['flops'] / 1e9:.2f} GFLOP, {result['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"= {result['flops_per_s'] / peak:.0%} of peak")


if __name__ == "__main__":
    main()
