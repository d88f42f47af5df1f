"""One training stage's setup and step: ``prepare_stage`` (build, initialise, freeze, optimiser) and
``train_step``; core/loop.py runs the steps.

Each stage builds the model afresh from the recipe and takes weights only through ``init_from``,
so a stage's starting point is explicit in the recipe (DeepSeek-OCR stage 2 = fresh decoder + the
encoder of stage 1). ``prepare_stage`` and ``train_step`` are also what the benchmark times
(benchmarks/train_step.py), so it measures the step ``core.run`` takes.
"""
import contextlib
import math

import attrs
import torch

from core import adapters, distributed, resume
from core.data import SampleEncoding
from core.errors import ConfigError
from core.hooks import attach
from core.model import build_model, checkpoint_activations
from core.muon import MuonAdamW, muon_matrices
from core.stageconfig import stage_model
from core.report import parameter_table


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
    if stage.adapters:  # an adapter stage trains its adapters and what a policy opens on purpose (core/adapters.py)
        model.requires_grad_(False)
    with attach(pm, policies, f"{where}.freeze"):
        answers = pm.hook.vlmkit_freeze(model=model, stage=stage)
    for p in frozen_by_design:  # a broad "trainable" glob must not wake them (DDP fails on unused parameters)
        p.requires_grad_(False)
    multipliers = {}
    for answer in answers:
        for name, factor in answer.items():
            multipliers[name] = multipliers.get(name, 1.0) * factor
    return multipliers


def freeze_and_adapt(registry, pm, model, stage, where):
    """The stage's freeze policies, then its adapters: -> ({name: lr multiplier}, core.adapters.Adapted or None)."""
    frozen = adapters.frozen_by_design(model)
    multipliers = apply_freeze(registry, pm, model, stage, where)
    adapted = adapters.attach(registry, pm, model, stage.adapters, f"{where}.adapters", frozen, multipliers)
    return multipliers, adapted


def parameter_groups(model, extra_modules, multipliers, lr, muon_lr=None, muon_parts=("decoder",)):
    """Optimizer groups over exactly the trainable parameters, one per (lr multiplier, kind).

    With ``muon_lr`` the matrices of the ``muon_parts`` (core.muon.muon_matrices) form Muon groups at
    that lr; the rest is AdamW.
    """
    muon = set()
    if muon_lr is not None:
        muon = {f"{part}.{n}" for part in muon_parts for n in muon_matrices(getattr(model, part))}
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
    """A stage ready to train: the model and what trains it. Its regularisers answer their hook from
    ``prepare_stage`` until ``close()``."""
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
    pm: object  # the plugin manager: loss_terms calls its vlmkit_regulariser_loss
    precision: str
    attached: object  # the regularisers' core.hooks.Attachment
    adapted: object = None  # core.adapters.Adapted: the stage's adapters, or None

    def close(self):
        self.attached.close()


def prepare_stage(recipe, registry, pm, index, device, run_dir=None, point=None, say=distributed.print0,
                  init_from=True):
    """Build stage ``index``'s model, load the weights it starts from, and prepare what trains it (prepare_model).
    ``point``: a checkpoint.ResumePoint to continue from. ``init_from=False`` skips the stage's init_from weights
    (a benchmark times the step, not the weights)."""
    resume.seed_all(recipe.run.seed + 1000 * index)  # python's and numpy's RNGs too: plugins draw from them
    model, tokenizer = build_model(stage_model(recipe, index), registry)
    model.to(device)
    base = adapters.load_start(recipe, registry, pm, index, model, run_dir, point, say, init_from)
    return prepare_model(recipe, registry, pm, index, model, tokenizer, device, point, base)


def prepare_model(recipe, registry, pm, index, model, tokenizer, device, point=None, base=None):
    """Everything that trains stage ``index`` on a built ``model``, in the order that matters: freeze,
    adapters, regularisers, resumed weights (``point``), activation checkpointing, FSDP, optimizer, DDP."""
    stage, where = recipe.stages[index], f"stages.{index}"
    multipliers, adapted = freeze_and_adapt(registry, pm, model, stage, where)
    if adapted is not None:
        adapted.base = base
    regularisers = registry.build_all("regulariser", stage.regularisers, f"{where}.regularisers",
                                      context={"model": model, "tokenizer": tokenizer})
    extra_modules = {f"regulariser.{c.name}": r.to(device) for c, r in zip(stage.regularisers, regularisers)
                     if isinstance(r, torch.nn.Module)}
    if point is not None:  # the weights before sharding: FSDP then cuts what was loaded
        adapters.load_resumed(model, point, adapted, extra_modules)
    checkpoint_activations(model, stage.activation_checkpointing, f"{where}.activation_checkpointing")
    sharded = recipe.run.parallel == "fsdp" and distributed.active()
    if sharded:  # after freezing and before the optimizer, which must hold the sharded parameters
        distributed.shard(model)

    table = parameter_table(model, extra_modules)
    groups = parameter_groups(model, extra_modules, multipliers, stage.lr,
                              muon_lr=stage.muon_lr if stage.optimizer == "muon" else None, muon_parts=stage.muon_parts)
    trainable = [p for g in groups for p in g["params"]]
    if not trainable:
        raise ConfigError(f"{where}.freeze: every parameter is frozen; nothing to train")
    optimizer = make_optimizer(stage, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(stage, s))
    engine = model if sharded else distributed.wrap(model, find_unused_parameters=stage.text_ratio > 0)
    if recipe.run.compile:
        engine = torch.compile(engine)
    set_train_mode(model)
    extra_params = [p for m in extra_modules.values() for p in m.parameters()]
    clip = distributed.clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_
    attached = attach(pm, regularisers, f"{where}.regularisers")  # until Prepared.close()
    return Prepared(stage, where, model, tokenizer, engine, extra_modules, extra_params, trainable, clip, optimizer,
                    scheduler, sharded, table, pm, recipe.run.precision, attached, adapted)


def loss_terms(prep, batch):
    """The forward pass and every loss term of one batch: {"loss": next-token, regulariser name: ...}."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=prep.precision == "bf16"):
        out = prep.engine(batch["pixel_values"], batch["input_ids"], batch["targets"],
                          tiles=batch.get("tiles"), grids=batch.get("grids"))
        terms = {"loss": out["loss"]}
        for result in prep.pm.hook.vlmkit_regulariser_loss(model=prep.model, batch=batch, outputs=out):
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
    sums, images = {}, True
    for micro in range(stage.grad_accum):  # the optimizer step sees grad_accum batches
        last = micro == stage.grad_accum - 1
        with contextlib.nullcontext() if last else distributed.no_sync(prep.engine):
            batch = next_batch(micro)
            images = images and batch["pixel_values"] is not None  # a text-only batch leaves the vision tower idle
            terms = loss_terms(prep, batch)
            total = sum(terms.values())
            if check is not None:
                check(terms, total)
            (total / stage.grad_accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach() / stage.grad_accum
    distributed.average_gradients(prep.extra_params)
    if images:
        adapters.check_used(prep.adapted, prep.model)
    if stage.grad_clip > 0:
        prep.clip(prep.trainable, stage.grad_clip)
    prep.optimizer.step()
    prep.scheduler.step()
    return sums
