"""One page of OmniDocBench's end-to-end evaluation: ground-truth blocks, tables, text matching, samples.

docs/metrics-omnidocbench.md, "Steps 2, 3 and 6", with the official lines
(``dataset/end2end_dataset.py:53-114``, ``:153-340``, ``utils/match.py:161-269``).
``score_page`` returns the page's samples per element (text_block, display_formula, table,
reading_order), each with the evaluator's per-sample ``Edit_num`` and ``upper_len``.
"""
from rapidfuzz.distance import Levenshtein
from scipy.optimize import linear_sum_assignment

from plugins.metrics.omnidocbench_extract import split_page
from plugins.metrics.omnidocbench_files import block_order, truncated_chains
from plugins.metrics.omnidocbench_html import cell_strings, normalise_table
from plugins.metrics.omnidocbench_match import IGNORED, TEXT, distance_matrix, quick_match
from plugins.metrics.omnidocbench_normalise import clean_string, latex_to_text

# The blocks that enter the text matching, in the order the evaluator collects them.
MATCHED = TEXT + ("equation_caption",) + IGNORED[:-1] + ("equation_isolated",)
FORMULA_PRED = ("equation_inline", "equation_isolated", "")  # a display formula matched to these stays one
TABLE_KINDS = ("html_table", "latex_table", "md2html_table")


def page_blocks(page, corrected=False):
    """Blocks by category, each truncated chain merged into one block (``end2end_dataset.py:53-93``)."""
    relations = ((page.get("extra") or {}).get("relation") or [])
    chains = truncated_chains(relations, corrected)
    in_chain = {anno for chain in chains for anno in chain}
    members, by_category = {}, {}
    for block in page.get("layout_dets") or []:
        if block.get("anno_id") in in_chain:
            members[block["anno_id"]] = block
        else:
            by_category.setdefault(block.get("category_type"), []).append(block)
    for chain in chains:
        blocks = sorted((members[a] for a in chain if a in members), key=block_order)
        if not blocks:
            continue
        first = blocks[0]
        merged = {"category_type": first.get("category_type"), "order": first.get("order"),
                  "anno_id": first.get("anno_id"), "text": "".join(b.get("text") or "" for b in blocks)}
        by_category.setdefault(merged["category_type"], []).append(merged)
    return by_category


def _tables(gt_tables, pieces):
    """Table samples and the cell strings of unmatched predicted tables (``end2end_dataset.py:287-302``)."""
    latex, html_tables = pieces.get("latex_table", []), pieces.get("html_table", [])
    latex_mode = len(latex) > len(html_tables)
    gt = []  # (html, the string matched on: the html, or the latex on the LaTeX path)
    for block in gt_tables:  # the evaluator keeps a table only if the strings it uses are non-empty
        html = str(block.get("html", ""))
        key = str(block.get("latex", "")) if latex_mode else html
        if html and key:
            gt.append((html, key))
    preds = [p for p in (latex if latex_mode else html_tables) if str(p["content"])]
    if not gt:
        return [], []  # no usable ground-truth table: predicted tables are dropped without a trace
    assigned = {}
    if preds:
        rows, cols = linear_sum_assignment(distance_matrix([k for _, k in gt], [str(p["content"]) for p in preds]))
        assigned = {int(r): int(c) for r, c in zip(rows, cols)}
    # A LaTeX table never scores: the evaluator blanks every prediction that came through that path.
    samples = [_sample(raw, "" if latex_mode or g not in assigned else str(preds[assigned[g]]["content"]),
                       normalise_table(raw), None) for g, (raw, _) in enumerate(gt)]
    for sample in samples:
        sample["norm_pred"] = normalise_table(sample["pred"])
        _edit(sample)
    cells = []
    if not latex_mode:
        for p, table in enumerate(preds):
            if p not in assigned.values():
                cells += [{**table, "kind": "text_all", "content": c} for c in cell_strings(table["content"])]
    return samples, cells


def _sample(gt, pred, norm_gt, norm_pred):
    return {"gt": gt, "pred": pred, "norm_gt": norm_gt, "norm_pred": norm_pred}


def _edit(sample):
    """Edit_num and upper_len as ``metrics/cal_metric.py:139-157`` computes them; both empty: excluded (None)."""
    gt = sample["norm_gt"] or sample["gt"]
    pred = sample["norm_pred"] or sample["pred"]
    upper = max(len(gt), len(pred))
    sample["edit_num"] = Levenshtein.distance(pred, gt) if upper else None
    sample["upper_len"] = upper
    return sample


def _reading_order(text_entries):
    """GT orders of the matched text blocks, read in prediction order, against their sorted orders."""
    matched = [(e["gt_position"], e["pred_position"]) for e in text_entries
               if e["gt_position"] != [""] and e["pred_position"] != ""]
    gt = sorted(x for e in text_entries if e["gt_position"] != [""] for x in e["gt_position"] if x)
    pred = [x for positions, _ in sorted(matched, key=lambda m: m[1]) for x in positions if x]
    if not gt and not pred:
        return []
    return [_edit({"gt": gt, "pred": pred, "norm_gt": None, "norm_pred": None})]


def score_page(page, markdown, corrected=False):
    """The page's samples: ``text_block``, ``formula_as_text``, ``display_formula``, ``table``, ``reading_order``.

    ``formula_as_text`` holds display formulas matched to a non-formula prediction; the evaluator
    scores them as text (the formula rendered by pylatexenc) when the run has any text sample at all,
    and drops them otherwise; the caller decides.
    """
    pieces = split_page(markdown)
    mix = [p for kind, group in pieces.items() if kind not in TABLE_KINDS for p in group]
    blocks = page_blocks(page, corrected)
    gt_mix = sorted((b for c in MATCHED for b in blocks.get(c, [])), key=block_order)
    tables, cells = [], []
    if blocks.get("table"):
        tables, cells = _tables(sorted(blocks["table"], key=block_order), pieces)
    entries = quick_match(gt_mix, mix + cells, corrected)
    text = [e for e in entries if e["category"] in TEXT]
    out = {"text_block": [_edit(_sample(e["gt"], e["pred"], e["norm_gt"], e["norm_pred"])) for e in text],
           "formula_as_text": [], "display_formula": [], "table": tables, "reading_order": _reading_order(text)}
    for e in entries:
        if e["category"] != "equation_isolated":
            continue
        if e["pred_category"] in FORMULA_PRED:
            out["display_formula"].append(_edit(_sample(e["gt"], e["pred"], e["norm_gt"], e["norm_pred"])))
        else:
            try:
                gt = latex_to_text(e["gt"])
            except Exception:  # the evaluator would stop here; keep the formula's source instead
                gt = e["gt"]
            out["formula_as_text"].append(_edit(_sample(gt, e["pred"], clean_string(gt), e["norm_pred"])))
    return out
