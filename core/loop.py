"""One stage's training loop (``run_stage``): the data streams, the steps, logging, checkpoints with the
training state, the collapse monitor and the held-out probe; core/train.py builds the stage and takes each step.
"""
import os
import random
import time

import attrs
import torch
from tqdm import tqdm

from core import adapters, checkpoint, distributed, repetition, resume, stream
from core.badsamples import format_report
from core.data import to_device
from core.evaluate import decode_shared
from core.monitor import collapse_scores, probe_images
from core.stageconfig import stage_model
from core.errors import plugin_call
from core.report import format_parameter_table
from core.textdist import ned
from core.train import prepare_stage, sample_encoding, train_step


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what is intact."""


class StageLoop:
    """One stage's training loop and what it carries from step to step: the data streams, the step, the
    latest losses, the last checkpoint written, the text-only steps taken and the collapse scores."""

    def __init__(self, ctx, index, prep, point=None):
        recipe, stage = ctx.recipe, prep.stage
        self.ctx, self.index, self.prep, self.stage = ctx, index, prep, stage
        self.batch_size = stage.batch_size or recipe.data.batch_size
        self.batches = self._open(*ctx.stage_dataset(index), False, recipe.run.seed + index)
        self.text_batches = None
        if stage.text_ratio:
            self.text_batches = self._open("data.text_dataset", ctx.text_dataset, True, recipe.run.seed + index + 7919)
        self.streams = {"image": self.batches, "text": self.text_batches}
        self.first_step, self.last_good, self.losses = 0, None, {}
        if point is not None:
            self._resume(point)
        self.step, self.text_steps, self.text_this_step, self.collapse = self.first_step - 1, 0, [], {}
        self.stage_dir = os.path.join(ctx.run_dir, stage.name)
        self.start = None  # set by begin()

    def begin(self):
        """Log the stage's start (its parameter table) and start its clock."""
        prep = self.prep
        self.ctx.log({"event": "stage_start", "stage": self.stage.name,
                      "trainable": sum(p.numel() for p in prep.trainable), "parameters": prep.table})
        self.start = time.perf_counter()

    def _open(self, key, dataset, text_only, seed):
        d, prep = self.ctx.recipe.data, self.prep
        shards = plugin_call(key, dataset.shards, "train")
        return stream.open_batches(shards, sample_encoding(d, prep.model, prep.tokenizer, text_only),
                                   self.batch_size, seed, d.shuffle_buffer, d.num_workers, resample=d.resample,
                                   on_bad_sample=d.on_bad_sample)

    def _resume(self, point):
        """Optimizer, scheduler, RNGs and data positions as ``point`` saved them; the recipe's lr etc. on top
        (core.run said which changed). The checkpoint's losses stand until a step runs."""
        prep, stage = self.prep, self.stage
        self.first_step = resume.restore(prep.optimizer, prep.scheduler, self.streams, point.tensors,
                                         point.train_state)
        resume.apply_stage(prep.optimizer, prep.scheduler, stage)
        self.ctx.say(f"stage {stage.name}: resumed at step {self.first_step} from {point.model_file}"
                     + (f"; the recipe's {stage.steps} steps are done" if self.first_step >= stage.steps else ""))
        self.last_good, self.losses = point.model_file, dict(point.meta.get("losses", {}))

    def next_batch(self, micro):
        """Micro-batch ``micro`` of this step, on the device: a text-only one when the stage's coin says so."""
        text = self.text_batches is not None and _text_step(self.ctx.recipe.run.seed, self.index,
                                                            self.step * self.stage.grad_accum + micro,
                                                            self.stage.text_ratio)
        self.text_this_step.append(text)
        return to_device(next(self.text_batches if text else self.batches), self.ctx.device)

    def check(self, terms, total):
        """Stop at a non-finite loss, naming the step, the terms and the last good checkpoint."""
        if not torch.isfinite(total):
            raise TrainingError(f"stage {self.stage.name} step {self.step}: loss is {total.item()} "
                                f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                                f"last good checkpoint: {self.last_good or 'none in this stage'}")

    def rate(self):
        """Samples per second trained so far in this process."""
        steps = self.step + 1 - self.first_step
        return steps * self.batch_size * self.stage.grad_accum / max(time.perf_counter() - self.start, 1e-9)

    def train(self, step, progress):
        """One optimizer step, its losses on the progress bar and, every run.log_every steps, in the log."""
        ctx, stage = self.ctx, self.stage
        self.step, self.text_this_step = step, []
        ctx.threads.update()
        log_now = step % ctx.recipe.run.log_every == 0 or step == stage.steps - 1
        lr = resume.used_lr(self.prep.optimizer) if log_now else None  # what this step's update uses
        terms = train_step(self.prep, self.next_batch, self.check)
        self.text_steps += sum(self.text_this_step)
        self.losses = {k: v.item() for k, v in terms.items()}
        rate = self.rate()
        progress.set_postfix({**{k: f"{v:.3f}" for k, v in self.losses.items()}, "samples/s": f"{rate:.0f}",
                              "threads": ctx.threads.threads}, refresh=False)
        if log_now:
            ctx.log({"event": "train", "stage": stage.name, "step": step, **lr,
                     "samples_per_s": rate, "threads": ctx.threads.threads, **self.losses})

    def after_step(self, step, progress, monitor_pixels, probe):
        """Checkpoint, collapse monitor and probe when their intervals say; True when the stage is done early."""
        stage = self.stage
        if stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0 and step + 1 < stage.steps:
            self.last_good = self.save(step + 1)
        if monitor_pixels is not None and (step == 0 or (step + 1) % stage.monitor_every == 0):
            self.collapse = collapse_scores(self.view(), monitor_pixels)  # leaves each module's mode as it was
            self.ctx.log({"event": "collapse", "stage": stage.name, "step": step + 1, **self.collapse})
            progress.write(f"{stage.name} step {step + 1}: collapse monitor (mean pairwise cosine) "
                           + ", ".join(f"{k} {v:.3f}" for k, v in self.collapse.items()))
        if probe and (step + 1) % stage.probe_every == 0:
            result = _probe(self.ctx, self.view(), self.prep.tokenizer, probe, stage, step)
            progress.write(f"{stage.name} step {step + 1}: held-out probe exact {result['exact']:.3f} "
                           f"NED {result['ned']:.3f} ({len(probe)} samples)")
            if stage.stop_when_exact and result["exact"] == 1.0:
                progress.write(f"{stage.name}: all {len(probe)} probe samples read exactly; stage done")
                return True
        return False

    def view(self):
        """The model with whole weights for monitor, probe and evaluation (under FSDP a gathered copy,
        built on every rank: collective)."""
        prep, ctx = self.prep, self.ctx
        if not prep.sharded:
            return prep.model
        config = stage_model(ctx.recipe, self.index)
        return distributed.plain_copy(prep.model, lambda: adapters.build_like(config, ctx.registry, ctx.pm,
                                                                              prep.adapted).to(ctx.device))

    def save(self, step, summary=None):
        """A checkpoint at ``step`` with the training state; ``summary`` marks the stage complete (a resume skips
        it). Returns its model file.

        Rank 0 writes it; every rank waits until it is there (the next stage may start from it).
        Under FSDP every rank first helps gather the whole weights onto rank 0: the same file as DDP's."""
        ctx, prep, stage = self.ctx, self.prep, self.stage
        train_state = resume.capture(prep.optimizer, prep.scheduler, self.streams, step, prep.sharded, stage)
        path = os.path.join(self.stage_dir, f"model_{step:06d}.safetensors")
        state = distributed.full_state(prep.model, rank0_only=True) if prep.sharded else None
        if not ctx.main:
            distributed.barrier()
            return path
        # enough to rebuild the model from the checkpoint alone (python -m core.generate)
        meta = {"stage": stage.name, "recipe": ctx.recipe.source, "losses": self.losses,
                "model": attrs.asdict(stage_model(ctx.recipe, self.index)), "prompt": ctx.recipe.data.prompt,
                "plugins": ctx.recipe.plugins, **({"complete": True, "summary": summary} if summary else {}),
                # the lengths it was trained to write: python -m core.generate's default --max-new-tokens
                "max_len": ctx.recipe.data.max_len,
                "max_new_tokens": ctx.recipe.eval and ctx.recipe.eval.max_new_tokens}
        heads = prep.extra_modules
        if prep.adapted is not None:  # the adapter and what else trained (heads: in the train file), and its base
            whole = prep.model.state_dict() if state is None else state
            state, train_state = adapters.checkpoint_parts(prep.adapted, whole, heads, train_state)
            heads = None
            meta.update(adapters.checkpoint_meta(prep.adapted, self.stage_dir))
        path = checkpoint.save_checkpoint(self.stage_dir, step, prep.model, meta, heads,
                                          keep_last=stage.checkpoint_keep, train_state=train_state,
                                          model_state=state, encoder_file=prep.adapted is None)
        ctx.log({"event": "checkpoint", "stage": stage.name, "step": step, "path": path})
        distributed.barrier()
        return path

    def close(self):
        self.batches.close()
        if self.text_batches is not None:
            self.text_batches.close()
        self.prep.close()

    def finish(self):
        """The stage's data reports, summary and final checkpoint; -> the summary."""
        ctx, stage, step = self.ctx, self.stage, self.step
        seconds = time.perf_counter() - self.start
        for name, source in (("", self.batches), (" text-only", self.text_batches)):
            report = source.report() if source is not None else None  # what the batches this stage used skipped
            if report:
                ctx.say(format_report(report, f"stage {stage.name}{name}"))
                ctx.log({"event": "data_report", "stage": stage.name + name.replace(" ", ":"), "report": report})
        summary = {"stage": stage.name, "steps": step + 1, "seconds": round(seconds, 1),
                   "samples_per_s": round((step + 1 - self.first_step) * self.batch_size * stage.grad_accum
                                          / max(seconds, 1e-9), 1),
                   **({"text_steps": self.text_steps} if self.text_batches is not None else {}), **self.losses,
                   **{f"collapse_{k}": round(v, 4) for k, v in self.collapse.items()}}
        summary["checkpoint"] = self.save(step + 1, summary=summary)
        ctx.log({"event": "stage_end", **summary})
        return summary


