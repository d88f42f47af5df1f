"""Score predictions against ground truth with metric plugins; ``python -m core.metrics``.

    python -m core.metrics fox ned --pred preds.jsonl --gt gt.jsonl [--per-sample rows.jsonl]

Both files are JSONL, one ``{"id": ..., "text": ...}`` per line (blank lines are
skipped). Ids (strings or integers) are matched by their string form. Every
ground-truth id is scored: a missing prediction is scored as the empty string
"" and reported on stderr; predictions whose id is not in the ground truth are
reported and ignored. The aggregate is printed as one JSON object on the last
line of stdout; ``--per-sample`` writes one JSON row per sample (``id`` +
values). Bad input prints one ``error: ...`` line to stderr and exits 2.
"""
import argparse
import json
import sys
import warnings

from core.errors import ConfigError
from core.registry import load_plugins, new_plugin_manager

PROGRESS_MIN = 1000  # show a progress bar above this many pairs
SHOW_IDS = 5


def score_pairs(metrics, pairs, progress=False):
    """Score ``pairs`` of ``(id, pred, gt)`` with metric objects; return ``(rows, aggregate)``.

    Each row is ``{"id": id, **values}`` merged over all metrics; the aggregate
    merges every metric's ``vlmkit_metric_aggregate(rows)``. Two metrics that
    produce the same value name raise ConfigError.
    """
    pm = new_plugin_manager()
    for metric in metrics:
        pm.register(metric)
    if progress and len(pairs) > PROGRESS_MIN:
        from tqdm import tqdm
        pairs = tqdm(pairs, desc="scoring", unit="pair", file=sys.stderr)
    rows = []
    for sample_id, pred, gt in pairs:
        row = {"id": sample_id}
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


def read_jsonl(path):
    """Return ``{str(id): (id, text)}`` in file order; a bad line raises ConfigError naming file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    out = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("text"), str):
            raise ConfigError(f'{path}:{n}: expected an object {{"id": ..., "text": "..."}}')
        sid = item["id"]
        if isinstance(sid, bool) or not isinstance(sid, (str, int)):
            raise ConfigError(f"{path}:{n}: id must be a string or an integer, not {sid!r}")
        if str(sid) in out:
            raise ConfigError(f"{path}:{n}: duplicate id {sid!r}")
        out[str(sid)] = (sid, item["text"])
    return out


def _report(ids, message):
    if ids:
        shown = ", ".join(ids[:SHOW_IDS]) + (", ..." if len(ids) > SHOW_IDS else "")
        print(f"warning: {len(ids)} {message}: {shown}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("metrics", nargs="+", metavar="NAME", help="registered metric names, e.g. fox ned exact")
    parser.add_argument("--pred", required=True, help="predictions file")
    parser.add_argument("--gt", required=True, help="ground-truth file")
    parser.add_argument("--format", choices=["jsonl"], default="jsonl", help="file format (default jsonl)")
    parser.add_argument("--per-sample", metavar="OUT", help="write per-sample rows (JSONL) here")
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source frame
    try:
        _, registry = load_plugins()
        metrics = [registry.build("metric", name) for name in args.metrics]
        gt, pred = read_jsonl(args.gt), read_jsonl(args.pred)
        _report([k for k in gt if k not in pred], 'ground-truth ids have no prediction (scored as empty string "")')
        _report([k for k in pred if k not in gt], "prediction ids are not in the ground truth (ignored)")
        pairs = [(sid, pred.get(key, (None, ""))[1], text) for key, (sid, text) in gt.items()]
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
