import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPE = os.path.join(ROOT, "recipes", "two_stage.yaml")
# the grid task (the default before issue 14): square 32 px images, cell_reading; the plumbing tests use
# it because it is the smallest recipe that trains end to end and has a square view (crops need one)
GRID_RECIPE = os.path.join(ROOT, "recipes", "grid.yaml")


def run_cli(*args, env_extra=None, cwd=None, timeout=600):
    """Run ``python -m <args>`` from the repo root; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, (env_extra or {}).pop("PYTHONPATH", None),
                                                   env.get("PYTHONPATH")] if p)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def random_gpt(sizes, seed=0, **kw):
    """A nanochat GPT of ``sizes`` (+ ``kw``) with every weight N(0, 0.3), in eval mode: the real init zeroes
    lm_head, so every logit would tie."""
    from plugins.decoders.nanochat import GPT
    torch.manual_seed(seed)
    model = GPT(**{**sizes, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()
