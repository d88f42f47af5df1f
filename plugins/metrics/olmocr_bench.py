"""olmOCR-Bench's score: unit tests per page, pass rates per source, their mean (docs/metrics-olmocr-bench.md).

Each sample is a page whose ground truth carries its tests (``meta["olmocr_bench"]``: written by
the ``olmocr_bench`` metric input, or by the ``olmocr_bench`` shard source for a training run's
evaluation) and whose prediction is one reading, or several (``Readings``, one per repeat file).
A test passes when it passes on more than half of the readings. ``math`` tests need KaTeX in a
headless browser and are reported as not run: they count in no total.

Per sample: ``olmocr_bench_page`` (the share of the page's tests that pass) and
``olmocr_bench_tests`` ([id, source, type, passed (1/0, None if not run), share of readings passed]).
Aggregate: ``olmocr_bench`` = the mean over sources (JSONL files, plus ``baseline``) of passed /
tests; ``olmocr_bench_ci`` its 95% bootstrap interval (1,000 resamples within each source, seed 0);
``olmocr_bench_sources`` {source: [passed, tests]}; ``olmocr_bench_types`` {type: mean share of
readings passed}; ``olmocr_bench_tests_run`` and ``olmocr_bench_not_run``; ``olmocr_bench_untested_samples``
counts samples that are not olmOCR-Bench pages (they have no tests). A page without any reading,
or a test that raises, fails the whole candidate, as in the benchmark: the score is then 0 and
``olmocr_bench_failed`` says why.
"""
import numpy as np

from core.hookspecs import hookimpl
from plugins.metrics.olmocr_bench_checks import load_test, run_test

BOOTSTRAP, LEVEL, SEED = 1000, 0.95, 0


def bootstrap_interval(groups, resamples=BOOTSTRAP, level=LEVEL, seed=SEED):
    """The (low, high) percentile interval of the mean of group means, each group resampled on its own."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return None, None
    rng = np.random.default_rng(seed)
    means = [np.mean([rng.choice(g, size=len(g), replace=True).mean() for g in groups]) for _ in range(resamples)]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _judge(test, readings):
    """(passed, share of readings passed, error or None); passed is None for a test that is not run."""
    if test["type"] == "math":
        return None, None, None
    if not readings:
        return 0, 0.0, "no reading of this page"
    passes = 0
    for text in readings:
        try:
            result = run_test(test, text)
        except Exception as e:  # the benchmark counts the reading as failed and the candidate as in error
            return 0, 0.0, f"test {test['id']}: {type(e).__name__}: {e}"
        passes += bool(result)
    share = passes / len(readings)
    return int(share > 0.5), share, None


class OlmOCRBench:
    """Value names: ``olmocr_bench_page``, ``olmocr_bench_tests`` (per sample); ``olmocr_bench``,
    ``olmocr_bench_ci``, ``olmocr_bench_sources``, ``olmocr_bench_types``, ``olmocr_bench_tests_run``,
    ``olmocr_bench_not_run``, ``olmocr_bench_failed`` (aggregate)."""

    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        meta = getattr(gt, "meta", None)
        page = meta.get("olmocr_bench") if isinstance(meta, dict) else None
        if not isinstance(page, dict):  # not an olmOCR-Bench page: nothing to test (counted in the aggregate)
            return {"olmocr_bench_page": None, "olmocr_bench_tests": None, "olmocr_bench_errors": []}
        readings = getattr(pred, "repeats", [pred])
        where = f"{page.get('pdf')} page {page.get('page')}"
        results, errors = [], []
        for entry in page["tests"]:
            test = load_test(entry["test"], f"{where}: test {entry['test'].get('id')!r}")
            passed, share, error = _judge(test, readings)
            results.append([test["id"], entry["source"], test["type"], passed, share])
            if error:
                errors.append(f"{where}: {error}")
        run = [r[3] for r in results if r[3] is not None]
        return {"olmocr_bench_page": sum(run) / len(run) if run else None, "olmocr_bench_tests": results,
                "olmocr_bench_errors": errors}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        results = [r for row in rows for r in row.get("olmocr_bench_tests") or []]
        errors = [e for row in rows for e in row.get("olmocr_bench_errors") or []]
        sources = {}
        for _, source, _, passed, _ in results:
            if passed is not None:
                sources.setdefault(source, []).append(0 if errors else passed)
        types = {}
        for _, _, kind, passed, share in results:
            if passed is not None:
                types.setdefault(kind, []).append(share)
        rates = [sum(s) / len(s) for s in sources.values()]
        low, high = bootstrap_interval(list(sources.values()))
        out = {"olmocr_bench": sum(rates) / len(rates) if rates else None, "olmocr_bench_ci": [low, high],
               "olmocr_bench_sources": {k: [sum(v), len(v)] for k, v in sources.items()},
               "olmocr_bench_types": {k: sum(v) / len(v) for k, v in sorted(types.items())},
               "olmocr_bench_tests_run": sum(len(v) for v in sources.values()),
               "olmocr_bench_not_run": sum(1 for r in results if r[3] is None)}
        if errors:
            out["olmocr_bench_failed"] = f"{len(errors)} error(s), the first: {errors[0]}"
        untested = sum(1 for row in rows if row.get("olmocr_bench_tests") is None)
        if untested:  # e.g. plain text pairs: olmOCR-Bench's tests come with its pages only
            out["olmocr_bench_untested_samples"] = untested
        return out


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "olmocr_bench", OlmOCRBench)
