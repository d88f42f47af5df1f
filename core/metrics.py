"""Score predictions against ground truth with metric plugins; ``python -m core.metrics``.

    python -m core.metrics fox ned --pred preds.jsonl --gt gt.jsonl [--per-sample rows.jsonl]
    python -m core.metrics fox --format fox --pred results_final.json
    python -m core.metrics omnidocbench --format omnidocbench --gt OmniDocBench.json --pred md_folder/

``--format`` (``core.metric_inputs`` has the details): ``jsonl`` (default; one
``{"id": ..., "text": ...}`` per line, a ground-truth line may add ``"page"``),
``fox`` (Fox's result JSON, which holds both sides: no ``--gt``) or
``omnidocbench`` (OmniDocBench.json + a folder of ``<image stem>.md`` or a
JSONL file; one sample per page, scored by the ``omnidocbench`` metric as the
official end-to-end evaluator scores it, bugs included; ``--corrected`` fixes
them, docs/metrics-omnidocbench.md). Ids (strings or integers) are matched by
their string form. Every ground-truth id is scored: a missing prediction is
scored as the empty string "" and reported on stderr (omnidocbench: the page
is skipped, as the evaluator skips it); predictions whose id is not in the
ground truth are reported and ignored. The
aggregate is printed as one JSON object on the last line of stdout;
``--per-sample`` writes one JSON row per sample (``id``, ``page`` if known, and
the values). Bad input prints one ``error: ...`` line to stderr and exits 2.
"""
import argparse
import json
import sys
import warnings

from core.errors import ConfigError
from core.metric_inputs import FORMATS, load_pairs
from core.registry import load_plugins, new_plugin_manager

PROGRESS_MIN = 1000  # show a progress bar above this many pairs


def score_pairs(metrics, pairs, progress=False):
    """Score ``pairs`` of ``(id, pred, gt)`` or ``(id, pred, gt, page)`` with metric objects.

    Returns ``(rows, aggregate)``. Each row is ``{"id": id, **values}`` merged
    over all metrics, with ``"page": page`` after the id when a pair has a page
    that is not None (metrics that average per page read it, e.g.
    ``omnidocbench``); the aggregate merges every metric's
    ``vlmkit_metric_aggregate(rows)``. Two metrics that produce the same value
    name (or ``id``/``page``) raise ConfigError.
    """
    pm = new_plugin_manager()
    for metric in metrics:
        pm.register(metric)
    if progress and len(pairs) > PROGRESS_MIN:
        from tqdm import tqdm
        pairs = tqdm(pairs, desc="scoring", unit="pair", file=sys.stderr)
    rows = []
    for sample_id, pred, gt, *page in pairs:
        row = {"id": sample_id}
        if page and page[0] is not None:
            row["page"] = page[0]
        for values in reversed(pm.hook.vlmkit_metric_score(pred=pred, gt=gt)):  # pluggy answers LIFO
            _merge(row, values, "per-sample value")
        rows.append(row)
    aggregate = {}
    for values in reversed(pm.hook.vlmkit_metric_aggregate(rows=rows)):
        _merge(aggregate, values, "aggregate value")
    return rows, aggregate


def _merge(into, values, what):
    for name, value in values.items():
        if name in into:
            raise ConfigError(f"two metrics produce the {what} {name!r}; use them in separate runs")
        into[name] = value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("metrics", nargs="+", metavar="NAME", help="registered metric names, e.g. fox ned exact")
    parser.add_argument("--pred", required=True, help="predictions file (or folder of .md for omnidocbench)")
    parser.add_argument("--gt", help="ground-truth file (not with --format fox)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="input format (default jsonl)")
    parser.add_argument("--corrected", action="store_true",
                        help="omnidocbench: fix the official evaluator's bugs instead of reproducing its numbers")
    parser.add_argument("--per-sample", metavar="OUT", help="write per-sample rows (JSONL) here")
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source frame
    try:
        _, registry = load_plugins()
        metrics = [registry.build("metric", name) for name in args.metrics]
        pairs = load_pairs(args.format, args.pred, args.gt, corrected=args.corrected)
        rows, aggregate = score_pairs(metrics, pairs, progress=True)
        if args.per_sample:
            try:
                with open(args.per_sample, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            except OSError as e:
                raise ConfigError(f"cannot write {args.per_sample}: {e}") from e
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(aggregate, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
