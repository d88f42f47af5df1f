"""Metric plugins and ``python -m core.metrics``; expected values derived by hand from docs/metrics.md."""
import json
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.metrics import score_pairs
from core.registry import load_plugins
from core.textdist import levenshtein, ned, window_ned
from plugins.metrics.exact import ExactMatch
from plugins.metrics.fox import FoxMetric
from plugins.metrics.ned import NEDMetric

ROOT = Path(__file__).resolve().parents[1]
approx = pytest.approx


def fox(pred, gt, **kw):
    return FoxMetric(**kw).vlmkit_metric_score(pred=pred, gt=gt)


def test_textdist():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert ned("kitten", "sitting") == approx(3 / 7)
    assert ned("", "abc") == 1.0
    assert ned("", "") is None and ned("", "", both_empty=0.0) == 0.0  # 0/0: left out, or a cost of nothing
    assert ned("ab", "ab", both_empty=None) == 0.0
    # the closest same-length window: "wor1d" is one substitution from "world"
    assert window_ned("hello world", "wor1d") == approx(1 / 5) and window_ned("xxabcxx", "abc") == 0.0
    assert window_ned("ab", "abc") is None and window_ned("abc", "") is None  # longer, or empty: no window


def test_fox_swapped_precision_recall():
    # P={a,b,c}, G={a,b,d,e}, I=|{a,b}|=2. Fox (§1.4): precision=I/|G|=2/4, recall=I/|P|=2/3;
    # conventional word_precision=I/|P|=2/3, word_recall=I/|G|=2/4. f1=1/(.5/.5+.5/(2/3))=4/7.
    # edit: "a b c" -> "a b d e" = substitute c->d, insert " e" = 3, max len 7.
    v = fox("a b c", "a b d e")
    assert v == approx({"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7, "edit_dist": 3 / 7,
                        "word_precision": 2 / 3, "word_recall": 2 / 4})


def test_fox_set_based_repeats():
    # P={the,cat}, G={the,cat,sat}: I=2 -> precision 2/3, recall 2/2; f1=1/(.5*1.5+.5)=0.8
    v = fox("the the cat", "the cat cat sat")
    assert (v["precision"], v["recall"], v["f1"]) == approx((2 / 3, 1.0, 0.8))


def test_fox_punctuation_attached():
    # str.split keeps "Hello," whole: P={Hello,,world}, G={Hello,world}, I=1 -> 1/2, 1/2, f1 1/2;
    # edit: delete "," = 1 over max len 12.
    v = fox("Hello, world", "Hello world")
    assert (v["precision"], v["recall"], v["f1"], v["edit_dist"]) == approx((0.5, 0.5, 0.5, 1 / 12))


def test_fox_whitespace_only_and_one_side_empty():
    # "  \n" has no tokens: P={}, G={a,b}, I=0 -> precision 0/2=0, recall undefined -> 0, f1 0 (§1.7);
    # edit on raw strings: " "->"a", " "=" ", "\n"->"b" = 2 over 3.
    v = fox("  \n", "a b")
    assert v == approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "edit_dist": 2 / 3,
                        "word_precision": 0.0, "word_recall": 0.0})
    # GT empty, output "x y": precision I/|G| undefined -> 0, recall 0/2 = 0; edit 3/3.
    v = fox("x y", "")
    assert (v["precision"], v["recall"], v["f1"], v["edit_dist"]) == (0.0, 0.0, 0.0, 1.0)
    # NBSP and ideographic space are whitespace for str.split (§1.2): "a\u00a0b" -> {a,b}, equal sets.
    assert fox("a\u00a0b", "a\u3000b")["precision"] == 1.0


def test_fox_both_empty_excluded_from_mean():
    m = FoxMetric()
    assert set(fox("", "").values()) == {None}
    assert set(fox(" ", "\n").values()) == {None}  # both token sets empty: excluded too
    rows, agg = score_pairs([m], [(1, "a b c", "a b d e"), (2, "", ""), (3, "x", "x")])
    # means over samples 1 and 3 only: precision (2/4+1)/2, recall (2/3+1)/2, edit (3/7+0)/2
    assert agg["fox_samples"] == 2
    assert (agg["precision"], agg["recall"], agg["edit_dist"]) == approx((0.75, 5 / 6, 3 / 14))
    assert rows[1] == {"id": 2, **dict.fromkeys(rows[0].keys() - {"id"})}


def test_fox_cjk_fallback_tokenizer():
    # Chinese on one side switches both sides (§1.2). Fallback: one token per CJK char, split the rest.
    # P={我,爱,NLP}, G={我,爱,nlp,你} (no lower-casing), I=2 -> precision 2/4, recall 2/3.
    v = fox("我爱 NLP", "我爱 nlp 你", zh_tokenizer="chars")
    assert (v["precision"], v["recall"]) == approx((2 / 4, 2 / 3))
    # "你好，世界" -> 你,好,，,世,界 ; "你好世界" -> 4 tokens: I=4 -> precision 4/4, recall 4/5
    v = fox("你好，世界", "你好世界", zh_tokenizer="chars")
    assert (v["precision"], v["recall"]) == approx((1.0, 0.8))


def test_fox_jieba_variant():
    pytest.importorskip("jieba")
    v = fox("我爱北京", "我爱北京", zh_tokenizer="jieba")
    assert (v["precision"], v["recall"], v["edit_dist"]) == (1.0, 1.0, 0.0)


def test_fox_tokenizer_option_errors():
    with pytest.raises(ConfigError):
        FoxMetric(zh_tokenizer="spaces")
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="jieba"):
            FoxMetric(zh_tokenizer="jieba")


