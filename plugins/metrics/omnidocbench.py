"""OmniDocBench's end-to-end Edit_dist, as its official evaluator computes it (docs/metrics-omnidocbench.md).

With ``--format omnidocbench`` each ground truth is a whole OmniDocBench.json page (the reader
attaches it to the page text as ``gt.meta``; so does a training run's evaluation on shards that
``python -m core.shards omnidocbench`` wrote, from each sample's json) and each prediction a page
of markdown. The page
goes through the evaluator's ``quick_match`` pipeline (``omnidocbench_page.score_page``): typed
pieces, tables and display formulas scored apart from text, headers/captions/page numbers
absorbed, Hungarian matching with merging of consecutive pieces. Four elements come out, each with
the evaluator's three averages over its samples (per sample ``Edit_num`` = Levenshtein distance of
the normalised strings, ``upper_len`` = the longer length; a sample whose two strings are empty is
left out):

* ``odb_ALL_page_avg`` (text_block: the leaderboard's "Text Edit") = mean over pages of
  sum(Edit_num) / sum(upper_len) on the page; ``odb_edit_whole`` = the same ratio over all
  samples; ``odb_edit_sample_avg`` = mean of the per-sample ratios; ``odb_samples``, ``odb_pages``.
* ``odb_display_formula_*``, ``odb_table_*``, ``odb_reading_order_*``: the same three for display
  formulas (Edit_dist only, no CDM), tables and reading order.
* Tables also get TEDS and TEDS-S (``omnidocbench_teds``, with the ``tables`` extra):
  ``odb_table_TEDS`` / ``odb_table_TEDS_structure_only`` = the mean over tables (the evaluator's
  ``all``), ``..._page_avg`` = the mean over pages of each page's mean (its ``page`` value, which the
  leaderboard shows x 100).
* The v1.5 leaderboard's Overall, ((1 - text ALL_page_avg) x 100 + CDM x 100 + TEDS page avg x 100) / 3,
  needs all three parts; CDM is not computed (it needs a LaTeX toolchain), so instead of an Overall
  ``odb_overall_missing`` names the parts that are missing.

``corrected`` (``--option corrected`` on the command line) fixes the evaluator's bugs instead of
reproducing them (see the doc). A plain-text pair (``--format jsonl``, an evaluation split) has no
blocks: it is scored as one text_block sample after the same text normalisation, as before.
Per-sample rows carry the page's text ratio (``odb_edit``, ``odb_edit_num``, ``odb_upper_len``)
and each element's samples as [Edit_num, upper_len] pairs.
"""
import math

from core.hookspecs import hookimpl
from core.textdist import levenshtein
from plugins.metrics.omnidocbench_normalise import normalise_text
from plugins.metrics.omnidocbench_page import score_page
from plugins.metrics.omnidocbench_teds import available as teds_available
from plugins.metrics.omnidocbench_teds import teds

ELEMENTS = ("text_block", "display_formula", "table", "reading_order")
PREFIX = {"text_block": "odb", "display_formula": "odb_display_formula", "table": "odb_table",
          "reading_order": "odb_reading_order"}
CDM_MISSING = "display_formula CDM (needs a LaTeX toolchain; not computed)"
TEDS_MISSING = "table TEDS (needs the tables extra: pip install 'vlmkit[tables]')"


def _pairs(samples):
    """[Edit_num, upper_len] per sample; a sample the evaluator leaves out (both strings empty) is omitted."""
    return [[s["edit_num"], s["upper_len"]] for s in samples if s["edit_num"] is not None]


def _averages(pages):
    """The evaluator's three averages over ``pages``, a list of per-page [Edit_num, upper_len] lists."""
    ratios = [num / upper for page in pages for num, upper in page]
    sums = [(sum(n for n, _ in page), sum(u for _, u in page)) for page in pages if page]
    if not sums:
        return None, None, None, 0, 0
    page_avg = math.fsum(n / u for n, u in sums) / len(sums)
    whole = sum(n for n, _ in sums) / sum(u for _, u in sums)
    return page_avg, whole, math.fsum(ratios) / len(ratios), len(ratios), len(sums)


def _teds_pair(sample):
    """[TEDS, TEDS-S] of a table sample, on the normalised strings (each falls back to its raw one)."""
    pred, gt = sample["norm_pred"] or sample["pred"], sample["norm_gt"] or sample["gt"]
    return [teds(pred, gt), teds(pred, gt, structure_only=True)]


