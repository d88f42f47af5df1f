"""Score predictions against ground truth with metric plugins; ``python -m core.metrics``.

    python -m core.metrics fox ned --pred preds.jsonl --gt gt.jsonl [--per-sample rows.jsonl]
    python -m core.metrics fox --format fox --pred results_final.json
    python -m core.metrics omnidocbench --format omnidocbench --gt OmniDocBench.json --pred md_folder/

``--format``: ``jsonl`` (default; vlmkit's own: ``--gt`` and ``--pred`` hold one ``{"id": ...,
"text": ...}`` per line, a ground-truth line may add ``"page"`` (string or integer) to group
samples for page averages), or any registered ``metric_input`` plugin (core/contracts.py
``MetricInput``; built in: ``fox``, Fox's result JSON, and ``omnidocbench``, OmniDocBench.json +
a folder of ``<image stem>.md``, scored as the official end-to-end evaluator scores it). ``--option
KEY=VALUE`` (or ``--option KEY`` for true) passes an argument to that format's reader, e.g.
``--option corrected`` for OmniDocBench without its evaluator's bugs. Ids (strings or integers) are
matched by their string form (core/pairs.py). Every ground-truth id is scored: a missing prediction
is scored as the empty string "" and reported on stderr; predictions whose id is not in the ground
truth are reported and ignored. The aggregate is printed as one JSON object on the last line of
stdout; ``--per-sample`` writes one JSON row per sample (``id``, ``page`` if known, and the values).
Bad input prints one ``error: ...`` line to stderr and exits 2.
"""
import argparse
import json
import os
import sys
import warnings

from core.errors import ConfigError, cli_main
from core.pairs import pair_up, read_jsonl
from core.pluginfiles import resolve_plugin_paths
from core.hooks import attach, new_plugin_manager
from core.registry import load_plugins
from core.yamlfile import parse_options

NATIVE_FORMAT = "jsonl"
PROGRESS_MIN = 1000  # show a progress bar above this many pairs


# ---- reading pairs

def load_pairs(registry, fmt, pred_path, gt_path=None, options=None):
    """The ``(id, pred, gt, page)`` pairs of ``fmt``'s files (page may be None). ``gt_path``: a path, or a
    list of them (one is a path; several only for a reader with ``several_gt``, core/contracts.py)."""
    if isinstance(gt_path, (list, tuple)) and len(gt_path) == 1:
        gt_path = gt_path[0]
    reader = None if fmt == NATIVE_FORMAT else registry.build("metric_input", fmt, where="--format",
                                                               **(options or {}))
    if isinstance(gt_path, (list, tuple)) and not getattr(reader, "several_gt", False):
        raise ConfigError(f"--gt: --format {fmt} reads one ground-truth path, got {len(gt_path)}")
    if reader is None:
        if options:
            raise ConfigError(f"--option: the {NATIVE_FORMAT} format takes no options")
        if gt_path is None:
            raise ConfigError(f"--gt is required with --format {fmt}")
        return pair_up(read_jsonl(gt_path, allow_page=True), read_jsonl(pred_path))
    if gt_path is None and reader.needs_gt:
        raise ConfigError(f"--gt is required with --format {fmt}")
    if gt_path is not None and not reader.needs_gt:
        raise ConfigError(f"--gt is not used with --format {fmt}: its --pred file holds both sides")
    return reader.read(pred_path, gt_path)


# ---- scoring

def score_pairs(metrics, pairs, progress=False, pm=None):
    """Score ``pairs`` of ``(id, pred, gt)`` or ``(id, pred, gt, page)`` with metric objects.

    Returns ``(rows, aggregate)``. Each row is ``{"id": id, **values}`` merged over all metrics,
    with ``"page": page`` after the id when a pair has a page that is not None (metrics that
    average per page read it, e.g. ``omnidocbench``); the aggregate merges every metric's
    ``vlmkit_metric_aggregate(rows)``. Two metrics that produce the same value name (or
    ``id``/``page``) raise ConfigError. The metrics are attached to ``pm`` (the loaded plugins'
    manager: a run's, or this command's) while they score; None: a manager of their own.
    """
    if progress and len(pairs) > PROGRESS_MIN:
        from tqdm import tqdm
        pairs = tqdm(pairs, desc="scoring", unit="pair", file=sys.stderr)
    pm = new_plugin_manager() if pm is None else pm
    rows, aggregate = [], {}
    with attach(pm, metrics, "metrics"):
        for sid, pred, gt, *page in pairs:
            row = {"id": sid}
            if page and page[0] is not None:
                row["page"] = page[0]
            for values in pm.hook.vlmkit_metric_score(pred=pred, gt=gt):
                _merge(row, values, "per-sample value")
            rows.append(row)
        for values in pm.hook.vlmkit_metric_aggregate(rows=rows):
            _merge(aggregate, values, "aggregate value")
    return rows, aggregate


def _merge(into, values, what):
    for name, value in values.items():
        if name in into:
            raise ConfigError(f"two metrics produce the {what} {name!r}; use them in separate runs")
        into[name] = value


def command(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("metrics", nargs="+", metavar="NAME", help="registered metric names, e.g. fox ned exact")
    parser.add_argument("--pred", required=True, help="predictions file (or folder of .md for omnidocbench)")
    parser.add_argument("--gt", "--tests", dest="gt", nargs="+", metavar="GT",
                        help="ground-truth file (not with --format fox); some formats take several, e.g. "
                             "olmocr_bench's test files BENCH/*.jsonl")
    parser.add_argument("--format", default=NATIVE_FORMAT,
                        help="input format: jsonl (default) or a registered metric_input (fox, omnidocbench, ...)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="an argument of the --format reader; KEY alone means true, e.g. corrected (omnidocbench)")
    parser.add_argument("--per-sample", metavar="OUT", help="write per-sample rows (JSONL) here")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="load this plugin too (a module name or a .py file), as a recipe's plugins: do")
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source frame
    pm, registry = load_plugins(resolve_plugin_paths(args.plugin, os.getcwd()))
    metrics = [registry.build("metric", name, where=f"metric {name!r}") for name in args.metrics]
    pairs = load_pairs(registry, args.format, args.pred, args.gt, parse_options(args.option))
    rows, aggregate = score_pairs(metrics, pairs, progress=True, pm=pm)
    if args.per_sample:
        try:
            with open(args.per_sample, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        except OSError as e:
            raise ConfigError(f"cannot write {args.per_sample}: {e}") from e
    print(json.dumps(aggregate, ensure_ascii=False))
    return 0


def main(argv=None):
    """The command line: ``command`` with errors as one line and an exit code."""
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
