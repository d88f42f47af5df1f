"""DeepSeek-OCR's DeepEncoder: SAM ViT-B -> compressor -> CLIP-L fed with SAM's map (architecture.md §2.3).

The SAM output (B, C, h, w) replaces CLIP's patch embeddings; the features are
CLIP's tokens (CLS dropped) and SAM's map concatenated per grid cell, CLIP FIRST.
Submodules are `sam` and `clip` so DSO's `sam_model.*` / `vision_model.*` weights
map on by renaming the prefix (architecture.md §2.7).
"""
import torch
import torch.nn as nn

from core import hookimpl
from plugins.encoders.clip import CLIPVisionTower
from plugins.encoders.sam import SAMEncoder


class DeepEncoder(nn.Module):
    """(B, 3, H, W) -> (B, h, w, clip_dim + sam_out_dim); defaults are the real ViT-B + ViT-L sizes."""

    def __init__(self, image_size=1024, sam: dict | None = None, clip: dict | None = None):
        super().__init__()
        sam, clip = dict(sam or {}), dict(clip or {})
        self.image_size = image_size  # the model builder reads it
        self.sam = SAMEncoder(image_size=image_size, **sam)
        clip_dim = clip.get("dim", 1024)
        if clip_dim != self.sam.out_dim:
            raise ValueError(f"deepencoder: clip.dim ({clip_dim}) must equal sam's downsample_channels[-1] "
                             f"({self.sam.out_dim}): SAM's map is CLIP's patch embedding")
        # CLIP's position grid defaults to SAM's output grid at image_size (224/14 = 16 = 1024/64,
        # architecture.md §2.2), so the position embeddings are used without resizing there
        if "image_size" not in clip:
            clip["image_size"] = self.sam.grid_size(image_size, image_size)[0] * clip.get("patch_size", 14)
        self.clip = CLIPVisionTower(**clip)
        # bypassed by patch_embeds: must not require grad, or DDP fails on an unused parameter (DESIGN.md)
        self.clip.embeddings.patch_embedding.requires_grad_(False)
        self.out_dim = self.clip.out_dim + self.sam.out_dim

    def grid_size(self, height, width):
        return self.sam.grid_size(height, width)

    def forward(self, pixel_values):
        sam_map = self.sam.forward_features(pixel_values)  # (B, C, h, w)
        B, _, h, w = sam_map.shape
        clip_out = self.clip(pixel_values, patch_embeds=sam_map)  # (B, 1 + h*w, D)
        # CLIP first, then SAM, both in row-major grid order (architecture.md §2.3)
        feats = torch.cat([clip_out[:, 1:], sam_map.flatten(2).transpose(1, 2)], dim=-1)
        return feats.reshape(B, h, w, -1)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "deepencoder", DeepEncoder)
