"""Match ground-truth blocks to predicted pieces, as OmniDocBench's ``match_gt2pred_quick`` does.

docs/metrics-omnidocbench.md, "Steps 4 and 5", maps each function to the official lines
(``utils/match_quick.py:265-611`` and its helpers ``:657-1156``, ``utils/match.py:20-158``).

Ground-truth items are OmniDocBench.json blocks (``category_type``, ``order``, ``text`` or
``latex``); predicted items are the pieces of ``omnidocbench_extract.split_page``. ``quick_match``
returns one entry per group the evaluator gives a category, with what the scores need:
``category`` ("" for predictions matched to no block), raw and normalised ``gt``/``pred``,
``gt_position`` (the blocks' orders), ``pred_position`` and ``pred_category``.

``corrected=False`` keeps the evaluator's two matching bugs, ``corrected=True`` fixes them:
lines that normalise to "" are dropped without their items (so later items lose their
alignment: wrong positions and categories), and an entry removed from the list being iterated
makes the loop skip the next entry.
"""
import re
from collections import Counter
from copy import deepcopy

import numpy as np
from scipy.optimize import linear_sum_assignment

from core.textdist import ned, window_ned
from plugins.metrics.omnidocbench_files import block_order
from plugins.metrics.omnidocbench_normalise import normalise_formula, normalise_text
from plugins.metrics.omnidocbench_truncation import merge_consecutive

TEXT = ("text_block", "title", "code_txt", "code_txt_caption", "reference")
IGNORED = ("figure_caption", "figure_footnote", "table_caption", "table_footnote", "code_algorithm",
           "code_algorithm_caption", "header", "footer", "page_footnote", "page_number", "equation_caption")
TEXT_LIKE = frozenset(TEXT + IGNORED)  # blocks read through their ``text`` (the others: display formulas)
ABSORB = 0.25  # a prediction this close to an ignored block is given to it
UNDO = 0.7     # a Hungarian pair costlier than this is undone
ATTACH = 0.4   # an unmatched block this close to part of a prediction is attached to it

_ARRAY = re.compile(r"\\begin\{array\}\{(?P<spec>[^}]*)\}(?P<body>.*?)\\end\{array\}", re.S)


def distance_matrix(rows, cols):
    """The matching cost: NED of every (row, column) pair of strings."""
    out = np.zeros((len(rows), len(cols)))
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            out[i][j] = ned(a, b, both_empty=0.0)
    return out


def _single_column(spec):
    spec = re.sub(r"\s+|\|", "", spec)
    spec = re.sub(r"@{[^}]*}", "", spec)
    spec = re.sub(r"!{[^}]*}", "", spec)
    return spec in ("l", "c", "r")


def _array_lines(latex):
    """The rows of a single-column ``array`` (None when there is none or it has more columns)."""
    match = _ARRAY.search(latex)
    if not match or not _single_column(match.group("spec")):
        return None
    return [line.strip() for line in re.split(r"\\\\", match.group("body")) if line.strip()]


def split_gt_arrays(items):
    """A single-column ``array`` display formula becomes one block per row, ordered 7.1, 7.2, ..."""
    out = []
    for item in items:
        lines = None
        if item.get("category_type") == "equation_isolated" and "\\begin{array" in item.get("latex", ""):
            lines = _array_lines(item["latex"])
        if lines is None:
            out.append(item)
            continue
        for k, line in enumerate(lines, start=1):
            out.append({**deepcopy(item), "latex": f"\\[{line}\\]", "order": round(float(item["order"]) + k / 10, 1)})
    return out


def split_pred_arrays(pieces):
    """The same for predicted display formulas; each row's position is where it sits in the page."""
    out = []
    for piece in pieces:
        match = None
        if piece["kind"] == "equation_isolated" and "\\begin{array" in piece["content"]:
            match = _ARRAY.search(piece["content"])
        if not match or not _single_column(match.group("spec")):
            out.append(piece)
            continue
        body, cursor = match.group("body"), 0
        for line in [ln.strip() for ln in re.split(r"\\\\", body) if ln.strip()]:
            at = body.find(line, cursor)
            at = cursor if at == -1 else at
            cursor = at + len(line)
            out.append({**piece, "content": f"\\[{line.strip()}\\]",
                        "start": piece["start"] + match.start("body") + at})
    return out


def category(piece):
    return piece.get("fine") or piece["kind"]


def _gt_line(item):
    cat = item["category_type"]
    field = "text" if cat in TEXT_LIKE else "latex"
    raw = str(item[field]) if field in item else ""
    return raw, (normalise_text(raw) if field == "text" else normalise_formula(raw)), cat


