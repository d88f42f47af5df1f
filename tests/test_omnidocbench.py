"""``python -m core.metrics omnidocbench --format omnidocbench`` against the official evaluator's numbers.

Fixtures: tests/data/omnidocbench/ (our own pages in OmniDocBench.json's format: gt.json, and
pred/<image stem>.md; one page per pipeline step, ``missing_file`` has no prediction).

Where the expected values come from: OmniDocBench's ``pdf_validation.py`` (repo
opendatalab/OmniDocBench, mirror pichiu/OmniDocBench, commit 7bd6c2e) run offline
(HF_HUB_OFFLINE=1) on exactly these files, with its requirements (pylatexenc 3.0a30,
Levenshtein 0.25.1, scipy 1.10.1) and the configs/end2end.yaml config reduced to
``match_method: quick_match`` and metric Edit_dist for text_block, display_formula, table and
reading_order (CDM and TEDS removed). OFFICIAL holds its ``*_per_page_edit.json`` values and the
``all`` averages of its ``*_metric_result.json``, SAMPLES a few per-sample Edit_num/upper_len from
its ``*_result.json``, copied digit for digit. The ``--option corrected`` expectations are not the
evaluator's (it has no such mode): they are worked out by hand in each test.
"""
import json
from pathlib import Path

import pytest

from core.metrics import main

DATA = Path(__file__).parent / "data" / "omnidocbench"
OFFICIAL = {
    "text_block": {
        "pages": {"consecutive_merge": 0.0, "empty_prediction": 1.0, "formulas_out": 0.0, "hallucination_free": 0.0,
                  "header_absorbed": 0.0, "leftover_pairing": 0.6405228758169934, "pipe_table": 0.0,
                  "quirk_misaligned": 0.0847457627118644, "quirk_truncated": 0.21428571428571427, "tables_out": 0.0},
        "all": (0.1939554352814572, 0.2097560975609756, 0.16123064500807446)},
    "display_formula": {"pages": {"formulas_out": 0.25}, "all": (0.25, 0.25, 0.25)},
    "table": {"pages": {"pipe_table": 0.48986486486486486, "tables_out": 0.0125},
              "all": (0.25118243243243243, 0.3223684210526316, 0.25118243243243243)},
    "reading_order": {
        "pages": {"consecutive_merge": 0.0, "empty_prediction": 1.0, "formulas_out": 0.0, "hallucination_free": 0.0,
                  "header_absorbed": 0.0, "leftover_pairing": 0.0, "pipe_table": 0.0, "quirk_misaligned": 0.0,
                  "quirk_truncated": 0.0, "tables_out": 0.0},
        "all": (0.1, 0.09523809523809523, 0.1)},
}
PREFIX = {"text_block": "odb", "display_formula": "odb_display_formula", "table": "odb_table",
          "reading_order": "odb_reading_order"}


