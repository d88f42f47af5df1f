"""Render text-line images with drawing code of its own (not the training generator), for checking a
checkpoint with `python -m core.generate` and `python -m core.metrics`:

    python docs/own_lines.py OUT_DIR [--font NAME[,NAME...]] [--count N] [--seed S] [--scale K] [--txt]
    python -m core.generate RUN/vis_mid OUT_DIR/*.png --out OUT_DIR/pred.jsonl
    python -m core.metrics fox ned exact --pred OUT_DIR/pred.jsonl --gt OUT_DIR/gt.jsonl

Words: a fresh sample of wonderwords' lists drawn with this script's own random stream, keeping only
words outside the default recipe's training vocabulary (synthetic_lines, seed 0), so every word is
unseen. Each line: 2-4 words, the first Capitalised, sometimes a number or a comma after the second
word, ending in a period (half the lines), "!" or "?" (``--txt`` also writes it beside its image as
``line_NNNN.txt``: the folder that ``python -m core.shards folder`` reads). Drawn with ImageDraw at --scale
times the target size (default 2: 64 x 512, which the checkpoint's preprocessing resizes), font size scale x
14-18 px, black on white, left margin and baseline jittered. ``--font`` takes any synthetic_lines font name
(default, source_sans_pro, lato_bold, caladea, dejavu_serif, ...) or a .ttf/.otf path, or several
separated by commas, one drawn per line: e.g. the held-out families caladea (serif) and hanken_grotesk
(sans), which the training fonts should never include (docs/fonts.md).
"""
import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plugins.datasets.synthetic_lines import SyntheticLines, english_words, font_file


def unseen_words():
    train = {w.lower() for w in SyntheticLines(fonts=[{"name": "default", "sizes": [14, 14]}]).train_words}
    return [w for w in english_words() if w.isalpha() and w.islower() and 3 <= len(w) <= 9 and w not in train]


def sentence(rng, words):
    picked = [rng.choice(words) for _ in range(rng.randint(2, 4))]
    picked[0] = picked[0].capitalize()
    if rng.random() < 0.3:
        picked.insert(rng.randint(1, len(picked)), str(rng.randint(2, 99)))
    if rng.random() < 0.3 and len(picked) > 2:
        picked[1] += ","
    text = " ".join(picked) + rng.choice([".", ".", "!", "?"])
    while len(text) > 30:  # a line the training images could hold
        picked.pop()
        text = " ".join(picked) + "."
    return text


def main(argv=None):
    # the whole docstring, as written: its first line alone stops mid-sentence
    parser = argparse.ArgumentParser(prog="python docs/own_lines.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for line_NNNN.png and gt.jsonl (created)")
    parser.add_argument("--font", default="default",
                        help="synthetic_lines font names or .ttf/.otf paths, comma-separated (one per line drawn)")
    parser.add_argument("--count", type=int, default=256, help="number of lines")
    parser.add_argument("--seed", type=int, default=12345, help="seed of this script's own random stream")
    parser.add_argument("--scale", type=int, default=2, help="draw at this multiple of 32 x 256")
    parser.add_argument("--txt", action="store_true", help="write each text beside its image (core.shards folder)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    words = unseen_words()
    paths = [font_file(name) for name in args.font.split(",")]
    rows = []
    for i in range(args.count):
        text = sentence(rng, words)
        path = rng.choice(paths) if len(paths) > 1 else paths[0]  # one font: the stream as before
        size = rng.randint(14, 18) * args.scale
        font = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)
        width, height = 256 * args.scale, 32 * args.scale
        while font.getbbox(text)[2] > width - 4 * args.scale:  # shrink rather than cut the line
            size -= 1
            font = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)
        image = Image.new("L", (width, height), 255)
        left, top, right, bottom = font.getbbox(text)
        x = rng.randint(2 * args.scale, max(2 * args.scale, width - right - 2 * args.scale))
        y = rng.randint(0, max(0, height - bottom)) - 0
        y = min(max(y, -top), height - bottom)
        ImageDraw.Draw(image).text((x, y), text, font=font, fill=0)
        name = f"line_{i:04d}.png"
        image.save(os.path.join(args.out, name))
        if args.txt:
            with open(os.path.join(args.out, name[:-4] + ".txt"), "w", encoding="utf-8") as f:
                f.write(text)
        rows.append({"id": os.path.join(args.out, name), "text": text})
    with open(os.path.join(args.out, "gt.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} lines in {args.out} (font {args.font}); gt.jsonl beside them")


if __name__ == "__main__":
    main()
