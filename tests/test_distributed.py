"""torchrun with 2 gloo ranks (DDP and FSDP2): the same weights as 1 process with the same global batch, and
run.resume=auto."""
import json
import os
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

# Every shard holds exactly one rank batch (2 samples) and every text has the same length, so one
# process with batch 4 sees, step by step, the union of the two ranks' batches of 2, and the mean
# losses agree (shard order is seeded; shuffle_buffer 1 keeps the order inside a shard).
COMMON = ["run.threads=1", "data.shuffle_buffer=1", "data.dataset.words=[2,2]", "data.dataset.word_length=[3,3]",
          "data.dataset.vocabulary_size=2000",
          "data.dataset.train_samples=64", "data.dataset.samples_per_shard=2", "data.dataset.eval_samples=4",
          "eval.samples=4", "eval.max_new_tokens=2", "stages.0.steps=6", "stages.1.steps=3",
          "stages.0.probe_every=0", "stages.1.probe_every=0", "stages.0.monitor_every=0", "stages.1.monitor_every=0"]


def _one_process(tmp_path):
    """(env, cache override) after 1 process with batch 4 trained in tmp_path/one: the reference."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    cache = f"data.dataset.cache_dir={tmp_path / 'cache'}"
    single = subprocess.run([sys.executable, "-m", "core.run", GRID_RECIPE, f"run.dir={tmp_path / 'one'}", cache,
                             "data.batch_size=4", *COMMON], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    return env, cache


def test_two_gloo_ranks_match_one_process(tmp_path):
    env, cache = _one_process(tmp_path)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                            "-m", "core.run", GRID_RECIPE, f"run.dir={tmp_path / 'two'}", cache,
                            "data.batch_size=2", *COMMON], env=env, capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in ranks.stdout
    for stage, step in (("vis_tok", 6), ("vis_mid", 3)):
        one = load_file(str(tmp_path / "one" / stage / f"model_{step:06d}.safetensors"))
        two = load_file(str(tmp_path / "two" / stage / f"model_{step:06d}.safetensors"))
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst <= 1e-5, (stage, worst)
    first = load_file(str(tmp_path / "one" / "vis_tok" / "model_000006.safetensors"))
    assert first["decoder.lm_head.weight"].abs().max() > 0


def _workers(pid):
    """The processes torchrun started (its children; Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_two_gloo_ranks_killed_and_resumed_match_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    cache = f"data.dataset.cache_dir={tmp_path / 'cache'}"
    steps = ["stages.0.steps=16", "stages.0.checkpoint_every=4", "stages.1.steps=3", "data.batch_size=2"]

    def torchrun(run_dir, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "core.run",
                GRID_RECIPE, f"run.dir={run_dir}", cache, *COMMON, *steps, *extra]
    straight = subprocess.run(torchrun(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    written = (killed / "vis_tok" / "model_000004.safetensors", killed / "vis_tok" / "latest.json")
    while not all(path.exists() for path in written):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    for pid in _workers(proc.pid):  # both ranks die at once, as on a lost node; torchrun then exits
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    done = json.loads((killed / "vis_tok" / "latest.json").read_text())["step"]
    assert done < 16 and not (killed / "vis_mid").exists(), f"killed too late (step {done}); nothing to resume"

    meta = json.loads((killed / "vis_tok" / f"meta_{done:06d}.json").read_text())
    with pytest.raises(ConfigError, match="written by 2 process"):  # 1 process cannot take 2 ranks' positions
        resume.check_world_size(meta["train_state"], 1, "model.safetensors")

    resumed = subprocess.run(torchrun(killed, "run.resume=auto"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"vis_tok: resumed at step {done}" in resumed.stdout, resumed.stdout[-2000:]
    for stage, step in (("vis_tok", 16), ("vis_mid", 3)):
        a = load_file(str(tmp_path / "straight" / stage / f"model_{step:06d}.safetensors"))
        b = load_file(str(killed / stage / f"model_{step:06d}.safetensors"))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]  # gloo's sums are deterministic: bit-identical
        assert not different, (stage, done, different[:5])


def test_fsdp_two_gloo_ranks_match_one_process_and_resume(tmp_path):
    """run.parallel=fsdp: FSDP2 shards, the same weights as 1 process, DDP's checkpoint files, and resume."""
    env, cache = _one_process(tmp_path)

    def fsdp(run_dir, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "core.run", GRID_RECIPE, f"run.dir={run_dir}", cache, "data.batch_size=2",
                               "run.parallel=fsdp", "stages.0.checkpoint_every=3", *COMMON, *extra],
                              env=env, capture_output=True, text=True, timeout=600)
    ranks = fsdp(tmp_path / "two")
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "distributed: 2 processes (gloo), model sharded (FSDP2)" in ranks.stdout
    for stage, step in (("vis_tok", 6), ("vis_mid", 3)):
        for kind in ("model", "encoder"):  # rank 0 wrote whole tensors under DDP's names
            one = load_file(str(tmp_path / "one" / stage / f"{kind}_{step:06d}.safetensors"))
            two = load_file(str(tmp_path / "two" / stage / f"{kind}_{step:06d}.safetensors"))
            assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)
            worst = max((one[k] - two[k]).abs().max().item() for k in one)
            assert worst <= 1e-5, (stage, kind, worst)

    # Cut the run back to its step-3 checkpoint, as a kill after it would leave it, and resume under FSDP:
    # the sharded optimizer moments go back from the whole tensors in train_000003.safetensors.
    cut = tmp_path / "cut"
    (cut / "vis_tok").mkdir(parents=True)
    for kind in ("model", "encoder", "train"):
        name = f"{kind}_000003.safetensors"
        (cut / "vis_tok" / name).write_bytes((tmp_path / "two" / "vis_tok" / name).read_bytes())
    (cut / "vis_tok" / "meta_000003.json").write_text((tmp_path / "two" / "vis_tok" / "meta_000003.json").read_text())
    (cut / "vis_tok" / "latest.json").write_text(json.dumps({"step": 3, "model": "model_000003.safetensors"}))
    resumed = fsdp(cut, "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "vis_tok: resumed at step 3" in resumed.stdout, resumed.stdout[-2000:]
    for stage, step in (("vis_tok", 6), ("vis_mid", 3)):
        a = load_file(str(tmp_path / "two" / stage / f"model_{step:06d}.safetensors"))
        b = load_file(str(cut / stage / f"model_{step:06d}.safetensors"))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, (stage, worst)


def test_fsdp_refuses_muon_and_compile():
    from core.recipe import load_recipe
    with pytest.raises(ConfigError,
                       match=r"override 'stages.1.optimizer=muon': stages.1.optimizer: muon needs whole matrices"):
        load_recipe(GRID_RECIPE, ["run.parallel=fsdp", "stages.1.optimizer=muon"])
    with pytest.raises(ConfigError, match=r"run.compile: not supported with run.parallel: fsdp"):
        load_recipe(GRID_RECIPE, ["run.parallel=fsdp", "run.compile=true"])
    with pytest.raises(ConfigError, match=r"override 'run.parallel=zero': run.parallel: must be ddp or fsdp"):
        load_recipe(GRID_RECIPE, ["run.parallel=zero"])
