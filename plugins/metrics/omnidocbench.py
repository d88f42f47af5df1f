"""OmniDocBench's text edit distance (``metrics/cal_metric.py`` ``Edit_dist``) with its three averages.

* Normalisation (docs/metrics.md §2.2), the same for prediction and ground truth:
  ``norm = clean_string(textblock2unicode(text))``.
  ``textblock2unicode``: every inline maths segment ``$...$`` or ``\\(...\\)``
  (non-greedy, within one line) whose content, after deleting the two-character
  escapes ``\\\\ \\_ \\& \\% \\^``, still contains ``\\``, ``^`` or ``_`` is
  replaced by the stripped ``pylatexenc`` ``LatexNodes2Text().latex_to_text``
  rendering of that cleaned content. pylatexenc is not a vlmkit dependency:
  without it such a segment is replaced by its cleaned content, stripped, with
  no LaTeX rendering (``$\\alpha^2$`` gives "alpha2" instead of "α2",
  ``$\\times$`` gives "imes" instead of nothing). That is NOT benchmark-exact
  for text with inline maths (``pip install pylatexenc`` to make it exact);
  text without such segments is unaffected. ``renderer`` on the object says
  which one is in use. Other segments keep their ``$``, which step 2 removes.
  ``clean_string``: delete the literal two-character sequences backslash-t and
  backslash-n, real tabs and newlines, ``/t`` and ``/n`` (in that order, so
  "and/not" becomes "andot"), then every character that is neither a Unicode
  word character (``\\w``) nor in U+4E00-U+9FFF. Net effect: all whitespace
  and punctuation go; case, digits, accents and CJK stay.
* Per sample (§2.1): each side uses its normalised string if that is non-empty,
  else its raw string. ``upper_len = max(len(pred), len(gt))`` in code points,
  ``Edit_num`` = Levenshtein distance (unit costs); ``odb_edit`` =
  Edit_num / upper_len, with ``odb_edit_num`` and ``odb_upper_len`` kept in the
  row for the length-weighted averages. Both sides empty (raw strings too):
  the sample is excluded, all three values are None (OmniDocBench records
  nothing, its NaN is skipped by every sum and mean). One side empty: 1.0.
* Averaging (§2.3), over the non-excluded samples:
  ``odb_ALL_page_avg`` = mean over pages of (sum Edit_num / sum upper_len on
  that page), OmniDocBench's leaderboard "Text Edit"; ``odb_edit_whole`` =
  sum Edit_num / sum upper_len over everything; ``odb_edit_sample_avg`` = plain
  mean of the per-sample ratios. Pages come from the rows' ``page`` key (see
  ``core.metrics.score_pairs``); a row without one is its own page, so without
  pages ``odb_ALL_page_avg`` equals ``odb_edit_sample_avg``. A page whose
  samples are all excluded does not count. ``odb_samples`` and ``odb_pages``
  count what went into the averages. No samples: the averages are None.
"""
import math
import re
import warnings

from core.hookspecs import hookimpl
from core.textdist import levenshtein

KEYS = ("odb_edit", "odb_edit_num", "odb_upper_len")
# Inline maths as the evaluator finds it (§2.2 step 1): $...$ or \(...\), shortest match, no newline inside.
_INLINE = re.compile(r"\$(.*?)\$|\\\((.*?)\\\)")
_ESCAPE = re.compile(r"\\[\\_&%^]")  # the escapes removed before the "is this LaTeX?" test, §2.2
_NOT_KEPT = re.compile(r"[^\w\u4e00-\u9fff]")  # clean_string's final filter, §2.2 step 2
_DELETED = ("\\t", "\\n", "\t", "\n", "/t", "/n")  # clean_string's deletions, in its order, §2.2 step 2


def _pylatexenc():
    try:
        from pylatexenc.latex2text import LatexNodes2Text
    except ImportError:
        return None
    return LatexNodes2Text().latex_to_text


