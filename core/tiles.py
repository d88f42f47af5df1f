"""DeepSeek-OCR's "gundam" crops: a grid of local tiles besides the padded global view.

Grid choice and cutting follow DSO's ``dynamic_preprocess`` (architecture.md §2.4):

* candidate grids ``(i, j)`` = (tiles across, tiles down) with ``min_tiles <= i*j <= max_tiles``
  (DSO: min_num 2; max_num 9 in HF ``infer``, MAX_CROPS 6 in vLLM), ordered by ``i*j``;
* the grid whose ``i/j`` is closest to the image's ``w/h`` wins; on a tie a later candidate
  wins if the image's area exceeds ``0.5 * tile**2 * i * j`` (so a large image takes the larger grid);
* the image is resized to ``(tile*i, tile*j)`` and cut into row-major tiles: a plain resize and
  crop, no padding (§2.5);
* an image with both sides ``<= tile_size`` gets no crops: its sample is the global view alone.

The token layout of the tiles is the model's (core/model.py); its count is ``local_tokens`` here,
so the data side (placeholders in the prompt) and the model agree on one formula (§2.3).
"""
import functools

import attrs
from PIL import Image

from core.errors import ConfigError

ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose follows
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the image by 90 degrees (transpose, rotations, transverse)


def candidate_grids(min_tiles, max_tiles):
    """The (across, down) grids, built and ordered exactly as DSO does.

    DSO sorts a *set* by area only, so among grids of equal area the set's iteration order decides
    which one a tie meets first; tuples of small ints hash the same in every CPython process, so
    building the same set the same way gives DSO's order (a test pins it).
    """
    return list(_candidate_grids(min_tiles, max_tiles))


@functools.lru_cache(maxsize=None)
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
            best = grid  # DSO's tie-break: a big enough image takes the later (not smaller) grid
    return best


def cut_tiles(image, tile_size, grid):
    """Resize ``image`` to (tile*across, tile*down) and cut it into across*down tiles, row-major."""
    across, down = grid
    # DSO calls image.resize(size) without a filter: Pillow's default for RGB is bicubic
    resized = image.resize((tile_size * across, tile_size * down), Image.Resampling.BICUBIC)
    return [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
            for r in range(down) for c in range(across)]


def upright_size(image):
    """(width, height) after EXIF transpose, read from the header: grids can be chosen without decoding."""
    width, height = image.size
    if image.getexif().get(ORIENTATION) in _SWAPS_SIDES:
        return height, width
    return width, height


def local_tokens(grid, tile_grid):
    """Vision tokens of the tiles: (h2*down) rows of (w2*across + 1) (a newline per row), §2.3.

    DSO's processor writes it (q2*nw + 1) * (q2*nh) for square tile grids q2 x q2; ``grid`` None -> 0.
    """
    if grid is None:
        return 0
    (across, down), (h2, w2) = grid, tile_grid
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

    @classmethod
    def for_encoder(cls, encoder, crops, where="model.crops"):
        """The tiling of recipe ``crops`` (core.recipe.Crops) for ``encoder``; None when crops are off.

        A tile must give the encoder the global view's token density (e.g. 640 px -> 10 x 10 where
        1024 px -> 16 x 16, §2.4): the encoder's grid for the tile must be tile/S times its grid for S.
        """
        if crops is None:
            return None
        t, size = crops.tile_size, encoder.image_size
        if not isinstance(size, int):  # an [h, w] global view (a text strip): DSO's crops assume a square
            raise ConfigError(f"{where}: crops need a square global view; model.encoder.image_size is {list(size)}")
        h, w = encoder.grid_size(size, size)
        h2, w2 = encoder.grid_size(t, t)
        if h2 < 1 or w2 < 1 or h2 * size != h * t or w2 * size != w * t:
            step = size // h if size % h == 0 else None
            hint = f"; use a multiple of {step} px" if step else ""
            raise ConfigError(f"{where}.tile_size: {t} px gives the encoder a {h2}x{w2} grid, not the "
                              f"{h}x{w} per {size} px of its global view scaled to {t} px{hint}")
        return cls(t, crops.min_tiles, crops.max_tiles, (h2, w2))

    def grid(self, width, height):
        return choose_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    def local_tokens(self, grid):
        return local_tokens(grid, self.tile_grid)

    def grids(self):
        """Every grid an image can get, in DSO's candidate order."""
        return candidate_grids(self.min_tiles, self.max_tiles)

    def describe(self, global_tokens):
        """Lines for --dry-run: the token count of each grid."""
        counts = ", ".join(f"{a}x{d}: {global_tokens + self.local_tokens((a, d))}" for a, d in self.grids())
        h2, w2 = self.tile_grid
        return (f"crops: {self.tile_size} px tiles ({h2}x{w2} grid each), {self.min_tiles}-{self.max_tiles} per "
                f"image, only for images larger than a tile; local rows come first, then the global view.\n"
                f"vision tokens by grid (across x down): {counts}")
