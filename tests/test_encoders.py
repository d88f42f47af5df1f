"""Encoders and projectors: shapes, grids, DSO key names, real-size parameter counts (meta device),
and windowed attention against a naive loop reference. Tiny sizes: fast on a shared 2-core CPU."""
import math

import pytest
import torch

from core.errors import ConfigError
from core.registry import Registry
from plugins.encoders import clip as clip_mod
from plugins.encoders import deepencoder as deep_mod
from plugins.encoders import sam as sam_mod
from plugins.encoders.clip import CLIPEncoder, CLIPVisionTower
from plugins.encoders.deepencoder import DeepEncoder
from plugins.encoders.sam import SAMEncoder, get_rel_pos, resize_pos_grid
from plugins.projectors import linear as linear_mod
from plugins.projectors import mlp as mlp_mod
from plugins.projectors.linear import LinearProjector
from plugins.projectors.mlp import MLPProjector

torch.set_num_threads(1)

TINY_SAM = dict(patch_size=4, dim=32, depth=2, heads=2, window_size=3, global_attn_indexes=(1,),
                out_chans=16, downsample_channels=(24, 32), downsample_strides=(2, 2))
TINY_CLIP = dict(patch_size=4, dim=32, depth=1, heads=2, mlp_dim=64)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- SAM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, strides, window", [
    ((32, 32), (2, 2), 3),   # grid 8: not a multiple of the window 3
    ((40, 24), (2, 1), 3),   # non-square grid 10x6, stride (2, 1)
    ((28, 28), (2, 2), 4),   # grid 7, odd sizes through the strided convs
])
def test_sam_shapes_and_grid_size(size, strides, window):
    torch.manual_seed(0)
    cfg = dict(TINY_SAM, downsample_strides=strides, window_size=window)
    sam = SAMEncoder(image_size=32, **cfg)
    x = torch.randn(2, 3, *size)
    h, w = sam.grid_size(*size)
    out = sam(x)
    assert out.shape == (2, h, w, sam.out_dim) and sam.out_dim == 32
    assert torch.equal(sam.forward_features(x).permute(0, 2, 3, 1), out)
    assert torch.isfinite(out).all()


def test_sam_grid_size_arithmetic():
    sam = SAMEncoder(image_size=32, **dict(TINY_SAM, downsample_strides=(2, 1)))
    assert sam.grid_size(32, 32) == (4, 4)    # 8 -> 4 -> 4
    assert sam.grid_size(20, 36) == (3, 5)    # 5x9 -> 3x5 -> 3x5


def test_sam_pos_embed_and_rel_pos_interpolation():
    torch.manual_seed(0)
    sam = SAMEncoder(image_size=32, **TINY_SAM)  # pos grid 8x8, global rel-pos table 2*8-1
    with torch.no_grad():
        sam.pos_embed.normal_()
        for blk in sam.blocks:  # non-zero rel-pos tables, so their resizing is exercised
            blk.attn.rel_pos_h.normal_(std=0.1)
            blk.attn.rel_pos_w.normal_(std=0.1)
    for size in [(48, 48), (24, 40)]:  # grid 12x12 (up) and 6x10 (down / non-square)
        out = sam(torch.randn(1, 3, *size))
        assert out.shape == (1, *sam.grid_size(*size), 32) and torch.isfinite(out).all()
    # resizing keeps a constant map constant, and is the identity at the configured grid
    const = torch.full((1, 8, 8, 4), 0.5)
    assert torch.allclose(resize_pos_grid(const, 5, 11), torch.full((1, 5, 11, 4), 0.5), atol=1e-6)
    assert resize_pos_grid(sam.pos_embed, 8, 8) is sam.pos_embed
    # rel-pos: a gather at the table's own size; linear resize of the table otherwise
    table = torch.arange(7.0)[:, None].repeat(1, 2)  # offsets -3..3 for size 4
    R = get_rel_pos(4, 4, table)
    assert R.shape == (4, 4, 2) and R[0, 3, 0] == 0 and R[3, 0, 0] == 6 and R[2, 2, 0] == 3
    assert get_rel_pos(6, 6, table).shape == (6, 6, 2)


