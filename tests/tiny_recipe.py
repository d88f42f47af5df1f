"""A two-stage recipe small enough to train in-process in about a second, and a kill of it inside a checkpoint
write, in-process too.

The model is tests/helpers.TINY, written into the YAML; the synthetic data are rendered once per
``cache`` folder, so tests that share the session's ``tiny_data`` folder (conftest.py) pay for it once.
"""
import json
import os

from core.recipe import COMPONENTS
from core.run import main
from tests.helpers import TINY


def _flow(value):
    """A value as a YAML flow scalar, list or mapping (the plain names and numbers of a model config)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return value if isinstance(value, str) else json.dumps(value)


# the model section, one line per component, from the one definition of the tiny model
TINY_MODEL = "\n".join(f"  {part}: {_flow({'name': getattr(TINY, part).name, **getattr(TINY, part).args})}"
                       for part in COMPONENTS)

TINY_RECIPE = """\
run: {{dir: {run_dir}, seed: 0, log_every: 1, threads: 1}}
model:
{model}
data:
  dataset: {{name: synthetic_ocr, cache_dir: {cache}, image_size: 32, layout: grid, wrap: chars, words: [2, 3],
            word_length: [2, 5], train_samples: 64, eval_samples: 4, vocabulary_size: 2000}}
  batch_size: 4
  max_len: 64
stages:
  - {{name: a, steps: 2, lr: 3.0e-3, checkpoint_every: 1}}
  - {{name: b, steps: 1, lr: 3.0e-3, init_from: {{path: "stage:a", parts: [encoder]}}}}
eval: null
"""


def write_recipe(folder, cache, run_dir="run", extra=""):
    """recipe.yaml in ``folder`` (run.dir relative to it unless absolute); ``extra`` is appended YAML."""
    path = folder / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(run_dir=folder / run_dir, cache=cache, model=TINY_MODEL) + extra)
    return path


def run(recipe, *overrides):
    """python -m core.run in-process; returns the exit code."""
    return main([str(recipe), *overrides])


def log_events(run_dir, event):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


B_LINE = '  - {name: b, steps: 1, lr: 3.0e-3, init_from: {path: "stage:a", parts: [encoder]}}\n'
LORA = '{name: lora, r: 4, alpha: 8, targets: ["decoder.*.attn.*", "encoder.clip.*"]}'


def lora_recipe(folder, cache, steps=3, every=1, adapter=LORA, after=""):
    """The tiny recipe with stage b a LoRA stage on all of stage a (``after``: more stage lines)."""
    text = TINY_RECIPE.format(run_dir=folder / "run", cache=cache, model=TINY_MODEL)
    lora = (f'  - {{name: b, steps: {steps}, lr: 1.0e-2, checkpoint_every: {every}, init_from: {{path: "stage:a"}},'
            f' adapters: [{adapter}]}}\n')
    path = folder / "recipe.yaml"
    path.write_text(text.replace(B_LINE, lora + after))
    return path


def pointer(folder):
    """The step a stage folder's latest.json points at."""
    return json.loads((folder / "latest.json").read_text())["step"]


class Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so nothing in vlmkit catches it."""


class WritePoints:
    """Wraps the file operations of a checkpoint write (os.fsync, os.replace, os.remove inside the run folder)
    and raises Killed before the ``kill_at``-th one, or the first whose file name starts with ``kill_before``; at
    an fsync the file is first cut to half its size, as a kill in the middle of writing it would leave it.
    With neither it only counts."""

    def __init__(self, monkeypatch, run_dir, kill_at=None, kill_before=None):
        self.run_dir, self.kill_at, self.kill_before, self.seen = str(run_dir), kill_at, kill_before, []
        for name in ("fsync", "replace", "remove"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def op(target, *args, **kwargs):
            path = os.readlink(f"/proc/self/fd/{target}") if name == "fsync" else os.fspath(target)
            if path.startswith(self.run_dir + os.sep):
                self.seen.append((name, os.path.basename(path)))
                if len(self.seen) - 1 == self.kill_at or (
                        self.kill_before and os.path.basename(path).startswith(self.kill_before)):
                    if name == "fsync":
                        os.truncate(path, os.path.getsize(path) // 2)
                    raise Killed(f"{name} {path}")
            return real(target, *args, **kwargs)
        return op
