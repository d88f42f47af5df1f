"""The omnidocbench metric and the fox / omnidocbench / jsonl-with-page input formats of ``python -m core.metrics``.

Expected values are worked out by hand from metrics.md (§1.1, §1.4, §2.1-§2.6).
"""
import json
import re

import pytest

from core.errors import ConfigError
from core import metrics
from core.metrics import main, score_pairs
from core.registry import load_plugins
from plugins.metrics.fox import FoxMetric
from plugins.metrics.omnidocbench import OmniDocBenchText
from plugins.metrics.omnidocbench_files import omnidocbench_page_text
from plugins.metrics.omnidocbench_normalise import clean_string, textblock2unicode

approx = pytest.approx


def load_pairs(fmt, pred, gt=None, **options):
    return metrics.load_pairs(load_plugins()[1], fmt, pred, gt, options)


def odb(pred, gt):
    return OmniDocBenchText().vlmkit_metric_score(pred=pred, gt=gt)


# --- normalisation (§2.2) and per-sample values (§2.1) ---------------------------------------------------------

def test_clean_string_by_hand():
    assert clean_string("Hello, World!\n\tBye.") == "HelloWorldBye"  # punctuation + whitespace gone, case kept
    assert clean_string("and/not") == "andot"                          # "/n" deleted before the \w filter
    assert clean_string("a/tb c\\nd\\te") == "abcde"                   # "/t", literal backslash-n / backslash-t
    assert clean_string("中文，测试。 ＡＢ１") == "中文测试ＡＢ１"          # CJK and full-width letters/digits kept
    assert clean_string("café_1 — “q” ☺") == "café_1q"                 # accents, digits, "_" kept; symbols gone


def test_textblock2unicode_rule():
    keep = lambda s: s  # noqa: E731  (a renderer that returns the cleaned content: shows what it is given)
    # No \ ^ _ left after deleting the escapes \\ \_ \& \% \^ -> left alone ($ goes later, in clean_string).
    assert textblock2unicode("costs $5$ or 50$\\%$", keep) == "costs $5$ or 50$\\%$"
    # LaTeX-looking segments: the renderer gets the cleaned content, its output replaces the segment, stripped.
    assert textblock2unicode("see $ \\alpha^2 $ and \\(x_1\\) now", keep) == "see \\alpha^2 and x_1 now"
    assert textblock2unicode("$a\\_b^{2}$", keep) == "ab^{2}"  # the escape \_ is deleted with its backslash
    assert textblock2unicode("see $ \\alpha^2 $ now") == "see \u03b1^2 now"  # default renderer: pylatexenc
    # With a renderer: it gets the cleaned content; a renderer error leaves the segment as it was.
    seen = []
    assert textblock2unicode("a $x^2$ b", lambda s: seen.append(s) or " X2 ") == "a X2 b" and seen == ["x^2"]
    assert textblock2unicode("a $x^2$ b", lambda s: 1 / 0) == "a $x^2$ b"


def test_omnidocbench_per_sample():
    # "Hello, world" -> "Helloworld", "hello world." -> "helloworld": one substitution (case kept) / 10
    assert odb("Hello, world", "hello world.") == {"odb_edit": approx(0.1), "odb_edit_num": 1, "odb_upper_len": 10}
    assert odb("中文，测试", "中文测试")["odb_edit"] == 0.0
    # Strings that normalise to "" fall back to raw (§2.1): "!!!" vs "!!" -> 1 deletion / 3
    assert odb("!!!", "!!") == {"odb_edit": approx(1 / 3), "odb_edit_num": 1, "odb_upper_len": 3}
    # One side: "..." normalises to "" -> raw "..." vs "abc": 3 substitutions / 3
    assert odb("...", "abc")["odb_edit"] == 1.0
    assert odb("", "abc")["odb_edit"] == 1.0
    # Both empty: excluded
    assert odb("", "") == {"odb_edit": None, "odb_edit_num": None, "odb_upper_len": None}


def test_omnidocbench_three_averages():
    pairs = [("a1", "abcd", "abcd", "A"),          # 0/4
             ("a2", "xy", "ab", "A"),              # 2/2
             ("b1", "abcdefgh", "abcdefgx", "B"),  # 1/8
             ("b2", "", "", "B"),                  # both empty: excluded
             ("c1", "", "", "C")]                  # page C has no scored sample: not a page
    rows, agg = score_pairs([OmniDocBenchText()], pairs)
    # page A: (0+2)/(4+2) = 1/3; page B: 1/8 -> ALL_page_avg = (1/3 + 1/8)/2 = 11/48
    # edit_whole = (0+2+1)/(4+2+8) = 3/14; edit_sample_avg = (0 + 1 + 1/8)/3 = 3/8
    assert agg == {"odb_ALL_page_avg": approx(11 / 48), "odb_edit_whole": approx(3 / 14),
                   "odb_edit_sample_avg": approx(3 / 8), "odb_samples": 3, "odb_pages": 2}
    assert rows[0] == {"id": "a1", "page": "A", "odb_edit": 0.0, "odb_edit_num": 0, "odb_upper_len": 4}
    # Without pages every sample is its own page: ALL_page_avg = sample mean = 3/8 (3-tuples still work)
    _, agg = score_pairs([OmniDocBenchText()], [p[:3] for p in pairs])
    assert (agg["odb_ALL_page_avg"], agg["odb_pages"]) == (approx(3 / 8), 3)
    rows, agg = score_pairs([OmniDocBenchText()], [("x", "", "", None)])
    assert "page" not in rows[0] and agg["odb_ALL_page_avg"] is None and agg["odb_samples"] == 0


