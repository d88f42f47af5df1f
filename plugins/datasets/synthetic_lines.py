"""Synthetic text lines: real English words in proportional TrueType fonts, written once as WebDataset shards.

What a reader of real text meets, at a size a CPU trains on in minutes (docs/results.md, "The default run"):
- fonts: Pillow's bundled default (Aileron, ``ImageFont.load_default(size=...)``, no system font needed),
  matplotlib's DejaVu Sans and Serif and STIX General, and fonts that pip packages ship in several weights
  (``source_sans_pro``, ``source_serif_pro``, ``lato``: dependencies; ``caladea``, ``hanken_grotesk``, which
  no recipe trains on, with vlmkit's ``fonts`` extra; ``PIP_FONTS``), or any .ttf/.otf path, each at a
  range of sizes; every size is checked at construction to draw each asked character distinguishably
  (Aileron draws ``I`` and ``l`` as the same glyph below 14 px, so its sizes start there);
- words: the English word lists that the ``wonderwords`` package ships (nouns, adjectives, verbs;
  plain text files), mixed case (lower, Capitalised, UPPER), numbers, and punctuation attached as
  in prose (trailing ``. , ; : ! ?``, quotes and parentheses around a word, ``'s``, hyphenated words);
- layout: 1-4 words per line (greedy, a word that would overflow the line is dropped), one or a few
  lines, the block placed at a random position (x and y jitter) inside the image, so text is not
  aligned to the vision-token grid;
- rendering variations (``effects``, off unless asked; plugins/datasets/line_effects.py): slight rotation
  and scale, contrast, blur, noise, JPEG, each drawn per sample from the page's random stream, on the
  training split only (augmentation: the held-out split is read as drawn);
- vocabulary: the words (and numbers) are split once, by the seed, into disjoint train and held-out
  sets; eval samples use only held-out ones, so evaluation measures reading, not memorising words.

Shards are cached in ``cache_dir/<hash of the arguments>/<split>`` as synthetic_ocr's are; each
shard has its own random stream, so shards render in parallel processes (rendering is part of the
default run's wall time).
"""
import io
import itertools
import multiprocessing
import os
import random
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from core import ConfigError, hookimpl
from core.distributed import print0
from core.shardwriter import ShardWriter
from plugins.datasets import line_effects
from plugins.datasets.rendered import RenderedDataset

FORMAT_VERSION = 2  # bump when rendering or the shard format changes (2: effects on the train split only)
CHARSET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'\"!?()-"
TRAILING = ".,;:!?"
ENCLOSING = ('""', "()", "''")
# Two glyphs count as distinguishable when their ink differs by at least this many full pixels
# (summed absolute difference / 255, both drawn at the same pen position). Aileron's I and l at 13 px
# differ by 0.96 (one anti-aliased column), at 14 px by 20 (I is a pixel wider); its '.' and ':' at
# 14 px by 1.85 (the colon's upper dot is small but whole).
MIN_GLYPH_DIFFERENCE = 1.5


# Fonts that pip packages ship, by family: (module, its dict of font files, the file key of the regular
# weight). A weight is the family name plus a suffix, e.g. ``lato_bold`` or ``source_serif_pro_semibold``.
# Licences: SIL OFL 1.1, Caladea Apache 2.0; matplotlib (a dependency) ships DejaVu (a free licence).
# Roboto and Manrope are not here: their I and l are the same glyph (docs/fonts.md).
PIP_FONTS = {
    "source_sans_pro": ("font_source_sans_pro", "font_files_ttf", "SourceSansPro"),
    "source_serif_pro": ("font_source_serif_pro", "font_files_ttf", "SourceSerifPro"),
    "lato": ("font_lato", "font_files", "Lato"),
    "caladea": ("font_caladea", "font_files", "Caladea"),
    "hanken_grotesk": ("font_hanken_grotesk", "font_files_otf", "HankenGrotesk"),
}
MATPLOTLIB_FONTS = {"dejavu_sans": "DejaVuSans.ttf", "dejavu_sans_bold": "DejaVuSans-Bold.ttf",
                    "dejavu_serif": "DejaVuSerif.ttf", "dejavu_serif_bold": "DejaVuSerif-Bold.ttf",
                    "stix": "STIXGeneral.ttf", "stix_bold": "STIXGeneralBol.ttf"}


