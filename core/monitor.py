"""Collapse monitor: are different images still different to the vision tower?

DESIGN.md: in the original project the pairwise cosine similarity of different
images' features went from ~0.6 to 0.9998 during stage 1, and the model then
ignored the image. The monitor measures it on a fixed probe set (held-out
images plus three that share nothing: uniform noise, all white, all black):
each image's features are mean-pooled over the grid, and the score is the mean
cosine similarity over all pairs of different images. 1.0 means collapsed.

It reports one number per point of the vision path: each part the encoder
names in ``feature_parts()`` (the DeepEncoder: ``clip`` and ``sam``, slices of
its output channels) and ``projector`` (the tokens the decoder sees).
"""
import torch
import torch.nn.functional as F
from PIL import Image

from core.images import image_hw, preprocess
from core.model import evaluating


def probe_images(samples, image_size, count=16, seed=0):
    """The first ``count`` held-out images plus noise, white and black, preprocessed: (N, 3, H, W)."""
    images = [s["image"] for s in samples[:count]]
    height, width = image_hw(image_size)
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    images += [Image.fromarray(noise), Image.new("RGB", (width, height), "white"),
               Image.new("RGB", (width, height), "black")]
    return torch.stack([preprocess(im, image_size) for im in images])


def mean_pairwise_cosine(pooled):
    """Mean cosine similarity over all pairs i != j of the rows of ``pooled`` (N, C)."""
    n = pooled.shape[0]
    unit = F.normalize(pooled.float(), dim=-1)
    sims = unit @ unit.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def collapse_scores(model, pixels):
    """{part: mean pairwise cosine similarity} for the encoder's named parts and the projector."""
    with evaluating(model):
        features, tokens = model.encode_images(pixels)
    pooled = features.flatten(1, 2).mean(dim=1)  # (N, C) over the h x w grid
    parts = getattr(model.encoder, "feature_parts", lambda: {"encoder": slice(None)})()
    scores = {name: mean_pairwise_cosine(pooled[:, cut]) for name, cut in parts.items()}
    scores["projector"] = mean_pairwise_cosine(tokens.mean(dim=1))
    return scores
