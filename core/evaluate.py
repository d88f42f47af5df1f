"""Evaluation: greedy generation on held-out samples, per-sample loss, metric plugins."""
import time

import torch

from core import data
from core.generate import generate
from core.metrics import score_pairs


def _prompt_ids(model, tokenizer, prompt):
    ids, _ = data.encode_sample(tokenizer, "", prompt, model.num_image_tokens(), max_len=10 ** 9)
    return ids  # the inputs without the answer: bos + prompt with placeholders


def _pixels(samples, image_size, device):
    return torch.stack([data.preprocess(s["image"], image_size) for s in samples]).to(device)


@torch.no_grad()
def decode_samples(model, tokenizer, samples, prompt, device, max_new_tokens=64, batch_size=32):
    """Greedy OCR of each sample's image; returns the decoded strings."""
    was_training = model.training
    model.eval()
    prompt_ids = _prompt_ids(model, tokenizer, prompt)
    texts = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        for ids in generate(model, tokenizer, _pixels(chunk, model.image_size, device), prompt_ids, max_new_tokens):
            texts.append(tokenizer.decode(ids))
    model.train(was_training)
    return texts


@torch.no_grad()
def sample_losses(model, tokenizer, samples, prompt, device, max_len, batch_size=32):
    """Teacher-forced next-token loss of each sample's answer (mean over its tokens)."""
    losses = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        encoded = [data.encode_sample(tokenizer, s["text"], prompt, model.num_image_tokens(), max_len) for s in chunk]
        batch = data.collate([{"pixel_values": data.preprocess(s["image"], model.image_size), "input_ids": ids,
                               "targets": tg, "text": s["text"], "key": s["key"]}
                              for s, (ids, tg) in zip(chunk, encoded)], pad_id=tokenizer.pad_id)
        out = model(batch["pixel_values"].to(device), batch["input_ids"].to(device))
        logits, targets = out["logits"].float(), batch["targets"].to(device)
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1,
                                                      reduction="none")
        counts = (targets != -1).sum(dim=1).clamp(min=1)
        losses.extend((per_token.sum(dim=1) / counts).tolist())
    return losses


def evaluate(model, tokenizer, samples, metrics, prompt, device, max_new_tokens, max_len, batch_size=32):
    """Rows (id, gt, pred, loss, metric values...) and the aggregate dict (metrics + samples/s)."""
    model.eval()
    start = time.perf_counter()
    preds = decode_samples(model, tokenizer, samples, prompt, device, max_new_tokens, batch_size)
    seconds = time.perf_counter() - start
    losses = sample_losses(model, tokenizer, samples, prompt, device, max_len, batch_size)
    rows, aggregate = score_pairs(metrics, [(s["key"], p, s["text"]) for s, p in zip(samples, preds)])
    for row, sample, pred, loss in zip(rows, samples, preds, losses):
        row.update({"gt": sample["text"], "pred": pred, "loss": round(loss, 4)})
    aggregate.update({"samples": len(samples), "mean_loss": sum(losses) / max(1, len(losses)),
                      "samples_per_s": len(samples) / seconds if seconds else None})
    return rows, aggregate


def format_summary(aggregate):
    width = max(len(k) for k in aggregate)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in aggregate.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def format_samples(rows, limit=8):
    """Per-sample lines for the terminal: exact mark, id, loss, word overlap, NED, gt -> pred."""
    lines = []
    for row in rows[:limit]:
        mark = "ok " if row["pred"].strip() == row["gt"].strip() else "   "
        overlap = f"  words {row['precision']:.2f}" if row.get("precision") is not None else ""
        ned = f"  NED {row['ned']:.2f}" if row.get("ned") is not None else ""
        lines.append(f"{mark}{row['id']:<10} loss {row['loss']:.3f}{overlap}{ned}  {row['gt']!r} -> {row['pred']!r}")
    return "\n".join(lines)
