"""Non-square views: rectangular images and patches in SAM, CLIP and the DeepEncoder, DeepSeek-OCR's
token layout on a strip, the [h, w] preprocessing path, and the synthetic_lines dataset
(disjoint vocabularies, distinguishable glyphs, text inside the image, jitter). Tiny sizes: fast."""
import itertools
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.data import eval_samples
from core.images import image_hw, image_views, pair, preprocess
from core.errors import ConfigError
from core.registry import Registry
from plugins.datasets import synthetic_lines
from plugins.datasets.synthetic_lines import CHARSET, SyntheticLines, confusable_pairs, load_font
from plugins.encoders.clip import CLIPEncoder
from plugins.encoders.deepencoder import DeepEncoder
from plugins.encoders.sam import SAMEncoder, window_partition, window_unpartition

torch.set_num_threads(1)

STRIP_SAM = dict(patch_size=[32, 4], dim=32, depth=2, heads=2, window_size=[1, 8], global_attn_indexes=[1],
                 out_chans=16, downsample_channels=[24, 32], downsample_strides=[[1, 2], 1])
STRIP_CLIP = dict(dim=32, depth=1, heads=2, mlp_dim=64)
FONTS = [{"name": "default", "sizes": [14, 15]}, {"name": "source_sans_pro", "sizes": [13, 14]}]


# ---- encoders

def test_pair_accepts_int_or_two_ints():
    assert pair(8) == (8, 8) and pair([32, 4]) == (32, 4) and pair((2, 1)) == (2, 1)
    for bad in ([1, 2, 3], "8", [1.5, 2]):
        with pytest.raises(ValueError):
            pair(bad)


def test_sam_rectangular_patches_windows_and_strides():
    torch.manual_seed(0)
    sam = SAMEncoder(image_size=[32, 256], **STRIP_SAM)
    assert sam.patch_embed.proj.kernel_size == (32, 4) and sam.pos_embed.shape == (1, 1, 64, 32)
    # a global block's rel-pos tables follow the grid per axis: 2 * 1 - 1 rows and 2 * 64 - 1 columns
    assert sam.blocks[1].attn.rel_pos_h.shape[0] == 1 and sam.blocks[1].attn.rel_pos_w.shape[0] == 127
    assert sam.blocks[0].attn.rel_pos_h.shape[0] == 1 and sam.blocks[0].attn.rel_pos_w.shape[0] == 15  # window 1x8
    assert sam.grid_size(32, 256) == (1, 32)  # 1 x 64 patches, then stride (1, 2) and 1
    out = sam(torch.randn(2, 3, 32, 256))
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert sam.pos_embed.grad.abs().sum() > 0 and sam.blocks[0].attn.rel_pos_w.grad.abs().sum() > 0


def test_rectangular_window_partition_round_trip():
    x = torch.randn(2, 3, 10, 5)
    windows, padded = window_partition(x, (1, 4))  # width 10 -> padded to 12: 3 windows per row
    assert windows.shape == (2 * 3 * 3, 1, 4, 5) and padded == (3, 12)
    assert torch.equal(window_unpartition(windows, (1, 4), padded, (3, 10)), x)
    square, padded_sq = window_partition(x, 2)  # the int form is SAM's square window, unchanged
    assert square.shape == (2 * 2 * 5, 2, 2, 5) and padded_sq == (4, 10)


def test_clip_positions_on_a_rectangular_grid():
    torch.manual_seed(0)
    clip = CLIPEncoder(image_size=[16, 64], patch_size=[16, 4], **STRIP_CLIP)
    assert clip.embeddings.grid == (1, 16) and clip.embeddings.position_embedding.num_embeddings == 17
    assert clip(torch.randn(2, 3, 16, 64)).shape == (2, 1, 16, 32)
    pos = clip.embeddings.positions(1, 16)
    assert torch.equal(pos, clip.embeddings.position_embedding.weight)  # its own grid: no resizing
    assert clip.embeddings.positions(2, 8).shape == (17, 32)  # another grid: resized from the 1 x 16 table
    assert CLIPEncoder(image_size=32, patch_size=8, **STRIP_CLIP).embeddings.grid == 4  # square: an int, as before