# --- input formats ----------------------------------------------------------------------------------------------

def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def test_fox_format(tmp_path, capsys):
    results = [{"image": "p1.png", "question": "<image>\nOCR", "label": "a b d e", "answer": "a b c"},
               {"image": "p2.png", "question": "q", "label": "x y", "answer": "x"},
               {"image": "p2.png", "question": "q", "label": "z", "answer": "z"}]
    path = tmp_path / "results_final.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    pairs = load_pairs("fox", str(path))
    assert [p[0] for p in pairs] == ["p1.png", "p2.png#1", "p2.png#2"]  # repeated image: + list index
    assert pairs[0][1:3] == ("a b c", "a b d e")                        # (pred = answer, gt = label)
    rows, _ = score_pairs([FoxMetric()], pairs)
    # G = label words {a,b,d,e}, P = answer words {a,b,c}: Fox "precision" = share of GT words = 2/4 (§1.4)
    assert (rows[0]["precision"], rows[0]["recall"]) == approx((2 / 4, 2 / 3))
    rc, agg, _ = _run(capsys, "fox", "--format", "fox", "--pred", str(path))
    # precision (2/4 + 1/2 + 1)/3 = 2/3; recall (2/3 + 1 + 1)/3 = 8/9
    assert rc == 0 and (agg["precision"], agg["recall"]) == approx((2 / 3, 8 / 9))
    rc, _, err = _run(capsys, "fox", "--format", "fox", "--pred", str(path), "--gt", str(path))
    assert rc == 2 and err.startswith("error: --gt is not used")
    path.write_text(json.dumps(results[:1] + [{"image": "p3.png", "label": "t"}]), encoding="utf-8")
    rc, _, err = _run(capsys, "fox", "--format", "fox", "--pred", str(path))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{path}: item 1:" in err


def _page(image, blocks, relations=()):
    return {"layout_dets": blocks, "page_info": {"page_no": 0, "height": 10, "width": 10, "image_path": image},
            "extra": {"relation": list(relations)}}


def _block(anno_id, category, order, text=None):
    block = {"anno_id": anno_id, "category_type": category, "order": order, "ignore": False, "poly": [0] * 8}
    if text is not None:
        block["text"] = text
    return block


PAGE_A = _page("imgs/doc_a.jpg", [
    _block(0, "header", None, "Running Header"),  # not a text category: ignored
    _block(2, "text_block", 2, "First part "),
    _block(3, "text_block", 3, "middle "),
    _block(4, "text_block", 4, "end."),
    _block(1, "title", 1, "Intro"),                # listed late, sorted first by order
    _block(5, "figure", 5),
    _block(6, "text_block", 6, ""),                # empty text: dropped
], [{"source_anno_id": 2, "target_anno_id": 3, "relation_type": "truncated"},
    {"source_anno_id": 3, "target_anno_id": 4, "relation_type": "truncated"},
    {"source_anno_id": 5, "target_anno_id": 1, "relation_type": "parent_son"}])
PAGE_B = _page("doc_b.png", [_block(0, "text_block", 1, "Hello world")])


def test_omnidocbench_page_text():
    # as the evaluator (§2.4): chain 2->3, 3->4 becomes [2, 3, 3, 4], block 3 twice
    assert omnidocbench_page_text(PAGE_A) == "Intro\n\nFirst part middle middle end."
    assert omnidocbench_page_text(PAGE_A, corrected=True) == "Intro\n\nFirst part middle end."
    # a None order counts as 0: sorted before order 1
    page = _page("x.jpg", [_block(0, "text_block", 1, "one"), _block(1, "reference", None, "zero")])
    assert omnidocbench_page_text(page) == "zero\n\none"


