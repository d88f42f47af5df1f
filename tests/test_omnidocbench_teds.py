"""TEDS and TEDS-S of OmniDocBench's tables (plugins/metrics/omnidocbench_teds.py, the ``tables`` extra).

The pair values are worked out by hand from the definition (docs/metrics-omnidocbench.md, "TEDS"):
1 - tree edit distance / the larger number of elements under <table>. The two table values of
tests/data/omnidocbench are the official evaluator's (pdf_validation.py at commit 7bd6c2e with TEDS
in the table metrics, its per_table_TEDS.json and metric_result.json, copied digit for digit).
"""
import json

import pytest

from core.metrics import main

pytest.importorskip("apted")
pytest.importorskip("lxml")
from plugins.metrics.omnidocbench_teds import teds
from tests.test_omnidocbench import DATA


def _doc(body):
    return f'<html><body><table border="1" >{body}</table></body></html>'


GT = _doc("<tr><td>ab</td><td>c</td></tr><tr><td>d</td><td>e</td></tr>")


@pytest.mark.parametrize("pred, expected, expected_structure", [
    (GT, 1.0, 1.0),
    # one cell's two characters half wrong: rename cost 1/2 over 6 nodes
    (_doc("<tr><td>ax</td><td>c</td></tr><tr><td>d</td><td>e</td></tr>"), 1 - 0.5 / 6, 1.0),
    # a row missing: its tr and two tds deleted
    (_doc("<tr><td>ab</td><td>c</td></tr>"), 1 - 3 / 6, 1 - 3 / 6),
    # a span differs: the cell is renamed at cost 1, in both readings
    (_doc('<tr><td colspan="2">ab</td><td>c</td></tr><tr><td>d</td><td>e</td></tr>'), 1 - 1 / 6, 1 - 1 / 6),
    # markup inside a cell is content, not a tree node: <b>, </b>, a, b against a, b (2 of 4 tokens); the <b>
    # element still counts in the denominator (7 elements)
    (_doc("<tr><td><b>ab</b></td><td>c</td></tr><tr><td>d</td><td>e</td></tr>"), 1 - 0.5 / 7, 1.0),
    ("", 0.0, 0.0),  # an empty side
    ("<p>no table</p>", 0.0, 0.0),  # no body/table
    (_doc('<tr><td colspan="two">ab</td><td>c</td></tr>'), 0.0, 0.0),  # the evaluator's int() fails: 0
])
def test_pairs_by_hand(pred, expected, expected_structure):
    assert teds(pred, GT) == pytest.approx(expected, abs=1e-12)
    assert teds(pred, GT, structure_only=True) == pytest.approx(expected_structure, abs=1e-12)


def test_fixture_tables_as_the_evaluator(tmp_path, capsys):
    rows_path = tmp_path / "rows.jsonl"
    rc = main(["omnidocbench", "--format", "omnidocbench", "--gt", str(DATA / "gt.json"), "--pred",
               str(DATA / "pred"), "--per-sample", str(rows_path)])
    assert rc == 0
    agg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["id"]: r for r in map(json.loads, rows_path.read_text(encoding="utf-8").splitlines())}
    assert rows["tables_out"]["odb_table_teds"][0] == pytest.approx([0.9259259259259259, 1.0], abs=1e-12)
    assert rows["pipe_table"]["odb_table_teds"][0] == pytest.approx([0.8888888888888888, 1.0], abs=1e-12)
    assert agg["odb_table_TEDS"] == pytest.approx(0.9074074074074074, abs=1e-12)
    assert agg["odb_table_TEDS_page_avg"] == pytest.approx(0.9074074074074074, abs=1e-12)
    assert agg["odb_table_TEDS_structure_only"] == agg["odb_table_TEDS_structure_only_page_avg"] == 1.0
    # CDM is never computed, so the Overall is not reported; the output says what is missing
    assert "odb_overall" not in agg and "CDM" in agg["odb_overall_missing"] and "TEDS" not in agg["odb_overall_missing"]