def _score(tmp_path_factory, capsys, *extra):
    out = tmp_path_factory.mktemp("odb") / "rows.jsonl"
    rc = main(["omnidocbench", "--format", "omnidocbench", "--gt", str(DATA / "gt.json"), "--pred",
               str(DATA / "pred"), "--per-sample", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    return json.loads(captured.out.strip().splitlines()[-1]), rows, captured.err


def _page_values(rows, element):
    """Per-page sum(Edit_num)/sum(upper_len) of one element, as the evaluator's per_page_edit.json."""
    out = {}
    for page, row in rows.items():
        samples = row[f"odb_{element}"] + (row["odb_formula_as_text"] if element == "text_block" else [])
        if samples:
            out[page] = sum(n for n, _ in samples) / sum(u for _, u in samples)
    return out


@pytest.fixture
def official(tmp_path_factory, capsys):
    return _score(tmp_path_factory, capsys)


@pytest.fixture
def corrected(tmp_path_factory, capsys):
    return _score(tmp_path_factory, capsys, "--option", "corrected")


@pytest.mark.parametrize("element", list(OFFICIAL))
def test_every_page_and_average_as_the_evaluator(official, element):
    agg, rows, _ = official
    assert _page_values(rows, element) == pytest.approx(OFFICIAL[element]["pages"], abs=1e-12)
    prefix = PREFIX[element]
    got = (agg[f"{prefix}_ALL_page_avg"], agg[f"{prefix}_edit_whole"], agg[f"{prefix}_edit_sample_avg"])
    assert got == pytest.approx(OFFICIAL[element]["all"], abs=1e-12)
    assert "CDM" in agg["odb_overall_missing"] and "odb_overall" not in agg


def test_tables_out(official):
    # The predicted table (one cell wrong) is scored as a table only: the page's text is perfect.
    _, rows, _ = official
    assert rows["tables_out"]["odb_text_block"] == [[0, 15], [0, 43], [0, 26]]  # evaluator: same three samples
    assert rows["tables_out"]["odb_table"] == [[2, 160]]  # the caption line went to its caption block: no sample


def test_formulas_out(official):
    # $$E = mc^2 \tag{1}$$ is a display formula: scored against the GT formula (2 of 8 after its
    # normalisation), not in the text; the inline $m_{0}$ / $m_0$ render alike on both sides.
    _, rows, _ = official
    assert rows["formulas_out"]["odb_display_formula"] == [[2, 8]]
    assert rows["formulas_out"]["odb_text_block"] == [[0, 31], [0, 40]]


def test_header_absorbed(official):
    # Header, footer and page number in the prediction match their GT blocks and cost nothing.
    _, rows, _ = official
    assert rows["header_absorbed"]["odb_text_block"] == [[0, 12], [0, 48]]


def test_consecutive_merge(official):
    # One GT paragraph written as three: the three consecutive pieces are merged into one match.
    _, rows, _ = official
    assert rows["consecutive_merge"]["odb_text_block"] == [[0, 119], [0, 32]]


def test_leftover_pairing(official):
    # The unmatched GT paragraph and the unmatched hallucinated one are paired whatever their distance:
    # Edit_num 98 over the longer (hallucinated) length 120, not 36/36 against "".
    _, rows, _ = official
    assert rows["leftover_pairing"]["odb_text_block"] == [[0, 33], [98, 120]]
    # A hallucinated paragraph with no GT left to pair with costs nothing.
    assert rows["hallucination_free"]["odb_text_block"] == [[0, 27], [0, 16]]


def test_missing_file_skips_page(official):
    agg, rows, err = official
    assert "missing_file" not in rows and agg["odb_pages"] == 10
    assert "1 ground-truth pages have no prediction (skipped" in err and "missing_file" in err


def test_empty_prediction(official):
    _, rows, _ = official
    assert rows["empty_prediction"]["odb_text_block"] == [[11, 11], [34, 34]]
    assert rows["empty_prediction"]["odb_reading_order"] == [[2, 2]]


def test_quirks_vs_corrected(official, corrected):
    _, rows, _ = official
    _, fixed, _ = corrected
    # "---" normalises to "" and is dropped from the lines but not from the pieces, so the formula
    # line takes the "---" piece's text category: the evaluator moves the display formula into the
    # text score (a2b2c2 against a^2+b^2=c^2, 5 of 11). Corrected: it stays a formula, exact.
    assert rows["quirk_misaligned"]["odb_formula_as_text"] == [[5, 11]]
    assert rows["quirk_misaligned"]["odb_display_formula"] == []
    assert fixed["quirk_misaligned"]["odb_formula_as_text"] == []
    assert fixed["quirk_misaligned"]["odb_display_formula"] == [[0, 11]]
    assert fixed["quirk_misaligned"]["odb_edit"] == 0.0
    # Truncation links 0->1, 1->2: the evaluator's GT repeats block 1 ("continuesinasecondcolumn", 24
    # characters); corrected, the GT is the three blocks once each and the prediction matches exactly.
    assert rows["quirk_truncated"]["odb_text_block"] == [[24, 87], [0, 25]]
    assert fixed["quirk_truncated"]["odb_text_block"] == [[0, 63], [0, 25]]
    # Pages without these bugs score the same both ways.
    for page in ("tables_out", "formulas_out", "leftover_pairing", "consecutive_merge"):
        assert fixed[page]["odb_text_block"] == rows[page]["odb_text_block"]
