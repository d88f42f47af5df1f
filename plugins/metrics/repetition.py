"""The share of outputs that end in a loop (docs/reading-and-scoring.md, "Repetition").

Per sample ``repetition`` is 1.0 when the prediction ends in a loop by olmOCR-Bench's baseline rule
(``core.repetition.ends_in_loop``: whitespace runs read as one space, then a pattern of 1 to 5
characters repeated more than 30 times at the end), else 0.0; the ground truth is not looked at.
``repetition_rate`` is the mean over samples, the number DeepSeek-OCR 2 reports as its repetition
rate; ``repetition_loops`` counts the looping outputs.
"""
from core.hookspecs import hookimpl
from core.repetition import ends_in_loop


class RepetitionMetric:
    """Value names: ``repetition`` (per sample), ``repetition_rate`` and ``repetition_loops`` (aggregate)."""

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        return {"repetition": 1.0 if ends_in_loop(pred) else 0.0}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        values = [r["repetition"] for r in rows if r.get("repetition") is not None]
        return {"repetition_rate": sum(values) / len(values) if values else None,
                "repetition_loops": int(sum(values))}


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "repetition", RepetitionMetric)
