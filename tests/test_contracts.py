"""One test per component kind: a minimal third-party implementation (tests/third_party_plugin.py, written
from docs/plugins.md) builds and runs through a recipe, the shard writer or the metrics command,
in place of the built-in; and a component that breaks its contract is one error line naming it."""
import json
import os
import shutil

import pytest
import yaml
from PIL import Image

from core import contracts
from core.errors import ConfigError
from core.metrics import main as metrics_main
from core.registry import Registry
from core.run import main as run_main
from core.shards import write_shards
from plugins.datasets.synthetic_ocr import SyntheticOCR
from tests.helpers import ROOT

PLUGIN = os.path.join(ROOT, "tests", "third_party_plugin.py")
DATA = dict(image_size=32, layout="grid", wrap="chars", words=[1, 2], word_length=[2, 4], train_samples=64,
            eval_samples=8, samples_per_shard=32)


def recipe(tmp_path, **changes):
    """A two-step, one-stage recipe of built-ins at toy size, with ``changes`` (section -> value) applied."""
    raw = {
        "run": {"dir": str(tmp_path / "run"), "threads": 1, "log_every": 1},
        "model": {"encoder": {"name": "deepencoder", "image_size": 32,
                              "sam": dict(patch_size=8, dim=16, depth=1, heads=2, window_size=2,
                                          global_attn_indexes=[0], out_chans=16, downsample_channels=[16, 24],
                                          downsample_strides=[1, 1]),
                              "clip": dict(dim=24, depth=1, heads=2, mlp_dim=48)},
                  "projector": {"name": "linear"},
                  "decoder": {"name": "nanochat", "n_layer": 1, "n_head": 2, "n_kv_head": 2, "n_embd": 32,
                              "sequence_len": 64},
                  "tokenizer": {"name": "bytes"}},
        "data": {"dataset": {"name": "synthetic_ocr", "cache_dir": str(tmp_path / "cache"), **DATA},
                 "batch_size": 4, "max_len": 48},
        "stages": [{"name": "s1", "steps": 2, "lr": 1e-3}],
        "eval": {"samples": 4, "max_new_tokens": 6, "metrics": ["exact"]},
        "plugins": [PLUGIN],
    }
    for path, value in changes.items():
        *parents, last = path.split(".")
        target = raw
        for key in parents:
            target = target[key]
        target[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def run(tmp_path, **changes):
    assert run_main([recipe(tmp_path, **changes)]) == 0
    run_dir = tmp_path / "run"
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return run_dir, events


@pytest.mark.parametrize("part, component", [
    ("encoder", {"name": "pool", "image_size": 32}),
    ("encoder", {"name": "pool", "image_size": [16, 64]}),  # a rectangle: 2 rows of 8 cells
    ("projector", {"name": "scale"}),
    ("decoder", {"name": "mean"}),
    ("tokenizer", {"name": "letters"}),
])
def test_a_third_party_model_part_trains_and_reads(tmp_path, part, component):
    run_dir, events = run(tmp_path, **{f"model.{part}": component})
    assert [e["stage"] for e in events if e["event"] == "stage_end"] == ["s1"]
    aggregate = json.loads((run_dir / "eval.json").read_text())["aggregate"]
    assert aggregate["samples"] == 4 and aggregate["exact"] is not None


def test_a_third_party_encoder_sees_its_rectangular_view(tmp_path, capsys):
    path = recipe(tmp_path, **{"model.encoder": {"name": "pool", "image_size": [16, 64]}})
    assert run_main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "image 16x64 -> grid 2x8 -> 19 vision tokens (2 rows of 8 + newline, + 1 separator)" in out


def test_a_third_party_dataset_feeds_training(tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    source = SyntheticOCR(cache_dir=str(tmp_path / "made"), **DATA)
    for split in ("train", "eval"):
        for path in source.shards(split):
            shutil.copy(path, folder / os.path.basename(path))
    run_dir, events = run(tmp_path, **{"data.dataset": {"name": "folder_tars", "folder": str(folder)}})
    assert json.loads((run_dir / "eval.json").read_text())["aggregate"]["samples"] == 4


def test_a_third_party_regulariser_adds_its_loss_and_saves_its_parameters(tmp_path):
    run_dir, events = run(tmp_path, **{"stages": [{"name": "s1", "steps": 2, "regularisers": [{"name": "penalty"}]}]})
    train = [e for e in events if e["event"] == "train"]
    assert train and all("penalty" in e for e in train)
    from safetensors.torch import load_file
    assert "regulariser.penalty.scale" in load_file(str(run_dir / "s1" / "model_000002.safetensors"))


def test_a_third_party_freeze_policy_decides_what_trains(tmp_path):
    _, events = run(tmp_path, **{"stages": [{"name": "s1", "steps": 2, "freeze": [{"name": "projector_off"}]}]})
    table = {name: (t, f) for name, t, f in next(e for e in events if e["event"] == "stage_start")["parameters"]}
    assert table["projector"][0] == 0 and table["projector"][1] > 0


def test_a_third_party_adapter_trains_alone_and_merges(tmp_path, cli):
    """The scale projector (no bias) with an output-scale adapter on it: the adapter checkpoint holds the scale
    alone, python -m core.merge folds it in, and both read the same."""
    first = {"name": "s1", "steps": 2, "lr": 1e-2}
    second = {"name": "s2", "steps": 2, "lr": 1e-2, "init_from": {"path": "stage:s1"},
              "adapters": [{"name": "output_scale", "layers": ["projector.linear"]}]}
    run_dir, _ = run(tmp_path, **{"model.projector": {"name": "scale"}, "stages": [first, second]})
    from safetensors.torch import load_file
    assert list(load_file(str(run_dir / "s2" / "model_000002.safetensors"))) == ["projector.linear.scale"]
    assert cli("core.merge", run_dir / "s2", tmp_path / "merged").returncode == 0
    merged = load_file(str(tmp_path / "merged" / "model_000002.safetensors"))
    assert "projector.linear.weight" in merged and not any("scale" in k for k in merged)
    image = tmp_path / "page.png"
    Image.new("RGB", (32, 32), "white").save(image)
    texts = [cli("core.generate", folder, image, "--max-new-tokens", "4").stdout
             for folder in (run_dir / "s2", tmp_path / "merged")]
    assert texts[0] == texts[1] and texts[0]


def test_a_third_party_logger_gets_every_event(tmp_path):
    run_dir, _ = run(tmp_path, loggers=[{"name": "jsonl"}, {"name": "event_list"}])
    events = (run_dir / "events.txt").read_text().split()
    assert events[0] == "stage_start" and "train" in events and events[-1] == "eval"


def test_a_third_party_metric_is_scored_in_the_evaluation(tmp_path):
    run_dir, _ = run(tmp_path, **{"eval.metrics": [{"name": "length_gap"}]})
    aggregate = json.loads((run_dir / "eval.json").read_text())["aggregate"]
    assert isinstance(aggregate["length_gap"], float)


def test_a_third_party_source_writes_shards(tmp_path):
    for name, color in (("a.png", "white"), ("b.png", "black")):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    (tmp_path / "pairs.json").write_text(json.dumps({"a.png": "hello", "b.png": "", "c.png": "gone"}))
    from core.registry import load_plugins
    registry = load_plugins([PLUGIN])[1]
    summary = write_shards("word_pairs", str(tmp_path / "pairs.json"), str(tmp_path / "out"), progress=False,
                           registry=registry)
    assert summary.samples == 1 and dict(summary.skipped) == {"empty_text": 1, "missing_image": 1}


def test_a_third_party_metric_input_is_scored(tmp_path, capsys):
    path = tmp_path / "results.tsv"
    path.write_text("1\tabc\tabcd\n2\tx\tx\n", encoding="utf-8")
    assert metrics_main(["length_gap", "--format", "tsv", "--pred", str(path), "--plugin", PLUGIN]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"length_gap": 0.5}


def test_a_component_without_a_required_member_is_one_line_naming_it():
    registry = Registry()
    registry.source = "plugin mine"

    class NoGrid:
        image_size, out_dim = 32, 8

    registry.add("encoder", "nogrid", NoGrid)
    with pytest.raises(ConfigError, match=r"encoder 'nogrid' from plugin mine lacks __call__, grid_size"):
        registry.build("encoder", "nogrid", where="model.encoder")


def test_every_kind_has_a_contract():
    from core.registry import KINDS
    assert set(KINDS) == set(contracts.PROTOCOLS) | set(contracts.BEHAVIOUR_HOOKS)
    assert contracts.required_members(contracts.Encoder) == ["__call__", "grid_size", "image_size", "out_dim"]
