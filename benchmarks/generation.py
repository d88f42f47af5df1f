"""Speed of generation (with and without the KV cache) and of the NED metric. A benchmark, not a test.

    python -m benchmarks.generation [--quick] [--threads N]

Generation: the default recipe's model (recipes/two_stage.yaml) with random weights, batch 8,
always decoding the full number of new tokens (a tokenizer whose stop ids no model can emit);
tokens/s = batch x new tokens / wall time of one ``generate()`` call (vision pass and prefill
included). NED: ``core.textdist.ned`` against the bare ``rapidfuzz`` call on 1,000 pairs of
2,000-character strings about 5% apart. Prints markdown tables.
"""
import argparse
import random
import string
import time

import torch
from rapidfuzz.distance import Levenshtein

from benchmarks.common import RECIPE
from core.generate import generate, image_prompt_ids
from core.images import image_hw
from core.model import build_model
from core.recipe import load_recipe
from core.registry import load_plugins
from core.textdist import ned


class NeverStop:
    """The tokenizer, but with stop ids outside the vocabulary: generation runs to max_new_tokens."""
    eos_id = bos_id = -1

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def default_model():
    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    model, tokenizer = build_model(recipe.model, load_plugins(recipe.plugins)[1])
    torch.nn.init.normal_(model.decoder.lm_head.weight, std=0.02)  # init leaves it zero: every logit equal
    return model.eval(), tokenizer, image_prompt_ids(model, tokenizer, recipe.data.prompt)


def tokens_per_s(model, tokenizer, prompt, batch, new_tokens, use_cache, repeats=1):
    positions = model.decoder.cos.size(1)  # nanochat's rotary table: 10 x sequence_len
    assert len(prompt) + new_tokens <= positions, f"{len(prompt)} + {new_tokens} > {positions} positions"
    pixels = torch.randn(batch, 3, *image_hw(model.image_size))
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        rows = generate(model, NeverStop(tokenizer), pixels, prompt, new_tokens, use_cache=use_cache)
        seconds = min(seconds, time.perf_counter() - start)
        assert all(len(r) == new_tokens for r in rows)
    return batch * new_tokens / seconds


TABLE_HEAD = "| new tokens | KV cache tokens/s | no cache tokens/s | speed-up |\n|---:|---:|---:|---:|"


def table_row(model, tokenizer, prompt, batch, new_tokens, repeats):
    """One TABLE_HEAD row: tokens/s with and without the KV cache, and the ratio."""
    cached = tokens_per_s(model, tokenizer, prompt, batch, new_tokens, True, repeats)
    naive = tokens_per_s(model, tokenizer, prompt, batch, new_tokens, False, repeats)
    return f"| {new_tokens} | {cached:,.0f} | {naive:,.0f} | {cached / naive:.1f}x |"


def bench_generation(lengths, batch):
    model, tokenizer, prompt = default_model()
    tokens_per_s(model, tokenizer, prompt, batch, 8, True)  # warm-up
    print(f"generation, batch {batch}, prompt {len(prompt)} tokens ({model.num_image_tokens()} vision), "
          f"{torch.get_num_threads()} thread(s), best of 3 (of 1 above 256 tokens)\n")
    print(TABLE_HEAD)
    for n in lengths:
        print(table_row(model, tokenizer, prompt, batch, n, 3 if n <= 256 else 1), flush=True)


def text_pairs(n, length=2000, edit_rate=0.05, seed=0):
    rng = random.Random(seed)
    letters = string.ascii_letters + "     "
    pairs = []
    for _ in range(n):
        a = [rng.choice(letters) for _ in range(length)]
        b = list(a)
        for _ in range(int(length * edit_rate)):
            i, op = rng.randrange(len(b)), rng.choice("sid")
            if op == "s":
                b[i] = rng.choice(letters)
            elif op == "i":
                b.insert(i, rng.choice(letters))
            else:
                del b[i]
        pairs.append(("".join(a), "".join(b)))
    return pairs


def pairs_per_s(fn, pairs, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for a, b in pairs:
            fn(a, b)
        best = min(best, time.perf_counter() - start)
    return len(pairs) / best


def bench_ned(n):
    pairs = text_pairs(n)
    assert all(ned(a, b) == Levenshtein.normalized_distance(a, b) for a, b in pairs)
    mean = sum(ned(a, b) for a, b in pairs) / n
    print(f"\nNED, {n:,} pairs of 2,000 characters (mean NED {mean:.3f}), best of 5\n")
    print("| function | pairs/s |\n|---|---:|")
    print(f"| core.textdist.ned | {pairs_per_s(ned, pairs):,.0f} |")
    print(f"| rapidfuzz Levenshtein.normalized_distance | "
          f"{pairs_per_s(Levenshtein.normalized_distance, pairs):,.0f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 new tokens, 100 NED pairs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_generation([16, 64] if args.quick else [64, 256, 1024], batch=8)
    bench_ned(100 if args.quick else 1000)


if __name__ == "__main__":
    main()