def run_stage(ctx, index, stage, point=None):
    """Train one stage; returns (model, tokenizer, summary dict: final loss, steps, seconds, checkpoint path).

    ``point`` (checkpoint.ResumePoint): an interrupted run of this stage, whose weights, optimizer,
    scheduler, RNG and data positions continue from there.
    """
    recipe = ctx.recipe
    prep = prepare_stage(recipe, ctx.registry, ctx.pm, index, ctx.device, ctx.run_dir, point, say=ctx.say)
    ctx.say(format_parameter_table(prep.table, title=f"\nstage {index + 1}/{len(recipe.stages)} {stage.name!r}: "
                                                     f"parameters"))
    loop = StageLoop(ctx, index, prep, point)
    probe = ctx.eval_samples[:recipe.eval.probe_samples] if stage.probe_every and recipe.eval else None
    monitor_pixels = None
    if stage.monitor_every:
        monitor_pixels = probe_images(ctx.eval_samples, prep.model.image_size).to(ctx.device)
    loop.begin()
    progress = tqdm(range(loop.first_step, stage.steps), desc=f"{stage.name}", unit="step", dynamic_ncols=True,
                    mininterval=1.0, initial=loop.first_step, total=stage.steps, disable=not ctx.main)
    try:
        for step in progress:
            loop.train(step, progress)
            if loop.after_step(step, progress, monitor_pixels, probe):
                break
    finally:
        progress.close()
        loop.close()
    summary = loop.finish()
    return loop.view(), prep.tokenizer, summary


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
              "ned": sum(ned(p, g, both_empty=0.0) for p, g in pairs) / len(pairs)}  # two empty strings agree
    ctx.log({"event": "probe", "stage": stage.name, "step": step + 1, **result})
    return result
