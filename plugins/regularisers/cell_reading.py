"""Cell reading: supervise each vision token with the character in its cell.

For layouts that put one character per vision token and fill the grid in
reading order, row by row (the synthetic dataset's ``layout: grid`` with
``wrap: chars``), the k-th vision token (row-major, newline slots skipped)
shows the answer's k-th token; cells after the answer are empty. A linear head
on the decoder-side vision tokens is trained to say so.

Why: the decoder cannot learn where to look until the vision tokens say what
is there, and the vision tokens get no reading signal until the decoder looks:
with the next-token loss alone (and with CTC, whose alignment has a plateau
of its own) a tiny model sat at the letter-frequency loss for 500+ steps
(docs/results.md, "How the tiny default learns"). This loss needs no alignment search.

Needs a tokenizer with one token per character (the bytes tokenizer on ASCII
text); a sample whose answer is longer than the grid is supervised on the
cells it has.
"""
import torch
import torch.nn.functional as F
from torch import nn

from core import hookimpl
from core.images import image_hw


class CellReading(nn.Module):
    def __init__(self, model, tokenizer, weight=1.0):
        super().__init__()
        self.weight, self.tokenizer = weight, tokenizer
        self.empty = tokenizer.vocab_size  # the class of a cell after the answer's end
        self.grid = model.encoder.grid_size(*image_hw(model.image_size))
        self.head = nn.Linear(model.decoder.n_embd, tokenizer.vocab_size + 1)

    def targets(self, texts, device):
        h, w = self.grid
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(text)[:h * w]
            rows.append(ids + [self.empty] * (h * w - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=device)

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        if outputs["vision_tokens"] is None:  # a text-only batch
            return None
        h, w = self.grid
        tokens = outputs["vision_tokens"]
        cells = tokens[:, :h * (w + 1)].reshape(tokens.shape[0], h, w + 1, -1)[:, :, :w]  # drop newline slots
        logits = self.head(cells.reshape(tokens.shape[0], h * w, -1)).float()
        loss = F.cross_entropy(logits.transpose(1, 2), self.targets(batch["texts"], tokens.device))
        return {"cells": self.weight * loss}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "cell_reading", CellReading)
