"""The collapse monitor's number: mean cosine similarity over pairs of different images."""
import pytest
import torch

from core.monitor import collapse_scores, mean_pairwise_cosine, probe_images
from tests.helpers import tiny


def test_mean_pairwise_cosine_by_hand():
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)  # orthogonal: all pairs 0
    assert mean_pairwise_cosine(torch.ones(4, 5)) == pytest.approx(1.0)  # identical: collapsed
    # pairs of [1,0], [1,1]/sqrt2, [0,1]: cos 1/sqrt2, 0, 1/sqrt2 -> mean sqrt2/3
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])) == pytest.approx(2 ** 0.5 / 3)


def test_collapse_scores_per_part_and_a_collapsed_encoder(registry):
    model, _ = tiny(registry)
    from PIL import Image
    samples = [{"image": Image.new("RGB", (32, 32), (i * 40, 0, 255 - i * 40))} for i in range(4)]
    pixels = probe_images(samples, model.image_size)
    assert pixels.shape == (4 + 3, 3, 32, 32)
    scores = collapse_scores(model, pixels)
    assert set(scores) == {"clip", "sam", "projector"} and all(-1 <= v <= 1 for v in scores.values())
    with torch.no_grad():  # an encoder that ignores its input: every image looks the same
        model.encoder.sam.patch_embed.proj.weight.zero_()
    assert collapse_scores(model, pixels)["sam"] == pytest.approx(1.0, abs=1e-5)
