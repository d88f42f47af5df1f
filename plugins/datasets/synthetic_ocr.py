"""Synthetic OCR: random words rendered black on white, written once as WebDataset shards.

The default recipe trains a tiny model on a CPU in minutes, so the images are small
(64x64) and the text sits on the vision encoder's token grid: 8 px lines and, in the
"grid" layout, one character per 8 px cell (one vision-token column per character).
Train and eval draw from disjoint halves of a random vocabulary, so evaluation
measures reading, not memorising words.
"""
import io
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from core import ConfigError, hookimpl
from core.distributed import is_main
from core.shardwriter import ShardWriter
from plugins.datasets.rendered import RenderedDataset

FORMAT_VERSION = 1  # bump when rendering or the shard format changes: it invalidates old caches


class SyntheticOCR(RenderedDataset):
    name, format_version = "synthetic_ocr", FORMAT_VERSION

    def __init__(self, cache_dir="~/.cache/vlmkit/synthetic_ocr", image_size=64, font_size=8, line_height=8,
                 cell_width=8, layout="grid", wrap="words", margin=0, words=(2, 5), word_length=(2, 6),
                 alphabet="abcdefghijklmnopqrstuvwxyz", vocabulary_size=20000, heldout_fraction=0.2,
                 train_samples=50000, eval_samples=256, samples_per_shard=5000, seed=0, fixed_samples=None):
        # every argument except cache_dir decides the pixels, so all of them go into the cache hash
        self.args = dict(image_size=image_size, font_size=font_size, line_height=line_height,
                         cell_width=cell_width, layout=layout, wrap=wrap, margin=margin, words=list(words),
                         word_length=list(word_length), alphabet=alphabet, vocabulary_size=vocabulary_size,
                         heldout_fraction=heldout_fraction, train_samples=train_samples,
                         eval_samples=eval_samples, samples_per_shard=samples_per_shard, seed=seed,
                         fixed_samples=fixed_samples)
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.image_size, self.line_height, self.cell_width = image_size, line_height, cell_width
        self.layout, self.wrap_mode, self.margin, self.words = layout, wrap, margin, tuple(words)
        self.samples = {"train": fixed_samples or train_samples, "eval": fixed_samples or eval_samples}
        self.samples_per_shard, self.seed, self.fixed_samples = samples_per_shard, seed, fixed_samples
        self.font = ImageFont.load_default(size=font_size)  # Aileron via FreeType: no system font needed
        inner = image_size - 2 * margin
        self.max_lines = inner // line_height
        self.chars_per_line = inner // cell_width
        self.max_width = inner
        # shift every glyph so the alphabet's ink (ascenders to descenders) is centred in its line
        _, top, _, bottom = self.font.getbbox(alphabet)
        self.y_offset = (line_height - (bottom - top)) // 2 - top
        self._inks = {}
        self.space = round(self.font.getlength(" "))
        self._check(words, word_length, alphabet, vocabulary_size, heldout_fraction, bottom - top)
        self.train_words, self.heldout_words = self._vocabulary(word_length, alphabet, vocabulary_size,
                                                                heldout_fraction)

    def _check(self, words, word_length, alphabet, vocabulary_size, heldout_fraction, ink_height):
        # ValueError: the registry turns it into a ConfigError naming the recipe key
        if self.layout not in ("grid", "flow"):
            raise ConfigError(f"layout must be 'grid' or 'flow', not {self.layout!r}")
        if self.wrap_mode not in ("words", "chars") or (self.wrap_mode == "chars" and self.layout != "grid"):
            raise ConfigError(f"wrap must be 'words', or 'chars' with the grid layout; not {self.wrap_mode!r}")
        if not (1 <= words[0] <= words[1]) or not (1 <= word_length[0] <= word_length[1]):
            raise ConfigError(f"words {list(words)} and word_length {list(word_length)} must be [min, max] "
                             f"with 1 <= min <= max")
        if " " in alphabet or len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ConfigError("alphabet must be distinct characters without a space")
        if self.max_lines < 1 or ink_height > self.line_height:
            raise ConfigError(f"font_size text ({ink_height} px tall) does not fit line_height {self.line_height} "
                             f"within image_size {self.image_size} and margin {self.margin}")
        if self.layout == "grid":
            widest = max(self.font.getbbox(c)[2] - self.font.getbbox(c)[0] for c in alphabet)
            room = self.chars_per_line * (self.max_lines if self.wrap_mode == "chars" else 1)
            if widest > self.cell_width or word_length[1] > room:
                raise ConfigError(f"grid layout: cell_width {self.cell_width} gives {self.chars_per_line} chars per "
                                 f"line; word_length max {word_length[1]} and glyphs up to {widest} px must fit")
        elif word_length[1] * max(self.font.getlength(c) for c in alphabet) + 1 > self.max_width:
            raise ConfigError(f"flow layout: a word of {word_length[1]} letters may not fit in {self.max_width} px")
        if min(self.samples["train"], self.samples["eval"], self.samples_per_shard) < 1:
            raise ConfigError("train_samples, eval_samples and samples_per_shard must be at least 1")
        possible = sum(len(alphabet) ** n for n in range(word_length[0], word_length[1] + 1))
        if vocabulary_size > possible:
            raise ConfigError(f"vocabulary_size {vocabulary_size} exceeds the {possible} possible words")
        held = round(vocabulary_size * heldout_fraction)
        if not 1 <= held < vocabulary_size:
            raise ConfigError(f"heldout_fraction {heldout_fraction} leaves no train or no held-out words")

    def _vocabulary(self, word_length, alphabet, size, heldout_fraction):
        rng = random.Random(self.seed)
        vocab = {}  # a dict keeps insertion order, so the split is deterministic
        while len(vocab) < size:
            vocab["".join(rng.choices(alphabet, k=rng.randint(*word_length)))] = None
        vocab = list(vocab)
        held = round(size * heldout_fraction)
        return vocab[held:], vocab[:held]

    # ---- layout and rendering

    def _ink(self, s):
        """(alpha mask, ink left, advance, ink right) of s drawn with its pen at x=0, cached: pasting
        pre-rendered chars (grid) or words (flow) is several times faster than drawing text."""
        ink = self._inks.get(s)
        if ink is None:
            x0, _, x1, _ = self.font.getbbox(s)
            mask = Image.new("L", (max(x1 - x0, 1), self.line_height), 0)
            ImageDraw.Draw(mask).text((-x0, self.y_offset), s, font=self.font, fill=255)
            ink = self._inks[s] = (mask, x0, round(self.font.getlength(s)), x1)
        return ink

    def _place(self, line):
        """-> [(x, mask)] for one line, and the x of its rightmost ink."""
        if self.layout == "grid":
            placed = []
            for col, char in enumerate(line):
                if char != " ":  # each char's ink centred in its own cell
                    mask, x0, _, x1 = self._ink(char)
                    placed.append((col * self.cell_width + (self.cell_width - (x1 - x0)) // 2, mask))
            return placed, len(line) * self.cell_width
        placed, pen, right = [], None, 0
        for word in line.split(" "):
            mask, x0, advance, x1 = self._ink(word)
            pen = max(0, -x0) if pen is None else pen  # a first glyph hanging left (j) is not cut off
            placed.append((pen + x0, mask))
            right, pen = pen + x1, pen + advance + self.space
        return placed, right

    def _fits(self, line):
        if self.layout == "grid":
            return len(line) <= self.chars_per_line
        return self._place(line)[1] <= self.max_width

    def wrap(self, words):
        """-> (kept words, lines). Words that would overflow the image are dropped.

        wrap="words": greedy word wrap. wrap="chars" (grid only): the text fills the grid cell by
        cell like a terminal, breaking words anywhere, so character k of the text always sits in
        cell k: the simplest reading order a tiny decoder can learn.
        """
        if self.wrap_mode == "chars":
            cols, room = self.chars_per_line, self.chars_per_line * self.max_lines
            kept = list(words)
            while kept and len(" ".join(kept)) > room:
                kept.pop()
            text = " ".join(kept)
            return kept, [text[i:i + cols] for i in range(0, len(text), cols)]
        lines = []
        for i, word in enumerate(words):
            if lines and self._fits(lines[-1] + " " + word):
                lines[-1] += " " + word
            elif len(lines) < self.max_lines and self._fits(word):
                lines.append(word)
            else:
                return words[:i], lines
        return list(words), lines

    def render(self, text):
        """Render text (words separated by single spaces) -> RGB image; ValueError if it does not fit."""
        words = text.split(" ")
        kept, lines = self.wrap(words)
        if len(kept) != len(words):
            raise ValueError(f"text does not fit a {self.image_size} px image: {text!r}")
        return self._draw(lines)

    def _draw(self, lines):
        """Wrapped lines (from wrap) -> RGB image."""
        image = Image.new("L", (self.image_size, self.image_size), 255)
        for row, line in enumerate(lines):
            y = self.margin + row * self.line_height
            for x, mask in self._place(line)[0]:
                image.paste(0, (self.margin + x, y, self.margin + x + mask.width, y + mask.height), mask)
        return image.convert("RGB")

    def texts(self, split):
        """The split's target texts, in order (deterministic for the arguments)."""
        return (text for text, _ in self._pages(split))

    def _pages(self, split):
        """(text, its wrapped lines) of the split, in order: the shards draw the lines without wrapping again."""
        if self.fixed_samples:
            split = "train"  # the overfit check evaluates on the very samples it trains on
        vocab = self.train_words if split == "train" else self.heldout_words
        rng = random.Random(f"synthetic_ocr:{self.seed}:{split}")
        for _ in range(self.samples[split]):
            picked = [rng.choice(vocab) for _ in range(rng.randint(*self.words))]
            kept, lines = self.wrap(picked)
            yield " ".join(kept), lines

    # ---- shards

    def _write(self, split, folder):
        n = self.samples[split]
        writer, buf = ShardWriter(folder, split, self.samples_per_shard, max_size=None), io.BytesIO()
        for i, (text, lines) in enumerate(tqdm(self._pages(split), total=n, desc=f"synthetic_ocr {split}",
                                               unit="img", disable=not is_main())):
            buf.seek(0)
            buf.truncate()
            self._draw(lines).save(buf, format="PNG", compress_level=1)  # lossless; level 1 is 1.5x faster
            writer.write(f"{i:08d}", [("png", buf.getvalue()), ("txt", text.encode())])
        writer.close()


@hookimpl
def vlmkit_register(registry):
    registry.add("dataset", "synthetic_ocr", SyntheticOCR)
