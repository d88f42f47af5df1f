"""Regularisers: what their losses reward, and that they train what they should."""
import math

import pytest
import torch

from plugins.regularisers.cell_reading import CellReading
from plugins.regularisers.contrastive import ContrastiveRegulariser
from tests.test_model import registry, tiny  # noqa: F401  (fixture)


def test_contrastive_rewards_distinct_images(registry):  # noqa: F811
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
        reg.head_a.weight.zero_(); reg.head_b.weight.zero_()
        reg.head_a.weight[:, :8] = torch.eye(64, 8)[:, :8] * 1.0
        reg.head_b.weight[:, :8] = torch.eye(64, 8)[:, :8] * 1.0
    same = torch.randn(b, 1, 1, 8).expand(b, h, w, 8)  # both views carry the same per-image code
    features = torch.zeros(b, h, w, model.encoder.out_dim)
    features[..., :8] = same
    features[..., clip_dim:clip_dim + 8] = same
    loss_distinct = reg.vlmkit_regulariser_loss(model, {}, {"vision_features": features, "vision_tokens": tokens})
    assert loss_distinct["contrastive"].item() < 0.5 * math.log(b)


def test_contrastive_trains_the_encoder_and_skips_text_batches(registry):  # noqa: F811
    model, tok = tiny(registry)
    reg = ContrastiveRegulariser(model)
    out = model(torch.randn(4, 3, 32, 32), torch.tensor([[tok.bos_id] + [tok.image_id] * 21] * 4))
    reg.vlmkit_regulariser_loss(model, {}, out)["contrastive"].backward()
    assert model.encoder.sam.patch_embed.proj.weight.grad.abs().sum() > 0
    assert reg.vlmkit_regulariser_loss(model, {}, {"vision_features": None, "vision_tokens": None}) is None


def test_cell_reading_targets_follow_the_cells(registry):  # noqa: F811
    model, tok = tiny(registry)
    reg = CellReading(model, tok)
    targets = reg.targets(["ab cd"], "cpu")
    assert targets.shape == (1, 16)
    assert targets[0, :5].tolist() == tok.encode("ab cd") and (targets[0, 5:] == tok.vocab_size).all()
