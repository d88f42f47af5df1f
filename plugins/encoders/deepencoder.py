"""DeepSeek-OCR's DeepEncoder: SAM ViT-B -> compressor -> CLIP-L fed with SAM's map (docs/architecture.md §2.3).

The SAM output (B, C, h, w) replaces CLIP's patch embeddings; the features are
CLIP's tokens (CLS dropped) and SAM's map concatenated per grid cell, CLIP FIRST.
Submodules are `sam` and `clip` so DeepSeek-OCR's `sam_model.*` / `vision_model.*` weights
map on by renaming the prefix (docs/architecture.md §2.7).

`weights` names a DeepSeek-OCR checkpoint (file, index json or folder): its
sam_model / vision_model tensors are loaded exactly or not at all, and the
projector, image_newline and view_seperator tensors, which belong to the whole
model, are kept in `pretrained_extras` for the model builder. Separate files
for the halves go in `sam: {weights: ...}` / `clip: {weights: ...}`.
"""
import torch
import torch.nn as nn

from core import hookimpl
from core.errors import ConfigError
from core.images import pair
from plugins.encoders import pretrained
from plugins.encoders.clip import CLIPVisionTower
from plugins.encoders.sam import SAMEncoder


# DeepSeek-OCR's single-view resolution modes (docs/architecture.md §2.4): 73 / 111 / 273 / 421 vision tokens
MODES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280}
BASE_SIZE = 1024  # the resolution DeepSeek-OCR's position tables are stored for, whatever the mode


class DeepEncoder(nn.Module):
    """(B, 3, H, W) -> (B, h, w, clip_dim + sam_out_dim); defaults are the real ViT-B + ViT-L sizes.

    ``mode`` picks one of DeepSeek-OCR's resolutions and keeps the position tables at 1024 px,
    so pretrained weights load in every mode; ``image_size`` alone sizes them for itself.

    ``image_size`` may be [height, width]: a non-square global view (a text strip, letterboxed to that
    rectangle by core/data.py) with SAM's patches, windows and strides as rectangles too. The token
    layout stays DeepSeek-OCR's, h rows of w tokens + newline, then the separator. The modes, and so
    the real-scale recipes, keep DeepSeek-OCR's padded square.
    """

    def __init__(self, image_size=None, mode=None, sam: dict | None = None, clip: dict | None = None,
                 weights=None, position_image_size=None):
        super().__init__()
        sam, clip = dict(sam or {}), dict(clip or {})
        if mode is not None:
            if mode not in MODES:
                raise ConfigError(f"deepencoder: mode must be one of {', '.join(MODES)}, not {mode!r}")
            if image_size not in (None, MODES[mode]):
                raise ConfigError(f"deepencoder: mode {mode!r} is {MODES[mode]} px but image_size is {image_size}")
            image_size, position_image_size = MODES[mode], position_image_size or BASE_SIZE
        image_size = image_size or BASE_SIZE
        if not isinstance(image_size, int):  # [h, w]; a square pair is the int itself (one code path, one meta)
            h, w = pair(image_size, "deepencoder.image_size")
            image_size = h if h == w else (h, w)
        position_image_size = position_image_size or image_size
        if weights is not None and (sam.get("weights") is not None or clip.get("weights") is not None):
            raise ConfigError("deepencoder: weights (a whole DeepSeek-OCR checkpoint) and sam.weights / clip.weights "
                              "both given; name one or the other")
        self.image_size = image_size  # the model builder reads it
        self.sam = SAMEncoder(image_size=image_size, position_image_size=position_image_size, **sam)
        clip_dim = clip.get("dim", 1024)
        if clip_dim != self.sam.out_dim:
            raise ConfigError(f"deepencoder: clip.dim ({clip_dim}) must equal sam's downsample_channels[-1] "
                             f"({self.sam.out_dim}): SAM's map is CLIP's patch embedding")
        # CLIP's position grid defaults to SAM's output grid at position_image_size (224/14 = 16 = 1024/64,
        # docs/architecture.md §2.2); other grids are resized at run time, as DeepSeek-OCR does for 640 px
        if "image_size" not in clip:
            grid = self.sam.grid_size(*pair(position_image_size, "deepencoder.position_image_size"))
            patch = clip.get("patch_size", 14)
            clip["image_size"] = grid[0] * patch if grid[0] == grid[1] else [g * patch for g in grid]
        self.clip = CLIPVisionTower(**clip)
        # bypassed by patch_embeds: must not require grad, or DDP fails on an unused parameter (DESIGN.md)
        self.clip.embeddings.patch_embedding.requires_grad_(False)
        self.out_dim = self.clip.out_dim + self.sam.out_dim
        # DeepSeek-OCR's projector.*, image_newline, view_separator: the model builder takes them from here
        self.pretrained_extras = {}
        self.pretrained_report = None
        if weights is not None:
            self.load_pretrained(weights)

    def load_pretrained(self, path):
        """Load a DeepSeek-OCR checkpoint's vision tensors; keep the model-level ones in pretrained_extras."""
        self.pretrained_report, self.pretrained_extras = pretrained.load_deepencoder(self, path)
        return self.pretrained_report

    def grid_size(self, height, width):
        return self.sam.grid_size(height, width)

    def feature_parts(self):
        """Which output channels come from where (the collapse monitor scores each part)."""
        return {"clip": slice(0, self.clip.out_dim), "sam": slice(self.clip.out_dim, None)}

    def forward(self, pixel_values):
        sam_map = self.sam.forward_features(pixel_values)  # (B, C, h, w)
        B, _, h, w = sam_map.shape
        clip_out = self.clip(pixel_values, patch_embeds=sam_map)  # (B, 1 + h*w, D)
        # CLIP first, then SAM, both in row-major grid order (docs/architecture.md §2.3)
        feats = torch.cat([clip_out[:, 1:], sam_map.flatten(2).transpose(1, 2)], dim=-1)
        return feats.reshape(B, h, w, -1)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "deepencoder", DeepEncoder)
