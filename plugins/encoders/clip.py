"""CLIP ViT-L/14-style vision tower: the second half of the DeepEncoder (docs/architecture.md §2.2).

Pre-LN transformer, quick_gelu, fused qkv, no post layernorm. In the DeepEncoder
the SAM output replaces the patch embeddings (`patch_embeds`). Module names
match DeepSeek-OCR's `clip_sdpa.py` (docs/architecture.md §2.7); defaults are ViT-L/14 at 224.

Two classes share one set of weights and names:
- CLIPVisionTower: forward(pixels, patch_embeds=None) -> (B, 1 + h*w, dim) with CLS, as DeepSeek-OCR;
- CLIPEncoder (registered "clip"): the encoder contract, forward(pixels) -> (B, h, w, dim), CLS dropped.

`weights` names a pretrained file (HF CLIP, DeepSeek-OCR's vision_model, or
vlmkit's own; `weights_format` "auto" tells them apart), loaded at the end of
__init__, exactly or not at all (plugins/encoders/pretrained.py, core/weights.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import ConfigError, hookimpl
from core.images import pair
from plugins.encoders import pretrained
from plugins.encoders.sam import resize_pos_grid


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, image_size, patch_size, dim):
        super().__init__()
        # (gh, gw): a rectangle when the DeepEncoder reads text strips; CLIP's own grid is square
        (ih, iw), (ph, pw) = pair(image_size, "clip.image_size"), pair(patch_size, "clip.patch_size")
        self.grid_hw = (ih // ph, iw // pw)
        self.grid = self.grid_hw[0] if ih // ph == iw // pw else self.grid_hw  # an int when square, like image_size
        n_pos = self.grid_hw[0] * self.grid_hw[1] + 1
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=(ph, pw), stride=(ph, pw), bias=False)
        self.position_embedding = nn.Embedding(n_pos, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)  # CLIP's small init, not N(0, 1)
        # persistent in DeepSeek-OCR, so checkpoints carry it (docs/architecture.md §3.2)
        self.register_buffer("position_ids", torch.arange(n_pos)[None], persistent=True)

    def positions(self, h, w):
        """(1 + h*w, dim): CLS slot as is, the grid part resized bicubic+antialias in fp32
        (docs/architecture.md §2.2)."""
        pos = self.position_embedding(self.position_ids)[0]
        cls_pos, grid_pos = pos[:1], pos[1:]
        if (h, w) != self.grid_hw:
            grid_pos = resize_pos_grid(grid_pos.reshape(1, *self.grid_hw, -1), h, w).reshape(h * w, -1)
        return torch.cat([cls_pos, grid_pos], dim=0)

    def forward(self, pixel_values, patch_embeds=None):
        if patch_embeds is None:
            patch_embeds = self.patch_embedding(pixel_values)
        B, _, h, w = patch_embeds.shape  # with patch_embeds, pixels are not looked at beyond this
        x = patch_embeds.flatten(2).transpose(1, 2)  # row-major (B, h*w, dim)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        return torch.cat([cls, x], dim=1) + self.positions(h, w).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)  # fused, split order q, k, v (docs/architecture.md §2.2)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # non-causal
        return self.out_proj(x.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, dim, heads, mlp_dim, eps):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_dim, eps):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, heads, mlp_dim, eps) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTower(nn.Module):
    """(B, 3, H, W) pixels, or (B, dim, h, w) patch_embeds -> (B, 1 + h*w, dim), CLS first."""

    def __init__(self, image_size=224, patch_size=14, dim=1024, depth=24, heads=16, mlp_dim=4096, eps=1e-5,
                 weights=None, weights_format="auto"):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"clip: dim {dim} is not divisible by heads {heads}")
        self.image_size, self.patch_size = image_size, patch_size
        self.out_dim = dim
        self.embeddings = Embeddings(image_size, patch_size, dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)  # DeepSeek-OCR's spelling
        self.transformer = Transformer(dim, depth, heads, mlp_dim, eps)
        # no post_layernorm: DeepSeek-OCR uses the last layer's output as it is (docs/architecture.md §2.2)
        self.pretrained_report = None
        if weights is not None:
            self.load_pretrained(weights, weights_format)

    def load_pretrained(self, path, weights_format="auto"):
        """Load a weight file (all-or-nothing, every key and shape checked); return the report."""
        self.pretrained_report = pretrained.load_clip(self, path, weights_format)
        return self.pretrained_report

    def grid_size(self, height, width):
        ph, pw = pair(self.patch_size, "clip.patch_size")
        return height // ph, width // pw

    def sequence(self, pixel_values, patch_embeds=None):
        return self.transformer(self.pre_layrnorm(self.embeddings(pixel_values, patch_embeds)))

    def forward(self, pixel_values, patch_embeds=None):
        return self.sequence(pixel_values, patch_embeds)

    def encode_grid(self, pixel_values):
        """(B, 3, H, W) -> (B, h, w, dim): the CLS token dropped, channels-last."""
        h, w = self.grid_size(pixel_values.shape[2], pixel_values.shape[3])
        x = self.sequence(pixel_values)[:, 1:]
        return x.reshape(x.shape[0], h, w, -1)


class CLIPEncoder(CLIPVisionTower):
    """The tower under the encoder contract; same parameters and state_dict keys."""

    def forward(self, pixel_values):
        return self.encode_grid(pixel_values)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "clip", CLIPEncoder)
