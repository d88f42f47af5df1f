"""SAM-style ViT: the first half of DeepSeek-OCR's DeepEncoder (docs/architecture.md §2.1).

patch embed -> + abs pos -> blocks (windowed / global attention with decomposed
relative positions) -> neck (1x1 conv, LN2d, 3x3 conv, LN2d) -> compressor
(net_2, net_3: strided 3x3 convs). Module names match DeepSeek-OCR's `sam_vary_sdpa.py`
so its checkpoints load as they are (docs/architecture.md §2.7). Every size is a
constructor argument; the defaults are ViT-B as DeepSeek-OCR uses it.

`weights` names a pretrained file (HF SAM, segment-anything, transformers'
deepseek_ocr2, DeepSeek-OCR, or vlmkit's own; `weights_format` "auto" tells them
apart by key names); it is loaded at the end of __init__, exactly or not at all
(plugins/encoders/pretrained.py, core/weights.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import ConfigError, hookimpl
from core.images import pair
from plugins.encoders import pretrained


def resize_pos_grid(pos, height, width):
    """(1, G, G', C) -> (1, height, width, C); bicubic, antialias, fp32 (docs/architecture.md §2.1)."""
    if pos.shape[1] == height and pos.shape[2] == width:
        return pos
    grid = pos.permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return grid.to(pos.dtype).permute(0, 2, 3, 1)


def get_rel_pos(q_size, k_size, rel_pos):
    """Relative-position embeddings for every (query, key) pair along one axis: (q_size, k_size, C).

    The table holds one row per offset; when the grid differs from the size it
    was built for, it is resized linearly first, as SAM does (docs/architecture.md §2.1).
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        table = F.interpolate(rel_pos.T[None].float(), size=max_dist, mode="linear")
        rel_pos = table[0].T.to(rel_pos.dtype)
    # scale coordinates so that q and k of different lengths share one offset axis
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offsets.long()]


def window_partition(x, ws):
    """(B, H, W, C) -> (B * nWindows, wh, ww, C), zero-padding H and W up to a multiple of the window
    ``ws`` (an int: square, as SAM; or (wh, ww): a one-row grid of a text strip needs wh = 1, where a
    square window would pad every window to mostly zeros)."""
    B, H, W, C = x.shape
    wh, ww = pair(ws, "window_size")
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh, ww, C), (Hp, Wp)


def window_unpartition(windows, ws, padded_hw, hw):
    """Inverse of window_partition, cropping the padding away."""
    (Hp, Wp), (H, W) = padded_hw, hw
    wh, ww = pair(ws, "window_size")
    B = windows.shape[0] // ((Hp // wh) * (Wp // ww))
    x = windows.view(B, Hp // wh, Wp // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, -1)[:, :H, :W, :]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map, with weight and bias."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        patch = pair(patch_size, "patch_size")  # (ph, pw): e.g. full-height strips of a text line
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)  # with bias

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # channels-last (B, h, w, dim)


class Attention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with decomposed relative positions (MViTv2)."""

    def __init__(self, dim, heads, rel_size):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        rel_h, rel_w = pair(rel_size, "rel_size")  # the window's (or the global grid's) height and width
        # zero init, one row per offset: 2 * size - 1 per axis (docs/architecture.md §2.1)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_h - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_w - 1, head_dim))

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, hd)
        # bias[(qi,qj),(ki,kj)] = q . Rh[qi,ki] + q . Rw[qj,kj], with the UNSCALED q (docs/architecture.md §2.1)
        Rh = get_rel_pos(H, H, self.rel_pos_h)
        Rw = get_rel_pos(W, W, self.rel_pos_w)
        r_q = q.reshape(B, self.heads, H, W, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.heads, H * W, H * W)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # default scale 1/sqrt(hd)
        return self.proj(x.transpose(1, 2).reshape(B, H, W, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))  # exact GELU (docs/architecture.md §2.1)


