"""Contrastive regulariser against vision-feature collapse (DESIGN.md, lessons).

InfoNCE within the batch over each image's features, mean-pooled over the grid:
if every image got the same features, no image could be told apart and the loss
would sit at log(batch size), so minimising it keeps different images different,
which is what the collapse monitor (core/monitor.py) measures. ``mode`` picks
what is contrasted (symmetric loss, temperature from the recipe):

* ``heads``: two views of the same image must pick each other out of the batch.
  The views are the encoder's first two ``feature_parts()`` (the DeepEncoder:
  CLIP and SAM channels of the same cell) or, for an encoder that names no parts,
  its output and the projector's tokens; small linear heads map both into a
  shared space (trained with the model, used only in training). The heads'
  biases can cancel an offset all images share, so the loss is blind to it.
* ``pooled``: no heads. At every point the monitor scores (each feature part,
  or the whole encoder output, and the projector's tokens averaged as the
  decoder gets them, newline and separator included) each image's pooled
  vector must pick itself out of the batch by cosine similarity. The positive
  logit is fixed at 1/temperature, so the loss falls only as the other images'
  cosines fall, common offset included. Losses of the points are averaged.

``variance`` > 0 adds VICReg's variance hinge on the same raw pooled views:
each channel's std over the batch must reach 1. At the tiny scale, collapse is
a shared offset growing at every layer until the LayerNorms see nothing else;
a cosine's gradient shrinks as that offset grows, the hinge's (absolute units)
does not. What each mode does on recipes/collapse.yaml: docs/results.md, "Collapse".
"""
import torch
import torch.nn.functional as F
from torch import nn

from core import ConfigError, hookimpl

MODES = ("heads", "pooled")


class ContrastiveRegulariser(nn.Module):
    def __init__(self, model, weight=0.1, temperature=0.1, dim=64, mode="heads", variance=0.0):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"contrastive: mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.weight, self.temperature, self.mode, self.variance = weight, temperature, mode, variance
        parts = getattr(model.encoder, "feature_parts", lambda: {})()
        if mode == "pooled":  # the monitor's points: every named part (or the whole output), then the projector
            self.cuts = list(parts.values()) or [slice(None)]
            return
        self.cuts = list(parts.values())[:2] if len(parts) >= 2 else None
        width = model.encoder.out_dim
        dims = [len(range(width)[cut]) for cut in self.cuts] if self.cuts else [width, model.decoder.n_embd]
        self.head_a, self.head_b = nn.Linear(dims[0], dim), nn.Linear(dims[1], dim)

    def views(self, outputs):
        pooled = outputs["vision_features"].flatten(1, 2).mean(dim=1)  # (B, C) over the grid
        if self.mode == "pooled":
            return [pooled[:, cut] for cut in self.cuts] + [outputs["vision_tokens"].mean(dim=1)]
        if self.cuts:
            return pooled[:, self.cuts[0]], pooled[:, self.cuts[1]]
        return pooled, outputs["vision_tokens"].mean(dim=1)

    def info_nce(self, a, b):
        """Symmetric InfoNCE: row i of ``a`` must pick row i of ``b`` (unit vectors) and vice versa."""
        logits = a @ b.T / self.temperature
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        if outputs["vision_features"] is None or outputs["vision_features"].shape[0] < 2:
            return None  # text-only, or nothing to contrast with
        views = [v.float() for v in self.views(outputs)]
        if self.mode == "pooled":
            units = [F.normalize(v, dim=-1) for v in views]
            loss = sum(self.info_nce(u, u) for u in units) / len(units)
        else:
            loss = self.info_nce(F.normalize(self.head_a(views[0]), dim=-1), F.normalize(self.head_b(views[1]), dim=-1))
        if self.variance:  # VICReg's hinge: each channel's std over the batch at least 1, in absolute units
            hinge = sum(F.relu(1 - (v.var(dim=0) + 1e-4).sqrt()).mean() for v in views) / len(views)
            loss = loss + self.variance * hinge
        return {"contrastive": self.weight * loss}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "contrastive", ContrastiveRegulariser)
