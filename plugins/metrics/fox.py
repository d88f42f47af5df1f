"""Fox's OCR metrics (``ucaslcl/Fox`` ``eval_tools/eval_ocr_test.py``), per sample as the script reports them.

* Normalisation: none (docs/metrics.md §1.2): case, punctuation, markdown and Unicode
  form all count.
* Tokenisation (§1.2): if either string contains a character in
  ``[\\u4e00-\\u9fa5]``, both are segmented with ``jieba.lcut`` (jieba keeps each
  whitespace character as a token); otherwise ``str.split()`` (runs of any
  Unicode whitespace; punctuation stays attached to words). jieba is a vlmkit
  dependency, so ``"auto"`` (the default) is Fox's own split: on the 18
  OmniDocBench demo pages every per-sample value equals Fox's script's
  (tests/test_metrics.py, Fox against Fox). Without jieba
  (``zh_tokenizer="chars"``, or ``"auto"`` when jieba is not installed) the
  Chinese branch falls back to one token per CJK ideograph / CJK or full-width
  punctuation mark and ``str.split()`` for the rest, dropping whitespace: this
  fallback is NOT Fox-exact (§6.4).
* Per sample (§1.3, §1.4), with P = set(pred tokens), G = set(gt tokens),
  I = |P & G| (set-based: repeats count once, order ignored):
  ``precision`` = I/|G| and ``recall`` = I/|P| -- Fox's *swapped* names, so
  ``precision`` is conventionally recall; ``word_precision`` = I/|P| and
  ``word_recall`` = I/|G| are the conventional pair; ``f1`` = nltk f_measure,
  alpha 0.5 (0 if either ratio is 0); ``edit_dist`` = Levenshtein(raw pred,
  raw gt) / max(len), code points, no 2,000-character limit (§1.7, §6.3).
* Empty input (Fox itself crashes, §1.6; convention of §1.7): a string with no
  non-whitespace character (``""`` or whitespace only) has an empty token set,
  also in jieba mode. Both token sets empty -> the sample is excluded: every
  value is None (also ``edit_dist``, so all means share one denominator). One
  set empty -> I = 0, the defined ratio keeps its value (0), the undefined ratio
  and F1 are 0, ``edit_dist`` is computed on the raw strings.
* Averaging (§1.5): plain mean over the samples with non-None values (a macro
  average, every page weighs the same); ``fox_samples`` counts them.
"""
import math
import re
import warnings

from collections import Counter

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.jsonfiles import read_json
from core.textdist import ned

KEYS = ("precision", "recall", "f1", "edit_dist", "word_precision", "word_recall")
_ZH = re.compile("[\u4e00-\u9fa5]")  # Fox's Chinese test, §1.2
_CJK = "\u3001-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
_CHARS = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def _char_tokens(text):
    """Fallback Chinese tokenizer (not Fox-exact): one token per CJK char, whitespace split otherwise."""
    return _CHARS.findall(text)


def _jieba_tokens():
    try:
        import jieba
    except ImportError:
        return None
    import logging
    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut


class FoxMetric:
    """``zh_tokenizer``: ``"auto"`` (jieba if importable, else ``"chars"``), ``"jieba"`` or ``"chars"``."""

    def __init__(self, zh_tokenizer="auto"):
        if zh_tokenizer not in ("auto", "jieba", "chars"):
            raise ConfigError(f"zh_tokenizer must be 'auto', 'jieba' or 'chars', not {zh_tokenizer!r}")
        lcut = _jieba_tokens() if zh_tokenizer != "chars" else None
        if zh_tokenizer == "jieba" and lcut is None:
            raise ConfigError("zh_tokenizer='jieba' but jieba is not installed (pip install jieba)")
        self.zh_tokenizer = "jieba" if lcut else "chars"
        self._zh_tokens = lcut or _char_tokens
        self._warn = zh_tokenizer == "auto" and lcut is None

    def tokens(self, text, chinese):
        if not text.strip():  # whitespace-only counts as no tokens, also for jieba
            return []
        return self._zh_tokens(text) if chinese else text.split()

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        chinese = bool(_ZH.search(pred) or _ZH.search(gt))  # either side switches both, §1.2
        if chinese and self._warn:
            warnings.warn("fox: jieba is not installed; Chinese text is split per character, "
                          "which is not Fox-exact (pip install jieba)", stacklevel=2)
            self._warn = False
        p, g = set(self.tokens(pred, chinese)), set(self.tokens(gt, chinese))
        if not p and not g:  # both empty: excluded, §1.7
            return dict.fromkeys(KEYS)
        inter = len(p & g)
        of_gt = inter / len(g) if g else 0.0    # Fox's "precision" (conventional recall), §1.4
        of_pred = inter / len(p) if p else 0.0  # Fox's "recall" (conventional precision), §1.4
        f1 = 0.0 if of_gt == 0 or of_pred == 0 else 1.0 / (0.5 / of_gt + 0.5 / of_pred)
        return {"precision": of_gt, "recall": of_pred, "f1": f1, "edit_dist": ned(pred, gt),
                "word_precision": of_pred, "word_recall": of_gt}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        out = {}
        for key in KEYS:
            values = [r[key] for r in rows if r.get(key) is not None]
            out[key] = math.fsum(values) / len(values) if values else None
        out["fox_samples"] = sum(1 for r in rows if r.get("edit_dist") is not None)
        return out


def read_fox_results(path):
    """Fox's result JSON (§1.1) -> ``[(id, answer, label, None)]``: ``answer`` is the model output.

    The id is ``image``, or ``image#index`` (index in the list) for an image listed more than once."""
    items = read_json(path)
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a JSON list of Fox results")
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("image", "label", "answer"))):
            raise ConfigError(f'{path}: item {i}: expected an object with strings "image", '
                              '"label" (ground truth) and "answer" (model output)')
    repeats = Counter(item["image"] for item in items)
    return [(item["image"] if repeats[item["image"]] == 1 else f"{item['image']}#{i}",
             item["answer"], item["label"], None) for i, item in enumerate(items)]


class FoxResults:
    """``--format fox``: ``--pred`` is Fox's result JSON, a list of ``{"image", "question", "label",
    "answer"}`` where ``label`` is the ground truth and ``answer`` the model output (§1.1); no ``--gt``."""
    needs_gt = False

    def read(self, pred_path, gt_path=None):
        return read_fox_results(pred_path)


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "fox", FoxMetric)
    registry.add("metric_input", "fox", FoxResults)
