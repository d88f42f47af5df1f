"""A two-stage recipe small enough to train in-process in about a second (issue 15's hardening tests).

The model is tests/helpers.TINY; the synthetic data are rendered once per ``cache`` folder, so tests
that share a session-scoped cache pay for it once.
"""
import json

from core.run import main

TINY_RECIPE = """\
run: {{dir: {run_dir}, seed: 0, log_every: 1, threads: 1}}
model:
  encoder:
    name: deepencoder
    image_size: 32
    sam: {{patch_size: 8, dim: 32, depth: 2, heads: 2, window_size: 2, global_attn_indexes: [1], out_chans: 32,
          downsample_channels: [32, 48], downsample_strides: [1, 1]}}
    clip: {{dim: 48, depth: 1, heads: 2, mlp_dim: 96}}
  projector: {{name: linear}}
  decoder: {{name: nanochat, n_layer: 2, n_head: 2, n_kv_head: 1, n_embd: 32, sequence_len: 128}}
  tokenizer: {{name: bytes}}
data:
  dataset: {{name: synthetic_ocr, cache_dir: {cache}, image_size: 32, layout: grid, wrap: chars, words: [2, 3],
            word_length: [2, 5], train_samples: 64, eval_samples: 4, vocabulary_size: 2000}}
  batch_size: 4
  max_len: 64
stages:
  - {{name: a, steps: 2, lr: 3.0e-3, checkpoint_every: 1}}
  - {{name: b, steps: 1, lr: 3.0e-3, init_from: {{path: "stage:a", parts: [encoder]}}}}
eval: null
"""


def write_recipe(folder, cache, run_dir="run", extra=""):
    """recipe.yaml in ``folder`` (run.dir relative to it unless absolute); ``extra`` is appended YAML."""
    path = folder / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(run_dir=folder / run_dir, cache=cache) + extra)
    return path


def run(recipe, *overrides):
    """python -m core.run in-process; returns the exit code."""
    return main([str(recipe), *overrides])


def log_events(run_dir, event):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


B_LINE = '  - {name: b, steps: 1, lr: 3.0e-3, init_from: {path: "stage:a", parts: [encoder]}}\n'
LORA = '{name: lora, r: 4, alpha: 8, targets: ["decoder.*.attn.*", "encoder.clip.*"]}'


def lora_recipe(folder, cache, steps=3, every=1, adapter=LORA, after=""):
    """The tiny recipe with stage b a LoRA stage on all of stage a (``after``: more stage lines)."""
    text = TINY_RECIPE.format(run_dir=folder / "run", cache=cache)
    lora = (f'  - {{name: b, steps: {steps}, lr: 1.0e-2, checkpoint_every: {every}, init_from: {{path: "stage:a"}},'
            f' adapters: [{adapter}]}}\n')
    path = folder / "recipe.yaml"
    path.write_text(text.replace(B_LINE, lora + after))
    return path
