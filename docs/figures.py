"""The pictures of docs/results.md: a run of the default recipe (needs matplotlib):

    python docs/figures.py RUN_DIR [--out docs/images]

- lines_train.png: 16 training images with their transcripts, as the model sees them (32 x 256);
- lines_heldout.png: 16 held-out images (words never trained on), ground truth and the prediction
  from RUN_DIR/eval_samples.jsonl;
- lines_probe.png: the held-out probe (exact match and NED on the first eval.probe_samples samples)
  across both stages, from RUN_DIR/log.jsonl, steps counted across stages.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.data import eval_samples
from core.recipe import load_recipe
from core.registry import load_plugins


def image_grid(samples, path, title, rows=8, cols=2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 1.25 * rows))
    for ax, (image, lines) in zip(axes.T.ravel(), samples):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("\n".join(lines), fontsize=8, family="monospace", loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_curve(log_path, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    stages, offset, points, bounds = [], 0, [], []
    for row in rows:
        if row.get("event") == "stage_start":
            stages.append(row["stage"])
        if row.get("event") == "probe":
            points.append((offset + row["step"], row["exact"], row["ned"], row["stage"]))
        if row.get("event") == "stage_end":
            offset += row["steps"]
            bounds.append(offset)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for stage in stages:
        xs = [p[0] for p in points if p[3] == stage]
        ax.plot(xs, [p[2] for p in points if p[3] == stage], "o-", label=f"NED ({stage})")
        ax.plot(xs, [p[1] for p in points if p[3] == stage], "s--", label=f"exact ({stage})")
    for b in bounds[:-1]:
        ax.axvline(b, color="grey", lw=0.8)
    ax.set_xlabel("training step (both stages, batch 32)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("held-out probe (words never trained on)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--recipe", default="recipes/two_stage.yaml")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    recipe = load_recipe(args.recipe)
    _, registry = load_plugins(recipe.plugins)
    ds = recipe.data.dataset
    dataset = registry.build("dataset", ds.name, where="data.dataset", **ds.args)
    train = eval_samples(dataset.shards("train"), limit=16)
    image_grid([(s["image"], [repr(s["text"])]) for s in train], os.path.join(args.out, "lines_train.png"),
               "training samples and their transcripts")
    held = {s["key"]: s for s in eval_samples(dataset.shards("eval"), limit=256)}
    rows = [json.loads(line) for line in open(os.path.join(args.run_dir, "eval_samples.jsonl"))]
    shown = []
    for row in rows[:16]:
        sample = held[row["id"]]
        mark = "ok " if row["pred"].strip() == row["gt"].strip() else "   "
        shown.append((sample["image"], [f"gt   {row['gt']!r}", f"{mark}pred {row['pred']!r}"]))
    image_grid(shown, os.path.join(args.out, "lines_heldout.png"), "held-out samples: ground truth and prediction")
    probe_curve(os.path.join(args.run_dir, "log.jsonl"), os.path.join(args.out, "lines_probe.png"))
    print(f"wrote lines_train.png, lines_heldout.png, lines_probe.png in {args.out}")


if __name__ == "__main__":
    main()
