"""Batched generation: vision embeddings computed once, then a KV-cached decode loop.

DESIGN.md lessons: the vision tower runs once per image per call (not per
token) and ``<|image|>`` is masked out of the logits. ``use_cache=False`` is
the naive reference that re-runs the decoder over the whole sequence per token.

``python -m core.generate CHECKPOINT IMAGE ...`` reads images with a saved
checkpoint; the command line lives in ``core/ocr.py`` (usage there).
"""
import sys

import torch

from core import data
from core.tiles import upright_size


def _pick(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        values, _ = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
        logits = logits.masked_fill(logits < values[:, -1:], float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def image_prompt_ids(model, tokenizer, prompt, grid=None):
    """bos + ``prompt`` with the placeholders of an image with crop grid ``grid`` (None: global view only)."""
    return data.prompt_prefix(tokenizer, prompt, model.num_image_tokens(grid), max_len=10 ** 9)


def image_grid(model, image):
    """The crop grid the model's tiling gives ``image`` (read from its header), or None."""
    return model.tiling.grid(*upright_size(image)) if model.tiling is not None else None


def grid_batches(grids, batch_size):
    """Lists of at most ``batch_size`` indices whose images share a crop grid, so one generate call has
    one prompt length; groups in the order their grid first appears, indices in order within each."""
    groups = {}
    for i, grid in enumerate(grids):
        groups.setdefault(None if grid is None else tuple(grid), []).append(i)
    return [ids[k:k + batch_size] for ids in groups.values() for k in range(0, len(ids), batch_size)]


def view_batch(model, images, grid, device):
    """PIL images that share crop ``grid`` -> generate's (pixel_values, tiles, grids) on ``device``."""
    views = [data.image_views(image, model.image_size, model.tiling) for image in images]
    if any(v[2] != grid for v in views):
        raise ValueError(f"images of one batch must share the crop grid {grid}; got {[v[2] for v in views]}")
    tiles = torch.cat([v[1] for v in views]).to(device) if grid is not None else None
    return torch.stack([v[0] for v in views]).to(device), tiles, [grid] * len(views)


@torch.no_grad()
def generate(model, tokenizer, pixel_values, prompt_ids, max_new_tokens, use_cache=True,
             temperature=0.0, top_k=None, seed=None, tiles=None, grids=None):
    """Decode up to ``max_new_tokens`` per image; returns a list of token-id lists (stop token excluded).

    ``prompt_ids`` is one prompt (with its <|image|> placeholders) shared by the batch, so with crops
    every image of the batch has the same grid (``grid_batches``); ``tiles``/``grids`` as in
    VisionLanguageModel.forward.
    """
    decoder = model.decoder
    batch = pixel_values.shape[0]
    generator = torch.Generator(device=pixel_values.device).manual_seed(seed) if seed is not None else None
    _, _, vision_tokens = model.encode_views(pixel_values, tiles, grids)
    ids = torch.tensor(prompt_ids, device=pixel_values.device).unsqueeze(0).expand(batch, -1)
    embeds = model.merge(ids, vision_tokens)
    stop = torch.tensor([tokenizer.eos_id, tokenizer.bos_id], device=ids.device)
    cache = decoder.make_kv_cache(batch, embeds.shape[1] + max_new_tokens) if use_cache else None
    logits = decoder(embeds, kv_cache=cache)[:, -1]
    picked = []
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits[:, model.image_token_id] = float("-inf")
        token = _pick(logits, temperature, top_k, generator).masked_fill(done, tokenizer.eos_id)
        picked.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        step = decoder.embed(token[:, None])
        if use_cache:
            logits = decoder(step, kv_cache=cache)[:, -1]
        else:
            embeds = torch.cat([embeds, step], dim=1)
            logits = decoder(embeds)[:, -1]
    results = []
    for row in torch.stack(picked, dim=1).tolist() if picked else [[]] * batch:
        cut = next((i for i, t in enumerate(row) if t in (tokenizer.eos_id, tokenizer.bos_id)), len(row))
        results.append(row[:cut])
    return results


if __name__ == "__main__":
    from core.ocr import main
    sys.exit(main())
