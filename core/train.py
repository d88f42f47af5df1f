"""One training stage: build, initialise, freeze, optimise, checkpoint.

Each stage builds the model afresh from the recipe and takes weights only
through ``init_from``, so a stage's starting point is explicit in the recipe
(DeepSeek-OCR stage 2 = fresh decoder + the encoder of stage 1).
"""
import contextlib
import math
import os
import random
import time

import attrs
import torch
from tqdm import tqdm

from core import checkpoint, data, distributed, fsdp, stream
from core import resume as resume_state
from core.errors import ConfigError
from core.evaluate import decode_samples
from core.model import build_model, checkpoint_activations, format_parameter_table, parameter_table
from core.monitor import collapse_scores, probe_images
from core.muon import MuonAdamW
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
    for policy in policies:
        pm.register(policy)
    try:
        answers = pm.hook.vlmkit_freeze(model=model, stage=stage)
    finally:
        for policy in policies:
            pm.unregister(policy)
    for p in frozen_by_design:  # a broad "trainable" glob must not wake them (DDP fails on unused parameters)
        p.requires_grad_(False)
    multipliers = {}
    for answer in answers:
        for name, factor in (answer or {}).items():
            multipliers[name] = multipliers.get(name, 1.0) * factor
    return multipliers


MUON_MATRICES = "decoder.transformer.h."  # nanochat's Muon takes the block matrices (architecture.md §1.7)


