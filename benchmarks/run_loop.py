"""The real run's time next to the bare step's: where the minutes of ``python -m core.run`` go.

    python -m benchmarks.run_loop [--steps N]

Runs core.run's own code (core.run.run: data streams, the step with its CTC heads and Muon, logging,
the thread governor, collapse monitor, held-out probe, checkpoints, the final evaluation and report)
on the default recipe's stage 1 for ``steps`` steps, with ``run.log_every: 1`` and the probe and the
monitor every ``steps // 2`` steps, in a temporary folder. From the log's timestamps: the loop's
step (the gaps between consecutive steps that hold no probe or monitor: the step plus loading its
batch), one probe, one monitor pass, the stage's final checkpoint, the evaluation per sample and the
setup (rendering the training images, building the model) and the report (plots). ``project`` puts them together at the
recipe's own step counts and intervals, next to the same steps at the bare step's speed
(benchmarks/train_step.py), so the gap between the two is measured, not guessed.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time

from benchmarks.common import RECIPE
from core import run as core_run
from core.recipe import load_recipe


def run_overrides(recipe, folder, steps, eval_samples):
    """Overrides that make ``recipe`` a short stage-1 run in ``folder`` whose probe and monitor fire twice."""
    every = max(steps // 2, 1)
    batch = recipe.stages[0].batch_size or recipe.data.batch_size
    out = [f"run.dir={folder}/run", "run.log_every=1", f"stages.0.steps={steps}", f"stages.0.probe_every={every}",
           f"stages.0.monitor_every={every}", f"eval.samples={eval_samples}"]
    out += [f"stages.{i}.steps=0" for i in range(1, len(recipe.stages))]
    if "train_samples" in recipe.data.dataset.args:  # render what the steps read, not the recipe's 40,000
        out += [f"data.dataset.train_samples={steps * batch}", f"data.dataset.cache_dir={folder}/cache"]
    return out


def timings(events, started, finished):
    """{setup, step, probe, monitor, finish, eval, report} seconds from one short run's log events."""
    train = {e["step"]: e["time"] for e in events if e["event"] == "train"}
    at = {(e["event"], e.get("step")): e["time"] for e in events if e["event"] in ("probe", "collapse")}
    busy = {step - 1 for kind, step in at}  # a step whose after-step work held a probe or monitor pass
    gaps = [train[s + 1] - train[s] for s in sorted(train)[:-1] if s not in busy and s + 1 in train]
    probes = [t - at.get(("collapse", step), train[step - 1]) for (kind, step), t in at.items() if kind == "probe"]
    monitors = [t - train[step - 1] for (kind, step), t in at.items() if kind == "collapse" and step > 1]
    end = next(e["time"] for e in events if e["event"] == "stage_end")
    last = max([train[max(train)]] + [t for (kind, step), t in at.items() if step == max(train) + 1])
    eval_time = next(e["time"] for e in events if e["event"] == "eval")
    start = next(e["time"] for e in events if e["event"] == "stage_start")
    return dict(setup=start - started, step=statistics.median(gaps), probe=statistics.median(probes),
                monitor=statistics.median(monitors), finish=end - last, eval=eval_time - end,
                report=finished - eval_time)


def measure(steps=40, recipe_path=RECIPE, eval_samples=64):
    """One short real run of the recipe's stage 1: ``timings`` plus its batch size, steps and eval samples."""
    recipe = load_recipe(recipe_path)
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-run-") as tmp:
        run_recipe = load_recipe(recipe_path, run_overrides(recipe, tmp, steps, eval_samples))
        started = time.time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            core_run.run(run_recipe)
        finished = time.time()
        with open(os.path.join(tmp, "run", "log.jsonl"), encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
    return dict(timings(events, started, finished), batch_size=recipe.stages[0].batch_size or recipe.data.batch_size,
                steps=steps, eval_samples=eval_samples)


def project(measured, bare_step_s, recipe_path=RECIPE):
    """Stage 1 of the recipe as it stands, in seconds: {loop, probes, monitor, finish, eval, report, total, bare}: the
    measured pieces at its step count and intervals, and ``bare``: its steps at the bare step's speed."""
    recipe = load_recipe(recipe_path)
    stage = recipe.stages[0]
    probes = stage.steps // stage.probe_every if stage.probe_every else 0
    monitors = 1 + stage.steps // stage.monitor_every if stage.monitor_every else 0
    eval_s = measured["eval"] / measured["eval_samples"] * (recipe.eval.samples if recipe.eval else 0)
    parts = dict(loop=stage.steps * measured["step"], probes=probes * measured["probe"],
                 monitor=monitors * measured["monitor"], finish=measured["finish"], eval=eval_s,
                 report=measured["report"])
    return dict(parts, total=sum(parts.values()), bare=stage.steps * bare_step_s, steps=stage.steps)


def format_rows(measured, projected, bare_step_s):
    """Markdown: the measured pieces, then stage 1 of the recipe projected from them."""
    m, p, batch = measured, projected, measured["batch_size"]
    return [f"| bare step (row 2) | real loop step | one probe | one monitor pass | final checkpoint | "
            f"eval per sample | setup ({m['steps'] * batch} images) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {bare_step_s * 1000:.0f} ms ({batch / bare_step_s:,.0f} samples/s) | {m['step'] * 1000:.0f} ms "
            f"({batch / m['step']:,.0f} samples/s) | {m['probe']:.2f} s | {m['monitor']:.2f} s | {m['finish']:.2f} s | "
            f"{m['eval'] / m['eval_samples'] * 1000:.0f} ms | {m['setup']:.1f} s |", "",
            f"Stage 1 of the recipe from these ({p['steps']} steps): loop {p['loop']:.0f} s + probes "
            f"{p['probes']:.0f} s + monitor {p['monitor']:.0f} s + checkpoint {p['finish']:.0f} s + eval "
            f"{p['eval']:.0f} s + report {p['report']:.0f} s = **{p['total']:.0f} s**, "
            f"against {p['bare']:.0f} s of bare steps "
            f"({p['total'] / p['bare']:.2f}x)."]


def main(argv=None):
    from benchmarks import train_step
    from benchmarks.common import synthetic_shards

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_loop", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-step-") as tmp:
        bare = train_step.measure(synthetic_shards(tmp, 256), steps=10)["seconds"]
    measured = measure(args.steps)
    print("\n".join(format_rows(measured, project(measured, bare), bare)))


if __name__ == "__main__":
    main()
