"""Rendering variations of synthetic text lines: slight rotation and scale, contrast, blur, noise, JPEG.

A helper of plugins/datasets/synthetic_lines.py (its ``effects`` option), not a plugin. ``choose`` draws
one sample's variations from the page's random stream, so they are part of its layout and the same
arguments render the same pixels; ``apply`` puts them on the drawn image. Every option is the largest
strength, and each variation is applied to a sample with ``probability`` at a uniform strength up to it:

- ``rotate``: degrees either way; ``scale``: horizontal stretch either way (0.1: 0.9x-1.1x), both about
  the text block's centre and shrunk until the block stays inside the image, so no ink is cut off;
- ``contrast``: the lowest factor of PIL's contrast enhancement (1: unchanged);
- ``blur``: Gaussian radius in pixels; ``noise``: standard deviation of Gaussian noise in grey levels;
- ``jpeg``: the lowest JPEG quality (the image is encoded and decoded once; the shard keeps it as PNG).
"""
import io
import math

from PIL import Image, ImageEnhance, ImageFilter

from core import ConfigError

LIMITS = {"probability": (0.0, 1.0), "rotate": (0.0, 10.0), "scale": (0.0, 0.5), "contrast": (0.05, 1.0),
          "blur": (0.0, 3.0), "noise": (0.0, 64.0), "jpeg": (5, 95)}


def check(options):
    """A ConfigError naming what is wrong with the ``effects`` option; {} (no variation) is valid."""
    for key, value in options.items():
        if key not in LIMITS:
            raise ConfigError(f"effects: unknown {key!r}; known: {', '.join(LIMITS)}")
        lo, hi = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ConfigError(f"effects.{key} must be a number in [{lo}, {hi}], not {value!r}")


def choose(rng, options, block, size):
    """One sample's variations: {name: strength} for those applied. ``block``: the text's (x, y, w, h) box,
    ``size``: the image's (w, h)."""
    p = options.get("probability", 0.5)
    chosen = {}
    for key in ("rotate", "scale", "contrast", "blur", "noise", "jpeg"):
        if key in options and rng.random() < p:
            if key in ("rotate", "scale"):
                chosen[key] = rng.uniform(-options[key], options[key])
            elif key == "contrast":
                chosen[key] = rng.uniform(options[key], 1.0)
            elif key == "jpeg":
                chosen[key] = rng.randint(int(options[key]), 95)
            else:
                chosen[key] = rng.uniform(0.0, options[key])
    if "noise" in chosen:
        chosen["noise_seed"] = rng.randrange(2 ** 32)
    if "rotate" in chosen or "scale" in chosen:
        chosen.update(_fit(chosen.pop("rotate", 0.0), chosen.pop("scale", 0.0), block, size))
    return chosen


def _fit(angle, stretch, block, size):
    """{rotate, scale, centre}: the rotation and stretch halved until the block's corners stay inside
    ({} when eight halvings do not fit it: the sample keeps its plain geometry)."""
    x, y, w, h = block
    cx, cy = x + w / 2, y + h / 2
    for _ in range(8):
        t, s = math.radians(abs(angle)), 1 + stretch
        half_w = s * w / 2 * math.cos(t) + h / 2 * math.sin(t)
        half_h = s * w / 2 * math.sin(t) + h / 2 * math.cos(t)
        # 1.5 px to spare: bilinear resampling spreads an edge's ink by up to a pixel
        if min(cx - half_w, size[0] - cx - half_w, cy - half_h, size[1] - cy - half_h) >= 1.5:
            return {"rotate": angle, "scale": 1 + stretch, "centre": [cx, cy]}
        angle, stretch = angle / 2, stretch / 2
    return {}


def apply(image, chosen, paper):
    """The drawn grey-scale ``image`` with ``chosen``'s variations (``paper``: the fill uncovered by rotation)."""
    if "centre" in chosen:
        image = _affine(image, chosen["centre"], chosen["rotate"], chosen["scale"], paper)
    if "contrast" in chosen:
        image = ImageEnhance.Contrast(image).enhance(chosen["contrast"])
    if "blur" in chosen:
        image = image.filter(ImageFilter.GaussianBlur(chosen["blur"]))
    if "noise" in chosen:
        import numpy as np
        noise = np.random.default_rng(chosen["noise_seed"]).normal(0.0, chosen["noise"], (image.height, image.width))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8))
    if "jpeg" in chosen:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=chosen["jpeg"])
        image = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return image


def _affine(image, centre, angle, scale, paper):
    """Rotate by ``angle`` degrees and stretch by ``scale`` horizontally about ``centre``. PIL's AFFINE data
    maps each output pixel back to the input: the inverse, diag(1/scale, 1) @ R(-angle)."""
    cx, cy = centre
    t = math.radians(angle)
    a, b, d, e = math.cos(t) / scale, math.sin(t) / scale, -math.sin(t), math.cos(t)
    data = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
    return image.transform(image.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=paper)
