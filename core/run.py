"""python -m core.run RECIPE [key.path=value ...] [--list-plugins] [--dry-run]

Runs the recipe's stages in order, then evaluates the last stage's model on the
held-out split. Before anything trains every stage is built on the meta device with its
freeze policies and regularisers (``check_stages``), and the data section's datasets and
shards are checked (core/datacheck.py), so a broken recipe or plugin of the last stage, a
missing shard or a dataset argument it does not take fails at once, not hours in; ``--dry-run``
does both and says what it found. A stage with ``steps: 0`` is skipped.

Exit codes: 0 done; 1 a non-finite loss; 2 bad input (recipe, override, plugin name, data
path, a plugin that breaks the hook contract): one ``error:`` line; 3 an exception raised
by a plugin's own code: its traceback, then one ``error:`` line naming the plugin.
"""
import argparse
import contextlib
import io
import os
import sys
import time

import torch

from core import adapters, checkpoint, distributed, memory, repetition, resume
from core.data import eval_samples
from core.datacheck import check_data
from core.errors import ConfigError, cli_main, plugin_call
from core.evaluate import evaluate, format_samples, format_summary, write_eval
from core.hooks import attach
from core.loop import TrainingError, run_stage
from core.model import build_model
from core.recipe import load_recipe, run_folder
from core.registry import load_plugins
from core.report import write_report
from core.stageconfig import dataset_key, stage_dataset, stage_model
from core.threads import ThreadGovernor
from core.stagecheck import check_stages


class RunContext:
    """What every stage of one run shares: recipe, plugins, device, run folder, data, log."""

    def __init__(self, recipe, pm, registry):
        self.recipe, self.pm, self.registry = recipe, pm, registry
        self.rank, self.world_size, self.device = distributed.setup(recipe.run.device)
        self.main = self.rank == 0  # only rank 0 prints, logs, writes checkpoints and scores the evaluation
        self.run_dir = run_folder(recipe)
        ds = recipe.data.dataset
        self.dataset = registry.build("dataset", ds.name, where="data.dataset", **ds.args)
        text = recipe.data.text_dataset
        self.text_dataset = text and registry.build("dataset", text.name, where="data.text_dataset", **text.args)
        self.datasets = {"data.dataset": self.dataset}  # by recipe key: and those of stages that change it
        self.eval_samples = None  # read_eval_split's, when the evaluation, a probe or a monitor needs them
        self.loggers = None  # core.hooks.Attachment: the recipe's loggers, attached for the run
        self.threads = ThreadGovernor(recipe.run.threads)

    def stage_dataset(self, index):
        """(recipe key, dataset) stage ``index`` trains on: data.dataset, or one built with the stage's changes."""
        key = dataset_key(self.recipe, index)
        if key not in self.datasets:
            component = stage_dataset(self.recipe, index)
            self.datasets[key] = self.registry.build("dataset", component.name, where=key, **component.args)
        return key, self.datasets[key]

    def read_eval_split(self):
        """The eval split's samples (at most eval.samples), its bad samples logged; a ConfigError if none is usable."""
        limit = self.recipe.eval.samples if self.recipe.eval else None
        data = self.recipe.data
        samples = eval_samples(plugin_call("data.dataset", self.dataset.shards, "eval"), limit=limit,
                               on_bad_sample=data.on_bad_sample, max_image_pixels=data.max_image_pixels)
        if samples.report:
            self.log({"event": "data_report", "stage": "eval", "report": samples.report})
        if not samples:
            skipped = ", ".join(f"{reason} {sum(by.values())}" for reason, by in samples.report.items())
            raise ConfigError(f"data.dataset: the eval split has no usable sample (an image with its txt); "
                              f"skipped: {skipped or 'none, the split is empty'}")
        return samples

    def say(self, text):
        distributed.print0(text)

    def log(self, record):
        if self.main:  # a failing logger is named (core/hooks.py)
            self.pm.hook.vlmkit_log(record={"time": round(time.time(), 3), **record})