def _pip_font(name):
    """A family or family_weight name -> the file its pip package ships; None when no family matches."""
    family = max((f for f in PIP_FONTS if name == f or name.startswith(f + "_")), key=len, default=None)
    if family is None:
        return None
    module, table, regular = PIP_FONTS[family]
    package = module.replace("_", "-")
    try:
        files = getattr(__import__(module), table)
    except ImportError:
        raise ConfigError(f"font {name!r} needs its package: pip install {package} (or vlmkit's fonts extra)") \
            from None
    wanted = (regular + name[len(family):].replace("_", "")).lower()
    match = [path for key, path in files.items() if key.lower() == wanted]
    if not match:
        weights = sorted(k[len(regular):].lower() for k in files if k.startswith(regular) and k != regular)
        raise ConfigError(f"font {name!r}: {package} has no such weight; it has {', '.join(weights)}")
    return match[0]


def font_file(name):
    """A font name -> the file a pip package ships (or the path itself); None for Pillow's default."""
    if name == "default":
        return None
    if name in MATPLOTLIB_FONTS:
        import matplotlib
        return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", MATPLOTLIB_FONTS[name])
    path = _pip_font(name)
    if path is not None:
        return path
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        known = ", ".join(["default", *PIP_FONTS, *MATPLOTLIB_FONTS])
        raise ConfigError(f"font {name!r}: not a font file nor one of {known} (with a weight: lato_bold)")
    return path


@cache
def load_font(name, size):
    path = font_file(name)
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


