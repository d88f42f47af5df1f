"""Checkpoint writing (core/checkpoint.py): keep-last-N and the latest pointer, the resume point's parts, the
files' permissions, and a kill at any moment of a write: the previous checkpoint stays loadable and a resume
reaches the weights of a run never interrupted (resume itself: test_resume.py)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from core import checkpoint
from tests.helpers import ROOT, tiny
from tests.tiny_recipe import Killed, WritePoints, pointer, run, write_recipe

WRITER = textwrap.dedent("""
    import os, sys, time
    import safetensors.torch
    from core import checkpoint
    from core.registry import load_plugins
    from tests.helpers import tiny
    model, _ = tiny(load_plugins()[1])
    checkpoint.save_checkpoint(sys.argv[1], 1, model, {})
    real = safetensors.torch.save_file
    def slow(tensors, path, *a, **k):  # write half a file, then hang: the kill lands inside the write
        real(tensors, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        print("writing", flush=True)
        time.sleep(60)
    checkpoint.save_file = slow
    checkpoint.save_checkpoint(sys.argv[1], 2, model, {})
""")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, registry):
    # a real process: the point is a SIGKILL while the file is half written
    stage_dir = str(tmp_path / "stage")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, stage_dir], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(name.startswith("model_000002") for name in os.listdir(stage_dir))  # the half-written temp file
    path = checkpoint.latest(stage_dir)
    assert path.endswith("model_000001.safetensors")
    model, _ = tiny(registry, seed=9)
    checkpoint.load_parts(model, path, list(checkpoint.PARTS))
    assert checkpoint.resolve(stage_dir, str(tmp_path), ["encoder"]).endswith("encoder_000001.safetensors")


def test_keep_last_and_pointer(tmp_path, registry):
    model, _ = tiny(registry)
    stage_dir = str(tmp_path / "s")
    for step in (10, 20, 30):
        checkpoint.save_checkpoint(stage_dir, step, model, {}, keep_last=2)
    assert sorted(os.listdir(stage_dir)) == ["encoder_000020.safetensors", "encoder_000030.safetensors",
                                             "latest.json", "meta_000020.json", "meta_000030.json",
                                             "model_000020.safetensors", "model_000030.safetensors"]
    assert checkpoint.latest(stage_dir).endswith("model_000030.safetensors")
    # the pointer wins over a newer-looking stray file
    open(os.path.join(stage_dir, "model_000040.safetensors"), "wb").close()
    assert checkpoint.latest(stage_dir).endswith("model_000030.safetensors")


def test_resume_point_names_its_parts(tmp_path, registry):
    model, _ = tiny(registry)
    stage_dir = str(tmp_path / "s")
    assert checkpoint.resume_point(stage_dir) is None  # no pointer: the stage starts afresh
    state = {"step": 3}
    checkpoint.save_checkpoint(stage_dir, 3, model, {"losses": {"loss": 1.5}},
                               train_state=({"t": torch.ones(2)}, state))
    point = checkpoint.resume_point(stage_dir)
    assert point.model_file.endswith("model_000003.safetensors") and point.meta["losses"] == {"loss": 1.5}
    assert point.train_state == state and torch.equal(point.tensors["t"], torch.ones(2)) and not point.complete
    checkpoint.save_checkpoint(stage_dir, 4, model, {"complete": True, "summary": {}})
    point = checkpoint.resume_point(stage_dir)
    assert point.complete and point.tensors is None and point.train_state is None


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_get_the_umasks_permissions(tmp_path, registry, umask):
    from core import resume
    model, _ = tiny(registry)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    old = os.umask(umask)
    try:
        checkpoint.save_checkpoint(str(tmp_path / "s"), 1, model, {},
                                   train_state=resume.capture(optimizer, scheduler, {}, 1))
    finally:
        os.umask(old)
    modes = {name: os.stat(tmp_path / "s" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "s")}
    assert len(modes) == 5 and set(modes.values()) == {0o666 & ~umask}, modes


# ---- a kill inside a run's checkpoint write, then run.resume=auto

FINAL = {"a": 2, "b": 1}  # the tiny recipe's stages and their last step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """The uninterrupted run's final weights per stage."""
    folder = tmp_path_factory.mktemp("reference")
    assert run(write_recipe(folder, tiny_data)) == 0
    return {s: load_file(str(folder / "run" / s / f"model_{n:06d}.safetensors")) for s, n in FINAL.items()}


def same_weights(run_dir, reference):
    for stage, step in FINAL.items():
        got = load_file(str(run_dir / stage / f"model_{step:06d}.safetensors"))
        assert got.keys() == reference[stage].keys()
        assert all(torch.equal(got[k], reference[stage][k]) for k in got), stage


def leftovers(run_dir):
    """Files an interrupted write left behind: temporaries, and step files newer than the stage's pointer."""
    bad = []
    for stage in FINAL:
        step = pointer(run_dir / stage)
        for name in os.listdir(run_dir / stage):
            match = re.match(r"(model|encoder|train|meta)_(\d{6})\.", name)
            if re.search(r"\.tmp\d+$", name) or (match and int(match.group(2)) > step):
                bad.append(f"{stage}/{name}")
    return bad


def test_a_kill_at_every_point_of_every_checkpoint_write_resumes_to_the_uninterrupted_weights(
        tmp_path, tiny_data, reference, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_data)
    keep = "stages.0.checkpoint_keep=1"  # the removal of stage a's step 1 is a kill point too
    with monkeypatch.context() as m:
        counter = WritePoints(m, tmp_path / "count")
        assert run(recipe, f"run.dir={tmp_path / 'count'}", keep) == 0
    points = counter.seen
    # 3 checkpoint writes (a at 1 and 2, b at 1), 5 files each: an fsync and a rename per file, + removals
    assert sum(op == "replace" for op, _ in points) == 15 and any(op == "remove" for op, _ in points), points
    for k, point in enumerate(points):
        run_dir = tmp_path / f"kill{k}"
        with monkeypatch.context() as m:
            WritePoints(m, run_dir, kill_at=k)
            with pytest.raises(Killed):
                run(recipe, f"run.dir={run_dir}", keep)
        assert run(recipe, f"run.dir={run_dir}", keep, "run.resume=auto") == 0, point
        same_weights(run_dir, reference)
        assert not leftovers(run_dir), (point, leftovers(run_dir))
        shutil.rmtree(run_dir)


def _strace_works():
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-e", "trace=none", "-o", "/dev/null", "true"], capture_output=True)
    return probe.returncode == 0  # ptrace may be forbidden in a container


@pytest.mark.skipif(not _strace_works(), reason="needs strace with ptrace allowed")
def test_sigkill_inside_the_first_checkpoint_write_then_resume(tmp_path, tiny_data, reference):
    """A real SIGKILL at the 4th rename (model, encoder and train state renamed, meta not) before any latest.json
    existed: resume must notice the unfinished write and train the stage again, not read its train state. A real
    process, since strace injects the signal into it; the in-process test above covers every other point."""
    when = 4
    recipe = write_recipe(tmp_path, tiny_data)
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "core.run", str(recipe)]
    killed = subprocess.run(["strace", "-f", "-qq", "-e", "trace=rename", "-e",
                             f"inject=rename:signal=SIGKILL:when={when}", "-o", "/dev/null", *command],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (tmp_path / "run" / "a" / "latest.json").exists()
    resumed = subprocess.run([*command, "run.resume=auto"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint write that did not finish" in resumed.stdout
    same_weights(tmp_path / "run", reference)


def test_a_fresh_stage_does_not_leave_an_older_runs_pointer_for_resume(tmp_path, tiny_data, monkeypatch):
    """A run into a folder that holds a finished run of another seed, killed in its first write, then resumed:
    the old latest.json must not make resume skip the stage with the old run's weights."""
    recipe = write_recipe(tmp_path, tiny_data)
    assert run(recipe, "run.seed=5") == 0
    assert run(recipe, f"run.dir={tmp_path / 'seed1'}", "run.seed=1") == 0
    with monkeypatch.context() as m:
        WritePoints(m, tmp_path / "run", kill_before="model_000001")  # stage a's first write
        with pytest.raises(Killed):
            run(recipe, "run.seed=1")
    assert run(recipe, "run.seed=1", "run.resume=auto") == 0
    expected = {s: load_file(str(tmp_path / "seed1" / s / f"model_{n:06d}.safetensors")) for s, n in FINAL.items()}
    same_weights(tmp_path / "run", expected)
