"""Contrastive regulariser against vision-feature collapse (DESIGN.md, lessons).

InfoNCE within the batch: each image's features, mean-pooled over the grid and
seen from two points of the vision path, must pick that image out of the
batch. The two views are the encoder's first two ``feature_parts()`` (the
DeepEncoder: CLIP and SAM channels of the same cell) or, for an encoder that
names no parts, its output and the projector's tokens. If every image got the
same features, no image could be told apart and the loss would sit at
log(batch size), so minimising it keeps different images different, which is
what the collapse monitor (core/monitor.py) measures. Small linear heads map
both views into a shared space; they are trained with the model and used only
in training. Symmetric loss (view a -> b and b -> a), temperature from the recipe.
"""
import torch
import torch.nn.functional as F
from torch import nn

from core import hookimpl


class ContrastiveRegulariser(nn.Module):
    def __init__(self, model, weight=0.1, temperature=0.1, dim=64):
        super().__init__()
        self.weight, self.temperature = weight, temperature
        parts = getattr(model.encoder, "feature_parts", lambda: {})()
        self.cuts = list(parts.values())[:2] if len(parts) >= 2 else None
        width = model.encoder.out_dim
        dims = [len(range(width)[cut]) for cut in self.cuts] if self.cuts else [width, model.decoder.n_embd]
        self.head_a, self.head_b = nn.Linear(dims[0], dim), nn.Linear(dims[1], dim)

    def views(self, outputs):
        pooled = outputs["vision_features"].flatten(1, 2).mean(dim=1)  # (B, C) over the grid
        if self.cuts:
            return pooled[:, self.cuts[0]], pooled[:, self.cuts[1]]
        return pooled, outputs["vision_tokens"].mean(dim=1)

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        if outputs["vision_features"] is None or outputs["vision_features"].shape[0] < 2:
            return None  # text-only, or nothing to contrast with
        a, b = self.views(outputs)
        a = F.normalize(self.head_a(a).float(), dim=-1)
        b = F.normalize(self.head_b(b).float(), dim=-1)
        logits = a @ b.T / self.temperature
        labels = torch.arange(a.shape[0], device=a.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"contrastive": self.weight * loss}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "contrastive", ContrastiveRegulariser)
