"""Scoring pipelines end to end: generate -> metrics by ids that match, errors instead of empty scores, and a
training run's evaluation on an OmniDocBench-format eval split scored as ``python -m core.metrics`` scores it."""
import json
import os
import shutil

from PIL import Image

from core.data import eval_samples
from core.metrics import load_pairs
from core.registry import load_plugins
from core.shards import write_shards
from tests.helpers import GRID_RECIPE, ROOT

ODB = os.path.join(ROOT, "tests", "data", "omnidocbench")
TINY_RUN = ["run.threads=1", "stages.0.steps=2", "stages.1.steps=1", "stages.0.probe_every=0", "stages.1.probe_every=0",
            "stages.0.monitor_every=0", "stages.1.monitor_every=0", "data.batch_size=4",
            "data.dataset.train_samples=64", "data.dataset.samples_per_shard=64", "data.dataset.eval_samples=8",
            "eval.samples=8"]


def odb_pages(tmp_path, count=4):
    """The first ``count`` pages of the test GT (None: all), each with a small page image beside the json."""
    pages = json.load(open(os.path.join(ODB, "gt.json"), encoding="utf-8"))[:count]
    for page in pages:
        Image.new("RGB", (48, 64), "white").save(tmp_path / page["page_info"]["image_path"])
    gt = tmp_path / "OmniDocBench.json"
    gt.write_text(json.dumps(pages), encoding="utf-8")
    return pages, gt


def test_ids_that_match_no_ground_truth_are_an_error_not_a_score(tmp_path, cli):
    (tmp_path / "g.jsonl").write_text('{"id": "page1", "text": "a b"}\n', encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"id": "/data/images/page1.png", "text": "a b"}\n', encoding="utf-8")
    result = cli("core.metrics", "ned", "--gt", tmp_path / "g.jsonl", "--pred", tmp_path / "p.jsonl")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: no prediction id matches") and result.stdout == ""
    pages, gt = odb_pages(tmp_path)
    (tmp_path / "other.jsonl").write_text('{"id": "nothing_like_it", "text": "x"}\n', encoding="utf-8")
    result = cli("core.metrics", "omnidocbench", "--format", "omnidocbench", "--gt", gt,
                 "--pred", tmp_path / "other.jsonl")
    assert result.returncode == 2 and "no prediction matches a page" in result.stderr and result.stdout == ""


def test_generate_output_is_scored_directly_by_image_stem(tmp_path, cli):
    """The pipeline of docs/reading-and-scoring.md: generate's JSONL (ids are image paths) and its .md folder both
    find every page."""
    pages, gt = odb_pages(tmp_path)
    run = tmp_path / "run"
    assert cli("core.run", GRID_RECIPE, f"run.dir={run}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
               *TINY_RUN).returncode == 0
    images = [str(tmp_path / p["page_info"]["image_path"]) for p in pages]
    stage = run / "vis_mid"
    assert cli("core.generate", stage, *images, "--out", tmp_path / "preds.jsonl",
               "--max-new-tokens", 4).returncode == 0
    assert cli("core.generate", stage, *images, "--out-dir", tmp_path / "md", "--max-new-tokens", 4).returncode == 0
    stems = [os.path.splitext(os.path.basename(i))[0] for i in images]
    assert sorted(os.listdir(tmp_path / "md")) == sorted(stem + ".md" for stem in stems)
    scores = []
    for pred in (tmp_path / "preds.jsonl", tmp_path / "md"):
        result = cli("core.metrics", "omnidocbench", "--format", "omnidocbench", "--gt", gt, "--pred", pred)
        assert result.returncode == 0, result.stderr
        assert "no prediction" not in result.stderr  # every page found its prediction
        scores.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert scores[0] == scores[1] and scores[0]["odb_pages"] >= 1


