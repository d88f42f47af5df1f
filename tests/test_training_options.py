"""Gradient accumulation, bf16 autocast and activation checkpointing change memory and speed, not the maths."""
import sys

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from core.model import checkpoint_activations
from tests.helpers import GRID_RECIPE, tiny
from tests.tiny_recipe import run, write_recipe

# equal-length texts, so the mean of two batch means is the mean over both batches
SAME_LENGTH = ["run.threads=1", "data.shuffle_buffer=1", "data.dataset.words=[2,2]", "data.dataset.word_length=[3,3]",
               "data.dataset.vocabulary_size=2000", "data.dataset.train_samples=64", "data.dataset.eval_samples=4",
               "eval.samples=4", "eval.max_new_tokens=2", "stages.0.steps=3", "stages.1.steps=1",
               "stages.0.probe_every=0", "stages.1.probe_every=0", "stages.0.monitor_every=0",
               "stages.1.monitor_every=0"]


def train_grid(cli, tmp_path, name, *overrides):
    result = cli("core.run", GRID_RECIPE, f"run.dir={tmp_path / name}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                 *SAME_LENGTH, *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path / name


def test_grad_accum_equals_the_bigger_batch(tmp_path, cli):
    big = train_grid(cli, tmp_path, "big", "data.batch_size=8")
    accum = train_grid(cli, tmp_path, "accum", "data.batch_size=4", "stages.0.grad_accum=2")
    a = load_file(str(big / "vis_tok" / "model_000003.safetensors"))
    b = load_file(str(accum / "vis_tok" / "model_000003.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


DTYPE_PROBE = '''
import torch
from core import hookimpl

SEEN = set()  # the dtypes every nn.Linear of the model produced while training


class DtypeProbe:
    """Records the output dtype of every nn.Linear of the stage's model; adds no loss."""

    def __init__(self, model):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _m, _i, out: SEEN.add(out.dtype))

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        return None


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "dtype_probe", DtypeProbe)
'''


@pytest.mark.parametrize("precision, expected", [("bf16", {torch.bfloat16}), ("fp32", {torch.float32})])
def test_the_precision_setting_is_the_dtype_the_matmuls_see_in_training(tmp_path_factory, tiny_data, precision,
                                                                        expected):
    """The run trains (finite losses: a non-finite one stops it) and every nn.Linear computes in the
    precision's dtype, so the test fails if autocast is off."""
    folder = tmp_path_factory.mktemp(precision)
    (folder / "dtype_probe.py").write_text(DTYPE_PROBE)
    recipe = write_recipe(folder, tiny_data, extra="plugins: [dtype_probe.py]\n")
    assert run(recipe, f"run.precision={precision}", "stages.0.regularisers=[dtype_probe]") == 0
    seen = sys.modules["vlmkit_recipe_plugin_dtype_probe"].SEEN
    assert seen == expected


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
