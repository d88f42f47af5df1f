"""olmOCR-Bench (``--format olmocr_bench``, the ``olmocr_bench`` metric and shard source) against the benchmark's own results.

Fixture: tests/data/olmocr_bench/ (our own tests, one or more per test kind, and a candidate folder of
readings in the benchmark's layout, with 3 repeats of one page); the PDFs are written by the test.
OFFICIAL holds what allenai/olmocr's ``olmocr/bench`` (commit f7cfe4c, run offline in its own venv with
bs4 4.15, rapidfuzz 3.14.6, fuzzysearch 0.8.1) gives on exactly these files with the math test
removed (it needs a browser there too): each test's pass/fail, the sources' passed/total and the score.
"""
import json
import shutil
from pathlib import Path

import pytest

from benchmarks.inputs import page_of_lines, pdf_bytes
from core.metrics import main
from tests.helpers import GRID_RECIPE

pytest.importorskip("fuzzysearch", reason="the order test needs the olmocr-bench extra")

DATA = Path(__file__).parent / "data" / "olmocr_bench"
OFFICIAL = {
    "tests": {"blank_page": True, "present_within_diffs": True, "present_markup": True, "present_exact_miss": False,
              "present_any_case": True, "present_first_n": False, "present_quotes": True, "absent_header": False,
              "absent_ok": True, "order_ok": True, "order_wrong": False, "order_fuzzy": True, "table_left": True,
              "table_up_wrong": False, "table_span": True, "table_span_right": True, "table_markdown": True,
              "table_html_only": False, "table_headings": True, "format_bold": True, "format_italic_miss": False,
              "footnote_ok": True, "footnote_missing": False, "format_heading": True, "doc.pdf_baseline": True,
              "repeats_two_of_three": True, "repeats_one_of_three": False, "sub/scan.pdf_baseline": False},
    "sources": {"blanks.jsonl": [1, 1], "dataset.jsonl": [16, 25], "baseline": [1, 2]},
    "overall": 0.7133333333333334,
}