def naive_block(block, x, ws):
    """Reference for one SAM block, written with loops straight from docs/architecture.md §2.1:
    zero-pad to a multiple of ws, attend inside each window with
    score = q.k / sqrt(hd) + q.Rh[qi - ki + ws - 1] + q.Rw[qj - kj + ws - 1] (unscaled q), crop."""
    attn = block.attn
    B, H, W, C = x.shape
    heads, hd = attn.heads, C // attn.heads
    h = block.norm1(x)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    hp = torch.zeros(B, Hp, Wp, C)
    hp[:, :H, :W] = h
    out = torch.zeros(B, Hp, Wp, C)
    T = ws * ws
    for b in range(B):
        for i0 in range(0, Hp, ws):
            for j0 in range(0, Wp, ws):
                qkv = attn.qkv(hp[b, i0:i0 + ws, j0:j0 + ws].reshape(T, C))
                heads_out = []
                for n in range(heads):
                    q, k, v = (qkv[:, s * C + n * hd: s * C + (n + 1) * hd] for s in range(3))
                    scores = torch.empty(T, T)
                    for a in range(T):
                        ai, aj = divmod(a, ws)
                        for c in range(T):
                            ci, cj = divmod(c, ws)
                            scores[a, c] = (q[a] @ k[c] / math.sqrt(hd) + q[a] @ attn.rel_pos_h[ai - ci + ws - 1]
                                            + q[a] @ attn.rel_pos_w[aj - cj + ws - 1])
                    heads_out.append(scores.softmax(-1) @ v)
                out[b, i0:i0 + ws, j0:j0 + ws] = attn.proj(torch.cat(heads_out, -1)).reshape(ws, ws, C)
    x = x + out[:, :H, :W]
    return x + block.mlp(block.norm2(x))


def test_windowed_and_global_attention_match_naive_reference():
    torch.manual_seed(0)
    sam = SAMEncoder(image_size=20, **TINY_SAM)  # grid 5: window 3 pads to 6; global table 2*5-1
    with torch.no_grad():
        for blk in sam.blocks:
            blk.attn.rel_pos_h.normal_(std=0.5)
            blk.attn.rel_pos_w.normal_(std=0.5)
    x = torch.randn(2, 5, 7, 32)  # non-square, neither side a multiple of 3
    with torch.no_grad():
        assert torch.allclose(sam.blocks[0](x), naive_block(sam.blocks[0], x, ws=3), atol=1e-5)
        xg = torch.randn(1, 5, 5, 32)  # global block at its table's grid: one window over everything
        assert torch.allclose(sam.blocks[1](xg), naive_block(sam.blocks[1], xg, ws=5), atol=1e-5)


# ---- CLIP ---------------------------------------------------------------------------------------

def test_clip_tower_and_encoder():
    torch.manual_seed(0)
    tower = CLIPVisionTower(image_size=16, **TINY_CLIP)  # position grid 4x4
    pix = torch.randn(2, 3, 16, 16)
    assert tower(pix).shape == (2, 17, 32)
    # patch_embeds bypass the conv: pixels give only the batch size; other grid sizes resize positions
    pe = torch.randn(2, 32, 3, 5)
    out = tower(pix, patch_embeds=pe)
    assert out.shape == (2, 16, 32)
    assert torch.equal(out, tower(torch.zeros(2, 3, 1, 1), patch_embeds=pe))
    pos = tower.embeddings.positions(3, 5)
    assert pos.shape == (16, 32) and torch.equal(pos[0], tower.embeddings.position_embedding.weight[0])
    # the registered encoder: same keys, (B, h, w, dim) without CLS; other image sizes interpolate
    enc = CLIPEncoder(image_size=16, **TINY_CLIP)
    enc.load_state_dict(tower.state_dict())
    grid = enc(pix)
    assert grid.shape == (2, 4, 4, 32) and enc.out_dim == 32 and enc.grid_size(16, 16) == (4, 4)
    assert torch.allclose(grid.reshape(2, 16, 32), tower(pix)[:, 1:])
    assert enc(torch.randn(1, 3, 24, 20)).shape == (1, 6, 5, 32)


