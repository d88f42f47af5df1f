"""Shards streamed through webdataset's gopen: http:// from a server this test starts on 127.0.0.1, and
pipe:cat. The same batches as the local files, the same exact resume, failures counted or named in one line."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from benchmarks.inputs import serve
from core.errors import ConfigError
from core.shardreader import read_shard
from core.shardwriter import ShardWriter
from core.stream import train_batches
from plugins.datasets.shards import Shards
from plugins.datasets.synthetic_ocr import SyntheticOCR
from plugins.tokenizers.bytes import ByteTokenizer
from tests.helpers import ROOT, good_sample

PATTERN = "shard-{000000..000003}.tar"


@pytest.fixture
def served(tmp_path):
    """(folder, base URL): four small shards under an HTTP server on 127.0.0.1, for this test only."""
    folder = tmp_path / "www"
    folder.mkdir()
    for s in range(4):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar"), encoder=False) as sink:
            for i in range(7):
                sink.write(good_sample(f"s{s}_{i}", 9 * i))
    with serve(folder) as base:
        yield folder, base


def urls(folder, base):
    """The same four shards as local paths, http URLs and pipe:cat commands, each from one brace pattern."""
    return {"local": Shards(train=str(folder / PATTERN)).shards("train"),
            "http": Shards(train=f"{base}/{PATTERN}").shards("train"),
            "pipe": Shards(train=f"pipe:cat {folder}/{PATTERN}").shards("train")}


def stream(paths, **kw):
    return train_batches(paths, ByteTokenizer(), 8, "<image>\nFree OCR.", 4, 30, 3, shuffle_buffer=4, **kw)


def same(a, b):
    return a["keys"] == b["keys"] and all(torch.equal(a[k], b[k]) for k in ("pixel_values", "input_ids", "targets"))


@pytest.mark.parametrize("workers", [0, 2])
def test_http_and_pipe_give_the_local_batches_and_resume_exactly(served, workers):
    folder, base = served
    sets = urls(folder, base)
    assert sets["http"][1] == f"{base}/shard-000001.tar" and sets["pipe"][3] == f"pipe:cat {folder}/shard-000003.tar"
    taken, more = 5, 8  # 28 samples: the resumed part crosses into the next epoch
    reference = list(itertools.islice(stream(sets["local"], num_workers=workers), taken + more))
    for name in ("http", "pipe"):
        first = stream(sets[name], num_workers=workers)
        got = list(itertools.islice(first, taken))
        assert all(same(a, b) for a, b in zip(got, reference[:taken])), name
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = stream(sets[name], num_workers=workers)
        resumed.load_state_dict(state)  # the workers re-read their shards from the start and skip what was used
        rest = list(itertools.islice(resumed, more))
        resumed.close()
        assert all(same(a, b) for a, b in zip(rest, reference[taken:])) and len(rest) == more, name


def test_an_unreachable_shard_is_counted_or_named_in_one_line(served):
    folder, base = served
    os.remove(folder / "shard-000002.tar")  # the server answers 404
    paths = Shards(train=f"{base}/{PATTERN}").shards("train")
    it = stream(paths, epochs=1)
    keys = [k for b in it for k in b["keys"]]
    assert sorted(keys) == sorted(f"s{s}_{i}" for s in (0, 1, 3) for i in range(7))
    assert it.report() == {"unreadable_shard": {paths[2]: 1}}
    with pytest.raises(ConfigError) as e:
        list(stream(paths, epochs=1, on_bad_sample="error"))
    assert str(e.value) == (f"data: shard {paths[2]!r}: unreadable_shard (curl exited with status 22: the server "
                            f"answered with an HTTP error (status 400 or more)) [data.on_bad_sample: error]")
    missing = f"pipe:cat {folder}/shard-000002.tar"
    with pytest.raises(ConfigError) as e:
        list(stream([missing], epochs=1, on_bad_sample="error"))
    assert str(e.value) == (f"data: shard {missing!r}: unreadable_shard (the command exited with status 1: cat: "
                            f"{folder}/shard-000002.tar: No such file or directory) [data.on_bad_sample: error]")
    with pytest.raises(ConfigError, match=r"no usable sample in 2 shard\(s\).*'unreadable_shard': \d+"):
        next(stream([missing, "http://127.0.0.1:9/none.tar"]))  # endless, but nothing left to read: stops


def test_urls_are_checked_for_a_scheme_webdataset_opens():
    with pytest.raises(ConfigError, match="data.dataset.train: shard 's3://b/x-0.tar': WebDataset opens no s3: URL"):
        Shards(train="s3://b/x-{0..1}.tar").shards("train")
    assert [r["__bad__"] for r in read_shard("pipe:exit 3")] == ["unreadable_shard"]


# ---- a training run over HTTP, killed and resumed, against the same run over the local files

RECIPE = """
run: {{dir: {run}, seed: 0, log_every: 100, threads: 1}}
model:
  encoder: {{name: deepencoder, image_size: 32, sam: {{patch_size: 8, dim: 32, depth: 1, heads: 2, window_size: 2,
            global_attn_indexes: [0], out_chans: 32, downsample_channels: [32, 48], downsample_strides: [1, 1]}},
            clip: {{dim: 48, depth: 1, heads: 2, mlp_dim: 96}}}}
  projector: {{name: linear}}
  decoder: {{name: nanochat, n_layer: 1, n_head: 2, n_kv_head: 2, n_embd: 32, sequence_len: 128}}
  tokenizer: {{name: bytes}}
