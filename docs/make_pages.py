"""Draw sample pages as one-page PDFs with their texts, to try "your own pages to a model" without PDFs.

    python docs/make_pages.py pages/ --count 12
    python -m core.shards pdf pages/ --out shards/pages --eval-every 6
    python -m core.run recipes/pages.yaml data.dataset.dir=shards/pages

Each page is ``page-NNN.pdf``, a US Letter page (612 x 792 pt) drawn with Pillow at 144 dpi and saved as
a PDF, beside ``page-NNN.txt`` with its text: the ``pdf`` source's naming for a one-page PDF
(plugins/sources/pdf.py). A page holds ``--lines`` lines of 2-3 English words (wonderwords' lists, as
the default recipe's lines use) in Source Sans Pro at ``--font-size`` points, black on white, from the
top left with a little jitter; the text file holds the same lines, one per line.
"""
import argparse
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plugins.datasets.synthetic_lines import english_words, load_font

PAGE = (612, 792)  # US Letter in points
DPI = 144  # drawn at 2 px per point


def page_lines(rng, words, count):
    """``count`` lines of 2-3 short words, the first of each capitalised."""
    lines = []
    for _ in range(count):
        picked = [rng.choice(words) for _ in range(rng.randint(2, 3))]
        lines.append(" ".join([picked[0].capitalize(), *picked[1:]]))
    return lines


def draw_page(lines, rng, font_size, font="source_sans_pro"):
    """A white Letter page at DPI with ``lines`` drawn from the top left, ``font_size`` points high."""
    scale = DPI / 72
    image = Image.new("L", (round(PAGE[0] * scale), round(PAGE[1] * scale)), 255)
    face = load_font(font, round(font_size * scale))
    x, y = (72 + rng.randint(-12, 12)) * scale, (72 + rng.randint(-12, 12)) * scale
    for line in lines:
        ImageDraw.Draw(image).text((x, y), line, font=face, fill=0)
        y += 1.4 * font_size * scale
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for page-NNN.pdf and page-NNN.txt")
    parser.add_argument("--count", type=int, default=12, help="pages (default 12)")
    parser.add_argument("--lines", type=int, nargs=2, default=[3, 5], metavar=("MIN", "MAX"),
                        help="lines per page (default 3 5)")
    parser.add_argument("--font-size", type=float, default=40, help="points (default 40: the text stays readable "
                                                                    "in recipes/pages.yaml's 256 px view)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    words = [w for w in english_words() if w.isalpha() and 3 <= len(w) <= 7]
    for i in range(args.count):
        lines = page_lines(rng, words, rng.randint(*args.lines))
        stem = os.path.join(args.out, f"page-{i:03d}")
        draw_page(lines, rng, args.font_size).save(stem + ".pdf", resolution=DPI)
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    print(f"{args.count} pages in {args.out}: page-NNN.pdf with page-NNN.txt beside each")


if __name__ == "__main__":
    main()