# ---- DeepEncoder --------------------------------------------------------------------------------

def test_deepencoder_forward_backward_and_order():
    torch.manual_seed(0)
    enc = DeepEncoder(image_size=32, sam=TINY_SAM, clip=TINY_CLIP)  # SAM grid 8 -> 2x2; CLIP grid 2x2
    assert enc.clip.embeddings.grid == 2 and enc.out_dim == 64 and enc.grid_size(32, 32) == (2, 2)
    assert enc.image_size == 32 and enc.sam.image_size == 32 and enc.clip.image_size == 8
    pix = torch.randn(2, 3, 32, 32)
    out = enc(pix)
    assert out.shape == (2, 2, 2, 64)
    # CLIP first, then SAM, row-major (docs/architecture.md §2.3); no_grad may pick another SDPA kernel: atol
    with torch.no_grad():
        sam_map = enc.sam.forward_features(pix)
        clip_out = enc.clip(pix, patch_embeds=sam_map)
    assert torch.allclose(out[..., 32:], sam_map.permute(0, 2, 3, 1), atol=1e-5)
    assert torch.allclose(out[..., :32].reshape(2, 4, 32), clip_out[:, 1:], atol=1e-5)
    out.square().mean().backward()
    for name in ["sam.patch_embed.proj.weight", "sam.blocks.0.attn.qkv.weight", "sam.net_3.weight",
                 "clip.embeddings.class_embedding", "clip.embeddings.position_embedding.weight",
                 "clip.transformer.layers.0.mlp.fc2.weight"]:
        g = enc.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    patch = enc.clip.embeddings.patch_embedding.weight
    assert not patch.requires_grad and patch.grad is None
    # another input size: SAM pos-embed and CLIP positions both interpolate
    assert enc(torch.randn(1, 3, 48, 40)).shape == (1, 3, 3, 64)


def test_deepencoder_rejects_mismatched_dims():
    with pytest.raises(ConfigError, match="downsample_channels"):
        DeepEncoder(image_size=32, sam=TINY_SAM, clip=dict(TINY_CLIP, dim=48, heads=2))


# ---- projectors ---------------------------------------------------------------------------------