def _latex_segments(text):
    """Yield ``(match, cleaned content)`` for the inline segments the evaluator converts (§2.2 step 1)."""
    for match in _INLINE.finditer(text):
        content = match.group(1) if match.group(1) is not None else match.group(2)
        cleaned = _ESCAPE.sub("", content)
        if any(c in cleaned for c in "\\^_"):
            yield match, cleaned


def textblock2unicode(text, latex_to_text=None):
    """Replace inline maths that looks like LaTeX by text (§2.2 step 1).

    ``latex_to_text`` renders the cleaned content (pylatexenc's); None keeps
    the cleaned content as it is (the documented non-exact fallback). A
    rendering that raises leaves the segment unchanged, as the evaluator does.
    """
    replacements = []
    for match, cleaned in _latex_segments(text):
        if latex_to_text is None:
            rendered = cleaned
        else:
            if cleaned.endswith("\\"):
                cleaned += " "  # as the evaluator does, so a trailing backslash is not an open escape
            try:
                rendered = latex_to_text(cleaned)
            except Exception:  # the evaluator skips segments pylatexenc cannot render
                continue
        replacements.append((match.start(), match.end(), rendered.strip()))
    for start, end, rendered in reversed(replacements):
        text = text[:start] + rendered + text[end:]
    return text


def clean_string(text):
    """OmniDocBench's clean_string (§2.2 step 2): drop whitespace escapes, then all but \\w and U+4E00-U+9FFF."""
    for seq in _DELETED:
        text = text.replace(seq, "")
    return _NOT_KEPT.sub("", text)


class OmniDocBenchText:
    """Value names: ``odb_edit`` (+ ``odb_edit_num``, ``odb_upper_len``) per sample;
    ``odb_ALL_page_avg``, ``odb_edit_whole``, ``odb_edit_sample_avg``, ``odb_samples``, ``odb_pages``."""

    def __init__(self):
        self._latex_to_text = _pylatexenc()
        self.renderer = "pylatexenc" if self._latex_to_text else "none (not benchmark-exact for inline maths)"
        self._warn = self._latex_to_text is None

    def normalise(self, text):
        """``clean_string(textblock2unicode(text))`` (§2.2); the raw-text fallback is applied by the caller."""
        if self._warn and next(_latex_segments(text), None) is not None:
            warnings.warn("omnidocbench: pylatexenc is not installed; inline LaTeX is kept as cleaned source "
                          "instead of rendered text, which is not benchmark-exact (pip install pylatexenc)",
                          stacklevel=3)
            self._warn = False
        return clean_string(textblock2unicode(text, self._latex_to_text))

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        pred = self.normalise(pred) or pred  # a string that normalises to "" falls back to raw, §2.1
        gt = self.normalise(gt) or gt
        upper = max(len(pred), len(gt))
        if upper == 0:  # both empty: excluded, §2.1
            return dict.fromkeys(KEYS)
        num = levenshtein(pred, gt)
        return {"odb_edit": num / upper, "odb_edit_num": num, "odb_upper_len": upper}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        pages = {}  # page key -> [sum Edit_num, sum upper_len]
        ratios = []
        for i, row in enumerate(rows):
            if row.get("odb_edit") is None:
                continue
            ratios.append(row["odb_edit"])
            key = ("page", row["page"]) if row.get("page") is not None else ("row", i)  # no page: own page
            sums = pages.setdefault(key, [0, 0])
            sums[0] += row["odb_edit_num"]
            sums[1] += row["odb_upper_len"]
        if not ratios:
            return {"odb_ALL_page_avg": None, "odb_edit_whole": None, "odb_edit_sample_avg": None,
                    "odb_samples": 0, "odb_pages": 0}
        total_num = sum(s[0] for s in pages.values())
        total_len = sum(s[1] for s in pages.values())
        return {
            "odb_ALL_page_avg": math.fsum(n / u for n, u in pages.values()) / len(pages),  # §2.3
            "odb_edit_whole": total_num / total_len,
            "odb_edit_sample_avg": math.fsum(ratios) / len(ratios),
            "odb_samples": len(ratios),
            "odb_pages": len(pages),
        }


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "omnidocbench", OmniDocBenchText)
