"""Gradient accumulation, bf16 autocast and activation checkpointing change memory and speed, not the maths."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from core.model import checkpoint_activations
from tests.helpers import GRID_RECIPE, ROOT
from tests.helpers import tiny

# equal-length texts, so the mean of two batch means is the mean over both batches
SAME_LENGTH = ["run.threads=1", "data.shuffle_buffer=1", "data.dataset.words=[2,2]", "data.dataset.word_length=[3,3]",
               "data.dataset.vocabulary_size=2000", "data.dataset.train_samples=64", "data.dataset.eval_samples=4",
               "eval.samples=4", "eval.max_new_tokens=2", "stages.0.steps=3", "stages.1.steps=1",
               "stages.0.probe_every=0", "stages.1.probe_every=0", "stages.0.monitor_every=0",
               "stages.1.monitor_every=0"]


def run(tmp_path, name, *overrides):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "core.run", GRID_RECIPE, f"run.dir={tmp_path / name}",
                             f"data.dataset.cache_dir={tmp_path / 'cache'}", *SAME_LENGTH, *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path / name


def test_grad_accum_equals_the_bigger_batch(tmp_path):
    big = run(tmp_path, "big", "data.batch_size=8")
    accum = run(tmp_path, "accum", "data.batch_size=4", "stages.0.grad_accum=2")
    a = load_file(str(big / "vis_tok" / "model_000003.safetensors"))
    b = load_file(str(accum / "vis_tok" / "model_000003.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_bf16_autocast_trains(tmp_path):
    out = run(tmp_path, "bf16", "run.precision=bf16", "data.batch_size=4")
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_activation_checkpointing_keeps_the_gradients(registry):
    def grads(checkpointed):
        model, tok = tiny(registry, seed=5)
        with torch.no_grad():  # nanochat zero-inits its output layers; give every block a gradient
            for p in model.decoder.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        if checkpointed:
            checkpoint_activations(model, ["encoder.sam", "encoder.clip", "decoder"])
        calls = []
        model.decoder.transformer.h[0].attn.register_forward_hook(lambda *a: calls.append(1))
        ids = torch.tensor([[tok.bos_id] + [tok.image_id] * 21 + tok.encode("ab")])
        targets = torch.cat([ids[:, 1:], torch.tensor([[tok.eos_id]])], dim=1)
        model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ids, targets)["loss"].backward()
        assert len(calls) == (2 if checkpointed else 1)  # recomputed in the backward pass
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)
    model, _ = tiny(registry)
    with pytest.raises(ConfigError, match="activation_checkpointing.0: the model has no component 'encodr'"):
        checkpoint_activations(model, ["encodr"])