def parameter_groups(model, extra_modules, multipliers, lr, muon_lr=None):
    """Optimizer groups over exactly the trainable parameters, one per (lr multiplier, kind).

    With ``muon_lr`` the decoder's 2-D block matrices form Muon groups at that lr; the rest is AdamW.
    """
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "muon" if muon_lr is not None and name.startswith(MUON_MATRICES) and p.ndim == 2 else "adamw"
            # FSDP's DTensors apart from plain tensors: one fused AdamW kernel cannot take both
            groups.setdefault((multipliers.get(name, 1.0), kind, fsdp.is_sharded(p)), []).append(p)
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


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_stage(ctx, index, stage, resume=None):
    """Train one stage; returns (model, tokenizer, summary dict: final loss, steps, seconds, checkpoint path).

    ``resume``: (model file, meta, train-state tensors) of an interrupted run of this stage
    (checkpoint.resume_point): weights, optimizer, scheduler, RNG and data positions continue from there.
    """
    recipe, pm, device = ctx.recipe, ctx.pm, ctx.device
    torch.manual_seed(recipe.run.seed + 1000 * index)
    model, tokenizer = build_model(recipe.model, ctx.registry)
    model.to(device)
    where = f"stages.{index}"
    if stage.init_from is not None and resume is None:
        path = checkpoint.resolve(stage.init_from.path, ctx.run_dir, stage.init_from.parts)
        keys = checkpoint.load_parts(model, path, stage.init_from.parts)
        ctx.say(f"stage {stage.name}: {'+'.join(stage.init_from.parts)} ({len(keys)} tensors) from {path}")

    multipliers = apply_freeze(ctx.registry, pm, model, stage, where)
    regularisers = ctx.registry.build_all("regulariser", stage.regularisers, f"{where}.regularisers",
                                          context={"model": model, "tokenizer": tokenizer})
    extra_modules = {f"regulariser.{c.name}": r for c, r in zip(stage.regularisers, regularisers)
                     if isinstance(r, torch.nn.Module)}
    for module in extra_modules.values():
        module.to(device)
    extra_params = [p for m in extra_modules.values() for p in m.parameters()]  # replicated even under FSDP
    if resume is not None:  # the weights before sharding: FSDP then cuts what was loaded
        checkpoint.load_parts(model, resume[0], list(checkpoint.PARTS))
        for prefix, module in extra_modules.items():
            checkpoint.load_prefixed(module, resume[0], prefix)
    checkpoint_activations(model, stage.activation_checkpointing, f"{where}.activation_checkpointing")
    sharded = recipe.run.parallel == "fsdp" and distributed.active()
    if sharded:  # after freezing and before the optimizer, which must hold the sharded parameters
        fsdp.shard(model)

    table = parameter_table(model) + [(name, sum(p.numel() for p in m.parameters()), 0)
                                      for name, m in extra_modules.items()]
    ctx.say(format_parameter_table(table, title=f"\nstage {index + 1}/{len(recipe.stages)} {stage.name!r}: parameters"))
    groups = parameter_groups(model, extra_modules, multipliers, stage.lr,
                              muon_lr=stage.muon_lr if stage.optimizer == "muon" else None)
    trainable = [p for g in groups for p in g["params"]]
    expected = {id(p) for p in model.parameters() if p.requires_grad} | {id(p) for p in extra_params}
    assert {id(p) for p in trainable} == expected and len(trainable) == len(expected), \
        "the optimizer must hold exactly the trainable parameters"
    if not trainable:
        raise ConfigError(f"{where}.freeze: every parameter is frozen; nothing to train")
    optimizer = make_optimizer(stage, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(stage, s))

    batch_size = stage.batch_size or recipe.data.batch_size

    def open_stream(dataset, text_only, seed):
        d = recipe.data
        return stream.train_batches(
            dataset.shards("train"), tokenizer, image_size=model.image_size, prompt=d.prompt,
            num_image_tokens=model.num_image_tokens(), max_len=d.max_len, batch_size=batch_size, seed=seed,
            shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers, resample=d.resample,
            on_bad_sample=d.on_bad_sample, on_long_target=d.on_long_target, max_image_pixels=d.max_image_pixels,
            text_only=text_only, tiling=model.tiling)
    batches = open_stream(ctx.dataset, False, recipe.run.seed + index)
    text_batches = open_stream(ctx.text_dataset, True, recipe.run.seed + index + 7919) if stage.text_ratio else None
    streams = {"image": batches, "text": text_batches}
    text_steps, first_step = 0, 0
    if resume is not None:
        path, meta, tensors = resume
        first_step = resume_state.restore(optimizer, scheduler, streams, tensors, meta["train_state"])
        ctx.say(f"stage {stage.name}: resumed at step {first_step} from {path}")
    probe = ctx.eval_samples[:recipe.eval.probe_samples] if stage.probe_every and recipe.eval else None
    monitor_pixels = probe_images(ctx.eval_samples, model.image_size).to(device) if stage.monitor_every else None
    collapse = {}

    stage_dir = os.path.join(ctx.run_dir, stage.name)
    ctx.log({"event": "stage_start", "stage": stage.name, "trainable": sum(p.numel() for p in trainable),
             "parameters": table})
    for r in regularisers:
        pm.register(r)
    set_train_mode(model)
    start = time.perf_counter()
    last_good, losses, step = (resume[0] if resume else None), {}, first_step - 1
    progress = tqdm(range(first_step, stage.steps), desc=f"{stage.name}", unit="step", dynamic_ncols=True,
                    mininterval=1.0, initial=first_step, total=stage.steps, disable=not ctx.main)
    engine = model if sharded else distributed.wrap(model, find_unused_parameters=stage.text_ratio > 0)
    if recipe.run.compile:
        engine = torch.compile(engine)
    clip_grad_norm_ = fsdp.clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_

    def view():
        """The model with whole weights for monitor, probe and evaluation (under FSDP a gathered copy,
        built on every rank: collective)."""
        return fsdp.plain_copy(model, lambda: build_model(recipe.model, ctx.registry)[0].to(device)) if sharded else model
    try:
        for step in progress:
            ctx.threads.update()
            optimizer.zero_grad(set_to_none=True)
            sums = {}
            for micro in range(stage.grad_accum):  # the optimizer step sees grad_accum batches
                text_step = text_batches is not None and _text_step(recipe.run.seed, index,
                                                                    step * stage.grad_accum + micro, stage.text_ratio)
                batch = _to(next(text_batches if text_step else batches), device)
                text_steps += text_step
                last = micro == stage.grad_accum - 1
                with (contextlib.nullcontext() if last else distributed.no_sync(engine)), \
                        torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.run.precision == "bf16"):
                    out = engine(batch["pixel_values"], batch["input_ids"], batch["targets"],
                                 tiles=batch.get("tiles"), grids=batch.get("grids"))
                    terms = {"loss": out["loss"]}
                    for result in pm.hook.vlmkit_regulariser_loss(model=model, batch=batch, outputs=out):
                        terms.update(result)
                    total = sum(terms.values())
                    if not torch.isfinite(total):
                        raise TrainingError(f"stage {stage.name} step {step}: loss is {total.item()} "
                                            f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                                            f"last good checkpoint: {last_good or 'none in this stage'}")
                    (total / stage.grad_accum).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach() / stage.grad_accum
            terms = sums
            distributed.average_gradients(extra_params)
            if stage.grad_clip > 0:
                clip_grad_norm_(trainable, stage.grad_clip)
            optimizer.step()
            scheduler.step()
            losses = {k: v.item() for k, v in terms.items()}
            rate = (step + 1 - first_step) * batch_size * stage.grad_accum / (time.perf_counter() - start)
            progress.set_postfix({**{k: f"{v:.3f}" for k, v in losses.items()}, "samples/s": f"{rate:.0f}",
                                  "threads": ctx.threads.threads}, refresh=False)
            if step % recipe.run.log_every == 0 or step == stage.steps - 1:
                ctx.log({"event": "train", "stage": stage.name, "step": step, "lr": stage.lr * lr_factor(stage, step),
                         "samples_per_s": rate, "threads": ctx.threads.threads, **losses})
            if stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0 and step + 1 < stage.steps:
                last_good = _save(ctx, stage_dir, step + 1, model, sharded, extra_modules, stage, losses,
                                  resume_state.capture(optimizer, scheduler, streams, step + 1, sharded))
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
        for r in regularisers:
            pm.unregister(r)
    seconds = time.perf_counter() - start
    for name, source in (("", batches), (" text-only", text_batches)):
        report = source.report() if source is not None else None  # what the batches this stage used skipped
        if report:
            ctx.say(data.format_report(report, f"stage {stage.name}{name}"))
            ctx.log({"event": "data_report", "stage": stage.name + name.replace(" ", ":"), "report": report})
    summary = {"stage": stage.name, "steps": step + 1, "seconds": round(seconds, 1),
               "samples_per_s": round((step + 1 - first_step) * batch_size * stage.grad_accum / max(seconds, 1e-9), 1),
               **({"text_steps": text_steps} if text_batches is not None else {}), **losses,
               **{f"collapse_{k}": round(v, 4) for k, v in collapse.items()}}
    summary["checkpoint"] = _save(ctx, stage_dir, step + 1, model, sharded, extra_modules, stage, losses,
                                  resume_state.capture(optimizer, scheduler, streams, step + 1, sharded), summary=summary)
    ctx.log({"event": "stage_end", **summary})
    return view(), tokenizer, summary


