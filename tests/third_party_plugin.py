"""A third-party plugin written only from docs/plugins.md and core/contracts.py: one minimal
component of every kind, registered under names of its own. tests/test_contracts.py builds each one
into a recipe (or the shard writer, or the metrics command) in place of the built-in.

It imports nothing from vlmkit but the documented ``hookimpl``, ``ConfigError`` and ``core.sources``
(Item and Skip, for a source), as a plugin in another package would.
"""
import json
import os

import torch
from torch import nn

from core import hookimpl
from core.sources import Item, Skip


class PoolEncoder(nn.Module):
    """(B, 3, H, W) -> (B, H/8, W/8, 16): a linear map of each 8x8 cell. ``image_size`` an int or [h, w]."""

    def __init__(self, image_size=32, out_dim=16):
        super().__init__()
        self.image_size, self.out_dim = image_size, out_dim
        self.proj = nn.Linear(3 * 64, out_dim)

    def grid_size(self, height, width):
        return height // 8, width // 8

    def forward(self, pixel_values):
        b, c, h, w = pixel_values.shape
        cells = pixel_values.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, h/8, w/8, 8, 8)
        cells = cells.permute(0, 2, 3, 1, 4, 5).reshape(b, h // 8, w // 8, c * 64)
        return self.proj(cells)


class ScaleProjector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, features):
        return self.linear(features)


class Cache:
    """Everything seen so far: the decoder recomputes its running mean from it."""

    def __init__(self):
        self.seen = None


class MeanDecoder(nn.Module):
    """Each position predicts from the running mean of the embeddings up to it (causal, no attention)."""

    def __init__(self, vocab_size, n_embd=24):
        super().__init__()
        self.n_embd = n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.head = nn.Linear(n_embd, vocab_size)

    def embed(self, ids):
        return self.wte(ids)

    def make_kv_cache(self, batch_size, seq_len):
        return Cache()

    def forward(self, embeds, targets=None, kv_cache=None):
        new = embeds.shape[1]
        if kv_cache is not None:
            kv_cache.seen = embeds if kv_cache.seen is None else torch.cat([kv_cache.seen, embeds], dim=1)
            embeds = kv_cache.seen
        steps = torch.arange(1, embeds.shape[1] + 1, device=embeds.device).view(1, -1, 1)
        logits = self.head(embeds.cumsum(dim=1) / steps)[:, -new:]  # the positions given in this call
        if targets is None:
            return logits.float()
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


class LetterTokenizer:
    """Lower-case letters and space, then the special tokens."""
    LETTERS = " abcdefghijklmnopqrstuvwxyz\n.:"

    def __init__(self):
        n = len(self.LETTERS)
        self.bos_id, self.eos_id, self.image_id, self.pad_id = n, n + 1, n + 2, n + 3
        self.vocab_size = n + 4

    def encode(self, text):
        return [self.LETTERS.index(c) for c in text.lower() if c in self.LETTERS]

    def decode(self, ids):
        return "".join(self.LETTERS[i] for i in ids if i < len(self.LETTERS))


class FolderDataset:
    """Shards a test wrote, under ``folder/{split}-*.tar``."""

    def __init__(self, folder):
        self.folder = folder

    def shards(self, split):
        return sorted(os.path.join(self.folder, f) for f in os.listdir(self.folder)
                      if f.startswith(split) and f.endswith(".tar"))


class WordPairs:
    """A source: a JSON object {image path: text}; an empty text is a skip."""
    needs = "file"

    def read(self, source, images_root=None):
        with open(source, encoding="utf-8") as f:
            pairs = json.load(f)
        for i, (image, text) in enumerate(pairs.items()):
            where = f"{source} entry {i}"
            if not text:
                yield Skip("empty_text", where)
            else:
                base = images_root or os.path.dirname(source)
                yield Item(os.path.splitext(image)[0], where, image=os.path.join(base, image), text=text)


class LengthMetric:
    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        return {"length_gap": float(abs(len(pred) - len(gt)))}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        values = [r["length_gap"] for r in rows]
        return {"length_gap": sum(values) / len(values) if values else None}


class TsvResults:
    """A metric input: one ``id<TAB>prediction<TAB>truth`` per line."""
    needs_gt = False

    def read(self, pred_path, gt_path=None):
        with open(pred_path, encoding="utf-8") as f:
            return [(*line.rstrip("\n").split("\t"), None) for line in f if line.strip()]


class ActivationPenalty(nn.Module):
    """A regulariser with a parameter of its own: trained with the model, saved with the stage."""

    def __init__(self, model, tokenizer, weight=0.01):
        super().__init__()
        self.weight = weight
        self.scale = nn.Parameter(torch.ones(()))

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        if outputs["vision_tokens"] is None:
            return None
        return {"penalty": self.weight * (self.scale * outputs["vision_tokens"]).pow(2).mean()}


class FreezeProjector:
    @hookimpl
    def vlmkit_freeze(self, model, stage):
        for name, p in model.named_parameters():
            if name.startswith("projector."):
                p.requires_grad_(False)
        return {}


class Scaled(nn.Module):
    """A linear layer whose outputs are scaled by a learnt vector (ones at first: the layer as it was)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(base.out_features))

    def forward(self, x):
        return self.base(x) * self.scale


class OutputScale:
    """An adapter: every linear layer named in ``layers`` gets a learnt output scale; merging multiplies it in."""

    def __init__(self, layers=("projector.linear",)):
        self.layers = list(layers)

    @hookimpl
    def vlmkit_adapter_attach(self, model, frozen):
        for name in self.layers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Scaled(model.get_submodule(name)))

    @hookimpl
    def vlmkit_adapter_merge(self, model):
        for name in self.layers:
            parent, _, child = name.rpartition(".")
            wrapped = model.get_submodule(name)
            with torch.no_grad():
                wrapped.base.weight.mul_(wrapped.scale[:, None])
            setattr(model.get_submodule(parent), child, wrapped.base)


class ListLogger:
    """Writes every record's event name to ``run_dir/events.txt``."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "events.txt")

    @hookimpl
    def vlmkit_log(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(record["event"] + "\n")


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "pool", PoolEncoder)
    registry.add("projector", "scale", ScaleProjector)
    registry.add("decoder", "mean", MeanDecoder)
    registry.add("tokenizer", "letters", LetterTokenizer)
    registry.add("dataset", "folder_tars", FolderDataset)
    registry.add("source", "word_pairs", WordPairs)
    registry.add("metric", "length_gap", LengthMetric)
    registry.add("metric_input", "tsv", TsvResults)
    registry.add("regulariser", "penalty", ActivationPenalty)
    registry.add("freeze", "projector_off", FreezeProjector)
    registry.add("adapter", "output_scale", OutputScale)
    registry.add("logger", "event_list", ListLogger)
