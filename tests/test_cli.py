"""python -m core.run as a user meets it: broken recipes, a short real run, the overfit check."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import GRID_RECIPE, ROOT

SMALL_DATA = ["data.dataset.train_samples=512", "data.dataset.samples_per_shard=256",
              "data.dataset.eval_samples=16", "eval.samples=16", "eval.probe_samples=8"]


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["stages.0.lrr=0.1"], "stages.0.lrr: unknown key (did you mean 'lr'?)"),
    (["model.encoder.name=deepencodr"], "model.encoder: unknown encoder 'deepencodr' (did you mean 'deepencoder'?)"),
    (["stages.0.steps=many"], "stages.0.steps: expected int, got str 'many'"),
    (["data.dataset={name: shards, train: '/nonexistent/train-{000000..000003}.tar', eval: '/nonexistent/e.tar'}"],
     "data.dataset.train: shard '/nonexistent/train-000000.tar' does not exist"),  # checked before any training
    (["stages.9.steps=1"], "override 'stages.9.steps=1': stages.9: no list item '9' (the list has 2)"),
    (["model.decoder.n_layers=3"], "model.decoder.n_layers: decoder 'nanochat' takes no argument 'n_layers'"),
], ids=["unknown-key", "unknown-plugin", "wrong-type", "missing-shards", "bad-override", "bad-component-arg"])
def test_broken_recipes_give_one_line_and_exit_2(cli, tmp_path, overrides, expected):
    result = cli("core.run", GRID_RECIPE, f"run.dir={tmp_path}", "data.dataset.cache_dir=" + str(tmp_path),
                 *overrides)
    assert expected in one_error_line(result)


def test_missing_recipe_file(cli):
    assert "recipe 'nope.yaml' does not exist" in one_error_line(cli("core.run", "nope.yaml"))


def test_list_plugins_names_sources(cli):
    result = cli("core.run", "--list-plugins")
    assert result.returncode == 0
    assert any(line.startswith("encoder deepencoder") and "built-in plugins.encoders.deepencoder" in line
               for line in result.stdout.splitlines())


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """``vlmkit --list-plugins | head``: the reader is gone before the listing is written (a fresh process: the
    closed pipe and the flush at interpreter exit are the point). No BrokenPipeError traceback, exit 1."""
    read, write = os.pipe()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "core.run", "--list-plugins"], stdout=write,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    os.close(write)
    os.close(read)  # no reader left: the command's first write fails with EPIPE
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_short_two_stage_run_writes_everything(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("core.run", GRID_RECIPE, f"run.dir={run_dir}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                 "stages.0.steps=4", "stages.1.steps=4", "stages.0.probe_every=2", "stages.1.probe_every=0",
                 "data.batch_size=4", *SMALL_DATA)
    assert result.returncode == 0, result.stderr[-2000:]
    for stage in ("vis_tok", "vis_mid"):
        files = sorted(os.listdir(run_dir / stage))
        assert files == ["encoder_000004.safetensors", "latest.json", "meta_000004.json", "model_000004.safetensors",
                         "train_000004.safetensors"]
    # stage 2 starts from stage 1's encoder (init_from) and keeps SAM frozen: its weights are stage 1's
    first = load_file(str(run_dir / "vis_tok" / "encoder_000004.safetensors"))
    second = load_file(str(run_dir / "vis_mid" / "model_000004.safetensors"))
    sam = [k for k in first if k.startswith("encoder.sam.")]
    assert sam and all(torch.equal(first[k], second[k]) for k in sam)
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    table = {n: t for n, t, _ in [e for e in events if e["event"] == "stage_start"][1]["parameters"]}
    assert table["encoder.sam"] == 0 and table["decoder"] > 0
    summary = json.loads((run_dir / "eval.json").read_text())["aggregate"]
    assert summary["samples"] == 16 and {"precision", "recall", "f1", "ned", "exact"} <= set(summary)
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events.count("stage_start") == 2 and events.count("probe") == 2 and "eval" in events
    assert len((run_dir / "eval_samples.jsonl").read_text().splitlines()) == 16
    report = (run_dir / "eval.md").read_text(encoding="utf-8")
    assert "| metric | value |" in report and "| exact |" in report
    sample_rows = report[report.index("| id | loss |"):].splitlines()[2:]
    assert len(sample_rows) == 16 and all(r.startswith("| ") and r.count(" | ") >= 6 for r in sample_rows)


def test_dry_run_describes_the_model(cli):
    result = cli("core.run", GRID_RECIPE, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "grid 4x4 -> 21 vision tokens" in result.stdout
    assert "prompt layout: <|bos|> + '<|image|>x21\\nFree OCR.' + answer + eos" in result.stdout


def test_dry_run_checks_the_data_section(cli, tmp_path):
    """Shards that exist and arguments the dataset takes; a wrong one fails the dry run (it passed with exit 0 and
    failed in the real run), and train images far from the model's view are warned about once, with a count."""
    from PIL import Image

    from core.shards import write_shards
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(5):  # 3:1 strips for the grid recipe's square view
        Image.new("RGB", (96, 32), "white").save(pages / f"p{i}.png")
        (pages / f"p{i}.txt").write_text(f"text {i}")
    train = write_shards("folder", str(pages), str(tmp_path / "shards"), progress=False).pattern
    dataset = f"data.dataset={{name: shards, train: '{train}', eval: '{train}'}}"
    missing = cli("core.run", GRID_RECIPE, "--dry-run", dataset.replace("train-000000", "train-000001"))
    assert "data.dataset.train: shard" in one_error_line(missing)
    assert "train-000001.tar' does not exist" in missing.stderr
    leftover = cli("core.run", GRID_RECIPE, "--dry-run", "data.dataset.name=shards", f"data.dataset.train={train}")
    assert "data.dataset.image_size: dataset 'shards' takes no argument 'image_size'" in one_error_line(leftover)
    good = cli("core.run", GRID_RECIPE, "--dry-run", dataset)
    assert good.returncode == 0, good.stderr
    assert f"data.dataset train: 1 shard(s): {train}" in good.stdout.splitlines()
    warnings = [line for line in good.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: data.dataset: 5 of the first 5 train images are far wider or taller than the model's view 1:1 "
        "(e.g. 'p0' is 3:1, width:height)"), good.stdout
    run_dir = tmp_path / "run"  # a real run warns once too, before its first step
    result = cli("core.run", GRID_RECIPE, dataset, f"run.dir={run_dir}", "stages.0.steps=1", "stages.1.steps=1",
                 "data.batch_size=2", "eval.samples=2", "eval.max_new_tokens=2", "stages.0.probe_every=0",
                 "stages.1.probe_every=0", "stages.0.monitor_every=0", "stages.1.monitor_every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("warning:")] == warnings


def test_overfit10_reproduces_every_sample(cli, tmp_path):
    """The tier-1 check: recipes/overfit10.yaml memorises its 10 fixed samples exactly."""
    recipe = os.path.join(os.path.dirname(GRID_RECIPE), "overfit10.yaml")
    result = cli("core.run", recipe, f"run.dir={tmp_path}", f"data.dataset.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-2000:]
    probes = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "probe"]
    assert probes[-1]["exact"] == 1.0  # stop_when_exact ended the stage at the first probe that read all 10
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["pred"] == r["gt"] and r["precision"] == 1.0 for r in rows)


def test_report_with_plots(cli, tmp_path):
    """Every run folder gets report.md; with matplotlib, its PNG plots are real images."""
    pytest.importorskip("matplotlib")
    from PIL import Image
    run_dir = tmp_path / "run"
    result = cli("core.run", GRID_RECIPE, f"run.dir={run_dir}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                 "stages.0.steps=6", "stages.1.steps=4", "stages.0.probe_every=3", "stages.0.monitor_every=3",
                 "stages.1.monitor_every=2", "run.log_every=1", "data.batch_size=4", *SMALL_DATA)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (run_dir / "report.md").read_text()
    for name in ("loss.png", "lr.png", "collapse.png", "probe.png"):
        assert f"]({name})" in report
        with Image.open(run_dir / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    assert "## Stage vis_mid: parameters" in report and "| encoder.sam | 0 |" in report
    assert "## Evaluation" in report