def _pred_line(piece):
    raw = str(piece["content"])
    if piece["kind"] == "text_all":
        return raw, normalise_text(raw)
    if piece["kind"] == "equation_isolated":
        return raw, normalise_formula(raw)
    return raw, raw


def _gt_position(item):
    """A matched block's position: its order; for None or 0 the evaluator reads ``position``, which blocks lack."""
    return block_order(item, missing=None) or item.get("position", [""])[0]


def _entry(cat, gt_items, gt_lines, g_idx, pred_items, pred_lines, p_idx):
    """One scored entry; ``g_idx``/``p_idx`` are index lists into the line lists ([""] = none)."""
    has_gt, has_pred = g_idx != [""], p_idx != [""]
    pred_cat = category(pred_items[p_idx[0]]) if has_pred else ""
    raw_gt = [gt_lines[g][0] for g in g_idx] if has_gt else []
    raw_pred = [pred_lines[p][0] for p in p_idx] if has_pred else []
    gt = _as_array(raw_gt) if cat == "equation_isolated" and len(raw_gt) > 1 else "".join(raw_gt)
    pred = _as_array(raw_pred) if "equation" in pred_cat and len(raw_pred) > 1 else "".join(raw_pred)
    return {"category": cat, "gt": gt, "pred": pred,
            "norm_gt": "".join(gt_lines[g][1] for g in g_idx) if has_gt else "",
            "norm_pred": "".join(pred_lines[p][1] for p in p_idx) if has_pred else "",
            "gt_position": [_gt_position(gt_items[g]) for g in g_idx] if has_gt else [""],
            "pred_position": pred_items[p_idx[0]]["start"] if has_pred else "",
            "pred_category": pred_cat}


def _as_array(lines):
    """Several formula lines matched together are written as one ``array`` (``match_quick.py:568-583``)."""
    return "\\begin{array}{l} " + " \\\\ ".join("{" + s.strip("$").strip("\n") + "}" for s in lines) + " \\end{array}"


def quick_match(gt_items, pred_items, corrected=False):
    """Entries for one page (``match_quick.py:265-611``): lines, shortcuts, absorption, then ``match_lines``."""
    gt_items = split_gt_arrays(gt_items)
    order = sorted(range(len(pred_items)), key=lambda i: (pred_items[i].get("fine") == "equation_inline",
                                                            pred_items[i]["start"], i))
    pred_items = split_pred_arrays([pred_items[i] for i in order])
    gt_rows = [_gt_line(item) for item in gt_items]
    gt_keep = [k for k, (raw, norm, _) in enumerate(gt_rows) if raw and norm]
    pred_rows = [_pred_line(p) for p in pred_items]
    pred_keep = [k for k, (raw, norm) in enumerate(pred_rows) if raw and norm]
    gt_lines, pred_lines = [gt_rows[k] for k in gt_keep], [pred_rows[k] for k in pred_keep]
    if corrected:  # keep each item with its line
        gt_items, pred_items = [gt_items[k] for k in gt_keep], [pred_items[k] for k in pred_keep]
    if not gt_lines:
        return []  # every prediction is unmatched: entries without a category, which no score keeps
    if not pred_lines:
        return [_entry(gt_lines[g][2], gt_items, gt_lines, [g], pred_items, pred_lines, [""])
                for g in range(len(gt_lines))]
    if len(gt_lines) == 1 and len(pred_lines) == 1:
        return [_entry(gt_lines[0][2], gt_items, gt_lines, [0], pred_items, pred_lines, [0])]

    # Ignored categories first: predictions close to a header, caption, page number... are absorbed.
    ignored = [g for g, line in enumerate(gt_lines) if line[2] in IGNORED]
    absorbed = set()
    if ignored:
        close = distance_matrix([gt_lines[g][1] for g in ignored], [p[1] for p in pred_lines]) < ABSORB
        absorbed = {int(p) for _, p in np.argwhere(close)}
    g_map = [g for g in range(len(gt_lines)) if gt_lines[g][2] not in IGNORED]
    p_map = [p for p in range(len(pred_lines)) if p not in absorbed]
    # Line k of the sub-problem is line g_map[k] / p_map[k]; its item is the one at that same index
    # in the item lists, which is the line's own item only when corrected (the bug of the docstring).
    sub_gt_items = [gt_items[g] for g in g_map]
    sub_pred_items = [pred_items[p] for p in p_map]
    sub_gt = [gt_lines[g] for g in g_map]
    sub_pred = [pred_lines[p] for p in p_map]
    groups = match_lines([line[1] for line in sub_gt], [line[1] for line in sub_pred])
    return _finish(groups, sub_gt, sub_gt_items, sub_pred, sub_pred_items, corrected)


