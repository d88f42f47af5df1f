"""One training stage: ``prepare_stage`` (build, initialise, freeze, optimiser) and ``run_stage`` (the loop).

Each stage builds the model afresh from the recipe and takes weights only through ``init_from``,
so a stage's starting point is explicit in the recipe (DeepSeek-OCR stage 2 = fresh decoder + the
encoder of stage 1). ``prepare_stage`` and ``train_step`` are also what the benchmark times
(benchmarks/train_step.py), so it measures the step ``core.run`` takes.
"""
import contextlib
import math
import os
import random
import time

import attrs
import torch
from tqdm import tqdm

from core import checkpoint, distributed, repetition, stream
from core import resume as resume_state
from core.badsamples import format_report
from core.data import SampleEncoding
from core.errors import ConfigError
from core.evaluate import decode_shared
from core.model import build_model, checkpoint_activations
from core.monitor import collapse_scores, probe_images
from core.muon import MuonAdamW, muon_matrices
from core.registry import attached, call_in_order, plugin_call
from core.report import format_parameter_table, parameter_table
from core.textdist import ned


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what is intact."""


def lr_factor(stage, step):
    """Multiplier of the stage's lr at ``step``: linear warmup, then constant, step or cosine decay."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    if stage.schedule == "step" and stage.decay_every:
        return stage.decay_factor ** ((step - stage.warmup) // stage.decay_every)
    if stage.schedule == "cosine":
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def set_train_mode(model):
    """Train mode, except modules whose parameters are all frozen stay in eval mode."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def apply_freeze(registry, pm, model, stage, where):
    """Run the stage's freeze policies (the vlmkit_freeze hook) on ``model``; return {name: lr multiplier}."""
    policies = registry.build_all("freeze", stage.freeze, f"{where}.freeze")
    frozen_by_design = [p for p in model.parameters() if not p.requires_grad]  # e.g. CLIP's bypassed patch conv
    with attached(pm, policies, f"{where}.freeze") as hook:
        answers = call_in_order(hook.vlmkit_freeze, model=model, stage=stage)
    for p in frozen_by_design:  # a broad "trainable" glob must not wake them (DDP fails on unused parameters)
        p.requires_grad_(False)
    multipliers = {}
    for answer in answers:
        for name, factor in answer.items():
            multipliers[name] = multipliers.get(name, 1.0) * factor
    return multipliers


def parameter_groups(model, extra_modules, multipliers, lr, muon_lr=None):
    """Optimizer groups over exactly the trainable parameters, one per (lr multiplier, kind).

    With ``muon_lr`` the decoder's block matrices (core.muon.muon_matrices) form Muon groups at that lr;
    the rest is AdamW.
    """
    muon = {f"decoder.{n}" for n in muon_matrices(model.decoder)} if muon_lr is not None else set()
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "muon" if name in muon else "adamw"
            # FSDP's DTensors apart from plain tensors: one fused AdamW kernel cannot take both
            groups.setdefault((multipliers.get(name, 1.0), kind, distributed.is_sharded(p)), []).append(p)
    groups.setdefault((1.0, "adamw", False), []).extend(p for m in extra_modules.values() for p in m.parameters())
    return [{"params": params, "lr": (muon_lr if kind == "muon" else lr) * factor, "lr_multiplier": factor,
             "kind": kind} for (factor, kind, _), params in sorted(groups.items()) if params]


def make_optimizer(stage, groups):
    if stage.optimizer == "muon":
        return MuonAdamW(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
    # fused: one kernel over every tensor instead of a Python loop per parameter; about 3x faster on
    # the CPU (BENCHMARKS.md). Only for float parameters on the CPU or CUDA, which is what torch fuses.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay,
                             fused=fused)


def sample_encoding(data_config, model, tokenizer, text_only=False):
    """How the recipe's ``data`` turns a raw sample into a training pair for this model."""
    return SampleEncoding(tokenizer, data_config.prompt, model.image_size, model.num_image_tokens(),
                          data_config.max_len, model.tiling, text_only, data_config.on_long_target,
                          data_config.max_image_pixels)


@attrs.define
class Prepared:
    """A stage ready to train: the model and what trains it. ``close()`` detaches its regularisers."""
    stage: object
    where: str
    model: torch.nn.Module
    tokenizer: object
    engine: torch.nn.Module  # what the forward runs through: the model, or DDP / torch.compile around it
    extra_modules: dict  # regulariser modules with parameters, by checkpoint prefix
    extra_params: list  # their parameters: outside DDP, their gradients are averaged by hand
    trainable: list
    clip: object  # the gradient-clipping function: FSDP's over sharded and plain gradients, else torch's
    optimizer: torch.optim.Optimizer
    scheduler: object
    sharded: bool
    table: list  # parameter table rows (component, trainable, frozen)
    hook: object  # the plugin manager's hooks, with the regularisers attached
    precision: str
    exits: contextlib.ExitStack

    def close(self):
        self.exits.close()


def prepare_stage(recipe, registry, pm, index, device, run_dir=None, resume=None, say=distributed.print0,
                  init_from=True):
    """Build stage ``index``'s model and everything that trains it, in the order that matters:
    init_from, freeze, regularisers, resumed weights, activation checkpointing, FSDP, optimizer, DDP.
    ``init_from=False`` skips the stage's init_from weights (a benchmark times the step, not the weights)."""
    stage, where = recipe.stages[index], f"stages.{index}"
    resume_state.seed_all(recipe.run.seed + 1000 * index)  # python's and numpy's RNGs too: plugins draw from them
    model, tokenizer = build_model(recipe.model, registry)
    model.to(device)
    if stage.init_from is not None and resume is None and init_from:
        path = checkpoint.resolve(stage.init_from.path, run_dir, stage.init_from.parts)
        keys = checkpoint.load_parts(model, path, stage.init_from.parts)
        say(f"stage {stage.name}: {'+'.join(stage.init_from.parts)} ({len(keys)} tensors) from {path}")

    multipliers = apply_freeze(registry, pm, model, stage, where)
    regularisers = registry.build_all("regulariser", stage.regularisers, f"{where}.regularisers",
                                      context={"model": model, "tokenizer": tokenizer})
    extra_modules = {f"regulariser.{c.name}": r.to(device) for c, r in zip(stage.regularisers, regularisers)
                     if isinstance(r, torch.nn.Module)}
    if resume is not None:  # the weights before sharding: FSDP then cuts what was loaded
        checkpoint.load_parts(model, resume[0], list(checkpoint.PARTS))
        for prefix, module in extra_modules.items():
            checkpoint.load_prefixed(module, resume[0], prefix)
    checkpoint_activations(model, stage.activation_checkpointing, f"{where}.activation_checkpointing")
    sharded = recipe.run.parallel == "fsdp" and distributed.active()
    if sharded:  # after freezing and before the optimizer, which must hold the sharded parameters
        distributed.shard(model)

    table = parameter_table(model, extra_modules)
    groups = parameter_groups(model, extra_modules, multipliers, stage.lr,
                              muon_lr=stage.muon_lr if stage.optimizer == "muon" else None)
    trainable = [p for g in groups for p in g["params"]]
    if not trainable:
        raise ConfigError(f"{where}.freeze: every parameter is frozen; nothing to train")
    optimizer = make_optimizer(stage, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(stage, s))
    engine = model if sharded else distributed.wrap(model, find_unused_parameters=stage.text_ratio > 0)
    if recipe.run.compile:
        engine = torch.compile(engine)
    exits = contextlib.ExitStack()
    hook = exits.enter_context(attached(pm, regularisers, f"{where}.regularisers"))
    set_train_mode(model)
    extra_params = [p for m in extra_modules.values() for p in m.parameters()]
    clip = distributed.clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_
    return Prepared(stage, where, model, tokenizer, engine, extra_modules, extra_params, trainable, clip, optimizer,
                    scheduler, sharded, table, hook, recipe.run.precision, exits)


def loss_terms(prep, batch):
    """The forward pass and every loss term of one batch: {"loss": next-token, regulariser name: ...}."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=prep.precision == "bf16"):
        out = prep.engine(batch["pixel_values"], batch["input_ids"], batch["targets"],
                          tiles=batch.get("tiles"), grids=batch.get("grids"))
        terms = {"loss": out["loss"]}
        for result in call_in_order(prep.hook.vlmkit_regulariser_loss, model=prep.model, batch=batch, outputs=out):
            clash = sorted(set(result) & set(terms))
            if clash:  # one term would replace the other (the next-token loss, even) without a word
                raise ConfigError(f"{prep.where}.regularisers: two loss terms are named {clash[0]!r} "
                                  f"('loss' is the next-token loss); each regulariser must name its own")
            terms.update(result)
    return terms


def train_step(prep, next_batch, check=None):
    """One optimizer step over ``stage.grad_accum`` micro-batches from ``next_batch(micro)``; returns the
    mean of each loss term (tensors). ``check(terms, total)`` sees each micro-batch's terms and their sum
    before backward."""
    stage = prep.stage
    prep.optimizer.zero_grad(set_to_none=True)
    sums = {}
    for micro in range(stage.grad_accum):  # the optimizer step sees grad_accum batches
        last = micro == stage.grad_accum - 1
        with contextlib.nullcontext() if last else distributed.no_sync(prep.engine):
            terms = loss_terms(prep, next_batch(micro))
            total = sum(terms.values())
            if check is not None:
                check(terms, total)
            (total / stage.grad_accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach() / stage.grad_accum
    distributed.average_gradients(prep.extra_params)
    if stage.grad_clip > 0:
        prep.clip(prep.trainable, stage.grad_clip)
    prep.optimizer.step()
    prep.scheduler.step()
    return sums


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_stage(ctx, index, stage, resume=None):
    """Train one stage; returns (model, tokenizer, summary dict: final loss, steps, seconds, checkpoint path).

    ``resume``: (model file, meta, train-state tensors) of an interrupted run of this stage
    (checkpoint.resume_point): weights, optimizer, scheduler, RNG and data positions continue from there.
    """
    recipe, device = ctx.recipe, ctx.device
    prep = prepare_stage(recipe, ctx.registry, ctx.pm, index, device, ctx.run_dir, resume, say=ctx.say)
    model, tokenizer = prep.model, prep.tokenizer
    ctx.say(format_parameter_table(prep.table, title=f"\nstage {index + 1}/{len(recipe.stages)} {stage.name!r}: "
                                                     f"parameters"))
    batch_size = stage.batch_size or recipe.data.batch_size

    def open_stream(dataset, text_only, seed):
        d = recipe.data
        shards = plugin_call("data.text_dataset" if text_only else "data.dataset", dataset.shards, "train")
        return stream.open_batches(shards, sample_encoding(d, model, tokenizer, text_only),
                                   batch_size, seed, d.shuffle_buffer, d.num_workers, resample=d.resample,
                                   on_bad_sample=d.on_bad_sample)
    batches = open_stream(ctx.dataset, False, recipe.run.seed + index)
    text_batches = open_stream(ctx.text_dataset, True, recipe.run.seed + index + 7919) if stage.text_ratio else None
    streams = {"image": batches, "text": text_batches}
    text_steps, first_step = 0, 0
    if resume is not None:
        first_step = resume_state.restore(prep.optimizer, prep.scheduler, streams, resume[2], resume[1]["train_state"])
        resume_state.apply_stage(prep.optimizer, prep.scheduler, stage)  # the recipe's lr etc. (run.py said which changed)
        ctx.say(f"stage {stage.name}: resumed at step {first_step} from {resume[0]}"
                + (f"; the recipe's {stage.steps} steps are done" if first_step >= stage.steps else ""))
    probe = ctx.eval_samples[:recipe.eval.probe_samples] if stage.probe_every and recipe.eval else None
    monitor_pixels = probe_images(ctx.eval_samples, model.image_size).to(device) if stage.monitor_every else None
    collapse = {}

    stage_dir = os.path.join(ctx.run_dir, stage.name)
    ctx.log({"event": "stage_start", "stage": stage.name, "trainable": sum(p.numel() for p in prep.trainable),
             "parameters": prep.table})
    start = time.perf_counter()
    # the checkpoint's losses stand until a step runs (a stage resumed at its end trains none)
    last_good, losses, step = (resume[0] if resume else None), dict(resume[1].get("losses", {})) if resume else {}, first_step - 1
    progress = tqdm(range(first_step, stage.steps), desc=f"{stage.name}", unit="step", dynamic_ncols=True,
                    mininterval=1.0, initial=first_step, total=stage.steps, disable=not ctx.main)

    def view():
        """The model with whole weights for monitor, probe and evaluation (under FSDP a gathered copy,
        built on every rank: collective)."""
        if not prep.sharded:
            return model
        return distributed.plain_copy(model, lambda: build_model(recipe.model, ctx.registry)[0].to(device))

    def save(step, summary=None):
        state = resume_state.capture(prep.optimizer, prep.scheduler, streams, step, prep.sharded, stage)
        return _save(ctx, stage_dir, step, prep, state, losses, summary)

    try:
        for step in progress:
            ctx.threads.update()
            text_this_step = []

            def next_batch(micro):
                text = text_batches is not None and _text_step(recipe.run.seed, index,
                                                               step * stage.grad_accum + micro, stage.text_ratio)
                text_this_step.append(text)
                return _to(next(text_batches if text else batches), device)

            def check(terms, total):
                if not torch.isfinite(total):
                    raise TrainingError(f"stage {stage.name} step {step}: loss is {total.item()} "
                                        f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                                        f"last good checkpoint: {last_good or 'none in this stage'}")
            log_now = step % recipe.run.log_every == 0 or step == stage.steps - 1
            lr = resume_state.used_lr(prep.optimizer) if log_now else None  # what this step's update uses
            terms = train_step(prep, next_batch, check)
            text_steps += sum(text_this_step)
            losses = {k: v.item() for k, v in terms.items()}
            rate = (step + 1 - first_step) * batch_size * stage.grad_accum / (time.perf_counter() - start)
            progress.set_postfix({**{k: f"{v:.3f}" for k, v in losses.items()}, "samples/s": f"{rate:.0f}",
                                  "threads": ctx.threads.threads}, refresh=False)
            if log_now:
                ctx.log({"event": "train", "stage": stage.name, "step": step, **lr,
                         "samples_per_s": rate, "threads": ctx.threads.threads, **losses})
            if stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0 and step + 1 < stage.steps:
                last_good = save(step + 1)
            if monitor_pixels is not None and (step == 0 or (step + 1) % stage.monitor_every == 0):
                collapse = collapse_scores(view(), monitor_pixels)  # leaves each module's mode as it was
                ctx.log({"event": "collapse", "stage": stage.name, "step": step + 1, **collapse})
                progress.write(f"{stage.name} step {step + 1}: collapse monitor (mean pairwise cosine) "
                               + ", ".join(f"{k} {v:.3f}" for k, v in collapse.items()))
            if probe and (step + 1) % stage.probe_every == 0:
                result = _probe(ctx, view(), tokenizer, probe, stage, step)
                progress.write(f"{stage.name} step {step + 1}: held-out probe exact {result['exact']:.3f} "
                               f"NED {result['ned']:.3f} ({len(probe)} samples)")
                if stage.stop_when_exact and result["exact"] == 1.0:
                    progress.write(f"{stage.name}: all {len(probe)} probe samples read exactly; stage done")
                    break
    finally:
        progress.close()
        batches.close()
        if text_batches is not None:
            text_batches.close()
        prep.close()
    seconds = time.perf_counter() - start
    for name, source in (("", batches), (" text-only", text_batches)):
        report = source.report() if source is not None else None  # what the batches this stage used skipped
        if report:
            ctx.say(format_report(report, f"stage {stage.name}{name}"))
            ctx.log({"event": "data_report", "stage": stage.name + name.replace(" ", ":"), "report": report})
    summary = {"stage": stage.name, "steps": step + 1, "seconds": round(seconds, 1),
               "samples_per_s": round((step + 1 - first_step) * batch_size * stage.grad_accum / max(seconds, 1e-9), 1),
               **({"text_steps": text_steps} if text_batches is not None else {}), **losses,
               **{f"collapse_{k}": round(v, 4) for k, v in collapse.items()}}
    summary["checkpoint"] = save(step + 1, summary=summary)
    ctx.log({"event": "stage_end", **summary})
    return view(), tokenizer, summary


def _text_step(seed, stage_index, step, ratio):
    """Whether this step trains on a text-only batch: a coin with P(ratio), the same in every process."""
    return random.Random(f"{seed}:{stage_index}:{step}:text").random() < ratio


def _probe(ctx, model, tokenizer, probe, stage, step):
    """Greedy-decode the probe samples; log and return exact-match rate and mean NED."""
    recipe = ctx.recipe
    preds = decode_shared(model, tokenizer, probe, recipe.data.prompt, ctx.device,  # each rank its share
                          max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
                          repetition=repetition.from_eval(recipe.eval, tokenizer))
    pairs = [(p.strip(), s["text"].strip()) for p, s in zip(preds, probe)]
    result = {"exact": sum(p == g for p, g in pairs) / len(pairs),
              "ned": sum(ned(p, g) or 0.0 for p, g in pairs) / len(pairs)}
    ctx.log({"event": "probe", "stage": stage.name, "step": step + 1, **result})
    return result


def _save(ctx, stage_dir, step, prep, train_state, losses, summary=None):
    """A checkpoint with the training state; ``summary`` marks the stage complete (resume skips it).

    Rank 0 writes it; every rank waits until it is there (the next stage may start from it).
    Under FSDP every rank first helps gather the whole weights onto rank 0: the same file as DDP's."""
    path = os.path.join(stage_dir, f"model_{step:06d}.safetensors")
    state = distributed.full_state(prep.model, rank0_only=True) if prep.sharded else None
    if not ctx.main:
        distributed.barrier()
        return path
    # enough to rebuild the model from the checkpoint alone (python -m core.generate)
    meta = {"stage": prep.stage.name, "recipe": ctx.recipe.source, "losses": losses,
            "model": attrs.asdict(ctx.recipe.model), "prompt": ctx.recipe.data.prompt,
            "plugins": ctx.recipe.plugins, **({"complete": True, "summary": summary} if summary else {})}
    path = checkpoint.save_checkpoint(stage_dir, step, prep.model, meta, prep.extra_modules,
                                      keep_last=prep.stage.checkpoint_keep, train_state=train_state, model_state=state)
    ctx.log({"event": "checkpoint", "stage": prep.stage.name, "step": step, "path": path})
    distributed.barrier()
    return path