def bench(root):
    """The benchmark folder: the fixture's test files and three PDFs (one of them in a subfolder, with no test)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.jsonl", "blanks.jsonl"):
        shutil.copy(DATA / name, root / name)
    (root / "pdfs" / "sub").mkdir(parents=True)
    (root / "pdfs" / "doc.pdf").write_bytes(pdf_bytes([page_of_lines(["Title Here"]), page_of_lines(["A second"])]))
    (root / "pdfs" / "blank.pdf").write_bytes(pdf_bytes([""]))
    (root / "pdfs" / "sub" / "scan.pdf").write_bytes(pdf_bytes([page_of_lines(["Scanned words"])]))
    return root


def _score(capsys, gt, pred, tmp_path, option="--gt"):
    rows_path = tmp_path / "rows.jsonl"
    gts = [str(path) for path in gt] if isinstance(gt, list) else [str(gt)]
    assert main(["olmocr_bench", "--format", "olmocr_bench", option, *gts, "--pred", str(pred),
                 "--per-sample", str(rows_path)]) == 0
    aggregate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    return aggregate, {t[0]: t for row in rows for t in row["olmocr_bench_tests"]}


def test_every_test_and_score_as_the_benchmark(tmp_path, capsys):
    aggregate, tests = _score(capsys, bench(tmp_path / "bench"), DATA / "candidate", tmp_path)
    assert {k: bool(t[3]) for k, t in tests.items() if t[2] != "math"} == OFFICIAL["tests"]
    assert tests["math_not_run"][3] is None and aggregate["olmocr_bench_not_run"] == 1  # counted in no total
    assert aggregate["olmocr_bench_sources"] == OFFICIAL["sources"]
    assert aggregate["olmocr_bench"] == pytest.approx(OFFICIAL["overall"], abs=1e-12)
    low, high = aggregate["olmocr_bench_ci"]
    assert low < aggregate["olmocr_bench"] < high
    assert tests["repeats_two_of_three"][4] == pytest.approx(2 / 3)  # 2 of the page's 3 readings pass


def test_a_page_without_reading_fails_the_candidate(tmp_path, capsys):
    candidate = tmp_path / "candidate"
    shutil.copytree(DATA / "candidate", candidate)
    for f in candidate.glob("doc_pg2_repeat*.md"):
        f.unlink()
    aggregate, _ = _score(capsys, bench(tmp_path / "bench"), candidate, tmp_path)
    assert aggregate["olmocr_bench"] == 0.0 and "doc.pdf page 2: no reading" in aggregate["olmocr_bench_failed"]


def test_one_jsonl_file_takes_only_its_pdfs(tmp_path, capsys):
    root = bench(tmp_path / "bench")
    aggregate, tests = _score(capsys, root / "blanks.jsonl", DATA / "candidate", tmp_path)
    assert set(tests) == {"blank_page"} and aggregate["olmocr_bench_sources"] == {"blanks.jsonl": [1, 1]}


def test_tests_given_as_the_shells_star_jsonl_score_as_the_folder(tmp_path, capsys):
    root = bench(tmp_path / "bench")
    folder = _score(capsys, root, DATA / "candidate", tmp_path)
    star = _score(capsys, sorted(root.glob("*.jsonl")), DATA / "candidate", tmp_path, option="--tests")
    assert star == folder  # every file of the folder: its PDFs too (the baseline tests)
    some = _score(capsys, [root / "blanks.jsonl"], DATA / "candidate", tmp_path, option="--tests")
    assert set(some[1]) == {"blank_page"}


def test_several_ground_truth_files_where_a_format_reads_one_is_one_line(tmp_path, cli):
    gt = tmp_path / "gt.jsonl"
    gt.write_text('{"id": "a", "text": "x"}\n')
    result = cli("core.metrics", "ned", "--gt", gt, gt, "--pred", gt)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --gt: --format jsonl reads one ground-truth path, got 2")


@pytest.mark.parametrize("line, message", [
    ('{"pdf": "doc.pdf", "page": 1, "id": "x", "type": "guess"}', "type one of"),
    ('{"pdf": "doc.pdf", "page": 1, "id": "x", "type": "present", "text": "**  **"}', "text is empty after"),
    ('{"pdf": "doc.pdf", "page": 1, "id": "x", "type": "order", "before": "ab", "after": "abcd", "max_diffs": 2}',
     "max_diffs is more than half"),
    ('{"pdf": "doc.pdf", "page": 1, "id": "x", "type": "table", "cell": "a", "colour": "red"}', "unknown key"),
])
def test_a_test_the_benchmark_refuses_is_one_error_line(tmp_path, cli, line, message):
    root = bench(tmp_path / "bench")
    (root / "dataset.jsonl").write_text(line + "\n")
    result = cli("core.metrics", "olmocr_bench", "--format", "olmocr_bench", "--gt", root, "--pred", DATA / "candidate")
    assert result.returncode == 2 and "dataset.jsonl:1" in result.stderr and message in result.stderr


def test_a_training_run_scores_the_benchmark_split_as_the_metrics_command_does(tmp_path, cli):
    root = bench(tmp_path / "bench")
    shards = tmp_path / "shards"
    assert cli("core.shards", "olmocr_bench", root, "--out", shards, "--name", "eval", "--quiet",
               "--longest-side", "64").returncode == 0
    # training needs texts: the benchmark's pages with a made-up one each, through the jsonl source
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": f"{root}/pdfs/{pdf}", "page": page, "text": "a"})
                                                  + "\n" for pdf, page in (("doc.pdf", 1), ("doc.pdf", 2))))
    assert cli("core.shards", "jsonl", tmp_path / "train.jsonl", "--out", shards, "--name", "train", "--quiet",
               "--longest-side", "64").returncode == 0
    run = tmp_path / "run"
    result = cli("core.run", GRID_RECIPE, f"run.dir={run}", f"data.dataset={{name: shards, train: "
                 f"'{shards}/train-000000.tar', eval: '{shards}/eval-000000.tar'}}", "eval.metrics=[olmocr_bench]", "eval.max_new_tokens=8", "run.threads=1",
                 "stages.0.steps=1", "stages.1.steps=1", "data.batch_size=2", "stages.0.probe_every=0",
                 "stages.1.probe_every=0", "stages.0.monitor_every=0", "stages.1.monitor_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    in_run = json.loads((run / "eval.json").read_text())["aggregate"]
    assert in_run["olmocr_bench_tests_run"] == 28 and in_run["olmocr_bench_not_run"] == 1
    candidate = tmp_path / "candidate"
    for row in map(json.loads, (run / "eval_samples.jsonl").read_text().splitlines()):
        path = candidate / (row["id"].replace("sub_", "sub/") + "_repeat1.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(row["pred"], encoding="utf-8")
    alone = cli("core.metrics", "olmocr_bench", "--format", "olmocr_bench", "--gt", root, "--pred", candidate)
    assert alone.returncode == 0, alone.stderr
    alone = json.loads(alone.stdout.strip().splitlines()[-1])
    assert alone == {k: v for k, v in in_run.items() if k.startswith("olmocr_bench")}
