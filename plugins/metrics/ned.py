"""Normalised edit distance per sample (OmniDocBench's per-sample formula).

* Normalisation: none. The raw strings are compared; OmniDocBench's text
  normalisation (docs/metrics.md §2.2: whitespace/punctuation removal, LaTeX) is NOT
  applied here.
* Per sample (docs/metrics.md §2.1): ``ned = Levenshtein(pred, gt) / max(len)`` over
  code points, unit costs.
* Empty input: both empty -> ``None``, excluded from the mean (as OmniDocBench,
  §2.1); one side empty -> 1.0.
* Averaging: ``ned`` is the plain mean of the per-sample values, i.e.
  OmniDocBench's ``edit_sample_avg`` (§2.3), not its leaderboard
  ``ALL_page_avg``. ``ned_samples`` counts the samples in that mean.
"""
import math

from core.hookspecs import hookimpl
from core.textdist import ned


class NEDMetric:
    """Value names: ``ned`` (per sample and aggregate), ``ned_samples`` (aggregate)."""

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        return {"ned": ned(pred, gt)}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        values = [r["ned"] for r in rows if r.get("ned") is not None]
        return {"ned": math.fsum(values) / len(values) if values else None, "ned_samples": len(values)}


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "ned", NEDMetric)