def list_plugins(registry):
    rows = registry.listing()
    width = max(len(f"{k} {n}") for k, n, _ in rows)
    for kind, name, source in rows:
        print(f"{kind + ' ' + name:<{width}}  {source}")


def make_run_dir(path):
    """run.dir created (or there) and writable, or one line: before anything is built or trained."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.dir: cannot create {path} ({e.strerror or e})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir: {path} is not writable")


def check_device(name):
    """run.device names a device this torch can use; one line instead of torch's assertion deep inside."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"run.device: {name!r} is not a torch device ({e})") from e
    available = {"cuda": torch.cuda.is_available, "mps": lambda: torch.backends.mps.is_available()}
    if device.type in available and not available[device.type]():
        raise ConfigError(f"run.device: {name} is not available to this torch ({torch.__version__}); "
                          f"use run.device=cpu, or install a torch build for it")


def dry_run(recipe, pm, registry, world_size=1):
    """Describe each stage as check_stages builds it, the memory a training step of it needs per process
    (core/memory.py), the token layout, then the data (core/datacheck.py)."""
    model, tokenizer = check_stages(recipe, pm, registry, show=True)
    for i, stage in enumerate(recipe.stages):
        if not stage.steps:
            continue
        title = f"stage {i + 1}/{len(recipe.stages)} {stage.name!r}"
        try:
            estimate = memory.estimate(recipe, registry, pm, i, world_size)
        except ConfigError as e:  # a dry run without the tokenizer file cannot lay out a batch
            print(f"{title}: no memory estimate: {e}\n")
            continue
        print(memory.format_estimate(estimate, title), end="\n\n")
    n = model.num_image_tokens()
    print(model.describe_layout())
    if model.tiling is not None:  # model.crops: the count depends on each image's crop grid (core/images.py)
        print(model.tiling.describe(n))
    print(f"vocabulary {tokenizer.vocab_size} (<|image|> = {tokenizer.image_id})")
    print(f"prompt layout: <|bos|> + {recipe.data.prompt.replace('<image>', f'<|image|>x{n}')!r} + answer + eos")
    check_data(recipe, registry, model, show=True)  # last: the model is described even when the data is not there


def checked_resume_point(ctx, index, stage):
    """The checkpoint.ResumePoint a ``run.resume=auto`` stage continues from, or None (the stage starts afresh).

    Only what ``latest.json`` names counts: the leftovers of a write that was cut off are removed first.
    A resumable point is checked against this run (world size, sharding, changed stage settings)."""
    stage_dir = os.path.join(ctx.run_dir, stage.name)
    if ctx.main:
        removed = checkpoint.discard_incomplete(stage_dir)
        if removed:
            ctx.say(f"stage {stage.name}: removed {len(removed)} file(s) of a checkpoint write that did not finish: "
                    + ", ".join(removed[:6]) + (" ..." if len(removed) > 6 else ""))
    point = checkpoint.resume_point(stage_dir)
    if point is None or point.complete:
        return point
    if point.tensors is None or point.train_state is None:
        raise ConfigError(f"run.resume: {point.model_file} has no training state (train_XXXXXX.safetensors) "
                          f"to resume from")
    # every rank reads the files: the run folder must be shared between nodes
    resume.check_world_size(point.train_state, ctx.world_size, point.model_file,
                            sharded=ctx.recipe.run.parallel == "fsdp" and ctx.world_size > 1)
    changed = resume.check_stage(point.train_state, stage, f"stages.{index}", point.model_file)
    if changed:
        ctx.say(f"stage {stage.name}: resuming with the recipe's "
                + ", ".join(f"stages.{index}.{k} {new!r} (the checkpoint had {old!r})"
                            for k, (old, new) in changed.items()))
        ctx.log({"event": "resume_changes", "stage": stage.name, "changed": {k: v[1] for k, v in changed.items()}})
    return point


