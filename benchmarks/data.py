"""Speed of the data pipeline against what training consumes. A benchmark, not a test.

    python -m benchmarks.data [--quick] [--pages N] [--keep DIR]

Per worker: ``core.stream.train_batches`` in the main process with one torch thread (what one
DataLoader worker does: read the tar, decode the image, preprocess, tokenize, collate), in
samples/s, with the per-sample milliseconds of decode / preprocess / tokenize measured apart.
Two data sets: the default recipe's synthetic shards (32 px) and a few hundred 1024x1024 PNG
pages of text rendered here with Pillow (read at 1024 px, DeepEncoder "base", and resized to
640 px, "small"). Training: steps of the default recipe's stage 1 (model + cell_reading
regulariser + AdamW, batch 32) on a ready batch, so data loading is not in it. Prints markdown.
"""
import argparse
import io
import math
import os
import random
import sys
import tempfile
import time

import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also as a plain script

from core import data, stream  # noqa: E402
from core.recipe import load_recipe  # noqa: E402
from core.registry import load_plugins  # noqa: E402
from benchmarks import RECIPE  # noqa: E402
from benchmarks.train_step import TrainStep  # noqa: E402

BASE_TOKENS, SMALL_TOKENS = 273, 111  # DeepEncoder vision tokens at 1024 px (base) and 640 px (small)


def bytes_tokenizer():
    """The default recipe's tokenizer (``bytes``), as the pipeline measurements use it."""
    return load_plugins()[1].build("tokenizer", "bytes")


def synthetic_shards(folder, samples):
    """``samples`` training images of the default recipe's dataset (whichever plugin it names) in ``folder``."""
    dataset = load_recipe(RECIPE).data.dataset
    args = dict(dataset.args, train_samples=samples, samples_per_shard=max(samples // 4, 1), cache_dir=folder)
    return load_plugins()[1].build("dataset", dataset.name, where="data.dataset", **args).shards("train")


def page_shards(folder, pages, per_shard=100, seed=0):
    """``pages`` 1024x1024 RGB PNG pages of random words (~40 lines), sharded ``per_shard`` to a tar."""
    rng = random.Random(seed)
    font = ImageFont.load_default(size=18)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
    paths, writer = [], None
    for i in range(pages):
        if i % per_shard == 0:
            if writer:
                writer.close()
            paths.append(os.path.join(folder, f"pages-{i // per_shard:06d}.tar"))
            writer = wds.TarWriter(paths[-1], encoder=False)
        image = Image.new("RGB", (1024, 1024), "white")
        draw, lines = ImageDraw.Draw(image), []
        for row in range(40):
            line = ""
            while font.getlength(line + " " + (word := rng.choice(words))) < 960:
                line = f"{line} {word}".strip()
            draw.text((32, 24 + row * 24), line, font=font, fill=(rng.randint(0, 60),) * 3)
            lines.append(line)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        writer.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": "\n".join(lines).encode()})
    writer.close()
    return paths


def stage_ms(paths, tokenizer, image_size, count):
    """Per-sample milliseconds of decode, preprocess and tokenize, each timed on its own."""
    raws = [r for p in paths for r in data.read_shard(p)][:count]
    t0 = time.perf_counter()
    decoded = [data.decode(r) for r in raws]
    t1 = time.perf_counter()
    for image, _ in decoded:
        data.preprocess(image, image_size)
    t2 = time.perf_counter()
    for _, text in decoded:
        tokenizer.encode(text)
    t3 = time.perf_counter()
    return [1000 * t / len(raws) for t in (t1 - t0, t2 - t1, t3 - t2)]


def pipeline_rate(paths, tokenizer, image_size, num_image_tokens, max_len, batch_size, samples, workers=0):
    """Samples/s of train_batches (tar reading, decode, preprocess, tokenize, collate) after one warm-up batch."""
    it = stream.train_batches(paths, tokenizer, image_size, "<image>\nFree OCR.", num_image_tokens, max_len,
                            batch_size, shuffle_buffer=100, num_workers=workers)
    next(it)  # workers started, first shard opened
    count, start = 0, time.perf_counter()
    while count < samples:
        count += len(next(it)["keys"])
    seconds = time.perf_counter() - start
    it.close()
    return count / seconds


def train_rate(paths, steps):
    """Samples/s of the default recipe's stage-1 training step (benchmarks/train_step.py), and its batch size."""
    step = TrainStep(paths)
    return step.batch_size / step.seconds(steps), step.batch_size


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, pages and steps")
    parser.add_argument("--pages", type=int, help="1024 px pages to render (default 300, --quick 48)")
    parser.add_argument("--keep", help="write the shards here (and reuse them) instead of a temporary folder")
    args = parser.parse_args(argv)
    synthetic, pages = (1000, 48) if args.quick else (4000, 300)
    pages = args.pages or pages
    steps = 5 if args.quick else 20
    threads = torch.get_num_threads()
    folder = args.keep or tempfile.mkdtemp(prefix="vlmkit-bench-data-")
    os.makedirs(folder, exist_ok=True)
    tokenizer = bytes_tokenizer()

    start = time.perf_counter()
    small = synthetic_shards(os.path.join(folder, "synthetic"), synthetic)
    print(f"{synthetic} synthetic 32 px samples in {len(small)} shards: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    page_dir = os.path.join(folder, f"pages{pages}")
    if not os.path.isdir(page_dir):
        os.makedirs(page_dir)
        page_shards(page_dir, pages)
    big = sorted(os.path.join(page_dir, f) for f in os.listdir(page_dir) if f.endswith(".tar"))
    size = sum(os.path.getsize(p) for p in big) / pages / 1024
    print(f"{pages} 1024x1024 PNG pages ({size:.0f} KiB each) in {len(big)} shards: "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    train, batch = train_rate(small, steps)  # with the machine's threads, as the trainer runs
    torch.set_num_threads(1)  # a DataLoader worker's setting (core.data._one_thread)
    rows = []
    for name, paths, image_size, tokens, max_len, batch_size, count in (
            ("synthetic 32 px -> 32", small, 32, 21, 64, 32, synthetic),
            ("1024 px page -> 1024", big, 1024, BASE_TOKENS, 8192, 8, pages),
            ("1024 px page -> 640", big, 640, SMALL_TOKENS, 8192, 8, pages)):
        ms = stage_ms(paths, tokenizer, image_size, min(count, 200))
        rate = pipeline_rate(paths, tokenizer, image_size, tokens, max_len, batch_size, count - batch_size)
        rows.append((name, ms, rate))
        print(f"  measured {name}", flush=True)
    torch.set_num_threads(threads)
    two = pipeline_rate(small, tokenizer, 32, 21, 64, 32, synthetic - 64, workers=2)

    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPU(s); pipeline: 1 torch thread (one worker); "
          f"training: {threads} thread(s)\n")
    print("| images | decode ms | preprocess ms | tokenize ms | samples/s per worker | workers to feed training |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (dec, pre, tok), rate in rows:
        need = math.ceil(train / rate) if name.startswith("synthetic") else "-"
        print(f"| {name} | {dec:.3f} | {pre:.3f} | {tok:.4f} | {rate:,.0f} | {need} |")
    print(f"\nsynthetic 32 px through a DataLoader with 2 workers: {two:,.0f} samples/s")
    print(f"default recipe stage-1 training step (batch {batch}, {threads} thread(s), data not included): "
          f"{train:,.0f} samples/s")


if __name__ == "__main__":
    main()
