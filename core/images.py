"""Images as the vision encoder sees them: decoding, pixels, and DeepSeek-OCR's crops.

* **Decoding** (``open_header``, ``open_image``): bytes or a file -> a Pillow image; empty, broken
  and too-large images (checked against ``data.max_image_pixels`` before the pixels are decoded)
  raise ``BadSample`` with their reason. Training and ``python -m core.generate`` use the same guard.
* **Pixels** (``preprocess``, ``image_views``): upright (EXIF), RGB as the page would look on paper
  (``rgb``: transparency composited on white, 16-bit and float modes scaled to 8 bits; the rules are
  in docs/data.md §5), padded to the aspect of the encoder's ``image_size`` (an int: DeepSeek-OCR's
  square; [height, width]: that rectangle) with DeepSeek-OCR's grey and resized to it
  (docs/architecture.md §2.5), then scaled to [-1, 1]. Training and generation share them.
* **Crops** (``Tiling``, ``choose_grid``, ``cut_tiles``): DeepSeek-OCR's "gundam" mode, a grid of
  local tiles beside the padded global view, chosen and cut as its ``dynamic_preprocess`` does
  (docs/architecture.md §2.4):

  * candidate grids ``(i, j)`` = (tiles across, tiles down) with ``min_tiles <= i*j <= max_tiles``
    (DeepSeek-OCR: min_num 2; max_num 9 in HF ``infer``, MAX_CROPS 6 in vLLM), ordered by ``i*j``;
  * the grid whose ``i/j`` is closest to the image's ``w/h`` wins; on a tie a later candidate
    wins if the image's area exceeds ``0.5 * tile**2 * i * j`` (so a large image takes the larger grid);
  * the image is resized to ``(tile*i, tile*j)`` and cut into row-major tiles: a plain resize and
    crop, no padding (§2.5);
  * an image with both sides ``<= tile_size`` gets no crops: its sample is the global view alone.

  The token layout of the tiles is the model's (core/model.py); its count is ``local_tokens`` here,
  so the data side (placeholders in the prompt) and the model agree on one formula (§2.3).
"""
import functools
import io

import attrs
import torch
from PIL import Image, ImageOps

from core.badsamples import BadSample
from core.errors import ConfigError

PAD_COLOR = (127, 127, 127)  # DeepSeek-OCR: tuple(int(0.5 * 255)) -> ~0 after normalisation
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (89,478,485)
ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose follows
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the image by 90 degrees (transpose, rotations, transverse)


# ---- decoding

def open_header(source, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, setting="data.max_image_pixels"):
    """A file path or binary stream -> PIL image with only its header read; BadSample if it does not identify
    or has more than ``max_pixels`` pixels (None: no limit; ``setting`` names it in the message), so a
    decompression bomb is refused undecoded."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow warns above its limit and raises above twice it: we check ourselves
    try:
        image = Image.open(source)  # reads the header only
    except Image.UnidentifiedImageError:
        raise BadSample("bad_image", "cannot identify image file") from None
    except Image.DecompressionBombError as e:  # a format plugin that checks on its own
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # Pillow raises many types for bad bytes; one bad image must not stop training
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    width, height = image.size
    if width == 0 or height == 0:
        image.close()
        raise BadSample("empty_image", f"{width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise BadSample("image_too_large", f"{width}x{height} = {width * height:,} pixels > {setting} "
                                           f"{max_pixels:,}")
    return image


def load(image):
    """Decode the pixels of an image from open_header; BadSample if they do not decode."""
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    return image


def open_image(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Image bytes -> loaded PIL image; BadSample if empty, too large (checked before decoding) or broken."""
    if not data:
        raise BadSample("empty_image", "0 bytes")
    return load(open_header(io.BytesIO(data), max_pixels))


# ---- pixels

def upright_rgb(image):
    """EXIF orientation applied (phone photos store rotation in EXIF, not in the pixels), then ``rgb``."""
    return rgb(ImageOps.exif_transpose(image))


WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def rgb(image):
    """Any Pillow mode -> 8-bit RGB as the page would look printed on white paper (docs/data.md §5):

    * transparency (an alpha band: RGBA, LA, PA, RGBa, La; or a transparent colour: P, L, RGB with
      ``transparency``) is composited over white, so dark text on a transparent background stays readable;
    * 16-bit grey (I;16*) is scaled by 255/65535; 32-bit ``I`` likewise when its values fit 16 bits
      (Pillow opens 16-bit PPM as I), else stretched from its minimum..maximum; float ``F`` is taken
      as 0..1 when it lies there, else stretched likewise;
    * the rest (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX) through Pillow's own conversion.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        image = _eight_bit(image)
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _eight_bit(image):
    """A 16-bit, 32-bit integer or float grey image -> L, by the scale rules of ``rgb``."""
    if image.mode in _SIXTEEN_BIT:
        image, (low, high) = image.convert("I"), (0, 65535)
    else:
        low, high = image.getextrema()
        if image.mode == "I" and low >= 0 and high <= 65535:
            low, high = 0, 65535
        elif image.mode == "F" and low >= 0 and high <= 1:
            low, high = 0, 1
    scale = 255 / (high - low) if high > low else 0
    return image.point(lambda v: (v - low) * scale).convert("L")  # a linear map: Pillow applies it in C


def pair(value, name="size"):
    """An int or an [h, w] pair -> (h, w): image, patch, window and stride sizes may be rectangles
    (a text-line strip with full-height patches); an int is the square DeepSeek-OCR uses. A ValueError
    naming ``name`` otherwise."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or [height, width], not {value!r}")


def image_hw(image_size):
    """An encoder's ``image_size`` -> (height, width): an int is DeepSeek-OCR's square global view,
    [height, width] a rectangle (a text strip; plugins/encoders/deepencoder.py)."""
    return pair(image_size, "image_size")


ASPECT_LIMIT = 2.0  # an image this many times wider or taller than the model's view is worth a warning


def aspect_text(width, height):
    """width:height with the shorter side as 1: '8:1', '1:1.29'."""
    return f"{width / height:.3g}:1" if width >= height else f"1:{height / width:.3g}"


def far_aspect(width, height, image_size, tiling=None):
    """(the image's aspect, the view's) as text when an upright ``width`` x ``height`` image is more than
    ASPECT_LIMIT times wider or taller than what the model sees of it, else None. It is padded to the view
    (``global_view``), so its text shrinks by that factor; with crops, the tiles follow the grid the image
    gets (``Tiling.grid``), and that grid's across:down is the view."""
    view_h, view_w = image_hw(image_size)
    grid = tiling.grid(width, height) if tiling is not None else None
    view = grid[0] / grid[1] if grid else view_w / view_h
    ratio = width / height / view
    if max(ratio, 1 / ratio) <= ASPECT_LIMIT:
        return None
    return aspect_text(width, height), aspect_text(*grid) if grid else aspect_text(view_w, view_h)


def normalised(image):
    """An RGB PIL image (W x H) -> (3, H, W) in [-1, 1]."""
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float()
    return (x / 255 - 0.5) / 0.5  # written as torchvision's ToTensor + Normalize(0.5, 0.5) to match it exactly


def global_view(image, image_size):
    """An upright RGB image padded to the view's aspect ratio and resized to ``image_size``, normalised
    (docs/architecture.md §2.5). An int is DeepSeek-OCR's square; [h, w] pads to that aspect the same way."""
    height, width = image_hw(image_size)
    if image.size != (width, height):  # fast path: synthetic images are already the view's size
        image = ImageOps.pad(image, (width, height), method=Image.Resampling.BICUBIC,
                             color=PAD_COLOR, centering=(0.5, 0.5))
    return normalised(image)


def preprocess(image, image_size):
    """PIL image -> float tensor (3, H, W) in [-1, 1]: upright, RGB, padded to the view's aspect ratio
    (a square for an int ``image_size``, DeepSeek-OCR's global view), resized."""
    return global_view(upright_rgb(image), image_size)


def image_views(image, image_size, tiling=None):
    """PIL image -> (global view (3, H, W), tiles (n, 3, t, t) or None, grid (across, down) or None).

    The global view is the image padded to the aspect of ``image_size`` and resized to it (H x W, a square
    for an int; docs/architecture.md §2.5); with a ``tiling`` (a Tiling; crops need the square view) an image
    larger than a tile also gets DeepSeek-OCR's crops (§2.4), which are resized and cut, not padded.
    """
    image = upright_rgb(image)
    grid = tiling.grid(*image.size) if tiling is not None else None
    if grid is None:
        return global_view(image, image_size), None, None
    tiles = torch.stack([normalised(t) for t in cut_tiles(image, tiling.tile_size, grid)])
    return global_view(image, image_size), tiles, grid


# ---- crops
def candidate_grids(min_tiles, max_tiles):
    """The (across, down) grids, built and ordered exactly as DeepSeek-OCR does.

    DeepSeek-OCR sorts a *set* by area only, so among grids of equal area the set's iteration order decides
    which one a tie meets first; tuples of small ints hash the same in every CPython process, so
    building the same set the same way gives DeepSeek-OCR's order (a test pins it).
    """
    return list(_candidate_grids(min_tiles, max_tiles))


