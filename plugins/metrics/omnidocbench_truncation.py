"""Merging runs of consecutive predicted pieces before the Hungarian match (``deal_with_truncated``).

docs/metrics-omnidocbench.md, "Step 5": official ``utils/match_quick.py:711-927``. A model that
breaks one ground-truth paragraph into several pieces (a line break, a column break) would
otherwise have only one piece matched. For each ground-truth block with no close prediction
(distance >= 0.25), every run of consecutive still-free pieces is grown while the merged text gets
closer and every part is a fuzzy substring of the block; the best run per block is kept, clashes
between blocks are settled by the lowest average cost, and the chosen runs become single columns.
"""
import numpy as np

from core.textdist import ned, window_ned

CLOSE = 0.25     # a block or piece this close to something is left alone
SUBSTRING = 0.6  # each merged part must be at most this far from some window of the block


def _grow(gt, run):
    """Whether adding ``run[-1]`` to ``run[:-1]`` is worth it, and whether to try one more after it."""
    current, merged = " ".join(run[:-1]), " ".join(run)
    if ned(gt, merged, both_empty=0.0) > ned(gt, current, both_empty=0.0):
        return False, False
    for part in run[:-1]:
        d = window_ned(gt, part)
        if d is None or d > SUBSTRING:
            return False, False
    added = window_ned(gt, run[-1])
    if added is None:
        return False, False
    return added < SUBSTRING, len(merged) <= len(gt)


def _choose(runs, costs):
    """Settle runs that share pieces: per overlapping group, the set of disjoint runs with the lowest mean cost.

    Mirrors the evaluator's path building (``match_quick.py:762-832``), including that a run equal to
    one already on a path replaces it when cheaper, which changes the path while it is being read.
    """
    if not runs:
        return []
    pairs = sorted(zip(runs, costs), key=lambda rc: rc[0][0])
    groups = [[pairs[0]]]
    for pair in pairs[1:]:
        if any(set(pair[0]) & set(member[0]) for member in groups[-1]):
            groups[-1].append(pair)
        else:
            groups.append([pair])
    chosen = []
    for group in groups:
        if len(group) == 1:
            chosen.append(group[0][0])
            continue
        paths = [[group[0]]]
        for cand in group[1:]:
            new_path = True
            for path in paths:
                dup = same = False
                for member in path:  # the list may change under this loop, on purpose (see docstring)
                    if member[0] == cand[0]:
                        dup = same = True
                        if member[1] > cand[1]:
                            path.pop(path.index(member))
                            path.append(cand)
                    elif set(member[0]) & set(cand[0]):
                        dup = True
                if not dup:
                    path.append(cand)
                    new_path = False
                if same:
                    new_path = False
            if new_path:
                paths.append([cand])
        best, best_cost = [], float("inf")
        for path in paths:
            mean = sum(c for _, c in path) / len(path)
            if mean < best_cost:
                best, best_cost = [run for run, _ in path], mean
        chosen.extend(best)
    return chosen


def merge_consecutive(cost, gt_norm, pred_norm):
    """Return the cost matrix over the new columns and the columns (a piece index, or a list of them)."""
    close = np.argwhere(cost < CLOSE)
    close_gt, close_pred = [int(i[0]) for i in close], [int(i[1]) for i in close]
    free_gt = [g for g in range(cost.shape[0]) if g not in close_gt]
    free_pred = [p for p in range(cost.shape[1]) if p not in close_pred]
    runs, costs = [], []
    for g in free_gt:
        best = None
        for p in free_pred:
            step, run = 1, [pred_norm[p]]
            while p + step not in close_pred and p + step < len(pred_norm):
                run.append(pred_norm[p + step])
                take, more = _grow(gt_norm[g], run)
                if not take:
                    break
                step += 1
                if not more:
                    break
            merged = " ".join(pred_norm[p:p + step])
            d = ned(gt_norm[g], merged, both_empty=0.0)
            if best is None or d < best[1]:
                best = (list(range(p, p + step)), d)
        if best is not None:
            runs.append(best[0])
            costs.append(best[1])
    chosen = _choose(runs, costs)
    if not chosen:
        return cost, range(len(pred_norm))
    columns = list(range(len(pred_norm)))
    for run in chosen:  # each chosen run replaces its pieces by one column, in place
        at = columns.index(run[0])
        del columns[at:at + len(run)]
        columns.insert(at, run)
    lines = [" ".join(pred_norm[c[0]:c[-1] + 1]) if isinstance(c, list) else pred_norm[c] for c in columns]
    new_cost = np.zeros((len(gt_norm), len(lines)))
    for i, a in enumerate(gt_norm):
        for j, b in enumerate(lines):
            new_cost[i][j] = ned(a, b, both_empty=0.0)
    return new_cost, columns
