"""Checkpoints: safetensors for tensors, JSON for metadata, no pickle.

A stage folder holds ``model_XXXXXX.safetensors`` + ``meta_XXXXXX.json`` (the
step in six digits, as nanochat names its files) and, for handing the vision
side to the next stage, ``encoder_XXXXXX.safetensors``. Files are written to a
temporary name and renamed, so a reader never sees half a file.
"""
import glob
import json
import os
import re

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


def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(state_dict):
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_checkpoint(stage_dir, step, model, meta, extra_modules=None, keep_last=None, train_state=None,
                    model_state=None):
    """Write the full model, the encoder alone and meta json, then the ``latest`` pointer; return the model path.

    ``model_state``: the model's state dict when ``model.state_dict()`` would not give whole tensors
    (FSDP's shards, gathered by core/distributed.py).
    The pointer is written last, so a reader that follows it never finds a step whose
    files are incomplete; ``keep_last`` then deletes all but the newest N steps.
    """
    os.makedirs(stage_dir, exist_ok=True)
    state = _tensors(model.state_dict() if model_state is None else model_state)
    for prefix, module in (extra_modules or {}).items():  # e.g. a regulariser's head
        state.update({f"{prefix}.{k}": v for k, v in _tensors(module.state_dict()).items()})
    model_path = os.path.join(stage_dir, f"model_{step:06d}.safetensors")
    _atomic(model_path, lambda p: save_file(state, p))
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
        for old_step in _steps(stage_dir)[:-keep_last]:
            for kind in ("model", "encoder", "train"):
                _remove(os.path.join(stage_dir, f"{kind}_{old_step:06d}.safetensors"))
            _remove(os.path.join(stage_dir, f"meta_{old_step:06d}.json"))
    return model_path


def _steps(stage_dir, kind="model"):
    """The steps of the ``{kind}_XXXXXX.safetensors`` files in a stage folder, ascending."""
    files = glob.glob(os.path.join(stage_dir, f"{kind}_[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"))
    return sorted(int(re.findall(r"(\d{6})\.safetensors$", p)[0]) for p in files)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def latest(stage_dir, kind="model"):
    """The ``{kind}_XXXXXX.safetensors`` the ``latest`` pointer names, else the newest one; or None."""
    try:
        with open(os.path.join(stage_dir, LATEST), encoding="utf-8") as f:
            step = int(json.load(f)["step"])
        path = os.path.join(stage_dir, f"{kind}_{step:06d}.safetensors")
        if os.path.isfile(path):
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no pointer (an older folder) or an unreadable one: fall back to the newest file
    steps = _steps(stage_dir, kind)
    return os.path.join(stage_dir, f"{kind}_{steps[-1]:06d}.safetensors") if steps else None


def resolve(path, run_dir, parts):
    """A checkpoint file from ``init_from.path``: a file, a stage folder, or ``stage:NAME`` in this run."""
    if path.startswith("stage:"):
        path = os.path.join(run_dir, path[len("stage:"):])
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        kind = "encoder" if set(parts) <= {"encoder"} else "model"
        found = latest(path, kind)
        if found is None:
            raise ConfigError(f"init_from: no {kind}_XXXXXX.safetensors checkpoint in {path}")
        return found
    if not os.path.isfile(path):
        raise ConfigError(f"init_from: checkpoint {path!r} does not exist")
    return path


def load_parts(model, path, parts):
    """Copy the named parts from a safetensors file into ``model``; all-or-nothing, every key checked."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"init_from.parts: unknown part {unknown[0]!r}; parts are {', '.join(PARTS)}")
    prefixes = tuple(x for p in parts for x in PARTS[p])
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from e
    wanted = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    given = {k: v for k, v in saved.items() if k.startswith(prefixes)}
    problems = describe_problems(compare_keys(wanted, given))
    if problems:
        raise ConfigError(f"{path}: does not fit the model's {'+'.join(parts)}; {problems}")
    with torch.no_grad():
        for k, v in given.items():
            wanted[k].copy_(v)
    return sorted(given)


def resume_point(stage_dir):
    """(model file, meta, train-state tensors) of the stage's latest checkpoint, or None if it has none."""
    path = latest(stage_dir) if os.path.isdir(stage_dir) else None
    if path is None:
        return None
    meta = read_meta(path)
    train_file = re.sub(r"model_(\d{6})\.safetensors$", r"train_\1.safetensors", path)
    tensors = load_file(train_file) if os.path.isfile(train_file) else None
    return path, meta, tensors


def load_prefixed(module, path, prefix):
    """Load ``prefix.*`` tensors of a checkpoint file into ``module`` (e.g. a regulariser's head)."""
    saved = load_file(path)
    state = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)


def read_meta(model_path):
    meta_path = re.sub(r"(model|encoder)_(\d{6})\.safetensors$", r"meta_\2.json", model_path)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)
