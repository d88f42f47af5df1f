"""Evaluation and the probe on every rank: 2 gloo ranks decode their shares and give 1 process's per-sample values."""
import json
import os
import shutil
import subprocess
import sys

from core.textdist import ned
from tests.helpers import GRID_RECIPE, ROOT

# 5 held-out samples (an odd number: the ranks' shares differ in size), 4 new tokens each; the probe decodes
# them all at stage 1's last step, so with the model of its final checkpoint
SMALL = ["run.threads=1", "data.batch_size=2", "data.dataset.words=[2,2]", "data.dataset.word_length=[3,3]",
         "data.dataset.vocabulary_size=2000", "data.dataset.train_samples=32", "data.dataset.samples_per_shard=4",
         "data.dataset.eval_samples=5", "eval.samples=5", "eval.probe_samples=5", "eval.max_new_tokens=4",
         "stages.0.steps=4", "stages.1.steps=2", "stages.0.probe_every=0", "stages.1.probe_every=2",
         "stages.0.monitor_every=0", "stages.1.monitor_every=0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(command, run_dir, cache, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([*command, "-m", "core.run", GRID_RECIPE, f"run.dir={run_dir}",
                             f"data.dataset.cache_dir={cache}", *SMALL, *extra],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _read(run_dir):
    rows = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    aggregate = json.loads((run_dir / "eval.json").read_text())["aggregate"]
    aggregate.pop("samples_per_s")  # a time
    return rows, aggregate


def test_two_gloo_ranks_evaluate_and_probe_as_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    ranks = _run(TORCHRUN, two, tmp_path / "cache")
    assert "distributed: 2 processes (gloo)" in ranks.stdout
    # the same checkpoints evaluated by 1 process: run.resume=auto finds both stages complete and only evaluates
    shutil.copytree(two, one, ignore=shutil.ignore_patterns("eval*", "log.jsonl", "report.md"))
    single = _run([sys.executable], one, tmp_path / "cache", "run.resume=auto")
    assert "not trained again" in single.stdout
    rows, aggregate = _read(one)
    assert len(rows) == 5 and _read(two) == (rows, aggregate)  # ids, preds, losses, every metric value
    # the 2 ranks' probe (shared out too) saw what 1 process reads with the same weights
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    (probe,) = [r for r in log if r.get("event") == "probe"]
    pairs = [(r["pred"].strip(), r["gt"].strip()) for r in rows]
    assert probe["exact"] == sum(p == g for p, g in pairs) / 5
    assert probe["ned"] == sum(ned(p, g) or 0.0 for p, g in pairs) / 5