# Fox with jieba (the default) against Fox's own scorer. Expected values: ``cal_per_metrics`` of Fox's
# eval_tools/eval_ocr_test.py (ucaslcl/Fox, commit 68c4a0a; jieba 0.42.1, nltk 3.9.1), called as its script
# calls it (label = GT, answer = output), METEOR left out (it needs WordNet). On OmniDocBench's demo pages the
# two agree on every sample (docs/reading-and-scoring.md, "The metrics").
FOX = [  # (label = GT, answer = output, precision, recall, f_measure, edit_dist) as Fox printed them
    ("我爱北京天安门。\n北京是中国的首都。", "我爱北京天安门\n北京是首都。", 0.8, 1.0, 0.8888888888888888, 0.2222222222222222),
    ("OCR 模型 reads pages, 每页 一次。", "OCR 模型 reads the pages, 每页一次.", 0.8888888888888888, 0.8,
     0.8421052631578947, 0.20689655172413793),
    ("纯文本对比测试", "纯文本对比测验", 0.75, 0.75, 0.75, 0.14285714285714285),
]


@pytest.mark.parametrize("label, answer, precision, recall, f1, edit", FOX)
def test_fox_default_is_jieba_and_matches_fox(label, answer, precision, recall, f1, edit):
    metric = FoxMetric()  # the default: jieba, installed with vlmkit
    assert metric.zh_tokenizer == "jieba"
    got = metric.vlmkit_metric_score(pred=answer, gt=label)
    assert (got["precision"], got["recall"], got["f1"], got["edit_dist"]) == pytest.approx(
        (precision, recall, f1, edit), abs=1e-15)


def test_char_fallback_is_not_fox():
    # Without jieba the Chinese branch splits per character: another precision on mixed text (0.9, not 8/9).
    label, answer, precision = FOX[1][:3]
    assert FoxMetric(zh_tokenizer="chars").vlmkit_metric_score(pred=answer, gt=label)["precision"] != precision


def test_long_pair_ned():
    # 3000 'a' vs the same with 30 substitutions: distance 30 / 3000 = 0.01 (no nltk 2,000-char limit, §6.3)
    gt = "a" * 3000
    pred = "b" * 30 + "a" * 2970
    assert NEDMetric().vlmkit_metric_score(pred=pred, gt=gt)["ned"] == approx(0.01)
    assert fox(pred, gt)["edit_dist"] == approx(0.01)


def test_ned_both_empty_excluded():
    # per-sample: "abc"/"abd" 1/3, ""/"" None (excluded), ""/"xy" 2/2 -> mean (1/3 + 1)/2 = 2/3 over 2 samples
    rows, agg = score_pairs([NEDMetric()], [("a", "abc", "abd"), ("b", "", ""), ("c", "", "xy")])
    assert [r["ned"] for r in rows] == [approx(1 / 3), None, 1.0]
    assert agg == {"ned": approx(2 / 3), "ned_samples": 2}


def test_exact():
    pairs = [(1, " abc\n", "abc"), (2, "abc", "ABC"), (3, "", "")]
    assert score_pairs([ExactMatch()], pairs)[1] == {"exact": approx(2 / 3)}  # 1, 0, 1
    assert score_pairs([ExactMatch(strip=False)], pairs)[1] == {"exact": approx(1 / 3)}  # 0, 0, 1


def test_registry_and_collisions():
    _, registry = load_plugins(entry_points=False)
    assert {"fox", "ned", "exact"} <= set(registry.names("metric"))
    with pytest.raises(ConfigError, match="exact"):
        score_pairs([ExactMatch(), ExactMatch()], [(1, "a", "a")])


def _write(path, items):
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")


def test_cli_end_to_end(tmp_path, cli):
    _write(tmp_path / "g.jsonl", [{"id": "p1", "text": "a b d e"}, {"id": "p2", "text": "x"},
                                  {"id": "p3", "text": "hello"}])
    _write(tmp_path / "p.jsonl", [{"id": "p1", "text": "a b c"}, {"id": "p2", "text": "x"},
                                  {"id": "extra", "text": "zzz"}])
    out = tmp_path / "rows.jsonl"
    r = cli("core.metrics", "fox", "ned", "--pred", str(tmp_path / "p.jsonl"), "--gt", str(tmp_path / "g.jsonl"),
             "--per-sample", str(out))
    assert r.returncode == 0, r.stderr
    agg = json.loads(r.stdout.strip().splitlines()[-1])
    # p1 as in test_fox_swapped_precision_recall; p2 exact; p3 missing -> pred "" vs "hello":
    # precision 0, recall 0, ned 1. Means over 3: precision (1/2+1+0)/3 = 1/2, recall (2/3+1+0)/3 = 5/9,
    # ned (3/7+0+1)/3 = 10/21.
    assert agg["fox_samples"] == 3 and agg["ned_samples"] == 3
    assert (agg["precision"], agg["recall"], agg["ned"]) == approx((0.5, 5 / 9, 10 / 21))
    assert "1 ground-truth ids have no prediction" in r.stderr and "p3" in r.stderr
    assert "1 prediction ids are not in the ground truth" in r.stderr and "extra" in r.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == ["p1", "p2", "p3"] and rows[2]["ned"] == 1.0


def test_cli_malformed_line(tmp_path, cli):
    _write(tmp_path / "g.jsonl", [{"id": 1, "text": "a"}])
    (tmp_path / "p.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": \n', encoding="utf-8")
    r = cli("core.metrics", "ned", "--pred", str(tmp_path / "p.jsonl"), "--gt", str(tmp_path / "g.jsonl"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{tmp_path / 'p.jsonl'}:2" in lines[0]


def test_cli_unknown_metric(cli):
    result = cli("core.metrics", "fxo", "--pred", "x", "--gt", "y")
    assert result.returncode == 2
    assert "did you mean 'fox'" in result.stderr
