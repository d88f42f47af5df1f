"""Resume (run.resume=auto; core/resume.py): a run killed with SIGKILL and resumed ends bit-identical to one never
interrupted; the training state (optimizer, schedule, every global RNG, stream positions) is captured and
restored; a stage setting changed since the checkpoint is applied and said, or refused in one line (a kill
inside a checkpoint write: test_checkpoint.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from core import resume
from core.errors import ConfigError
from tests.helpers import GRID_RECIPE, ROOT
from tests.tiny_recipe import Killed, WritePoints, log_events, pointer, run, write_recipe

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
    # real processes: the point is a SIGKILL at an arbitrary moment of training, not only inside a write
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
    optimizer, scheduler = _training_state()
    torch.manual_seed(5)
    random.seed(5)
    tensors, state = resume.capture(optimizer, scheduler, {"image": _Stream(7), "text": None}, step=3)
    mine = state["ranks"][0]  # numpy's state too when numpy is installed
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
    _, state = resume.capture(*_training_state(), {"image": _Stream(7), "text": None}, step=3, sharded=False)
    resume.check_world_size(state, 1, "ckpt", sharded=False)  # as written: fine
    for world_size, sharded, words in ((2, False, "1 process(es)"), (1, True, "unsharded (ddp")):
        with pytest.raises(ConfigError) as e:
            resume.check_world_size(state, world_size, "ckpt", sharded=sharded)
        assert "\n" not in str(e.value) and "ckpt" in str(e.value) and words in str(e.value)


# ---- the tiny recipe, stopped inside a checkpoint write and resumed with changed settings

def _checkpoint_at_step_1(tmp_path, tiny_data, monkeypatch):
    """A run of the tiny recipe stopped inside stage a's second write: resumable at step 1."""
    recipe = write_recipe(tmp_path, tiny_data)
    with monkeypatch.context() as m:
        WritePoints(m, tmp_path / "run", kill_before="model_000002")  # the step-2 write's first file
        with pytest.raises(Killed):
            run(recipe)
    assert pointer(tmp_path / "run" / "a") == 1
    return recipe


def test_a_changed_lr_on_resume_is_applied_said_and_logged(tmp_path, tiny_data, monkeypatch, capsys):
    recipe = _checkpoint_at_step_1(tmp_path, tiny_data, monkeypatch)
    capsys.readouterr()
    assert run(recipe, "run.resume=auto", "stages.0.lr=0.01") == 0
    out = capsys.readouterr().out
    assert "stages.0.lr 0.01 (the checkpoint had 0.003)" in out
    run_dir = tmp_path / "run"
    step1 = [e for e in log_events(run_dir, "train") if e["stage"] == "a" and e["step"] == 1]
    assert step1[-1]["lr"] == pytest.approx(0.01)  # what the optimizer used, not only what the recipe says
    meta = json.loads((run_dir / "a" / "meta_000002.json").read_text())
    assert [g["lr"] for g in meta["train_state"]["param_groups"]] == [pytest.approx(0.01)]
    assert log_events(run_dir, "resume_changes")[-1]["changed"] == {"lr": 0.01}


@pytest.mark.parametrize("override, key", [("stages.0.optimizer=muon", "stages.0.optimizer"),
                                           ("stages.0.muon_parts=[decoder, encoder]", "stages.0.muon_parts"),
                                           ("stages.0.regularisers=[cell_reading]", "stages.0.regularisers"),
                                           ("stages.0.batch_size=2", "stages.0.batch_size")])
def test_a_change_the_saved_state_cannot_follow_is_refused_in_one_line(tmp_path, tiny_data, monkeypatch, capsys,
                                                                        override, key):
    recipe = _checkpoint_at_step_1(tmp_path, tiny_data, monkeypatch)
    capsys.readouterr()
    assert run(recipe, "run.resume=auto", override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run.resume: {key} is ") and "\n" not in err


def test_a_resume_at_or_past_the_recipes_steps_ends_the_stage_there(tmp_path, tiny_data, monkeypatch, capsys):
    recipe = _checkpoint_at_step_1(tmp_path, tiny_data, monkeypatch)
    capsys.readouterr()
    assert run(recipe, "run.resume=auto", "stages.0.steps=1") == 0
    out = capsys.readouterr().out
    assert "the recipe's 1 steps are done" in out and "final loss" in out
    assert json.loads((tmp_path / "run" / "a" / "meta_000001.json").read_text())["complete"]


RANDOM_PLUGIN = '''
import random

import numpy
import torch
from core import hookimpl


class Jitter:
    """A regulariser whose loss draws from python's and numpy's global RNGs, as some plugins do."""

    def __init__(self, model, weight=1.0):
        self.model, self.weight = model, weight

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        scale = random.random() + float(numpy.random.rand())
        return {"jitter": self.weight * scale * sum(p.square().sum() for p in model.projector.parameters())}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "jitter", Jitter)
'''


def test_python_and_numpy_random_are_seeded_by_run_seed(tmp_path, tiny_data):
    (tmp_path / "jitter.py").write_text(RANDOM_PLUGIN)
    recipe = write_recipe(tmp_path, tiny_data, extra="plugins: [jitter.py]\n")
    overrides = ["stages.0.regularisers=[jitter]"]
    for name in ("one", "two"):
        assert run(recipe, f"run.dir={tmp_path / name}", *overrides) == 0
    metas = [json.loads((tmp_path / n / "a" / "meta_000002.json").read_text())["train_state"] for n in ("one", "two")]
    assert metas[0]["ranks"][0]["python_random"] == metas[1]["ranks"][0]["python_random"]
    assert metas[0]["ranks"][0].get("numpy_random") == metas[1]["ranks"][0].get("numpy_random")
    one, two = (load_file(str(tmp_path / n / "a" / "model_000002.safetensors")) for n in ("one", "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_half_a_log_line_from_a_killed_run_does_not_break_the_resumed_run(tmp_path, tiny_data):
    """A kill inside a long log.jsonl write (a record over the write buffer) leaves half a line."""
    recipe = write_recipe(tmp_path, tiny_data)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text('{"event": "stage_start", "stage": "a"}\n{"event": "tra')
    assert run(recipe, "run.resume=auto") == 0
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert lines[1] == '{"event": "tra' and all(json.loads(line) for line in lines[2:])
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_complete_stage_says_which_changed_settings_it_does_not_take_up(tmp_path, tiny_data, capsys):
    recipe = write_recipe(tmp_path, tiny_data)
    assert run(recipe) == 0
    capsys.readouterr()
    assert run(recipe, "run.resume=auto", "stages.0.steps=5") == 0
    out = capsys.readouterr().out
    assert "stage a: complete in" in out and "the recipe changed stages.0.steps since" in out