def test_projectors():
    lin = LinearProjector(64, 16)
    assert sorted(lin.state_dict()) == ["layers.bias", "layers.weight"]
    assert lin(torch.randn(2, 3, 64)).shape == (2, 3, 16)
    mlp = MLPProjector(64, 16, depth=3)
    assert sorted(mlp.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    assert mlp.layers[0].out_features == 16 and mlp(torch.randn(5, 64)).shape == (5, 16)
    assert MLPProjector(64, 16, depth=2, hidden_dim=8).layers[0].out_features == 8


def test_registration():
    reg = Registry()
    for mod in (sam_mod, clip_mod, deep_mod, linear_mod, mlp_mod):
        mod.vlmkit_register(reg)
    assert reg.names("encoder") == ["clip", "deepencoder", "sam"]
    assert reg.names("projector") == ["linear", "mlp"]
    enc = reg.build("encoder", "deepencoder", image_size=32, sam=TINY_SAM, clip=TINY_CLIP)
    assert isinstance(enc, DeepEncoder)
    assert reg.build("encoder", "clip", image_size=16, **TINY_CLIP)(torch.randn(1, 3, 16, 16)).shape == (1, 4, 4, 32)


# ---- real sizes, on the meta device (no memory, no compute) ---------------------------------------

@pytest.fixture(scope="module")
def real():
    with torch.device("meta"):
        return DeepEncoder(), LinearProjector(2048, 1280)


def test_real_parameter_counts(real):
    enc, proj = real
    assert abs(n_params(enc.sam) - 95.57e6) < 0.1e6                             # docs/architecture.md §2.1
    assert abs(n_params(enc.sam.net_2) + n_params(enc.sam.net_3) - 5.90e6) < 0.005e6
    assert abs(n_params(enc.clip) - 303.2e6) < 0.2e6                            # docs/architecture.md §2.2
    assert n_params(proj) == 2048 * 1280 + 1280 == 2_622_720                    # docs/architecture.md §2.3
    assert enc.out_dim == 2048 and enc.clip.embeddings.grid == 16


def test_real_grid_sizes_and_meta_forward(real):
    enc, _ = real
    for size, g in [(1024, 16), (640, 10), (512, 8), (1280, 20)]:             # docs/architecture.md §2.1
        assert enc.grid_size(size, size) == (g, g)
    for size in (1024, 640):  # shapes through the real-size graph, interpolation included
        assert enc(torch.empty(1, 3, size, size, device="meta")).shape == (1, size // 64, size // 64, 2048)


def test_real_state_dict_keys(real):
    enc, _ = real
    sd = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    expect = {  # DSO names and shapes (docs/architecture.md §2.7, §3)
        "sam.patch_embed.proj.weight": (768, 3, 16, 16), "sam.patch_embed.proj.bias": (768,),
        "sam.pos_embed": (1, 64, 64, 768),
        "sam.blocks.0.norm1.weight": (768,), "sam.blocks.0.attn.qkv.weight": (2304, 768),
        "sam.blocks.0.attn.qkv.bias": (2304,), "sam.blocks.0.attn.proj.weight": (768, 768),
        "sam.blocks.0.attn.rel_pos_h": (27, 64), "sam.blocks.2.attn.rel_pos_w": (127, 64),
        "sam.blocks.11.attn.rel_pos_h": (127, 64), "sam.blocks.10.attn.rel_pos_w": (27, 64),
        "sam.blocks.3.norm2.bias": (768,), "sam.blocks.5.mlp.lin1.weight": (3072, 768),
        "sam.blocks.5.mlp.lin2.weight": (768, 3072),
        "sam.neck.0.weight": (256, 768, 1, 1), "sam.neck.1.weight": (256,), "sam.neck.1.bias": (256,),
        "sam.neck.2.weight": (256, 256, 3, 3), "sam.neck.3.bias": (256,),
        "sam.net_2.weight": (512, 256, 3, 3), "sam.net_3.weight": (1024, 512, 3, 3),
        "clip.embeddings.class_embedding": (1024,), "clip.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "clip.embeddings.position_embedding.weight": (257, 1024), "clip.embeddings.position_ids": (1, 257),
        "clip.pre_layrnorm.weight": (1024,),
        "clip.transformer.layers.0.self_attn.qkv_proj.weight": (3072, 1024),
        "clip.transformer.layers.23.self_attn.out_proj.bias": (1024,),
        "clip.transformer.layers.0.layer_norm1.weight": (1024,), "clip.transformer.layers.0.layer_norm2.bias": (1024,),
        "clip.transformer.layers.7.mlp.fc1.weight": (4096, 1024), "clip.transformer.layers.7.mlp.fc2.weight": (1024, 4096),
    }
    for key, shape in expect.items():
        assert sd.get(key) == shape, key
    absent = ["sam.neck.0.bias", "sam.net_2.bias", "clip.embeddings.patch_embedding.bias", "clip.post_layernorm.weight",
              "sam.blocks.12.norm1.weight", "clip.transformer.layers.24.layer_norm1.weight"]
    assert not any(k in sd for k in absent)
