"""report.md for a run folder: what the run did, drawn and tabled from its log.jsonl and eval.json.

Plots (PNG; matplotlib is a dependency):
loss per stage (each loss term), learning rate, the collapse monitor, and the
held-out probe's exact-match rate. Tables: each stage's parameters
(trainable / frozen per component), the stage summaries, and the evaluation.
Without matplotlib the report keeps its tables and says how to get the plots.

    python -m core.report RUN_DIR     # (re)write RUN_DIR/report.md from its files
"""
import json
import os
import sys

from core.errors import cli_main

PLOTS = {  # file -> (title, event, value keys or None for "every numeric key except these")
    "loss.png": ("training loss per stage", "train", None),
    "lr.png": ("learning rate", "train", ["lr", "muon_lr"]),
    "collapse.png": ("collapse monitor: mean cosine similarity of different images' features", "collapse", None),
    "probe.png": ("held-out probe: exact-match rate", "probe", ["exact"]),
}
NOT_PLOTTED = {"step", "time", "lr", "muon_lr", "samples_per_s", "threads", "event", "stage"}


def parameter_table(model, extra_modules=None):
    """Rows (component, trainable, frozen): the model's top-level parts, the encoder split into the
    sub-networks its ``feature_parts()`` names (the DeepEncoder: sam, clip), then ``extra_modules``
    (e.g. a regulariser's head: trained with the model, saved with the stage)."""
    parts = getattr(model.encoder, "feature_parts", lambda: {})()
    children = {name for name, _ in model.encoder.named_children()}
    split = [name for name in parts if name in children]
    rows = {}
    for name, p in model.named_parameters():
        head, _, rest = name.partition(".")
        sub = rest.partition(".")[0]
        key = f"{head}.{sub}" if head == "encoder" and sub in split else head
        trainable, frozen = rows.get(key, (0, 0))
        rows[key] = (trainable + p.numel(), frozen) if p.requires_grad else (trainable, frozen + p.numel())
    table = [(k, t, f) for k, (t, f) in rows.items()]
    return table + [(name, sum(p.numel() for p in m.parameters()), 0) for name, m in (extra_modules or {}).items()]


def format_parameter_table(rows, title=""):
    width = max([len("component")] + [len(r[0]) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'component':<{width}}  {'trainable':>12}  {'frozen':>12}")
    for name, t, f in rows:
        lines.append(f"{name:<{width}}  {t:>12,}  {f:>12,}")
    total_t, total_f = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {total_t:>12,}  {total_f:>12,}")
    return "\n".join(lines)


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # half a line from a killed run (the resumed run starts a new line)
    return [e for e in events if isinstance(e, dict)]


def _series(events, event, keys):
    """{stage: {key: ([x], [y])}} with x the step, from events of one kind."""
    out = {}
    for e in events:
        if e.get("event") != event:
            continue
        wanted = keys or [k for k, v in e.items() if k not in NOT_PLOTTED and isinstance(v, (int, float))]
        for key in wanted:
            if isinstance(e.get(key), (int, float)):
                xs, ys = out.setdefault(e["stage"], {}).setdefault(key, ([], []))
                xs.append(e["step"])
                ys.append(e[key])
    return out


def draw(events, run_dir):
    """Write the PNGs that have data; returns their file names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, (title, event, keys) in PLOTS.items():
        series = _series(events, event, keys)
        if not series:
            continue
        stages = list(series)
        fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            for key, (xs, ys) in series[stage].items():
                ax.plot(xs, ys, label=key)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, name), dpi=80)
        plt.close(fig)
        written.append(name)
    return written


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(run_dir):
    """Write run_dir/report.md (and its PNGs); returns the report's path."""
    events = read_log(run_dir)
    images = draw(events, run_dir)
    parts = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", ""]
    if images:
        parts += [f"![{name[:-4]}]({name})" for name in images] + [""]
    else:
        parts += ["Plots need matplotlib: `pip install matplotlib`, then `python -m core.report RUN_DIR`.", ""]
    for e in events:
        if e.get("event") == "stage_start" and e.get("parameters"):
            parts += [f"## Stage {e['stage']}: parameters", "",
                      _table(["component", "trainable", "frozen"],
                             [(name, f"{t:,}", f"{f:,}") for name, t, f in e["parameters"]]), ""]
    ends = [e for e in events if e.get("event") == "stage_end"]
    if ends:
        keys = ["stage", "steps", "seconds", "samples_per_s", "loss"] + sorted(
            {k for e in ends for k in e if k.startswith("collapse_")})
        parts += ["## Stages", "", _table(keys, [[_fmt(e.get(k, "")) for k in keys] for e in ends]), ""]
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(eval_path):
        with open(eval_path, encoding="utf-8") as f:
            aggregate = json.load(f)["aggregate"]
        parts += ["## Evaluation", "", _table(["metric", "value"], [(k, _fmt(v)) for k, v in aggregate.items()]),
                  "", "Per sample: [eval.md](eval.md).", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def command(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "log.jsonl")):
        print("usage: python -m core.report RUN_DIR  (a run folder with log.jsonl)", file=sys.stderr)
        return 2
    print(write_report(argv[0]))
    return 0


def main(argv=None):
    """The command line: ``command`` with errors as one line and an exit code."""
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