def start_run(recipe, pm, registry):
    """Check what can be checked before anything is built for real (device, run folder, every stage on the
    meta device), then the run's context: seeded RNGs, loggers, the eval split when anything reads it."""
    check_device(recipe.run.device)
    make_run_dir(run_folder(recipe))
    with contextlib.redirect_stdout(io.StringIO()):  # the real builds below say what matters
        model, _ = check_stages(recipe, pm, registry)
    check_data(recipe, registry, model)  # datasets, their shards, an aspect warning: before anything trains
    resume.seed_all(recipe.run.seed)  # plugins built from here on draw from seeded RNGs
    ctx = RunContext(recipe, pm, registry)
    loggers = registry.build_all("logger", recipe.loggers, "loggers", context={"run_dir": ctx.run_dir})
    ctx.loggers = attach(pm, loggers, "loggers")  # they answer vlmkit_log until run() closes them
    if ctx.world_size > 1:
        ctx.say(f"distributed: {ctx.world_size} processes ({torch.distributed.get_backend()})"
                + (", model sharded (FSDP2)" if recipe.run.parallel == "fsdp" else ""))
    ctx.say(f"run folder {ctx.run_dir}; {ctx.threads.threads} CPU thread(s) "
            f"({'fixed' if recipe.run.threads else 'the idle cores, re-checked while training'}); device {ctx.device}")
    if recipe.run.resume == "never" and ctx.main:
        # this run trains these stages afresh: an older run's pointers must not make a later
        # run.resume=auto trust that run's checkpoints next to this one's (stages with steps 0 keep theirs)
        for stage in recipe.stages:
            if stage.steps:
                checkpoint.forget(os.path.join(ctx.run_dir, stage.name))
    if recipe.eval is not None or any(s.probe_every or s.monitor_every for s in recipe.stages):
        ctx.eval_samples = ctx.read_eval_split()  # an eval split that cannot be used stops here, not after training
    return ctx


def train_stages(ctx):
    """Each stage trained, resumed or, complete in run.dir already, loaded; -> (summaries, last model, tokenizer)."""
    summaries, model, tokenizer = [], None, None
    for i, stage in enumerate(ctx.recipe.stages):
        if stage.steps == 0:
            ctx.say(f"stage {stage.name}: steps 0, skipped (not built, trained or saved)")
            continue
        point = checked_resume_point(ctx, i, stage) if ctx.recipe.run.resume == "auto" else None
        if point is not None and point.complete:
            model, tokenizer, summary = load_complete_stage(ctx, i, stage, point)
        else:
            model, tokenizer, summary = run_stage(ctx, i, stage, point)
        summaries.append(summary)
    return summaries, model, tokenizer


def load_complete_stage(ctx, index, stage, point):
    """A stage that finished in an earlier run: its weights and summary, not trained again."""
    changed = resume.changed_settings(point.train_state or {}, stage)
    ctx.say(f"stage {stage.name}: complete in {point.model_file}; not trained again (run.resume=auto)"
            + ("; the recipe changed " + ", ".join(f"stages.{index}.{k}" for k in changed)
               + " since, which a complete stage does not take up (a new run.dir with init_from does)"
               if changed else ""))
    model, tokenizer = build_model(stage_model(ctx.recipe, index), ctx.registry)
    adapters.load_parts(model.to(ctx.device), point.model_file, list(checkpoint.PARTS), ctx.registry, ctx.pm)
    return model, tokenizer, point.meta["summary"]


def stage_lines(summaries):
    """One line per stage for the end of the run: steps, time, speed, final loss, collapse scores."""
    lines = []
    for s in summaries:
        collapse = "  ".join(f"{k.removeprefix('collapse_')} {v:.3f}" for k, v in s.items()
                             if k.startswith("collapse_"))
        loss = f"{s['loss']:.4f}" if "loss" in s else "-"  # a stage resumed at its end trained no step here
        lines.append(f"  {s['stage']:<12} {s['steps']:>6} steps  {s['seconds']:>7.1f} s  "
                     f"{s['samples_per_s']:>7.1f} samples/s  final loss {loss}"
                     + (f"  collapse monitor: {collapse}" if collapse else ""))
    return lines


