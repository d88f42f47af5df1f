"""synthetic_lines' fonts from pip packages and matplotlib (weights by name, each checked for distinct
glyphs) and its rendering variations (rotation and scale inside the image, contrast, blur, noise, JPEG)."""
import random

import numpy as np
import pytest

from core.errors import ConfigError
from plugins.datasets import line_effects
from plugins.datasets.synthetic_lines import SyntheticLines, confusable_pairs, font_file, load_font

# the families and sizes docs/fonts.md lists: every size must draw the 73 characters distinguishably
PROPOSED = {"source_sans_pro_semibold": [13, 18], "source_serif_pro": [13, 18], "source_serif_pro_bold": [13, 18],
            "lato": [15, 18], "lato_bold": [13, 18], "caladea": [14, 18], "hanken_grotesk": [14, 18],
            "dejavu_serif": [13, 18], "dejavu_sans": [17, 18], "stix": [15, 18], "stix_bold": [14, 18]}


def test_pip_and_matplotlib_fonts_by_family_and_weight(tmp_path):
    for package in ("font_lato", "font_source_serif_pro", "font_caladea", "font_hanken_grotesk"):
        pytest.importorskip(package)  # vlmkit's fonts extra
    fonts = [{"name": name, "sizes": sizes} for name, sizes in PROPOSED.items()]
    lines = SyntheticLines(cache_dir=str(tmp_path), fonts=fonts, train_samples=4, eval_samples=4, workers=1)
    assert {name for name, _ in lines.fonts} == set(PROPOSED)  # _check passed every size
    assert font_file("lato_bold") != font_file("lato") and font_file("lato_bold").endswith("Lato-Bold.ttf")
    with pytest.raises(ConfigError, match="no such weight; it has .*bold"):
        font_file("lato_heavy")
    with pytest.raises(ConfigError, match="not a font file nor one of default"):
        font_file("roboto")  # its I and l are one glyph: not offered
    assert confusable_pairs(load_font("dejavu_sans", 16))  # why dejavu_sans starts at 17 px (its i and l)
    assert font_file("stix").endswith("STIXGeneral.ttf") and confusable_pairs(load_font("stix", 14))


def _pages(effects, count=40):
    lines = SyntheticLines(fonts=[{"name": "source_sans_pro", "sizes": [13, 18]}], effects=effects,
                           train_samples=4, eval_samples=4)
    rng = random.Random(0)
    vocab = ([w for w in lines.train_words if not w.isdigit()], [w for w in lines.train_words if w.isdigit()])
    return lines, [lines.page(rng, vocab)[1] for _ in range(count)]


def test_rotation_and_scale_keep_the_text_inside_the_image():
    lines, layouts = _pages({"probability": 1.0, "rotate": 10.0, "scale": 0.5})
    turned = 0
    for layout in layouts:
        image = np.asarray(lines.draw(dict(layout, ink=0, paper=255)))
        assert (image < 128).any()
        frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert frame.min() > 200  # no ink reaches the border: nothing was cut off
        turned += abs(layout["effects"].get("rotate", 0.0)) > 0.5
    assert turned > 10


def test_variations_change_pixels_reproducibly_and_keep_the_text_legible():
    lines, layouts = _pages({"probability": 1.0, "contrast": 0.5, "blur": 1.0, "noise": 10.0, "jpeg": 30})
    for layout in layouts[:10]:
        plain = np.asarray(lines.draw(dict(layout, effects={})), dtype=float)
        varied = np.asarray(lines.draw(layout), dtype=float)
        assert np.array_equal(varied, np.asarray(lines.draw(layout), dtype=float))  # the layout decides
        assert np.abs(varied - plain).mean() > 1.0
        assert np.corrcoef(plain.ravel(), varied.ravel())[0, 1] > 0.5  # still the same text


def test_variations_are_drawn_on_the_training_split_only():
    lines = SyntheticLines(fonts=[{"name": "source_sans_pro", "sizes": [13, 18]}], train_samples=30, eval_samples=30,
                           effects={"probability": 1.0, "blur": 1.0, "noise": 10.0})
    assert all(layout["effects"] for _, layout in lines.pages("train"))
    assert not any("effects" in layout for _, layout in lines.pages("eval"))  # the held-out lines are read clean


def test_bad_effects_are_refused_with_the_key():
    for effects, match in (({"blurr": 1}, "unknown 'blurr'"), ({"rotate": 45}, r"effects\.rotate"),
                           ({"jpeg": "low"}, r"effects\.jpeg")):
        with pytest.raises(ConfigError, match=match):
            SyntheticLines(effects=effects, train_samples=4, eval_samples=4)
    assert SyntheticLines(train_samples=4, eval_samples=4).args.get("effects") is None  # default cache key kept
    assert line_effects.choose(random.Random(0), {}, (0, 0, 10, 10), (256, 32)) == {}
