"""How fast vlmkit is on this machine: one process, one run, one markdown report.

    python -m benchmarks [--quick] [--out FILE] [--device cpu|cuda] [--no-transformers]
                         [--recipe RECIPE --stage N --full-length] [key.path=value ...]

Rows, each measured here and now (the pieces live in benchmarks/, which can also run alone):
1. the machine's matmul peak: fp32 on the CPU, bf16 on a GPU (benchmarks/train_step.py);
2. the default recipe's stage-1 training step (or ``--recipe``/``--stage`` with overrides, e.g. the
   d20 recipe on a GPU): ms, samples/s, FLOPs counted by torch, achieved FLOP/s and its ratio to (1),
   and on a GPU the peak memory;
3. vlmkit's SAM, CLIP and nanochat against transformers' SamVisionModel, CLIPVisionModel and
   NanoChatForCausalLM with the same weights: forward + backward ms and the ratio, at the default
   recipe's sizes and at the real widths (benchmarks/versus_transformers.py; needs ``transformers``);
4. the data pipeline per worker (read, decode, preprocess, tokenize, collate) against what (2) consumes,
   PDF pages rendered per core (core/pdf.py), and shards read over http://127.0.0.1 against local files;
5. generation with and without the KV cache (benchmarks/generation.py);
6. NED pairs/s against bare rapidfuzz;
7. the real run (core.run's loop on the default recipe's stage 1 for a few steps: data, step, probe,
   monitor, checkpoint, evaluation, report) next to (2), projected to the recipe's stage 1
   (benchmarks/run_loop.py).
A benchmark, never a test: nothing here asserts a speed. Takes about 3 minutes on 2 CPU cores.
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import torch

from benchmarks import common
from benchmarks import data as data_bench
from benchmarks import generation as gen_bench
from benchmarks import run_loop
from benchmarks import train_step
from core.errors import cli_main
from core.recipe import load_recipe


def header(device):
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU core(s) ({cpu})"
    return (f"vlmkit benchmark, {datetime.date.today()}: {where}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), python {platform.python_version()}")


def peak_section(device, quick):
    peak, dtype, n = train_step.matmul_peak(device, seconds=0.5 if quick else 1.0)
    return peak, [f"## 1. Matmul peak\n\n{peak / 1e9:,.1f} GFLOP/s ({dtype}, {n}x{n}, best of 1024/2048/4096)"]


def step_section(shards, peak, args):
    r = train_step.measure(shards, steps=5 if args.quick else 20, recipe_path=args.recipe, stage_index=args.stage,
                           device=args.device, overrides=args.overrides, full_length=args.full_length)
    memory = "" if r["peak_memory"] is None else f" {r['peak_memory'] / 2 ** 30:.1f} GiB |"
    batch = "every row data.max_len tokens" if args.full_length else "one ready batch"
    lines = [f"## 2. Training step ({os.path.relpath(args.recipe)}, stage {args.stage + 1}, {batch}"
             + (f"; {' '.join(args.overrides)}" if args.overrides else "") + ")", "",
             "| batch x tokens | ms/step | samples/s | GFLOP/step (fwd+bwd) | achieved GFLOP/s | of peak |"
             + (" peak memory |" if memory else ""),
             "|---:|---:|---:|---:|---:|---:|" + ("---:|" if memory else ""),
             f"| {r['batch_size']} x {r['tokens'] // r['batch_size']} | {r['seconds'] * 1000:.1f} | "
             f"{r['samples_per_s']:,.0f} | {r['flops'] / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | "
             f"**{r['flops_per_s'] / peak:.0%}** |" + memory]
    return r, lines


def transformers_section(quick, log):
    try:
        from benchmarks import versus_transformers as vs
    except ImportError as e:  # transformers is the refs extra
        return [f"## 3. Against transformers\n\nskipped: {e} (pip install -e \".[refs]\")"]
    lines = ["## 3. Against transformers (same weights, forward + backward)", ""]
    for scale in ("default", "wide"):
        sizes, rows = vs.compare(scale, repeats=2 if quick else 5, log=log)
        lines += [vs.format_rows(scale, sizes, rows), ""]
    lines.append("default: recipes/two_stage.yaml sizes, batch 32. wide: SAM ViT-B / CLIP-L / d20 widths, "
                 "2 layers each, 256 px, 256 tokens, batch 4. max abs diff: forward outputs, ours vs theirs.")
    return lines


def data_section(shards, step, count, tmp, quick):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one DataLoader worker gets (core/stream.py)
    try:
        rate = data_bench.pipeline_rate(shards, common.bytes_tokenizer(), step["image_size"],
                                        step["num_image_tokens"], step["max_len"], step["batch_size"], count)
        pages, ms, kib = data_bench.pdf_render_rate(tmp, 8 if quick else 20)
    finally:
        torch.set_num_threads(threads)
    page_dir = os.path.join(tmp, "pages")
    os.makedirs(page_dir)
    (local, _), (remote, _) = data_bench.http_versus_local(data_bench.page_shards(page_dir, 32 if quick else 100))
    return ["## 4. Data pipeline vs training", "",
            "| default recipe's synthetic images, per worker (1 thread) | training step consumes | ratio |",
            "|---:|---:|---:|",
            f"| {rate:,.0f} samples/s | {step['samples_per_s']:,.0f} samples/s | "
            f"**{rate / step['samples_per_s']:.1f}x** |", "",
            "| input | measured |", "|---|---:|",
            f"| PDF page -> 1288 px PNG, one core (core/pdf.py) | {pages:,.1f} pages/s ({ms:.0f} ms, {kib:.0f} KiB) |",
            f"| 1024 px page shards read locally (raw bytes) | {local:,.0f} samples/s |",
            f"| the same over http://127.0.0.1 (webdataset gopen: curl) | {remote:,.0f} samples/s "
            f"({remote / local:.2f}x) |"]


def generation_section(quick):
    model, tokenizer, prompt = gen_bench.default_model()
    gen_bench.tokens_per_s(model, tokenizer, prompt, 8, 8, True)  # warm-up
    return ["## 5. Generation (default model, random weights, batch 8)", "", *gen_bench.TABLE_HEAD.split("\n"),
            *(gen_bench.table_row(model, tokenizer, prompt, 8, n, 2) for n in ((16, 64) if quick else (64, 256)))]


def ned_section(quick):
    from rapidfuzz.distance import Levenshtein

    from core.textdist import ned
    pairs = gen_bench.text_pairs(100 if quick else 1000)
    ours = gen_bench.pairs_per_s(ned, pairs, repeats=3)
    raw = gen_bench.pairs_per_s(Levenshtein.normalized_distance, pairs, repeats=3)
    return ["## 6. NED (2,000-character pairs ~5% apart)", "",
            "| core.textdist.ned | bare rapidfuzz | ratio |", "|---:|---:|---:|",
            f"| {ours:,.0f} pairs/s | {raw:,.0f} pairs/s | {ours / raw:.2f} |"]


def run_section(step, quick):
    measured = run_loop.measure(steps=20 if quick else 100, eval_samples=32 if quick else 64)
    rows = run_loop.format_rows(measured, run_loop.project(measured, step["seconds"]), step["seconds"])
    return ["## 7. The real run (core.run, default recipe's stage 1, "
            f"{measured['steps']} steps) against the bare step", "", *rows]


def command(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps (about a minute)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-transformers", action="store_true", help="skip row 3")
    parser.add_argument("--recipe", default=common.RECIPE, help="the recipe of row 2 (default: two_stage.yaml)")
    parser.add_argument("--stage", type=int, default=0, help="its stage index for row 2 (default 0)")
    parser.add_argument("--full-length", action="store_true",
                        help="row 2 with every sequence data.max_len tokens long (random answer ids)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of that recipe")
    args = parser.parse_intermixed_args(argv)
    load_recipe(args.recipe, args.overrides)  # a bad recipe or override stops here, not after minutes

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = [f"# {header(args.device)}", ""]
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as tmp:
        count = 256 if args.quick else 1024
        shards = common.synthetic_shards(tmp, count)
        peak, lines = peak_section(args.device, args.quick)
        report += lines + [""]
        log("1/7 matmul peak done")
        step, lines = step_section(shards, peak, args)
        report += lines + [""]
        log("2/7 training step done")
        if not args.no_transformers:
            report += transformers_section(args.quick, log) + [""]
        log("3/7 transformers comparison done")
        report += data_section(shards, step, count - 64, tmp, args.quick) + [""]
        log("4/7 data pipeline done")
    report += generation_section(args.quick) + [""]
    log("5/7 generation done")
    report += ned_section(args.quick) + [""]
    log("6/7 NED done")
    default = args.recipe == common.RECIPE and args.stage == 0 and not args.overrides and not args.full_length
    if default and args.device == "cpu":
        report += run_section(step, args.quick) + [""]  # row 7 projects the default recipe, which row 2 timed
    log("7/7 real run done")
    report.append(f"Total {time.perf_counter() - started:.0f} s; command: python -m benchmarks "
                  + " ".join(argv if argv is not None else sys.argv[1:]))
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def main(argv=None):
    """The command line: ``command`` with errors as one line and an exit code."""
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
