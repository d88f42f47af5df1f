"""Evaluation: greedy generation on held-out samples, per-sample loss, metric plugins, the report files.

Under torchrun every rank decodes (and computes the loss of) its share of the samples, every
world-size-th one from its rank on; the shares are gathered back into sample order and rank 0
scores them, so 1 process and N give the same per-sample values (docs/training.md, "Several GPUs").
"""
import html
import json
import os
import time

import torch

from core import data, distributed
from core.generate import (
    generate,
    grid_batches,
    image_grid,
    image_prompt_ids,
    view_batch,
)
from core.images import image_views
from core.metrics import score_pairs
from core.model import evaluating
from core.pairs import GroundTruth


@torch.no_grad()
def decode_samples(model, tokenizer, samples, prompt, device, max_new_tokens=64, batch_size=32, repetition=None):
    """Greedy OCR of each sample's image; returns the decoded strings, in sample order.

    With crops, images are batched by crop grid (one prompt length per generate call). ``repetition``:
    core.repetition.Repetition (no-repeat n-grams, stopping loops), as generate takes it.
    """
    grids = [image_grid(model, s["image"]) for s in samples]
    texts = [None] * len(samples)
    with evaluating(model):  # the probe calls this while training: frozen modules must stay in eval mode
        for batch in grid_batches(grids, batch_size):
            grid = grids[batch[0]]
            pixels, tiles, batch_grids = view_batch(model, [samples[i]["image"] for i in batch], grid, device)
            rows = generate(model, tokenizer, pixels, image_prompt_ids(model, tokenizer, prompt, grid),
                            max_new_tokens, tiles=tiles, grids=batch_grids, repetition=repetition)
            for i, ids in zip(batch, rows):
                texts[i] = tokenizer.decode(ids)
    return texts


@torch.no_grad()
def sample_losses(model, tokenizer, samples, prompt, device, max_len, batch_size=32):
    """Teacher-forced next-token loss of each sample's answer (mean over its tokens)."""
    losses = []
    for i in range(0, len(samples), batch_size):
        prepared = []
        for s in samples[i:i + batch_size]:
            pixels, tiles, grid = image_views(s["image"], model.image_size, model.tiling)
            ids, tg = data.encode_sample(tokenizer, s["text"], prompt, model.num_image_tokens(grid), max_len)
            prepared.append({"pixel_values": pixels, "tiles": tiles, "grid": grid, "input_ids": ids, "targets": tg,
                             "text": s["text"], "key": s["key"]})
        batch = data.collate(prepared, pad_id=tokenizer.pad_id)
        tiles = batch["tiles"].to(device) if batch["tiles"] is not None else None
        out = model(batch["pixel_values"].to(device), batch["input_ids"].to(device), tiles=tiles,
                    grids=batch["grids"])
        logits, targets = out["logits"].float(), batch["targets"].to(device)
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1,
                                                      reduction="none")
        counts = (targets != -1).sum(dim=1).clamp(min=1)
        losses.extend((per_token.sum(dim=1) / counts).tolist())
    return losses


def _in_order(parts, n):
    """The ranks' lists (rank r's for ``samples[r::world]``) as one list in sample order."""
    out = [None] * n
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


def decode_shared(model, tokenizer, samples, prompt, device, max_new_tokens=64, batch_size=32, repetition=None):
    """``decode_samples`` with the samples shared out between the ranks; every rank gets every text."""
    mine = samples[distributed.rank()::distributed.world_size()]
    texts = decode_samples(model, tokenizer, mine, prompt, device, max_new_tokens, batch_size, repetition)
    return _in_order(distributed.gather_objects(texts), len(samples))


