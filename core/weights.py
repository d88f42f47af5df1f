"""Pretrained weights: read a state dict from a file, and load it into a module exactly.

Generic: nothing here knows a plugin. Key renaming from other projects' layouts
lives with the plugins (e.g. ``plugins/encoders/pretrained.py``); this module
only reads files and copies tensors, checked and all-or-nothing.

- ``read_state_dict(path)``: a ``.safetensors`` file, a ``.pth`` / ``.pt`` /
  ``.bin`` file (``torch.load(weights_only=True)``, a top-level ``{"model": sd}``
  or ``{"state_dict": sd}`` unwrapped), a sharded ``*.safetensors.index.json``,
  or a ``save_pretrained`` folder. Anything missing, truncated or unreadable is
  a one-line ``ConfigError`` naming the file.
- ``load_state(module, state, source)``: every key and shape is checked against
  ``module.state_dict()`` before a single tensor is copied.
"""
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from core.errors import ConfigError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
REPORT_KEYS = ("loaded", "fresh", "missing", "unexpected", "mismatched")


def _one_line(e):
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def first_keys(keys, n=5):
    """'a, b, c (+k more)': the first n of a list, for one-line messages."""
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def resolve_weights_path(path):
    """A weight file from what a recipe names: a file, or a ``save_pretrained`` folder."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        for name in FOLDER_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise ConfigError(f"{path}: a folder without a weight file (looked for {', '.join(FOLDER_FILES)})")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: weight file does not exist")
    return path


def read_state_dict(path, keep=None):
    """{name: tensor} on the CPU from a weight file; ``keep(name) -> bool`` reads only some tensors
    (a safetensors file then reads nothing else from disk)."""
    path = resolve_weights_path(path)
    if path.endswith(".index.json"):
        return _read_sharded(path, keep)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, keep)
    if path.endswith(TORCH_SUFFIXES):
        state = _read_torch(path)
        return {k: v for k, v in state.items() if keep is None or keep(k)}
    raise ConfigError(f"{path}: unknown weight file type; expected .safetensors, "
                      f"{', '.join(TORCH_SUFFIXES)}, a *.safetensors.index.json or a save_pretrained folder")


def _read_safetensors(path, keep):
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file, truncated or corrupt ({_one_line(e)})") from e


def _read_sharded(path, keep):
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a readable safetensors index ({_one_line(e)})") from e
    folder = os.path.dirname(path)
    state = {}
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise ConfigError(f"{path}: shard {shard} does not exist")
        state.update(_read_safetensors(shard_path, keep))
    return state


def _read_torch(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle with non-tensor globals, ...: all one line
        raise ConfigError(f"{path}: not a readable PyTorch weight file, truncated, corrupt or not weights_only-safe "
                          f"({_one_line(e)})") from e
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    odd = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"{path}: not a state dict of tensors: {first_keys(odd)}")
    return dict(obj)


def empty_report():
    return {k: [] for k in REPORT_KEYS}


def on_meta(module=None):
    """True when ``module`` was built on the meta device, or (no module) when modules are being built there:
    a dry run or a checkpoint about to overwrite every tensor, so there is nothing to load or initialise."""
    if module is None:
        return torch.empty(0).device.type == "meta"  # the default device torch.device("meta") sets
    return any(t.is_meta for t in module.state_dict().values())


def _shape(t):
    return tuple(t.shape)


def compare_keys(target, state, skip_prefixes=()):
    """The load report of copying ``state`` into a module whose state dict is ``target`` (see load_state)."""
    report = empty_report()
    skip = tuple(skip_prefixes)
    for key in sorted(target):
        if skip and key.startswith(skip):
            report["fresh"].append(key)
        elif key not in state:
            report["missing"].append(key)
    for key in sorted(state):
        if key not in target or (skip and key.startswith(skip)):
            report["unexpected"].append(key)
        elif _shape(state[key]) != _shape(target[key]):
            report["mismatched"].append((key, _shape(state[key]), _shape(target[key])))
        else:
            report["loaded"].append(key)
    return report


def describe_problems(report):
    """'missing N: ...; unexpected N: ...; shape-mismatched N: key (file (..) vs model (..))'."""
    parts = []
    if report["missing"]:
        parts.append(f"missing {len(report['missing'])}: {first_keys(report['missing'])}")
    if report["unexpected"]:
        parts.append(f"unexpected {len(report['unexpected'])}: {first_keys(report['unexpected'])}")
    if report["mismatched"]:
        shown = [f"{k} (file {fs} vs model {ms})" for k, fs, ms in report["mismatched"]]
        parts.append(f"shape-mismatched {len(shown)}: {first_keys(shown)}")
    return "; ".join(parts)


def load_state(module, state, source, strict=True, skip_prefixes=(), name=None):
    """Copy ``state`` into ``module`` after checking every key and shape; return the report.

    The report is a dict of lists: ``loaded`` (keys copied), ``fresh`` (module keys
    under ``skip_prefixes``: not expected in the file, left as initialised),
    ``missing`` (module keys the file lacks), ``unexpected`` (file keys the module
    lacks, or under ``skip_prefixes``) and ``mismatched`` ((key, file shape, model
    shape) tuples). ``strict=True``: any missing, unexpected or mismatched key is a
    one-line ConfigError and nothing at all is copied. ``strict=False``: what
    matches by name and shape is copied, the rest is only reported (the caller logs it).
    A module on the meta device is not touched: the report comes back empty.
    """
    target = module.state_dict()
    if on_meta(module):
        return empty_report()
    report = compare_keys(target, state, skip_prefixes)
    if strict and (report["missing"] or report["unexpected"] or report["mismatched"]):
        what = name or type(module).__name__
        raise ConfigError(f"{source}: does not fit {what}: {describe_problems(report)}")
    with torch.no_grad():
        # convert everything first, so a failure cannot leave the module half loaded
        staged = {k: state[k].to(device=target[k].device, dtype=target[k].dtype) for k in report["loaded"]}
        for key, value in staged.items():
            target[key].copy_(value)
    return report
