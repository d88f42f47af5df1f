"""Checkpoints survive a process killed mid-write; keep-last-N and the latest pointer."""
import os
import signal
import subprocess
import sys
import textwrap

import torch

from core import checkpoint
from tests.helpers import ROOT, tiny

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
