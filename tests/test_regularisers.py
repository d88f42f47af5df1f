"""Regularisers: what their losses reward, and that they train what they should."""
import math

import pytest
import torch

from core.errors import ConfigError
from core.monitor import collapse_scores
from plugins.regularisers.cell_reading import CellReading
from plugins.regularisers.contrastive import ContrastiveRegulariser
from tests.helpers import tiny


def test_contrastive_rewards_distinct_images(registry):
    model, _ = tiny(registry)
    reg = ContrastiveRegulariser(model, weight=1.0)
    b, h, w = 6, 4, 4
    clip_dim = model.encoder.clip.out_dim
    distinct = torch.randn(b, h, w, model.encoder.out_dim)
    collapsed = distinct[:1].expand(b, -1, -1, -1)
    tokens = torch.zeros(b, 21, 32)
    loss_collapsed = reg.vlmkit_regulariser_loss(model, {}, {"vision_features": collapsed, "vision_tokens": tokens})
    # identical images cannot be told apart: the loss is exactly log(batch)
    assert loss_collapsed["contrastive"].item() == pytest.approx(math.log(b), abs=1e-5)
    # with the heads aligned on distinct features, the right image wins and the loss drops below log(batch)
    with torch.no_grad():
        reg.head_a.weight.zero_()
        reg.head_b.weight.zero_()
        reg.head_a.weight[:, :8] = torch.eye(64, 8)[:, :8] * 1.0
        reg.head_b.weight[:, :8] = torch.eye(64, 8)[:, :8] * 1.0
    same = torch.randn(b, 1, 1, 8).expand(b, h, w, 8)  # both views carry the same per-image code
    features = torch.zeros(b, h, w, model.encoder.out_dim)
    features[..., :8] = same
    features[..., clip_dim:clip_dim + 8] = same
    loss_distinct = reg.vlmkit_regulariser_loss(model, {}, {"vision_features": features, "vision_tokens": tokens})
    assert loss_distinct["contrastive"].item() < 0.5 * math.log(b)


def test_contrastive_trains_the_encoder_and_skips_text_batches(registry):
    model, tok = tiny(registry)
    reg = ContrastiveRegulariser(model)
    out = model(torch.randn(4, 3, 32, 32), torch.tensor([[tok.bos_id] + [tok.image_id] * 21] * 4))
    reg.vlmkit_regulariser_loss(model, {}, out)["contrastive"].backward()
    assert model.encoder.sam.patch_embed.proj.weight.grad.abs().sum() > 0
    assert reg.vlmkit_regulariser_loss(model, {}, {"vision_features": None, "vision_tokens": None}) is None


def test_cell_reading_targets_follow_the_cells(registry):
    model, tok = tiny(registry)
    reg = CellReading(model, tok)
    targets = reg.targets(["ab cd"], "cpu")
    assert targets.shape == (1, 16)
    assert targets[0, :5].tolist() == tok.encode("ab cd") and (targets[0, 5:] == tok.vocab_size).all()


def _pages(b, size=32, seed=0):
    """White pages with a few dark 8 px cells each: like the synthetic text, nearly the same image to a fresh
    encoder (pooled cosine ~0.9)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.ones(b, 3, size, size)
    for i in range(b):
        for cell in torch.randperm(16, generator=g)[:5].tolist():
            r, c = divmod(cell, 4)
            pixels[i, :, r * 8 + 2:r * 8 + 6, c * 8 + 2:c * 8 + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return pixels


def test_pooled_mode_lowers_the_monitored_similarity(registry):
    model, _ = tiny(registry)
    reg = ContrastiveRegulariser(model, weight=1.0, temperature=0.5, mode="pooled", variance=1.0)
    assert not list(reg.parameters())  # no heads: the loss sees the features the monitor scores
    pixels = _pages(8)
    before = collapse_scores(model, pixels)
    assert set(before) == {"clip", "sam", "projector"} and min(before.values()) > 0.8
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: 2 threads on a busy 2-core machine make this loop ~10x slower
    try:
        for _ in range(15):
            features, tokens = model.encode_images(pixels)
            loss = reg.vlmkit_regulariser_loss(model, {}, {"vision_features": features, "vision_tokens": tokens})
            optimizer.zero_grad()
            loss["contrastive"].backward()
            optimizer.step()
            losses.append(loss["contrastive"].item())
    finally:
        torch.set_num_threads(threads)
    after = collapse_scores(model, pixels)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(after[k] < 0.5 for k in after), (before, after)


def test_variance_term_keeps_pushing_when_a_common_offset_grows(registry):
    # Collapse at the tiny scale is a shared offset growing until it drowns the image (docs/results.md, "Collapse"):
    # the cosine InfoNCE's gradient shrinks as 1 / offset, the variance hinge's (absolute units) does not.
    model, _ = tiny(registry)
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(1, 1, 1, model.encoder.out_dim, generator=g)
    spread = 0.5 * torch.randn(6, 4, 4, model.encoder.out_dim, generator=g)

    def grad(variance, scale):
        reg = ContrastiveRegulariser(model, weight=1.0, temperature=0.5, mode="pooled", variance=variance)
        features = (scale * offset + spread).requires_grad_()
        tokens = features.flatten(1, 2)[..., :32]
        reg.vlmkit_regulariser_loss(model, {}, {"vision_features": features, "vision_tokens": tokens})[
            "contrastive"].backward()
        return features.grad.norm().item()
    assert grad(0.0, 100.0) < 0.1 * grad(0.0, 1.0)
    assert grad(1.0, 100.0) > 0.5 * grad(1.0, 1.0)


def test_contrastive_mode_is_checked(registry):
    model, _ = tiny(registry)
    with pytest.raises(ConfigError, match="mode must be one of heads, pooled"):
        ContrastiveRegulariser(model, mode="raw")