def glyph_mask(font, char):
    """The glyph's ink drawn with the pen at a fixed point: differences in shape, size and baseline all show."""
    image = Image.new("L", (2 * font.size, 2 * font.size), 0)
    ImageDraw.Draw(image).text((font.size // 2, font.size // 4), char, font=font, fill=255)
    return image


def confusable_pairs(font, chars=CHARSET, threshold=MIN_GLYPH_DIFFERENCE):
    """Pairs of characters that ``font`` draws with less than ``threshold`` pixels of different ink."""
    import numpy as np
    masks = np.stack([np.asarray(glyph_mask(font, c), dtype=np.float32).ravel() / 255 for c in chars])
    pairs = []
    for i, j in itertools.combinations(range(len(chars)), 2):
        diff = float(np.abs(masks[i] - masks[j]).sum())
        if diff < threshold:
            pairs.append((chars[i], chars[j], round(diff, 2)))
    return pairs


@cache
def _confusable(name, size):
    return confusable_pairs(load_font(name, size))


@cache
def english_words():
    """The word lists wonderwords ships (plain text), without its profanity list's words."""
    from importlib.resources import files
    assets = files("wonderwords") / "assets"
    profane = {w.strip().lower() for w in (assets / "profanitylist.txt").read_text().splitlines()}
    words = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        words.update(w.strip() for w in (assets / name).read_text().splitlines())
    return sorted(w for w in words if w and w.lower() not in profane)


class SyntheticLines(RenderedDataset):
    name, format_version = "synthetic_lines", FORMAT_VERSION

    def __init__(self, cache_dir="~/.cache/vlmkit/synthetic_lines", image_size=(32, 256),
                 fonts=({"name": "default", "sizes": [14, 18]},), words_per_line=(1, 4), lines=(1, 1),
                 word_length=(2, 10), max_chars=35, line_spacing=(1.0, 1.3), margin=1,
                 case=(0.6, 0.3, 0.1), numbers=0.08, trailing=0.2, enclosing=0.05, possessive=0.03,
                 ink=(0, 60), paper=(215, 255), heldout_fraction=0.2, train_samples=50000, eval_samples=256,
                 samples_per_shard=5000, seed=0, fixed_samples=None, workers=None, effects=None):
        # every argument except cache_dir and workers decides the pixels, so they all go into the hash
        self.args = dict(image_size=list(image_size) if not isinstance(image_size, int) else image_size,
                         fonts=[dict(f) for f in fonts], words_per_line=list(words_per_line), lines=list(lines),
                         word_length=list(word_length), max_chars=max_chars, line_spacing=list(line_spacing),
                         margin=margin, case=list(case), numbers=numbers, trailing=trailing, enclosing=enclosing,
                         possessive=possessive, ink=list(ink), paper=list(paper),
                         heldout_fraction=heldout_fraction, train_samples=train_samples,
                         eval_samples=eval_samples, samples_per_shard=samples_per_shard, seed=seed,
                         fixed_samples=fixed_samples, **({"effects": dict(effects)} if effects else {}))
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else map(int, image_size)
        self.fonts = [(f["name"], int(s)) for f in fonts for s in range(f["sizes"][0], f["sizes"][1] + 1)]
        self.words_per_line, self.lines, self.word_length = tuple(words_per_line), tuple(lines), tuple(word_length)
        self.max_chars, self.line_spacing, self.margin = max_chars, tuple(line_spacing), margin
        self.case, self.numbers, self.trailing = tuple(case), numbers, trailing
        self.enclosing, self.possessive, self.ink, self.paper = enclosing, possessive, tuple(ink), tuple(paper)
        self.samples = {"train": fixed_samples or train_samples, "eval": fixed_samples or eval_samples}
        self.samples_per_shard, self.seed, self.fixed_samples = samples_per_shard, seed, fixed_samples
        self.workers, self.effects = workers, dict(effects or {})
        line_effects.check(self.effects)
        self._check(fonts)
        self.train_words, self.heldout_words = self._vocabulary(heldout_fraction)

    def _check(self, fonts):
        # ValueError: the registry turns it into a ConfigError naming the recipe key
        for f in fonts:
            if set(f) != {"name", "sizes"} or len(f["sizes"]) != 2 or not 1 <= f["sizes"][0] <= f["sizes"][1]:
                raise ConfigError(f"fonts: each font is {{name, sizes: [min, max]}}, not {f!r}")
        for name, size in self.fonts:
            confused = _confusable(name, size)
            if confused:
                shown = ", ".join(f"{a!r}/{b!r} ({d} px)" for a, b, d in confused[:4])
                raise ConfigError(f"fonts: {name} at {size} px draws {shown} alike; pick larger sizes")
            if self._line_height(name, size) > self.height - 2 * self.margin:
                raise ConfigError(f"fonts: {name} at {size} px is taller than image_size {self.height} px")
        for key, (lo, hi) in (("words_per_line", self.words_per_line), ("lines", self.lines),
                              ("word_length", self.word_length)):
            if not 1 <= lo <= hi:
                raise ConfigError(f"{key} must be [min, max] with 1 <= min <= max, not {[lo, hi]}")
        if len(self.case) != 3 or abs(sum(self.case) - 1) > 1e-6:
            raise ConfigError(f"case: shares of lower, Capitalised and UPPER words summing to 1, not {list(self.case)}")
        if min(self.samples["train"], self.samples["eval"], self.samples_per_shard) < 1:
            raise ConfigError("train_samples, eval_samples and samples_per_shard must be at least 1")

    def _vocabulary(self, heldout_fraction):
        """Disjoint (train, held-out) word lists: the English words of word_length letters (hyphenated ones
        included) and the numbers 0-999, shuffled by the seed and split once."""
        lo, hi = self.word_length
        vocab = [w for w in english_words() if lo <= len(w) <= hi and w.isascii()
                 and w.replace("-", "").isalpha() and " " not in w]
        vocab += [str(n) for n in range(1000)]
        random.Random(f"synthetic_lines:{self.seed}:vocabulary").shuffle(vocab)
        held = round(len(vocab) * heldout_fraction)
        if not 1 <= held < len(vocab):
            raise ConfigError(f"heldout_fraction {heldout_fraction} leaves no train or no held-out words")
        return vocab[held:], vocab[:held]

    # ---- text

    def _draw_token(self, rng, vocab):
        """One word as it appears in text: a vocabulary word, cased and punctuated, or a number."""
        words, numbers = vocab
        if rng.random() < self.numbers:
            word = rng.choice(numbers)
        else:
            word = rng.choice(words)
            r = rng.random()
            if r < self.case[1]:
                word = word[:1].upper() + word[1:]
            elif r < self.case[1] + self.case[2]:
                word = word.upper()
            if rng.random() < self.possessive:
                word += "'s"
        if rng.random() < self.enclosing:
            left, right = rng.choice(ENCLOSING)
            word = left + word + right
        if rng.random() < self.trailing:
            word += rng.choice(TRAILING)
        return word

    def _line_height(self, name, size):
        font = load_font(name, size)
        _, top, _, bottom = font.getbbox(CHARSET)
        return bottom - top

    def page(self, rng, vocab, effects=True):
        """-> (text, layout): text is the lines joined by newlines; layout what _draw needs. ``effects``: False
        draws the sample without the rendering variations (the held-out split is read clean)."""
        name, size = rng.choice(self.fonts)
        font = load_font(name, size)
        _, top, _, bottom = font.getbbox(CHARSET)
        ink_height = bottom - top
        n_lines = rng.randint(*self.lines)
        spacing = round(ink_height * rng.uniform(*self.line_spacing))
        room_w = self.width - 2 * self.margin
        lines = []
        for _ in range(n_lines):
            if len(lines) and len(lines) * spacing + ink_height > self.height - 2 * self.margin:
                break
            words = []
            for _ in range(rng.randint(*self.words_per_line)):
                candidate = " ".join(words + [self._draw_token(rng, vocab)])
                if len(candidate) > self.max_chars or self._width(font, candidate) > room_w:
                    break
                words = candidate.split(" ")
            if not words:  # the first word alone overflows: draw another until one fits
                while not words:
                    token = self._draw_token(rng, vocab)
                    if len(token) <= self.max_chars and self._width(font, token) <= room_w:
                        words = [token]
            lines.append(" ".join(words))
        block_w = max(self._width(font, line) for line in lines)
        block_h = (len(lines) - 1) * spacing + ink_height
        x = rng.randint(self.margin, self.width - self.margin - block_w)
        y = rng.randint(self.margin, self.height - self.margin - block_h)
        ink, paper = rng.randint(*self.ink), rng.randint(*self.paper)
        layout = {"font": [name, size], "x": x, "y": y - top, "spacing": spacing, "lines": lines,
                  "ink": ink, "paper": paper}
        if self.effects and effects:  # drawn only when asked: the stream, so every other sample, stays as it was
            layout["effects"] = line_effects.choose(rng, self.effects, (x, y, block_w, block_h),
                                                    (self.width, self.height))
        return "\n".join(lines), layout

    @staticmethod
    def _width(font, text):
        """The ink's right edge with the pen at 0 (a first glyph hanging left is placed by _draw's x)."""
        left, _, right, _ = font.getbbox(text)
        return right - min(left, 0)

    def draw(self, layout):
        """Layout (from page) -> grey-scale PIL image of image_size."""
        font = load_font(*layout["font"])
        image = Image.new("L", (self.width, self.height), layout["paper"])
        d = ImageDraw.Draw(image)
        for i, line in enumerate(layout["lines"]):
            left = min(font.getbbox(line)[0], 0)
            d.text((layout["x"] - left, layout["y"] + i * layout["spacing"]), line, font=font, fill=layout["ink"])
        if layout.get("effects"):
            image = line_effects.apply(image, layout["effects"], layout["paper"])
        return image

    def _shard_pages(self, split, shard):
        """(text, layout) of one shard: its own random stream, so shards render independently."""
        if self.fixed_samples:
            split = "train"  # the overfit check evaluates on the very samples it trains on
        vocab = self.train_words if split == "train" else self.heldout_words
        vocab = ([w for w in vocab if not w.isdigit()], [w for w in vocab if w.isdigit()])
        rng = random.Random(f"synthetic_lines:{self.seed}:{split}:{shard}")
        start = shard * self.samples_per_shard
        for _ in range(start, min(start + self.samples_per_shard, self.samples[split])):
            yield self.page(rng, vocab, effects=split == "train")

    def pages(self, split):
        """Every (text, layout) of the split, in shard order (deterministic for the arguments)."""
        for shard in range(self._n_shards(split)):
            yield from self._shard_pages(split, shard)

    def texts(self, split):
        return (text for text, _ in self.pages(split))

    def _n_shards(self, split):
        return -(-self.samples["train" if self.fixed_samples else split] // self.samples_per_shard)

    # ---- shards

    def _write(self, split, folder):
        jobs = [(self.args, split, shard, str(folder)) for shard in range(self._n_shards(split))]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(self.workers or cores, len(jobs))
        print0(f"synthetic_lines: rendering {self.samples[split]} {split} images in {len(jobs)} shard(s), "
               f"{workers} process(es)")
        if workers > 1:
            with multiprocessing.get_context("spawn" if os.name != "posix" else "fork").Pool(workers) as pool:
                pool.map(_render_shard, jobs, chunksize=1)
        else:
            for job in jobs:
                _render_shard(job, self)


def _render_shard(job, dataset=None):
    """Render one shard into the temp dir (a top-level function: a worker process runs it)."""
    args, split, shard, tmp = job
    dataset = dataset or SyntheticLines(**args)
    buf = io.BytesIO()
    writer = ShardWriter(tmp, split, dataset.samples_per_shard, max_size=None, first=shard)
    try:
        for i, (text, layout) in enumerate(dataset._shard_pages(split, shard)):
            buf.seek(0)
            buf.truncate()
            dataset.draw(layout).save(buf, format="PNG", compress_level=1)  # lossless; level 1 is 1.5x faster
            key = shard * dataset.samples_per_shard + i
            writer.write(f"{key:08d}", [("png", buf.getvalue()), ("txt", text.encode())])
    finally:
        writer.close()


@hookimpl
def vlmkit_register(registry):
    registry.add("dataset", "synthetic_lines", SyntheticLines)