def evaluate_run(ctx, model, tokenizer, summaries):
    """The final evaluation on the eval split: eval.json, eval.md and eval_samples.jsonl; returns the aggregate.

    Every rank calls it and decodes its share (core/evaluate.py); rank 0 scores, writes and prints, the
    other ranks return None."""
    recipe = ctx.recipe
    metrics = ctx.registry.build_all("metric", recipe.eval.metrics, "eval.metrics") if ctx.main else []
    rows, aggregate = evaluate(model, tokenizer, ctx.eval_samples, metrics, recipe.data.prompt, ctx.device,
                               recipe.eval.max_new_tokens, recipe.data.max_len, recipe.eval.batch_size,
                               repetition.from_eval(recipe.eval, tokenizer), pm=ctx.pm)
    if not ctx.main:
        return None
    write_eval(ctx.run_dir, rows, aggregate, summaries)
    ctx.log({"event": "eval", **aggregate})
    ctx.say(f"\nevaluation on {len(rows)} samples of the eval split (greedy):\n"
            f"{format_samples(rows, recipe.eval.show_samples)}\n")
    ctx.say(format_summary(aggregate))
    return aggregate


def run(recipe, dry=False, world_size=None):
    """Train the recipe's stages and evaluate the last one (``dry``: only describe them, with the memory per
    process of ``world_size`` processes, default $WORLD_SIZE or 1); -> {"stages", "eval"}."""
    pm, registry = load_plugins(recipe.plugins)
    if dry:
        dry_run(recipe, pm, registry, world_size or int(os.environ.get("WORLD_SIZE", "1")))
        return None
    ctx = start_run(recipe, pm, registry)
    with ctx.loggers:
        summaries, model, tokenizer = train_stages(ctx)
        ctx.say("\nstages:")
        for line in stage_lines(summaries):
            ctx.say(line)
        result = {"stages": summaries}
        if recipe.eval is not None:  # every rank decodes a share; rank 0's aggregate
            aggregate = evaluate_run(ctx, model, tokenizer, summaries)
            if ctx.main:
                result["eval"] = aggregate
    if ctx.main:
        ctx.say(f"report: {write_report(ctx.run_dir)}")
    ctx.say(f"\nrun folder: {ctx.run_dir}")
    return result


def command(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.run", description="Train and evaluate a vlmkit recipe.")
    parser.add_argument("recipe", nargs="?", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.0.steps=50")
    parser.add_argument("--list-plugins", action="store_true", help="list registered components and their sources")
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device and describe the model "
                                                               "and the memory a training step needs, then check "
                                                               "the data section's datasets and shards")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: the processes torchrun would start (default: $WORLD_SIZE or 1)")
    args = parser.parse_intermixed_args(argv)  # overrides may come after --dry-run too
    if args.list_plugins and not args.recipe:
        list_plugins(load_plugins()[1])
        return 0
    if not args.recipe:
        parser.error("a recipe is required")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.list_plugins:
        list_plugins(load_plugins(recipe.plugins)[1])
        return 0
    if args.world_size is not None and args.world_size < 1:
        parser.error("--world-size must be at least 1")
    try:
        run(recipe, dry=args.dry_run, world_size=args.world_size)
    except BaseException:
        distributed.shutdown(completed=False)
        raise
    distributed.shutdown()
    return 0


def main(argv=None):
    """The command line: ``command`` with errors as one line and an exit code (a non-finite loss: 1)."""
    return cli_main(command, argv, handled=[(TrainingError, 1)])


if __name__ == "__main__":
    sys.exit(main())