def test_omnidocbench_format(tmp_path, capsys):
    gt = tmp_path / "OmniDocBench.json"
    gt.write_text(json.dumps([PAGE_A, PAGE_B]), encoding="utf-8")
    preds = tmp_path / "md"
    preds.mkdir()
    (preds / "doc_a.md").write_text("# Intro\n\nFirst part middle end.\n", encoding="utf-8")
    (preds / "stray.md").write_text("not in the GT", encoding="utf-8")
    rows_out = tmp_path / "rows.jsonl"
    rc, agg, err = _run(capsys, "omnidocbench", "--format", "omnidocbench", "--gt", str(gt), "--pred", str(preds),
                        "--per-sample", str(rows_out))
    # doc_a, blocks matched one to one: title "Intro" (0/5) and the truncation chain 2->3->4, which the
    # evaluator reads as [2, 3, 3, 4]: "Firstpartmiddlemiddleend" (24) against "Firstpartmiddleend", 6
    # deletions. The header block is never matched (nothing close to it). doc_b has no prediction: skipped.
    assert rc == 0 and agg["odb_ALL_page_avg"] == approx(6 / 29) and agg["odb_edit_whole"] == approx(6 / 29)
    assert (agg["odb_edit_sample_avg"], agg["odb_samples"], agg["odb_pages"]) == (approx(3 / 24), 2, 1)
    assert "1 ground-truth pages have no prediction (skipped" in err and "doc_b" in err
    assert "1 predictions are not in the ground truth" in err and "stray" in err
    rows = [json.loads(line) for line in rows_out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["page"], r["odb_text_block"]) for r in rows] == [("doc_a", "doc_a", [[0, 5], [6, 24]])]
    # --option corrected: each block of the chain once, "Firstpartmiddleend" on both sides
    rc, agg, _ = _run(capsys, "omnidocbench", "--format", "omnidocbench", "--gt", str(gt), "--pred", str(preds),
                      "--option", "corrected")
    assert rc == 0 and (agg["odb_ALL_page_avg"], agg["odb_edit_whole"]) == (0.0, 0.0)
    # predictions as JSONL whose ids are the image stems; the GT carries the page and, as text, the page text
    jsonl = tmp_path / "preds.jsonl"
    jsonl.write_text(json.dumps({"id": "doc_b", "text": "Hello world"}) + "\n", encoding="utf-8")
    pairs = load_pairs("omnidocbench", str(jsonl), str(gt))
    assert [(p[0], p[1], p[2], p[3]) for p in pairs] == [("doc_b", "Hello world", "Hello world", "doc_b")]
    assert pairs[0][2].meta == PAGE_B and "doc_a" in capsys.readouterr().err
    rc, agg, _ = _run(capsys, "ned", "--format", "omnidocbench", "--gt", str(gt), "--pred", str(jsonl))
    assert rc == 0 and agg["ned"] == 0.0  # plain-text metrics still see the page text


def test_omnidocbench_format_errors(tmp_path, capsys):
    gt = tmp_path / "bad.json"
    bad = _page("p.jpg", [_block(0, "text_block", 1, "a")],
                [{"source_anno_id": 0, "target_anno_id": 9, "relation_type": "truncated"}])
    gt.write_text(json.dumps([bad]), encoding="utf-8")
    rc, _, err = _run(capsys, "omnidocbench", "--format", "omnidocbench", "--gt", str(gt), "--pred", str(tmp_path))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{gt}: page 0 (p.jpg):" in err and "9" in err
    gt.write_text(json.dumps([{"layout_dets": []}]), encoding="utf-8")
    rc, _, err = _run(capsys, "ned", "--format", "omnidocbench", "--gt", str(gt), "--pred", str(tmp_path))
    assert rc == 2 and "page 0: expected an object with page_info.image_path" in err
    rc, _, err = _run(capsys, "ned", "--pred", str(gt))
    assert rc == 2 and "--gt is required" in err


def test_jsonl_page_key(tmp_path):
    gt, pred = tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    gt.write_text('{"id": 1, "text": "ab", "page": "P"}\n{"id": 2, "text": "cd", "page": "P"}\n'
                  '{"id": 3, "text": "ef"}\n', encoding="utf-8")
    pred.write_text('{"id": 1, "text": "ab", "page": "ignored"}\n{"id": 2, "text": "cx"}\n'
                    '{"id": 3, "text": "ef"}\n', encoding="utf-8")
    pairs = load_pairs("jsonl", str(pred), str(gt))
    assert [p[3] for p in pairs] == ["P", "P", None]
    # page P: (0 + 1)/(2 + 2) = 1/4; sample 3 is its own page: 0 -> ALL_page_avg = 1/8; sample avg (0+1/2+0)/3 = 1/6
    _, agg = score_pairs([OmniDocBenchText()], pairs)
    assert (agg["odb_ALL_page_avg"], agg["odb_edit_sample_avg"], agg["odb_pages"]) == approx((1 / 8, 1 / 6, 2))
    gt.write_text('{"id": 1, "text": "ab", "page": [1]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{gt}:1: page must be")):
        load_pairs("jsonl", str(pred), str(gt))
