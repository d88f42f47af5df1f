"""Your own pages to a model (README): sample PDFs -> python -m core.shards pdf -> recipes/pages.yaml with one
override -> python -m core.generate on a page, each command run in this process through its main()."""
import importlib.util
import json
import os

import pytest

from core.shardreader import read_shard
from tests.helpers import ROOT

PAGES_RECIPE = os.path.join(ROOT, "recipes", "pages.yaml")
# the recipe's model shrunk so a CPU trains a few steps in seconds: 64 px pages, 4 x 4 vision tokens
TINY_PAGES = ["model.encoder.image_size=64", "model.encoder.sam.dim=32", "model.encoder.sam.depth=1",
              "model.encoder.sam.global_attn_indexes=[0]", "model.encoder.clip.depth=1", "model.decoder.n_layer=1",
              "data.batch_size=2", "stages.0.steps=3", "stages.0.probe_every=0", "eval.samples=2",
              "eval.max_new_tokens=5", "run.threads=1"]


def make_pages(out, *args):
    """docs/make_pages.py's main (a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("make_pages", os.path.join(ROOT, "docs", "make_pages.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(out), *map(str, args)])


def test_your_own_pages_to_a_model_end_to_end(cli, tmp_path):
    pages, shards, run_dir = tmp_path / "pages", tmp_path / "shards", tmp_path / "run"
    make_pages(pages, "--count", 4, "--lines", 1, 2)
    assert sorted(p.name for p in pages.iterdir())[:2] == ["page-000.pdf", "page-000.txt"]
    made = cli("core.shards", "pdf", pages, "--out", shards, "--eval-every", 2, "--longest-side", 256, "--quiet")
    assert made.returncode == 0, made.stderr
    held = [raw["__key__"] for raw in read_shard(str(shards / "eval-000000.tar"))]
    kept = [raw["__key__"] for raw in read_shard(str(shards / "train-000000.tar"))]
    assert held == ["page-001", "page-003"] and kept == ["page-000", "page-002"]  # every 2nd page held out
    assert made.stdout.splitlines()[-2:] == [f"shards (data.dataset.train of the shards dataset, or "
                                             f"data.dataset.dir={shards}):", str(shards / "train-000000.tar")]

    trained = cli("core.run", PAGES_RECIPE, f"data.dataset.dir={shards}", f"run.dir={run_dir}", *TINY_PAGES)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "warning:" not in trained.stdout  # a page suits the square view: no aspect warning
    evaluated = json.loads((run_dir / "eval.json").read_text())["aggregate"]
    assert evaluated["samples"] == 2  # the held-out pages
    meta = json.loads((run_dir / "pages" / "meta_000003.json").read_text())
    assert meta["max_new_tokens"] == 5 and meta["max_len"] == 512

    page = f"{pages / 'page-000.pdf'}#page=1"
    read = cli("core.generate", run_dir / "pages", page, "--out", tmp_path / "preds.jsonl")
    assert read.returncode == 0, read.stderr
    assert "max new tokens: 5 (the checkpoint's eval.max_new_tokens)" in read.stderr
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [page] and len(rows[0]["text"].encode()) <= 5  # bytes tokenizer


def test_a_shards_folder_needs_its_splits(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    missing = cli("core.run", PAGES_RECIPE, "--dry-run", f"data.dataset.dir={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and f"dir '{tmp_path / 'nowhere'}' is not a folder" in missing.stderr
    empty = cli("core.run", PAGES_RECIPE, "--dry-run", f"data.dataset.dir={tmp_path / 'empty'}")
    assert empty.returncode == 2, empty.stderr
    assert f"data.dataset.dir: no train shards, '{tmp_path / 'empty' / 'train-*.tar'}' matches no file" in empty.stderr


@pytest.mark.parametrize("args, expected", [
    (["--eval-every", "1"], "--eval-every 1: every N-th sample (N at least 2)"),
    (["--eval-every", "2", "--name", "eval"], "--eval-every 2: every N-th sample"),
    (["--eval-every", "9"], "--eval-every 9: only 2 sample(s), so none was held out"),
])
def test_eval_every_refuses_what_it_cannot_do(cli, tmp_path, args, expected):
    make_pages(tmp_path / "pages", "--count", 2, "--lines", 1, 1)
    result = cli("core.shards", "pdf", tmp_path / "pages", "--out", tmp_path / "shards", "--longest-side", 64,
                 "--quiet", *args)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), result.stderr
    assert not list((tmp_path / "shards").glob("*.tar"))  # nothing published