@functools.cache
def _candidate_grids(min_tiles, max_tiles):
    """candidate_grids as a tuple, built once per setting: choose_grid runs for every sample."""
    grids = set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_tiles <= i * j <= max_tiles)
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width, height, tile_size, min_tiles=2, max_tiles=9):
    """-> (across, down) for an upright ``width`` x ``height`` image, or None: no crops (both sides fit a tile)."""
    if width <= tile_size and height <= tile_size:
        return None
    aspect, area = width / height, width * height
    best, best_diff = None, float("inf")
    for grid in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid  # DeepSeek-OCR's tie-break: a big enough image takes the later (not smaller) grid
    return best


def cut_tiles(image, tile_size, grid):
    """Resize ``image`` to (tile*across, tile*down) and cut it into across*down tiles, row-major."""
    across, down = grid
    # DeepSeek-OCR calls image.resize(size) without a filter: Pillow's default for RGB is bicubic
    resized = image.resize((tile_size * across, tile_size * down), Image.Resampling.BICUBIC)
    return [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
            for r in range(down) for c in range(across)]


def upright_size(image):
    """(width, height) after EXIF transpose, read from the header: grids can be chosen without decoding."""
    width, height = image.size
    if image.getexif().get(ORIENTATION) in _SWAPS_SIDES:
        return height, width
    return width, height


LAYOUTS = ("rows", "flat")  # an encoder's token_layout (core/model.py): DeepSeek-OCR's, DeepSeek-OCR 2's


def local_tokens(grid, tile_grid, layout="rows"):
    """Vision tokens of the tiles; ``grid`` None -> 0.

    ``rows`` (DeepSeek-OCR, §2.3): (h2*down) rows of (w2*across + 1), a newline per row; its processor
    writes it (q2*nw + 1) * (q2*nh) for square tile grids q2 x q2. ``flat`` (DeepSeek-OCR 2, §7.4):
    h2*w2 per tile, no newline.
    """
    if grid is None:
        return 0
    (across, down), (h2, w2) = grid, tile_grid
    if layout == "flat":
        return h2 * w2 * across * down
    return (w2 * across + 1) * (h2 * down)


@attrs.frozen
class Tiling:
    """The crop settings of a model (``model.crops`` in a recipe) with its encoder's grid for one tile.

    Plain data, so DataLoader workers get a copy.
    """
    tile_size: int
    min_tiles: int
    max_tiles: int
    tile_grid: tuple  # (h2, w2): the encoder's output grid for one tile
    layout: str = "rows"  # the encoder's token_layout (core/model.py)

    @classmethod
    def for_encoder(cls, encoder, crops, where="model.crops"):
        """The tiling of recipe ``crops`` (core.recipe.Crops) for ``encoder``; None when crops are off.

        A tile must give the encoder the global view's token density (e.g. 640 px -> 10 x 10 where
        1024 px -> 16 x 16, §2.4): the encoder's grid for the tile must be tile/S times its grid for S.
        """
        if crops is None:
            return None
        t, size = crops.tile_size, encoder.image_size
        if not isinstance(size, int):  # an [h, w] global view (a text strip): DeepSeek-OCR's crops assume a square
            raise ConfigError(f"{where}: crops need a square global view; model.encoder.image_size is {list(size)}")
        h, w = encoder.grid_size(size, size)
        h2, w2 = encoder.grid_size(t, t)
        if h2 < 1 or w2 < 1 or h2 * size != h * t or w2 * size != w * t:
            step = size // h if size % h == 0 else None
            hint = f"; use a multiple of {step} px" if step else ""
            raise ConfigError(f"{where}.tile_size: {t} px gives the encoder a {h2}x{w2} grid, not the "
                              f"{h}x{w} per {size} px of its global view scaled to {t} px{hint}")
        return cls(t, crops.min_tiles, crops.max_tiles, (h2, w2), getattr(encoder, "token_layout", "rows"))

    def grid(self, width, height):
        return choose_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    def local_tokens(self, grid):
        return local_tokens(grid, self.tile_grid, self.layout)

    def grids(self):
        """Every grid an image can get, in DeepSeek-OCR's candidate order."""
        return candidate_grids(self.min_tiles, self.max_tiles)

    def describe(self, global_tokens):
        """Lines for --dry-run: the token count of each grid."""
        counts = ", ".join(f"{a}x{d}: {global_tokens + self.local_tokens((a, d))}" for a, d in self.grids())
        h2, w2 = self.tile_grid
        first = "local rows" if self.layout == "rows" else "the tiles' tokens, tile after tile,"
        return (f"crops: {self.tile_size} px tiles ({h2}x{w2} grid each), {self.min_tiles}-{self.max_tiles} per "
                f"image, only for images larger than a tile; {first} come first, then the global view.\n"
                f"vision tokens by grid (across x down): {counts}")
