"""run.resume=auto: a run killed with SIGKILL and resumed ends bit-identical to one never interrupted."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.helpers import GRID_RECIPE, ROOT

ARGS = ["run.threads=1", "data.batch_size=4", "data.dataset.train_samples=256", "data.dataset.eval_samples=4",
        "eval.samples=4", "eval.max_new_tokens=4", "stages.0.steps=16", "stages.0.checkpoint_every=4",
        "stages.1.steps=8", "stages.1.checkpoint_every=4", "stages.0.probe_every=0", "stages.1.probe_every=0",
        "stages.0.monitor_every=0", "stages.1.monitor_every=0"]


def command(run_dir, cache, *extra):
    return [sys.executable, "-m", "core.run", GRID_RECIPE, f"run.dir={run_dir}", f"data.dataset.cache_dir={cache}",
            *ARGS, *extra]


def checkpoints_logged(run_dir):
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if '"checkpoint"' in line]


KILL_SEED = int(os.environ.get("VLMKIT_KILL_SEED", "0"))  # which checkpoint the kill follows: reproducible


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    subprocess.run(command(straight, cache), env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    kill_after = random.Random(KILL_SEED).choice([4, 8, 12])  # a checkpoint of stage 1; the kill lands after it
    proc = subprocess.Popen(command(killed, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(c["step"] >= kill_after for c in checkpoints_logged(killed)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "vis_mid").exists()  # it really died in stage 1
    resumed = subprocess.run(command(killed, cache, "run.resume=auto"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "vis_tok: resumed at step" in resumed.stdout, (kill_after, resumed.stdout[-2000:])

    for stage, step in (("vis_tok", 16), ("vis_mid", 8)):
        a = load_file(str(straight / stage / f"model_{step:06d}.safetensors"))
        b = load_file(str(killed / stage / f"model_{step:06d}.safetensors"))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (kill_after, different[:5])
    def aggregate(run_dir):
        values = json.loads((run_dir / "eval.json").read_text())["aggregate"]
        values.pop("samples_per_s")  # a timing, the one thing allowed to differ
        return values
    assert aggregate(straight) == aggregate(killed)


class _Stream:
    """Stands in for core.stream.Batches: a JSON-able position."""

    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _training_state():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_capture_restore_rng_and_streams():
    from core import resume
    optimizer, scheduler = _training_state()
    torch.manual_seed(5)
    random.seed(5)
    tensors, state = resume.capture(optimizer, scheduler, {"image": _Stream(7), "text": None}, step=3)
    mine = state["ranks"][0]  # numpy's state too when numpy is installed (issue 15)
    assert state["ranks"] == [{"python_random": mine["python_random"], "streams": {"image": {"position": 7}},
                               **({"numpy_random": mine["numpy_random"]} if "numpy_random" in mine else {})}]
    assert set(tensors) >= {"rng.torch.0"} and resume.saved_world_size(state) == 1
    expected = (torch.rand(4), random.random())
    torch.manual_seed(0)
    random.seed(0)
    stream = _Stream()
    assert resume.restore(*_training_state(), {"image": stream, "text": None}, tensors, state) == 3
    assert stream.position == 7
    got = (torch.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_a_checkpoint_resumes_only_with_its_world_size_and_sharding():
    import pytest

    from core import resume
    from core.errors import ConfigError
    _, state = resume.capture(*_training_state(), {"image": _Stream(7), "text": None}, step=3, sharded=False)
    resume.check_world_size(state, 1, "ckpt", sharded=False)  # as written: fine
    for world_size, sharded, words in ((2, False, "1 process(es)"), (1, True, "unsharded (ddp")):
        with pytest.raises(ConfigError) as e:
            resume.check_world_size(state, world_size, "ckpt", sharded=sharded)
        assert "\n" not in str(e.value) and "ckpt" in str(e.value) and words in str(e.value)