@pytest.mark.parametrize("size, patch, strides, grid", [
    ([32, 256], [32, 4], [[1, 2], 1], (1, 32)),   # a text strip: one row of full-height tokens
    ([32, 256], [32, 4], [1, 1], (1, 64)),
    ([64, 128], [16, 8], [2, [1, 2]], (2, 4)),     # two rows, rectangular patches and strides
])
def test_deepencoder_strips_and_layout_count(size, patch, strides, grid):
    from core.model import VisionLanguageModel
    from plugins.decoders.nanochat import GPT
    from plugins.projectors.linear import LinearProjector
    torch.manual_seed(0)
    enc = DeepEncoder(image_size=size, sam=dict(STRIP_SAM, patch_size=patch, downsample_strides=strides),
                      clip=STRIP_CLIP)
    assert enc.image_size == tuple(size) and enc.grid_size(*size) == grid
    assert enc.clip.embeddings.grid == (grid if grid[0] != grid[1] else grid[0])
    feats = enc(torch.randn(2, 3, *size))
    assert feats.shape == (2, *grid, enc.out_dim)
    decoder = GPT(sequence_len=128, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = VisionLanguageModel(enc, LinearProjector(enc.out_dim, 32), decoder, image_token_id=299)
    h, w = grid
    assert model.num_image_tokens() == h * (w + 1) + 1  # DeepSeek-OCR's layout: rows + newline, separator
    _, tokens = model.encode_images(torch.randn(2, 3, *size))
    assert tokens.shape == (2, h * (w + 1) + 1, 32)
    newline = model.image_newline.detach()
    for row in range(h):
        assert torch.equal(tokens[0, row * (w + 1) + w].detach(), newline)
    assert torch.equal(tokens[0, -1].detach(), model.view_separator.detach())


def test_deepencoder_square_pair_is_the_square_int():
    a = DeepEncoder(image_size=[32, 32], sam=dict(STRIP_SAM, patch_size=8, window_size=2,
                                                  downsample_strides=[1, 1]), clip=STRIP_CLIP)
    assert a.image_size == 32 and a.clip.embeddings.grid == 4


def test_crops_refuse_a_strip():
    from core.recipe import Crops
    from core.images import Tiling
    enc = DeepEncoder(image_size=[32, 256], sam=STRIP_SAM, clip=STRIP_CLIP)
    with pytest.raises(ConfigError, match="square"):
        Tiling.for_encoder(enc, Crops(tile_size=64, min_tiles=2, max_tiles=4))


# ---- preprocessing

def test_strip_preprocessing_letterboxes_to_the_aspect():
    assert image_hw(32) == (32, 32) and image_hw([32, 256]) == (32, 256)
    exact = Image.new("RGB", (256, 32), (255, 255, 255))
    assert preprocess(exact, [32, 256]).shape == (3, 32, 256) and preprocess(exact, [32, 256]).eq(1).all()
    # twice the size, same aspect: resized, no padding
    assert preprocess(Image.new("RGB", (512, 64), "white"), [32, 256]).eq(1).all()
    # a taller image (256 x 64 -> scale 0.5 -> 128 x 32): grey bands left and right, centred
    x = preprocess(Image.new("RGB", (256, 64), "white"), (32, 256))
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(x[:, :, :64], torch.full((3, 32, 64), grey))
    assert torch.allclose(x[:, :, 192:], torch.full((3, 32, 64), grey))
    assert x[:, :, 64:192].eq(1).all()
    pixels, tiles, grid = image_views(exact, [32, 256])
    assert pixels.shape == (3, 32, 256) and tiles is None and grid is None
    assert preprocess(Image.new("RGB", (64, 32), "white"), 32).shape == (3, 32, 32)  # the square path as before


# ---- synthetic_lines

@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    return SyntheticLines(cache_dir=str(tmp_path_factory.mktemp("lines")), fonts=FONTS, train_samples=60,
                          eval_samples=40, samples_per_shard=25, workers=1)


def stem(token):
    """A text token -> the vocabulary word it was made from (punctuation, 's and case removed)."""
    token = re.sub(r"^[\"'(]|[.,;:!?]$", "", token)
    token = re.sub(r"[\"')]$", "", token)
    token = re.sub(r"[.,;:!?]$", "", token)
    return token.removesuffix("'s").lower()


def test_vocabularies_disjoint_and_eval_uses_held_out_words(lines):
    train, held = set(lines.train_words), set(lines.heldout_words)
    assert not train & held and len(held) > 1000 and len(train) > 4 * len(held) - 10
    assert not {w.lower() for w in train} & {w.lower() for w in held}
    eval_texts = [s["text"] for s in eval_samples(lines.shards("eval"))]
    train_texts = [s["text"] for s in eval_samples(lines.shards("train"))]
    assert len(eval_texts) == 40 and len(train_texts) == 60
    held_lower, train_lower = {w.lower() for w in held}, {w.lower() for w in train}
    assert all(stem(t) in held_lower for text in eval_texts for t in text.split())
    assert all(stem(t) in train_lower for text in train_texts for t in text.split())


def test_text_looks_like_text(lines):
    texts = list(itertools.islice(lines.texts("train"), 60))
    chars = set("".join(texts)) - {" ", "\n"}
    assert chars <= set(CHARSET)
    assert any(c.isupper() for c in chars) and any(c.isdigit() for c in chars) and chars & set(".,;:!?")
    counts = [len(line.split(" ")) for t in texts for line in t.split("\n")]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    assert max(len(line) for t in texts for line in t.split("\n")) <= 35


def test_configured_glyphs_are_distinguishable(lines):
    for name, size in lines.fonts:
        assert confusable_pairs(load_font(name, size)) == []
    # Pillow's default font at 10 px draws I and l alike: such a size is refused, naming the pair
    assert ("l", "I") in {(a, b) for a, b, _ in confusable_pairs(load_font("default", 10))}
    registry = Registry()
    synthetic_lines.vlmkit_register(registry)
    with pytest.raises(ConfigError, match=r"data\.dataset: .*default at 10 px draws .*'l'/'I'"):
        registry.build("dataset", "synthetic_lines", where="data.dataset",
                       fonts=[{"name": "default", "sizes": [10, 10]}])


def test_text_fits_inside_the_image_and_is_jittered(lines):
    rng = random.Random(1)
    vocab = ([w for w in lines.train_words if not w.isdigit()], [w for w in lines.train_words if w.isdigit()])
    xs, ys = [], []
    for _ in range(60):
        text, layout = lines.page(rng, vocab)
        image = np.asarray(lines.draw(dict(layout, ink=0, paper=255)))
        # the same text drawn on a canvas with 40 px of room on every side: no ink may be lost in the image
        font = load_font(*layout["font"])
        big = Image.new("L", (lines.width + 80, lines.height + 80), 255)
        for i, line in enumerate(layout["lines"]):
            left = min(font.getbbox(line)[0], 0)
            ImageDraw.Draw(big).text((40 + layout["x"] - left, 40 + layout["y"] + i * layout["spacing"]), line,
                                     font=font, fill=0)
        assert (255 - image.astype(int)).sum() == (255 - np.asarray(big).astype(int)).sum(), text
        ink = np.argwhere(image < 128)
        xs.append(ink[:, 1].min())
        ys.append(ink[:, 0].min())
    assert max(xs) - min(xs) > 40 and max(ys) - min(ys) >= 4  # not aligned to a token grid


def test_a_few_lines_per_image(tmp_path):
    ds = SyntheticLines(cache_dir=str(tmp_path), image_size=[96, 256], fonts=FONTS, lines=[1, 3],
                        train_samples=10, eval_samples=10, workers=1)
    texts = list(itertools.islice(ds.texts("train"), 40))
    assert {t.count("\n") + 1 for t in texts} == {1, 2, 3}


def test_shards_cached_by_arguments(lines, tmp_path):
    paths = lines.shards("train")
    assert len(paths) == 3 and lines.shards("train") == paths
    again = SyntheticLines(cache_dir=str(lines.cache_dir), fonts=FONTS, train_samples=60, eval_samples=40,
                           samples_per_shard=25, workers=2)  # workers do not change the pixels
    assert again.cache_key() == lines.cache_key()
    two = SyntheticLines(cache_dir=str(tmp_path), fonts=FONTS, train_samples=60, eval_samples=40,
                         samples_per_shard=25, workers=2)  # rendered by two processes: the same samples
    assert [s["text"] for s in eval_samples(two.shards("train"))] == [s["text"] for s in eval_samples(paths)]
    first = eval_samples(paths, limit=1)[0]
    assert first["image"].size == (256, 32)
    assert SyntheticLines(cache_dir=str(tmp_path), fonts=FONTS, seed=1).cache_key() != lines.cache_key()


# ---- ctc on a strip: several sources, blank bias

def strip_model():
    from core.model import VisionLanguageModel
    from plugins.decoders.nanochat import GPT
    from plugins.projectors.linear import LinearProjector
    from plugins.tokenizers.bytes import ByteTokenizer
    torch.manual_seed(0)
    tok = ByteTokenizer()
    enc = DeepEncoder(image_size=[32, 256], sam=STRIP_SAM, clip=STRIP_CLIP)
    decoder = GPT(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    return VisionLanguageModel(enc, LinearProjector(enc.out_dim, 32), decoder, tok.image_id), tok


def test_ctc_on_the_neck_and_the_tokens():
    from plugins.regularisers.ctc import CTCRegulariser
    model, tok = strip_model()
    reg = CTCRegulariser(model, tok, frames_per_token=[2, 3], source=["encoder.sam.neck", "vision_tokens"],
                         blank_bias=5.0)
    assert reg.terms == ["ctc_neck", "ctc"] and len(reg.heads) == 2
    assert reg.heads[0].in_features == 16 and reg.heads[1].in_features == 32  # the neck's channels, n_embd
    n = model.num_image_tokens()
    ids = torch.tensor([[tok.bos_id] + [tok.image_id] * n] * 2)
    out = model(torch.randn(2, 3, 32, 256), ids)
    batch = {"texts": ["Hello, world", "(42)"]}
    losses = reg.vlmkit_regulariser_loss(model, batch, out)
    assert set(losses) == {"ctc_neck", "ctc"} and all(torch.isfinite(v) for v in losses.values())
    # the blank starts ahead: every frame's first choice is the blank
    frames = model.encoder.sam.forward_neck(torch.randn(2, 3, 32, 256)).flatten(2).transpose(1, 2)
    assert (reg.heads[0](frames).view(2, -1, tok.vocab_size + 1).argmax(-1) == reg.blank).all()
    sum(losses.values()).backward()
    assert model.encoder.sam.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.encoder.clip.transformer.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    single = CTCRegulariser(model, tok)  # the default: one head on the vision tokens, keys as before
    assert single.terms == ["ctc"] and set(single.state_dict()) == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="no module"):
        CTCRegulariser(model, tok, source="encoder.sam.nek")
    with pytest.raises(ValueError, match="frames_per_token"):
        CTCRegulariser(model, tok, frames_per_token=[2], source=["encoder.sam.neck", "vision_tokens"])