def test_an_eval_split_without_usable_samples_stops_before_training(tmp_path, cli):
    """A LLaVA-style eval split (conversations, no txt) has nothing to score: one error line, no training."""
    import tarfile
    import io
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "eval-000000.tar", "w") as tar:
        for i in range(3):
            turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a page"}]
            for ext, data in (("png", _png()), ("json", json.dumps({"conversations": turns}).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shutil.copy(folder / "eval-000000.tar", folder / "train-000000.tar")
    result = cli("core.run", GRID_RECIPE, f"run.dir={tmp_path / 'run'}", "run.threads=1",
                 f"data.dataset={{name: shards, train: '{folder}/train-000000.tar', eval: '{folder}/eval-000000.tar'}}")
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(lines) == 1 and "eval split has no usable sample" in lines[0]
    assert "missing_text 3" in lines[0] and not (tmp_path / "run" / "vis_tok").exists()


def _png():
    buf = __import__("io").BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_a_training_run_scores_an_omnidocbench_split_as_the_metrics_command_does(tmp_path, cli):
    pages, gt = odb_pages(tmp_path)
    shards = tmp_path / "shards"
    assert cli("core.shards", "omnidocbench", gt, "--out", shards, "--name", "eval", "--quiet").returncode == 0
    assert cli("core.shards", "omnidocbench", gt, "--out", shards, "--name", "train", "--quiet").returncode == 0
    run = tmp_path / "run"
    dataset = f"{{name: shards, train: '{shards}/train-000000.tar', eval: '{shards}/eval-000000.tar'}}"
    result = cli("core.run", GRID_RECIPE, f"run.dir={run}", f"data.dataset={dataset}", "data.max_len=96",
                 "eval.metrics=[omnidocbench]", "eval.max_new_tokens=8",
                 *[o for o in TINY_RUN if not o.startswith("data.dataset.")])
    assert result.returncode == 0, result.stderr[-3000:]
    in_run = json.loads((run / "eval.json").read_text())["aggregate"]
    assert in_run["odb_pages"] >= 1 and "odb_table_ALL_page_avg" in in_run  # block matching ran, not plain text
    preds = run / "preds"
    preds.mkdir()
    for row in map(json.loads, (run / "eval_samples.jsonl").read_text().splitlines()):
        (preds / f"{row['id']}.md").write_text(row["pred"], encoding="utf-8")
    standalone = cli("core.metrics", "omnidocbench", "--format", "omnidocbench", "--gt", gt, "--pred", preds)
    assert standalone.returncode == 0, standalone.stderr
    alone = json.loads(standalone.stdout.strip().splitlines()[-1])
    for key in ("odb_ALL_page_avg", "odb_edit_whole", "odb_table_ALL_page_avg", "odb_reading_order_ALL_page_avg"):
        assert in_run[key] == alone[key], key


def test_shards_and_the_metrics_command_score_against_the_same_ground_truth_text(tmp_path):
    """What a training run evaluates on (the omnidocbench source's shards, read as RunContext.eval_samples reads
    them) carries the page text that ``core.metrics --format omnidocbench`` pairs each prediction with, in the
    evaluator's reading and with ``corrected`` alike; quirk_truncated (links a->b, b->c) reads differently in
    the two, so a source and a metric input that disagreed on the switch would differ there."""
    pages, gt = odb_pages(tmp_path, count=None)
    preds = tmp_path / "preds"
    preds.mkdir()
    for page in pages:
        (preds / (os.path.splitext(page["page_info"]["image_path"])[0] + ".md")).write_text("x", encoding="utf-8")
    registry = load_plugins()[1]
    texts = {}
    for options in ({}, {"corrected": True}):
        name = "eval_corrected" if options else "eval"
        summary = write_shards("omnidocbench", str(gt), str(tmp_path / "shards"), name=name, options=options,
                               progress=False, registry=registry)
        in_run = {s["key"]: s["text"] for s in eval_samples(summary.shards)}
        command = {sid: str(truth) for sid, _, truth, _ in load_pairs(registry, "omnidocbench", str(preds), str(gt),
                                                                      options)}
        assert in_run == command and len(in_run) == len(pages)
        texts[name] = in_run
    assert texts["eval"]["quirk_truncated"] != texts["eval_corrected"]["quirk_truncated"]