data:
  dataset: {{name: shards, train: "{train}", eval: "{eval}"}}
  batch_size: 4
  max_len: 64
  shuffle_buffer: 16
stages:
  - {{name: only, steps: 12, lr: 3.0e-3, checkpoint_every: 4}}
eval: {{samples: 4, max_new_tokens: 4, metrics: [exact]}}
"""


def run(tmp_path, name, train, evaluate, *extra, background=False):
    """python -m core.run in a real process: the http run is killed with SIGKILL, and the runs it is compared
    with start the same way."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(run=tmp_path / name, train=train, eval=evaluate))
    cmd = [sys.executable, "-m", "core.run", str(recipe), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT)
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_training_over_http_killed_and_resumed_matches_local_and_pipe(tmp_path, served):
    folder, base = served
    synthetic = SyntheticOCR(cache_dir=str(tmp_path / "cache"), image_size=32, layout="grid", wrap="chars",
                             train_samples=128, eval_samples=4)
    for name in os.listdir(folder):
        os.remove(folder / name)
    writer = ShardWriter(str(folder), "shard", 32, max_size=None)  # 128 samples -> shard-000000..000003
    for raw in (r for p in synthetic.shards("train") for r in read_shard(p)):
        writer.write(raw["__key__"], [(k, v) for k, v in raw.items() if not k.startswith("__")])
    writer.close()
    local = str(folder / PATTERN)
    run(tmp_path, "local", local, str(folder / "shard-000000.tar"))
    killed = run(tmp_path, "http", f"{base}/{PATTERN}", f"{base}/shard-000000.tar", background=True)
    log = tmp_path / "http" / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and any('"checkpoint"' in line and json.loads(line)["step"] >= 4
                                    for line in log.read_text().splitlines())):
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = run(tmp_path, "http", f"{base}/{PATTERN}", f"{base}/shard-000000.tar", "run.resume=auto")
    assert "only: resumed at step" in resumed.stdout
    run(tmp_path, "pipe", f"pipe:cat {local}", f"pipe:cat {folder}/shard-000000.tar")
    final = {name: load_file(str(tmp_path / name / "only" / "model_000012.safetensors")) for name in ("local", "http",
                                                                                                      "pipe")}
    for name in ("http", "pipe"):
        assert all(torch.equal(final["local"][k], final[name][k]) for k in final["local"]), name