def _teds_averages(rows):
    """The evaluator's TEDS numbers: the mean over tables and the mean over pages of the page means."""
    if not teds_available():
        return {}
    pages = {}
    for i, r in enumerate(rows):
        if r.get("odb_table_teds"):
            pages.setdefault(r.get("page", i), []).extend(r["odb_table_teds"])
    out = {}
    for k, name in enumerate(("odb_table_TEDS", "odb_table_TEDS_structure_only")):
        tables = [pair[k] for page in pages.values() for pair in page]
        page_means = [math.fsum(pair[k] for pair in page) / len(page) for page in pages.values()]
        out[name] = math.fsum(tables) / len(tables) if tables else None
        out[name + "_page_avg"] = math.fsum(page_means) / len(page_means) if page_means else None
    return out


def _overall(out):
    """``odb_overall_missing``: which parts of the v1.5 Overall are absent (CDM always is, so no Overall)."""
    missing = []
    if out.get("odb_ALL_page_avg") is None:
        missing.append("text_block Edit_dist (no text sample)")
    if out.get("odb_table_TEDS_page_avg") is None:
        missing.append(TEDS_MISSING if not teds_available() else "table TEDS (no ground-truth table)")
    missing.append(CDM_MISSING)
    return {"odb_overall_missing": "; ".join(missing)}


class OmniDocBenchText:
    """Value names: per page ``odb_edit``, ``odb_edit_num``, ``odb_upper_len`` and ``odb_<element>`` sample
    lists; aggregates ``odb_ALL_page_avg``, ``odb_edit_whole``, ``odb_edit_sample_avg``, ``odb_samples``,
    ``odb_pages`` and, for pages with blocks, the same three averages per other element."""

    def __init__(self, corrected=False):
        self.corrected = corrected

    def normalise(self, text):
        """The evaluator's text normalisation, ``clean_string(textblock2unicode(text))``."""
        return normalise_text(text)

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        page = getattr(gt, "meta", None)
        if not (isinstance(page, dict) and isinstance(page.get("layout_dets"), list)):  # not an OmniDocBench page
            return self._plain(pred, gt)
        samples = score_page(page, pred, getattr(gt, "corrected", self.corrected))
        text = _pairs(samples["text_block"]) + _pairs(samples["formula_as_text"])
        num, upper = sum(n for n, _ in text), sum(u for _, u in text)
        row = {"odb_edit": num / upper if upper else None, "odb_edit_num": num if upper else None,
               "odb_upper_len": upper if upper else None,
               # whether the page holds a text sample at all: decides the fate of formula_as_text, see _aggregate
               "odb_has_text": bool(samples["text_block"])}
        for element in ("text_block", "formula_as_text", "display_formula", "table", "reading_order"):
            row[f"odb_{element}"] = _pairs(samples[element])
        if teds_available():  # every table sample, also those Edit_dist leaves out
            row["odb_table_teds"] = [_teds_pair(s) for s in samples["table"]]
        return row

    def _plain(self, pred, gt):
        pred = self.normalise(pred) or pred  # a string that normalises to "" is compared raw
        gt = self.normalise(gt) or gt
        upper = max(len(pred), len(gt))
        if upper == 0:  # both empty: left out
            return {"odb_edit": None, "odb_edit_num": None, "odb_upper_len": None}
        num = levenshtein(pred, gt)
        return {"odb_edit": num / upper, "odb_edit_num": num, "odb_upper_len": upper}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        structured = [r for r in rows if "odb_text_block" in r]
        # A display formula matched to a text piece is scored as text only if the run has any text
        # sample (``end2end_dataset.py:214``); otherwise it is dropped from both scores.
        moved = any(r["odb_has_text"] for r in structured)
        pages = {element: {} for element in ELEMENTS}  # element -> page key -> [[Edit_num, upper_len], ...]
        for i, r in enumerate(rows):
            key = ("page", r["page"]) if r.get("page") is not None else ("row", i)  # no page: its own page
            if "odb_text_block" in r:
                samples = {"text_block": r["odb_text_block"] + (r["odb_formula_as_text"] if moved else []),
                           **{element: r[f"odb_{element}"] for element in ELEMENTS[1:]}}
            elif r.get("odb_edit_num") is not None:
                samples = {"text_block": [[r["odb_edit_num"], r["odb_upper_len"]]]}
            else:
                continue
            for element, pairs in samples.items():
                pages[element].setdefault(key, []).extend(pairs)
        out = {}
        for element in ELEMENTS if structured else ELEMENTS[:1]:
            avg, whole, sample_avg, samples, n_pages = _averages(list(pages[element].values()))
            prefix = PREFIX[element]
            out.update({f"{prefix}_ALL_page_avg": avg, f"{prefix}_edit_whole": whole,
                        f"{prefix}_edit_sample_avg": sample_avg})
            if element == "text_block":
                out.update({"odb_samples": samples, "odb_pages": n_pages})
        if structured:
            out.update(_teds_averages(rows))
            out.update(_overall(out))
        return out


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "omnidocbench", OmniDocBenchText)