def _text_step(seed, stage_index, step, ratio):
    """Whether this step trains on a text-only batch: a coin with P(ratio), the same in every process."""
    return random.Random(f"{seed}:{stage_index}:{step}:text").random() < ratio


def _probe(ctx, model, tokenizer, probe, stage, step):
    """Greedy-decode the probe samples; log and return exact-match rate and mean NED."""
    recipe = ctx.recipe
    preds = decode_samples(model, tokenizer, probe, recipe.data.prompt, ctx.device,
                           max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size)
    pairs = [(p.strip(), s["text"].strip()) for p, s in zip(preds, probe)]
    result = {"exact": sum(p == g for p, g in pairs) / len(pairs),
              "ned": sum(ned(p, g) or 0.0 for p, g in pairs) / len(pairs)}
    ctx.log({"event": "probe", "stage": stage.name, "step": step + 1, **result})
    return result


def _save(ctx, stage_dir, step, model, sharded, extra_modules, stage, losses, train_state, summary=None):
    """A checkpoint with the training state; ``summary`` marks the stage complete (resume skips it).

    Rank 0 writes it; every rank waits until it is there (the next stage may start from it).
    Under FSDP every rank first helps gather the whole weights onto rank 0: the same file as DDP's."""
    path = os.path.join(stage_dir, f"model_{step:06d}.safetensors")
    state = fsdp.full_state(model, rank0_only=True) if sharded else None
    if not ctx.main:
        distributed.barrier()
        return path
    # enough to rebuild the model from the checkpoint alone (python -m core.generate)
    meta = {"stage": stage.name, "recipe": ctx.recipe.source, "losses": losses,
            "model": attrs.asdict(ctx.recipe.model), "prompt": ctx.recipe.data.prompt,
            "plugins": ctx.recipe.plugins, **({"complete": True, "summary": summary} if summary else {})}
    path = checkpoint.save_checkpoint(stage_dir, step, model, meta, extra_modules, keep_last=stage.checkpoint_keep,
                                      train_state=train_state, model_state=state)
    ctx.log({"event": "checkpoint", "stage": stage.name, "step": step, "path": path})
    distributed.barrier()
    return path
