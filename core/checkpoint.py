"""Checkpoints: safetensors for tensors, JSON for metadata, no pickle.

A stage folder holds ``model_XXXXXX.safetensors`` + ``meta_XXXXXX.json`` (the
step in six digits, as nanochat names its files) and, for handing the vision
side to the next stage, ``encoder_XXXXXX.safetensors``. Files are written to a
temporary name and renamed, so a reader never sees half a file, and get the permissions the
user's umask gives a new file (a run folder shared with other users or nodes stays readable).

``latest.json`` is written last and is the one commit point: a step exists when the pointer
names it. A process killed in the middle of a write leaves ``*.tmpPID`` files and step files
newer than the pointer (or, at a stage's first write, no pointer at all); resume trusts only the
pointer (``resume_point``) and removes those leftovers first (``discard_incomplete``).
"""
import contextlib
import json
import os
import re
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import ConfigError
from core.weights import compare_keys, describe_problems

LATEST = "latest.json"  # {"step": N, "model": "model_XXXXXX.safetensors"}, updated after every checkpoint

# A "part" of the model, as init_from names it, and the state_dict keys it owns.
PARTS = {
    "encoder": ("encoder.",),
    "projector": ("projector.",),
    "decoder": ("decoder.",),
    "vision_layout": ("image_newline", "view_separator"),
}


TMP = re.compile(r"\.tmp\d+$")  # _atomic's temporary names: PATH.tmpPID
STEP_FILE = re.compile(r"^(model|encoder|train|meta)_(\d{6})\.(safetensors|json)$")


def _umask():
    """The process's umask, read without changing it where Linux says it (/proc), else set back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    # safetensors (and tempfile-style writers) create 0600 files; a plain open() would give 0666 & ~umask
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(state_dict):
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_checkpoint(stage_dir, step, model, meta, extra_modules=None, keep_last=None, train_state=None,
                    model_state=None, encoder_file=True):
    """Write the full model, the encoder alone and meta json, then the ``latest`` pointer; return the model path.

    ``model_state``: the model's state dict when ``model.state_dict()`` would not give whole tensors
    (FSDP's shards, gathered by core/distributed.py), or the part of it to write (an adapter stage's,
    core/adapters.py, which writes no ``encoder_file``: readers take the model file instead).
    The pointer is written last, so a reader that follows it never finds a step whose
    files are incomplete; ``keep_last`` then deletes all but the newest N steps.
    """
    os.makedirs(stage_dir, exist_ok=True)
    state = _tensors(model.state_dict() if model_state is None else model_state)
    for prefix, module in (extra_modules or {}).items():  # e.g. a regulariser's head
        state.update({f"{prefix}.{k}": v for k, v in _tensors(module.state_dict()).items()})
    model_path = os.path.join(stage_dir, f"model_{step:06d}.safetensors")
    _atomic(model_path, lambda p: save_file(state, p))
    if encoder_file:
        encoder = {k: v for k, v in state.items() if k.startswith(PARTS["encoder"])}
        _atomic(os.path.join(stage_dir, f"encoder_{step:06d}.safetensors"), lambda p: save_file(encoder, p))

    if train_state is not None:  # (tensors, json-able state) from core.resume.capture
        tensors, state = train_state
        _atomic(os.path.join(stage_dir, f"train_{step:06d}.safetensors"), lambda p: save_file(_tensors(tensors), p))
        meta = {**meta, "train_state": state}

    def write_meta(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump({"step": step, **meta}, f, indent=2)
    _atomic(os.path.join(stage_dir, f"meta_{step:06d}.json"), write_meta)

    def write_pointer(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump({"step": step, "model": os.path.basename(model_path)}, f)
    _atomic(os.path.join(stage_dir, LATEST), write_pointer)
    if keep_last:
        for old_step in [s for s in _all_steps(stage_dir) if s < step][:-keep_last + 1 or None]:
            _remove_step(stage_dir, old_step)
    return model_path


def _all_steps(stage_dir):
    """Every step that has any file in the stage folder (complete or not), ascending."""
    names = os.listdir(stage_dir) if os.path.isdir(stage_dir) else []
    return sorted({int(m.group(2)) for m in map(STEP_FILE.match, names) if m})


def _remove_step(stage_dir, step):
    # the meta json first: a step without it is incomplete to every reader (latest's fallback)
    _remove(os.path.join(stage_dir, f"meta_{step:06d}.json"))
    for kind in ("model", "encoder", "train"):
        _remove(os.path.join(stage_dir, f"{kind}_{step:06d}.safetensors"))


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def pointer_step(stage_dir):
    """The step ``latest.json`` names, or None when there is no pointer. An unreadable pointer is a
    ConfigError: it is written whole and renamed, so it was damaged by something else."""
    path = os.path.join(stage_dir, LATEST)
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint pointer ({type(e).__name__}: {e}); "
                          f"remove it to use the newest complete checkpoint") from e


def latest(stage_dir, kind="model"):
    """The ``{kind}_XXXXXX.safetensors`` that ``latest.json`` names (None if that file is gone); without a
    pointer (a folder from elsewhere, or a first write that was cut off) the newest step whose meta json
    exists, since the meta is written after the tensors; or None."""
    step = pointer_step(stage_dir)
    if step is None:
        complete = [s for s in _all_steps(stage_dir) if os.path.isfile(os.path.join(stage_dir, f"meta_{s:06d}.json"))]
        complete = [s for s in complete if os.path.isfile(os.path.join(stage_dir, f"{kind}_{s:06d}.safetensors"))]
        if not complete:
            return None
        step = complete[-1]
    path = os.path.join(stage_dir, f"{kind}_{step:06d}.safetensors")
    return path if os.path.isfile(path) else None


def discard_incomplete(stage_dir):
    """Remove what an interrupted checkpoint write left: ``*.tmpPID`` files and every step file newer than the
    step ``latest.json`` names (all step files when there is no pointer). Returns the names removed.
    Call it only where nothing is writing the folder (a resume, before the stage starts)."""
    if not os.path.isdir(stage_dir):
        return []
    step = pointer_step(stage_dir)
    removed = []
    for name in sorted(os.listdir(stage_dir)):
        match = STEP_FILE.match(name)
        if TMP.search(name) or (match and (step is None or int(match.group(2)) > step)):
            _remove(os.path.join(stage_dir, name))
            removed.append(name)
    return removed


def forget(stage_dir):
    """Remove the stage's ``latest.json``: a stage starting afresh must not leave an older run's pointer
    for a later ``run.resume=auto`` to trust next to this run's files."""
    _remove(os.path.join(stage_dir, LATEST))


