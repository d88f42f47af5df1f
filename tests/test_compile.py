"""run.compile=true: the compiled training forward trains the same weights as eager mode.

Inductor needs minutes to compile even the tiny model on a 2-core CPU (docs/training.md), so the test swaps
torch.compile's backend for aot_eager: the same call site in core/train.py, Dynamo's graph capture
and AOTAutograd's joint forward/backward graphs, without Inductor's code generation.
"""
import functools
import os

import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from core.run import main
from tests.helpers import ROOT

COLLAPSE = os.path.join(ROOT, "recipes", "collapse.yaml")
ARGS = ["run.threads=1", "data.dataset.train_samples=64", "data.dataset.eval_samples=4", "eval.samples=4",
        "eval.max_new_tokens=2", "stages.0.steps=4", "stages.0.warmup=0", "stages.0.monitor_every=0"]


def train(*args):
    """core.run's exit code, or 3 if Dynamo captured no graph: a compile that silently fell back to eager fails."""
    torch._dynamo.reset()
    counters.clear()
    code = main(list(args))
    return code or (0 if counters["stats"]["unique_graphs"] else 3)


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = [COLLAPSE, f"data.dataset.cache_dir={tmp_path / 'cache'}", *ARGS]
    for name, flag in (("eager", "false"), ("compiled", "true")):
        code = train(*common, f"run.dir={tmp_path / name}", f"run.compile={flag}")
        # eager must capture no graph (3), or the counter would not tell the two runs apart
        assert code == (3 if flag == "false" else 0), (name, code)
    eager = load_file(str(tmp_path / "eager" / "vis_tok" / "model_000004.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "vis_tok" / "model_000004.safetensors"))
    assert eager.keys() == compiled.keys()
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert worst <= 1e-5, worst
    torch._dynamo.reset()  # the compiled graphs hold the model: free them for the tests that follow