def match_lines(gt_norm, pred_norm):
    """Matching proper: merge, Hungarian, undo, attach, leftovers; groups of (gt indices, pred indices)."""
    cost = distance_matrix(gt_norm, pred_norm)
    cost, columns = merge_consecutive(cost, gt_norm, pred_norm)
    rows, cols = linear_sum_assignment(cost)
    matches, unmatched_gt = {}, []
    assigned = {int(r): (int(c), cost[r][c]) for r, c in zip(rows, cols)}
    for g in range(len(gt_norm)):
        if g not in assigned:
            unmatched_gt.append(g)
            continue
        column, value = assigned[g]
        preds = columns[column]
        preds = list(range(preds[0], preds[-1] + 1)) if isinstance(preds, list) else [preds]
        if value > UNDO:
            unmatched_gt.append(g)
        else:
            matches[g] = preds
    attach = {}
    for p, line in enumerate(pred_norm):  # every prediction, matched or not, may take unmatched blocks
        close = [g for g in unmatched_gt if _attaches(window_ned(line, gt_norm[g]))]
        if close:
            attach[p] = close
    final, taken = {}, set()
    for g, preds in matches.items():
        key = tuple(sorted(preds))
        if key in final:
            if g not in taken:
                final[key].append(g)
                taken.add(g)
        else:
            final[key] = [g]
            taken.add(g)
    for p, gts in attach.items():
        key = (p,)
        if key in final:
            for g in gts:
                if g not in taken:
                    final[key].append(g)
                    taken.add(g)
        else:
            final[key] = [g for g in gts if g not in taken]
            taken.update(final[key])
    return _pair_leftovers(final, gt_norm, pred_norm)


def _attaches(distance):
    """Whether a block at this window distance from a prediction is attached to it (None: the block is longer)."""
    return distance is not None and distance < ATTACH


def _pair_leftovers(final, gt_norm, pred_norm):
    """Matched groups, leftovers paired by a second Hungarian, then groups sharing a prediction merged.

    The leftover sets are built as the evaluator builds them (set differences), so they are iterated
    in the same order: that order decides ties in the assignment and which prediction comes first.
    """
    pairs = [(g, list(key)) for key, gts in final.items() for g in sorted(set(gts))]
    matched_gt = set().union(*[set(gts) for gts in final.values()])
    left_gt = set(range(len(gt_norm))) - matched_gt
    left_pred = set(range(len(pred_norm))) - set(i for key in final for i in key if isinstance(i, int))
    if left_pred and left_gt:
        gl, pl = list(left_gt), list(left_pred)
        cost = [[ned(gt_norm[g], pred_norm[p], both_empty=0.0) for p in pl] for g in gl]
        rows, cols = linear_sum_assignment(cost)
        pairs += [(gl[r], [pl[c]]) for r, c in zip(rows, cols)]
    elif left_pred:
        pairs.append(("", list(left_pred)))
    else:
        pairs += [(g, "") for g in left_gt]
    groups, seen_pred, seen_gt = [], set(), set()
    for i, (g, preds) in enumerate(pairs):
        key = tuple(preds) if isinstance(preds, list) else (preds,)
        if key in seen_pred or key == ("",):
            continue
        gts = [g]
        for j, (other_g, other_preds) in enumerate(pairs):
            if j != i and (tuple(other_preds) if isinstance(other_preds, list) else (other_preds,)) == key:
                gts.append(other_g)
                seen_gt.add(other_g)
        groups.append((gts, preds))
        seen_pred.add(key)
        seen_gt.add(g)
    groups += [([g], [""]) for g in range(len(gt_norm)) if g not in seen_gt]
    return groups


def _finish(groups, gt_lines, gt_items, pred_lines, pred_items, corrected):
    """Categories and strings per group (``match_quick.py:548-588``).

    A group with no ground truth gets category "" (no score keeps it); one whose first prediction
    is an inline-maths piece is removed. The evaluator removes it from the list it is iterating,
    so the loop skips the next group, which keeps no category and drops out of every score; the
    corrected reading iterates over a copy.
    """
    groups = [{"gts": gts, "preds": preds} for gts, preds in groups]
    kept = groups
    for group in (list(groups) if corrected else groups):
        if group["gts"] != [""]:
            group["category"] = Counter(gt_lines[g][2] for g in group["gts"]).most_common(1)[0][0]
        elif category(pred_items[group["preds"][0]]) == "equation_inline":
            kept.remove(group)
        else:
            group["category"] = ""
    return [_entry(group["category"], gt_items, gt_lines, group["gts"], pred_items, pred_lines, group["preds"])
            for group in kept if "category" in group]