def resolve(path, run_dir, parts):
    """A checkpoint file from ``init_from.path``: a file, a stage folder, or ``stage:NAME`` in this run."""
    if path.startswith("stage:"):
        path = os.path.join(run_dir, path[len("stage:"):])
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        kind = "encoder" if set(parts) <= {"encoder"} else "model"
        found = latest(path, kind) or latest(path)  # an adapter stage writes no encoder file
        if found is None:
            raise ConfigError(f"init_from: no {kind}_XXXXXX.safetensors checkpoint in {path}")
        return found
    if not os.path.isfile(path):
        raise ConfigError(f"init_from: checkpoint {path!r} does not exist")
    return path


def check_parts(parts, where="init_from.parts"):
    """A ConfigError naming ``where`` unless every name is a part of PARTS."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"{where}: unknown part {unknown[0]!r}; parts are {', '.join(PARTS)}")


def read_tensors(path):
    """{name: tensor} of a checkpoint file, or a ConfigError naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from e


def load_parts(model, path, parts, saved=None):
    """Copy the named parts from a safetensors file (or ``saved``, the tensors read from it) into ``model``;
    all-or-nothing, every key checked."""
    check_parts(parts)
    prefixes = tuple(x for p in parts for x in PARTS[p])
    saved = read_tensors(path) if saved is None else saved
    wanted = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    given = {k: v for k, v in saved.items() if k.startswith(prefixes)}
    problems = describe_problems(compare_keys(wanted, given))
    if problems:
        raise ConfigError(f"{path}: does not fit the model's {'+'.join(parts)}; {problems}")
    with torch.no_grad():
        for k, v in given.items():
            wanted[k].copy_(v)
    return sorted(given)


class ResumePoint(NamedTuple):
    """The checkpoint a stage continues from (``run.resume=auto``)."""
    model_file: str
    meta: dict  # its meta json: losses, and for a finished stage ``complete`` and ``summary``
    tensors: dict | None  # train_XXXXXX.safetensors (optimizer moments, RNG states), or None if not written

    @property
    def complete(self):
        """Whether the stage finished here: a resume does not train it again."""
        return bool(self.meta.get("complete"))

    @property
    def train_state(self):
        """The JSON half of the training state (core/resume.py ``capture``), or None."""
        return self.meta.get("train_state")


def resume_point(stage_dir):
    """The ResumePoint of the step ``latest.json`` names, or None without a pointer. Only the pointer is
    trusted: files newer than it belong to a write that did not finish."""
    step = pointer_step(stage_dir) if os.path.isdir(stage_dir) else None
    if step is None:
        return None
    path = os.path.join(stage_dir, f"model_{step:06d}.safetensors")
    meta_path = os.path.join(stage_dir, f"meta_{step:06d}.json")
    if not (os.path.isfile(path) and os.path.isfile(meta_path)):
        raise ConfigError(f"run.resume: {os.path.join(stage_dir, LATEST)} names step {step} but its "
                          f"{'model' if not os.path.isfile(path) else 'meta'} file is gone; "
                          f"restore it, or remove the pointer to start the stage afresh")
    meta = read_meta(path)
    train_file = os.path.join(stage_dir, f"train_{step:06d}.safetensors")
    try:
        tensors = load_file(train_file) if os.path.isfile(train_file) else None
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"run.resume: {train_file}: not a readable safetensors file ({e})") from e
    return ResumePoint(path, meta, tensors)


def load_prefixed(module, path, prefix, saved=None):
    """Load ``prefix.*`` tensors of a checkpoint file (or ``saved``, tensors read from one) into ``module`` (e.g. a
    regulariser's head)."""
    saved = load_file(path) if saved is None else saved
    state = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)


def read_meta(model_path):
    meta_path = re.sub(r"(model|encoder)_(\d{6})\.safetensors$", r"meta_\2.json", model_path)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)