class Block(nn.Module):
    """Pre-LN transformer block; window_size 0 means global attention."""

    def __init__(self, dim, heads, mlp_ratio, window_size, grid):
        super().__init__()
        self.window_size = window_size  # int or (wh, ww); 0: global attention over the (gh, gw) grid
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, rel_size=window_size if window_size else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        h = self.norm1(x)
        if self.window_size:  # windows become batch entries: one SDPA call for all of them
            H, W = h.shape[1], h.shape[2]
            h, padded = window_partition(h, self.window_size)
            h = window_unpartition(self.attn(h), self.window_size, padded, (H, W))
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class SAMEncoder(nn.Module):
    """(B, 3, H, W) pixels -> (B, h, w, out_dim) channels-last grid of the last compressor conv.

    ``image_size``, ``patch_size``, ``window_size`` and each of ``downsample_strides`` are an int (square,
    as DeepSeek-OCR) or [height, width]: a 32 x 256 text strip with 32 x 4 patches is a 1 x 64 grid,
    one token per few pixels of the line (docs/results.md, "How the tiny default learns").
    """

    def __init__(self, image_size=1024, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0,
                 window_size=14, global_attn_indexes=(2, 5, 8, 11), out_chans=256,
                 downsample_channels=(512, 1024), downsample_strides=(2, 2), position_image_size=None,
                 weights=None, weights_format="auto"):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"sam: dim {dim} is not divisible by heads {heads}")
        if any(not 0 <= i < depth for i in global_attn_indexes):
            raise ConfigError(f"sam: global_attn_indexes {list(global_attn_indexes)} must lie in [0, depth={depth})")
        if len(downsample_channels) != len(downsample_strides):
            raise ConfigError("sam: downsample_channels and downsample_strides must have the same length")
        self.image_size, self.patch_size = image_size, patch_size
        self.patch = pair(patch_size, "sam.patch_size")
        self.strides = tuple(pair(s, "sam.downsample_strides") for s in downsample_strides)
        wh, ww = pair(window_size, "sam.window_size")
        window = wh if wh == ww else (wh, ww)  # an int stays an int: SAM's square window
        # the position tables (pos_embed, global rel-pos) are stored for position_image_size and resized to
        # the input's grid at run time: DeepSeek-OCR keeps 64x64 (1024 px) for every mode
        # (docs/architecture.md §2.1, §2.4)
        pos_h, pos_w = pair(position_image_size or image_size, "sam.image_size")
        grid = (pos_h // self.patch[0], pos_w // self.patch[1])
        self.patch_embed = PatchEmbed(self.patch, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, dim))  # SAM inits it to zeros
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, 0 if i in global_attn_indexes else window, grid)
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        # the compressor: plain strided convs, no norm or activation between (docs/architecture.md §2.1)
        self.compressor = []
        chans = out_chans
        for i, (c, s) in enumerate(zip(downsample_channels, self.strides)):
            name = f"net_{i + 2}"  # DeepSeek-OCR's names: net_2, net_3
            setattr(self, name, nn.Conv2d(chans, c, kernel_size=3, stride=s, padding=1, bias=False))
            self.compressor.append(name)
            chans = c
        self.out_dim = chans
        self.pretrained_report = None
        if weights is not None:
            self.load_pretrained(weights, weights_format)

    def load_pretrained(self, path, weights_format="auto"):
        """Load a weight file (all-or-nothing, every key and shape checked); return the report.

        Formats without the compressor (hf, segment_anything) leave net_2 / net_3 as
        initialised, and the report's "fresh" and the printed line say so.
        """
        self.pretrained_report = pretrained.load_sam(self, path, weights_format)
        return self.pretrained_report

    def grid_size(self, height, width):
        h, w = height // self.patch[0], width // self.patch[1]
        for sh, sw in self.strides:  # k3 pad1 stride s
            h, w = (h - 1) // sh + 1, (w - 1) // sw + 1
        return h, w

    def forward_neck(self, pixel_values):
        """(B, 3, H, W) -> (B, out_chans, H/patch, W/patch): the neck's map, before the compressor
        (what SAM itself outputs, e.g. HF SamVisionModel's last_hidden_state)."""
        x = self.patch_embed(pixel_values)
        x = x + resize_pos_grid(self.pos_embed, x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward_features(self, pixel_values):
        """(B, 3, H, W) -> (B, out_dim, h, w), channels-first as DeepSeek-OCR returns it."""
        x = self.forward_neck(pixel_values)
        for name in self.compressor:
            x = getattr(self, name)(x)
        return x

    def forward(self, pixel_values):
        return self.forward_features(pixel_values).permute(0, 2, 3, 1)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "sam", SAMEncoder)