def evaluate(model, tokenizer, samples, metrics, prompt, device, max_new_tokens, max_len, batch_size=32,
             repetition=None, pm=None):
    """Rows (id, gt, pred, loss, metric values...) and the aggregate dict (metrics + samples/s); the metrics
    answer through ``pm``, the run's plugin manager (core.metrics.score_pairs).

    Every rank calls it and decodes its share; rank 0 gets the rows and aggregate, the others (None, None).
    ``samples_per_s`` counts the decoding of all ranks together (from the slowest rank's time).
    """
    model.eval()
    mine = samples[distributed.rank()::distributed.world_size()]
    start = time.perf_counter()
    preds = decode_samples(model, tokenizer, mine, prompt, device, max_new_tokens, batch_size, repetition)
    seconds = time.perf_counter() - start
    losses = sample_losses(model, tokenizer, mine, prompt, device, max_len, batch_size)
    parts = distributed.gather_objects((preds, losses, seconds))
    preds, losses = _in_order([p[0] for p in parts], len(samples)), _in_order([p[1] for p in parts], len(samples))
    seconds = max(p[2] for p in parts)
    if not distributed.is_main():
        return None, None
    # the ground truth carries the sample's json: a metric that scores structure (OmniDocBench's blocks) reads it
    rows, aggregate = score_pairs(metrics, [(s["key"], p, GroundTruth(s["text"], s.get("meta")))
                                            for s, p in zip(samples, preds)], pm=pm)
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


NOT_METRICS = ("id", "page", "gt", "pred", "loss")


def metric_columns(rows, limit=None):
    """The per-sample numeric values the metrics produced, in first-seen order (at most ``limit``): which
    columns the tables show. Values whose name ends in ``_num`` / ``_len`` are the parts of a ratio."""
    names = []
    for row in rows:
        for key, value in row.items():
            if key not in NOT_METRICS and key not in names and isinstance(value, float) \
                    and not key.endswith(("_num", "_len")):
                names.append(key)
    return names if limit is None else names[:limit]


def _exact(row):
    return row["exact"] == 1.0 if row.get("exact") is not None else row["pred"].strip() == row["gt"].strip()


def format_samples(rows, limit=8):
    """Per-sample lines for the terminal: exact mark, id, loss, the first metric values, gt -> pred."""
    columns = metric_columns(rows, limit=3)
    lines = []
    for row in rows[:limit]:
        values = "".join(f"  {k} {row[k]:.2f}" for k in columns if row.get(k) is not None)
        lines.append(f"{'ok ' if _exact(row) else '   '}{row['id']:<10} loss {row['loss']:.3f}{values}  "
                     f"{_short(row['gt'])!r} -> {_short(row['pred'])!r}")
    return "\n".join(lines)


def _short(text, limit=120):
    """A page of text shortened for one terminal line: the full text is in eval_samples.jsonl."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_eval(run_dir, rows, aggregate, stages):
    """eval_samples.jsonl (a row per sample), eval.json (aggregate + stages), eval.md (both as tables)."""
    with open(os.path.join(run_dir, "eval_samples.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump({"aggregate": aggregate, "stages": stages}, f, indent=2)
    with open(os.path.join(run_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(format_markdown(rows, aggregate))


def _cell(value, digits=None):
    """A markdown table cell: numbers rounded, None as a dash, text HTML-escaped with | and line breaks escaped."""
    if value is None:
        return "–"
    if digits is not None and isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def format_markdown(rows, aggregate):
    """eval.md: the aggregate table, then one table row per sample with each metric's value."""
    columns = metric_columns(rows)
    lines = [f"# Evaluation: {len(rows)} samples, greedy", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {key} | {_cell(value, 4)} |" for key, value in aggregate.items()]
    lines += ["", "Per-sample values as each metric plugin defines them (the metric's own docs); exact = the "
              "prediction equals the ground truth after stripping surrounding whitespace.", "",
              "| id | loss | " + " | ".join(columns) + (" | " if columns else "") + "exact | gt | pred |",
              "|---|---:|" + "---:|" * len(columns) + ":---:|---|---|"]
    for row in rows:
        values = "".join(f" {_cell(row.get(k), 2)} |" for k in columns)
        lines.append(f"| {_cell(row['id'])} | {_cell(row['loss'], 3)} |{values} {'✓' if _exact(row) else '✗'} | "
                     f"{_cell(row['gt'])} | {_cell(row['pred'])} |")
    return "\n".join(lines) + "\n"
