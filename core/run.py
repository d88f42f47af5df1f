"""python -m core.run RECIPE [key.path=value ...] [--list-plugins] [--dry-run]

Runs the recipe's stages in order, then evaluates the last stage's model on the
held-out split. Bad input (recipe, override, plugin, data path) prints one
``error:`` line and exits with code 2.
"""
import argparse
import os
import sys
import time

import torch

from core import checkpoint, distributed
from core import resume as resume_state
from core import registry as plugin_registry
from core.data import image_hw
from core.errors import ConfigError
from core.evaluate import evaluate, format_samples, format_summary, write_eval
from core.model import build_model, format_parameter_table, parameter_table
from core.recipe import load_recipe
from core.report import write_report
from core.threads import ThreadGovernor
from core.train import TrainingError, apply_freeze, run_stage


class RunContext:
    """What every stage of one run shares: recipe, plugins, device, run folder, data, log."""

    def __init__(self, recipe, pm, registry):
        self.recipe, self.pm, self.registry = recipe, pm, registry
        self.rank, self.world_size, self.device = distributed.setup(recipe.run.device)
        self.main = self.rank == 0  # only rank 0 prints, logs, writes checkpoints and evaluates
        self.run_dir = os.path.abspath(os.path.expanduser(recipe.run.dir))
        ds = recipe.data.dataset
        self.dataset = registry.build("dataset", ds.name, where="data.dataset", **ds.args)
        text = recipe.data.text_dataset
        self.text_dataset = text and registry.build("dataset", text.name, where="data.text_dataset", **text.args)
        self._eval_samples = None
        self.threads = ThreadGovernor(recipe.run.threads)

    @property
    def eval_samples(self):
        from core.data import eval_samples
        if self._eval_samples is None:
            limit = self.recipe.eval.samples if self.recipe.eval else None
            data = self.recipe.data
            self._eval_samples = eval_samples(self.dataset.shards("eval"), limit=limit,
                                              on_bad_sample=data.on_bad_sample, max_image_pixels=data.max_image_pixels)
            if self._eval_samples.report:
                self.log({"event": "data_report", "stage": "eval", "report": self._eval_samples.report})
        return self._eval_samples

    def say(self, text):
        if self.main:
            print(text, flush=True)

    def log(self, record):
        if self.main:
            self.pm.hook.vlmkit_log(record={"time": round(time.time(), 3), **record})


def list_plugins(registry):
    rows = registry.listing()
    width = max(len(f"{k} {n}") for k, n, _ in rows)
    for kind, name, source in rows:
        print(f"{kind + ' ' + name:<{width}}  {source}")


def dry_run(recipe, pm, registry):
    """Build the model on the meta device (no memory, no weights, no data) and describe each stage."""
    for i, stage in enumerate(recipe.stages):
        with torch.device("meta"):
            model, tokenizer = build_model(recipe.model, registry)
        apply_freeze(registry, pm, model, stage, f"stages.{i}")
        print(format_parameter_table(parameter_table(model), title=f"stage {i + 1}/{len(recipe.stages)} "
                                     f"{stage.name!r}: parameters (meta device)"), end="\n\n")
    n = model.num_image_tokens()
    height, width = image_hw(model.image_size)
    h, w = model.encoder.grid_size(height, width)
    print(f"image {height}x{width} -> grid {h}x{w} -> {n} vision tokens "
          f"({h} rows of {w} + newline, + 1 separator)")
    if model.tiling is not None:  # model.crops: the count depends on each image's crop grid (core/tiles.py)
        print(model.tiling.describe(n))
    print(f"vocabulary {tokenizer.vocab_size} (<|image|> = {tokenizer.image_id})")
    print(f"prompt layout: <|bos|> + {recipe.data.prompt.replace('<image>', f'<|image|>x{n}')!r} + answer + eos")


