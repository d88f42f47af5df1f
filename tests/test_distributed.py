"""torchrun with 2 gloo ranks trains the same weights as 1 process with the same global batch."""
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import DEFAULT_RECIPE, ROOT

# Every shard holds exactly one rank batch (2 samples) and every text has the same length, so one
# process with batch 4 sees, step by step, the union of the two ranks' batches of 2, and the mean
# losses agree (shard order is seeded; shuffle_buffer 1 keeps the order inside a shard).
COMMON = ["run.threads=1", "data.shuffle_buffer=1", "data.dataset.words=[2,2]", "data.dataset.word_length=[3,3]", "data.dataset.vocabulary_size=2000",
          "data.dataset.train_samples=64", "data.dataset.samples_per_shard=2", "data.dataset.eval_samples=4",
          "eval.samples=4", "eval.max_new_tokens=2", "stages.0.steps=6", "stages.1.steps=3",
          "stages.0.probe_every=0", "stages.1.probe_every=0", "stages.0.monitor_every=0", "stages.1.monitor_every=0"]


def test_two_gloo_ranks_match_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    cache = f"data.dataset.cache_dir={tmp_path / 'cache'}"
    single = subprocess.run([sys.executable, "-m", "core.run", DEFAULT_RECIPE, f"run.dir={tmp_path / 'one'}", cache,
                             "data.batch_size=4", *COMMON], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                            "-m", "core.run", DEFAULT_RECIPE, f"run.dir={tmp_path / 'two'}", cache,
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
