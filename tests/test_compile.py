"""run.compile=true: the compiled training forward trains the same weights as eager mode.

Inductor needs minutes to compile even the tiny model on a 2-core CPU (docs/training.md), so the test swaps
torch.compile's backend for aot_eager: the same call site in core/train.py, Dynamo's graph capture
and AOTAutograd's joint forward/backward graphs, without Inductor's code generation.
"""
import os
import subprocess
import sys

from safetensors.torch import load_file

from tests.helpers import ROOT

COLLAPSE = os.path.join(ROOT, "recipes", "collapse.yaml")
# exits 3 if Dynamo captured no graph, so a compile that silently fell back to eager fails the test
CODE = """
import functools, sys, torch
from torch._dynamo.utils import counters
torch.compile = functools.partial(torch.compile, backend="aot_eager")
from core.run import main
code = main(sys.argv[1:])
sys.exit(code or (0 if counters["stats"]["unique_graphs"] else 3))
"""
ARGS = ["run.threads=1", "data.dataset.train_samples=64", "data.dataset.eval_samples=4", "eval.samples=4",
        "eval.max_new_tokens=2", "stages.0.steps=4", "stages.0.warmup=0", "stages.0.monitor_every=0"]


def test_compiled_training_matches_eager(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    common = [COLLAPSE, f"data.dataset.cache_dir={tmp_path / 'cache'}", *ARGS]
    for name, flag in (("eager", "false"), ("compiled", "true")):
        done = subprocess.run([sys.executable, "-c", CODE, *common, f"run.dir={tmp_path / name}", f"run.compile={flag}"],
                              env=env, capture_output=True, text=True, timeout=600)
        # eager must capture no graph (exit 3), or the counter would not tell the two runs apart
        assert done.returncode == (3 if flag == "false" else 0), (name, done.returncode, done.stderr[-3000:])
    eager = load_file(str(tmp_path / "eager" / "vis_tok" / "model_000004.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "vis_tok" / "model_000004.safetensors"))
    assert eager.keys() == compiled.keys()
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert worst <= 1e-5, worst
