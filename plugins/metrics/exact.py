"""Exact string match.

* Normalisation: surrounding whitespace is stripped from both sides when
  ``strip`` is true (``str.strip()``); nothing else (case, inner whitespace and
  Unicode form all count).
* Per sample: ``exact`` = 1.0 if equal else 0.0. Two empty strings match (1.0).
* Averaging: plain mean over all samples.
"""
import math

from core.hookspecs import hookimpl


class ExactMatch:
    """Value name: ``exact``."""

    def __init__(self, strip=True):
        self.strip = bool(strip)

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        if self.strip:
            pred, gt = pred.strip(), gt.strip()
        return {"exact": 1.0 if pred == gt else 0.0}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        values = [r["exact"] for r in rows if r.get("exact") is not None]
        return {"exact": math.fsum(values) / len(values) if values else None}


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "exact", ExactMatch)