def run(recipe):
    pm, registry = plugin_registry.load_plugins(recipe.plugins)
    if recipe.run.dry_run:
        dry_run(recipe, pm, registry)
        return None
    ctx = RunContext(recipe, pm, registry)
    os.makedirs(ctx.run_dir, exist_ok=True)
    for logger in registry.build_all("logger", recipe.loggers, "loggers", context={"run_dir": ctx.run_dir}):
        pm.register(logger)
    if ctx.world_size > 1:
        ctx.say(f"distributed: {ctx.world_size} processes ({torch.distributed.get_backend()})"
                + (", model sharded (FSDP2)" if recipe.run.parallel == "fsdp" else ""))
    ctx.say(f"run folder {ctx.run_dir}; {ctx.threads.threads} CPU thread(s) "
            f"({'fixed' if recipe.run.threads else 'the idle cores, re-checked while training'}); device {ctx.device}")
    summaries, model = [], None
    for i, stage in enumerate(recipe.stages):
        point = checkpoint.resume_point(os.path.join(ctx.run_dir, stage.name)) if recipe.run.resume == "auto" else None
        if point is not None and point[1].get("complete"):
            ctx.say(f"stage {stage.name}: complete in {point[0]}; not trained again (run.resume=auto)")
            model, tokenizer = build_model(recipe.model, registry)
            checkpoint.load_parts(model.to(ctx.device), point[0], list(checkpoint.PARTS))
            summaries.append(point[1]["summary"])
            continue
        if point is not None and point[2] is None:
            raise ConfigError(f"run.resume: {point[0]} has no training state (train_XXXXXX.safetensors) to resume from")
        if point is not None:  # every rank reads the files: the run folder must be shared between nodes
            resume_state.check_world_size(point[1]["train_state"], ctx.world_size, point[0],
                                          sharded=recipe.run.parallel == "fsdp" and ctx.world_size > 1)
        model, tokenizer, summary = run_stage(ctx, i, stage, resume=point)
        summaries.append(summary)
    ctx.say("\nstages:")
    for s in summaries:
        collapse = "  ".join(f"{k.removeprefix('collapse_')} {v:.3f}" for k, v in s.items() if k.startswith("collapse_"))
        ctx.say(f"  {s['stage']:<12} {s['steps']:>6} steps  {s['seconds']:>7.1f} s  "
                f"{s['samples_per_s']:>7.1f} samples/s  final loss {s['loss']:.4f}"
                + (f"  collapse monitor: {collapse}" if collapse else ""))
    result = {"stages": summaries}
    if recipe.eval is not None and ctx.main:
        metrics = registry.build_all("metric", recipe.eval.metrics, "eval.metrics")
        rows, aggregate = evaluate(model, tokenizer, ctx.eval_samples, metrics, recipe.data.prompt, ctx.device,
                                   recipe.eval.max_new_tokens, recipe.data.max_len, recipe.eval.batch_size)
        write_eval(ctx.run_dir, rows, aggregate, summaries)
        ctx.log({"event": "eval", **aggregate})
        ctx.say(f"\nevaluation on {len(rows)} samples of the eval split (greedy):\n{format_samples(rows, recipe.eval.show_samples)}\n")
        ctx.say(format_summary(aggregate))
        result["eval"] = aggregate
    if ctx.main:
        ctx.say(f"report: {write_report(ctx.run_dir)}")
    ctx.say(f"\nrun folder: {ctx.run_dir}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.run", description="Train and evaluate a vlmkit recipe.")
    parser.add_argument("recipe", nargs="?", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.0.steps=50")
    parser.add_argument("--list-plugins", action="store_true", help="list registered components and their sources")
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device and describe the model")
    args = parser.parse_intermixed_args(argv)  # overrides may come after --dry-run too
    try:
        if args.list_plugins and not args.recipe:
            list_plugins(plugin_registry.load_plugins()[1])
            return 0
        if not args.recipe:
            parser.error("a recipe is required")
        recipe = load_recipe(args.recipe, args.overrides)
        if args.list_plugins:
            list_plugins(plugin_registry.load_plugins(recipe.plugins)[1])
            return 0
        if args.dry_run:
            recipe.run.dry_run = True
        try:
            run(recipe)
        finally:
            distributed.shutdown()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
