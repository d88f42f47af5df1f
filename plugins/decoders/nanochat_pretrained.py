"""nanochat decoder from pretrained weights: the native layout and the HF ``NanoChatForCausalLM`` layout.

The recipe names a checkpoint and the model config comes from the files, never guessed:

    decoder: {name: nanochat, checkpoint: ~/.cache/nanochat/chatsft_checkpoints/d20}

- native (docs/architecture.md §1.9): ``model_XXXXXX.pt`` (a raw ``torch.save``d state_dict, maybe with
  ``_orig_mod.`` prefixes from torch.compile, embeddings maybe bf16) and ``meta_XXXXXX.json`` beside it, whose
  ``model_config`` holds the six sizes, plus ``window_pattern`` when nanochat wrote it after Jan 2026: that
  checkpoint is arch 2026-07 (NC-HEAD, nanochat_2026.py), the others 2025-10 (NC-OCT). A folder means its
  largest step. Read with ``torch.load(weights_only=True)``. Norms use finfo eps (``norm_eps`` None), the
  rotary base is 10000 (NC-OCT) or 100000 (NC-HEAD), softcap 15; these are not in the files, so a recipe
  may set them.
- hf: a folder with ``config.json`` and ``model.safetensors`` (or its sharded index, or
  ``pytorch_model.bin``); names are mapped back to nanochat's (the transformers converter's map, §1.9) and
  ``rms_norm_eps``, ``rope_theta`` and ``final_logit_softcapping`` come from config.json (§6).

A size the recipe gives that disagrees with the checkpoint is an error naming the key and both values.
The tokenizer may have more ids than the checkpoint (nanochat's 65536 or 32768 + ``<|image|>``): the weights load
at the checkpoint's vocab and ``GPT.grow_vocab`` appends the rest (old rows untouched). Loading is strict
and all-or-nothing. On the meta device (dry runs) the config is read but no weights are.
"""
import glob
import os
import re

import torch

from core import hookimpl
from core.distributed import print0
from core.errors import ConfigError
from core.hub import resolve
from core.jsonfiles import read_json
from core.weights import FOLDER_FILES as HF_WEIGHT_FILES, load_state, on_meta, read_state_dict, resolve_weights_path
from plugins.decoders.nanochat import GPT
from plugins.decoders.nanochat_hf import hf_to_native
from plugins.decoders.nanochat_2026 import GPT2026


class _Unset:
    def __repr__(self):
        return "<from the checkpoint, else GPT's default>"


UNSET = _Unset()
SIZE_KEYS = ("sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd")  # + vocab_size: meta's six keys
FORMATS = ("auto", "native", "hf")
HUB_FILES = ["*.json", "*.safetensors", "model_*.pt"]  # what is downloaded of a hub repository: HF or native
OCT, HEAD = "2025-10", "2026-07"  # NC-OCT and NC-HEAD (docs/architecture.md §1.1)
ARCHS = {OCT: GPT, HEAD: GPT2026}
HEAD_ONLY = ("window_pattern", "image_positions")
# native checkpoints do not hold these (§1.4, §6): each architecture's own
ARCH_SETTINGS = {OCT: dict(rotary_base=10000.0, norm_eps=None, softcap=15.0),
                 HEAD: dict(rotary_base=100000.0, norm_eps=None, softcap=15.0)}


def nanochat_decoder(vocab_size=None, sequence_len=UNSET, n_layer=UNSET, n_head=UNSET, n_kv_head=UNSET,
                     n_embd=UNSET, rotary_base=UNSET, norm_eps=UNSET, softcap=UNSET, arch=UNSET,
                     window_pattern=UNSET, image_positions=UNSET, image_id=None,
                     checkpoint=None, checkpoint_format="auto"):
    """The ``nanochat`` decoder: a fresh GPT or, with ``checkpoint``, one loaded from pretrained weights.

    ``arch``: "2025-10" (the default, nanochat.py's GPT) or "2026-07" (nanochat_2026.py's, which also takes
    ``window_pattern`` and ``image_positions``; vlmkit passes ``image_id``, the <|image|> id). Without a
    checkpoint every argument is that GPT's. With one, the sizes and the architecture come from the checkpoint;
    those the recipe gives must agree. ``vocab_size`` (vlmkit passes the tokenizer's) may exceed the checkpoint's.
    """
    given = {k: v for k, v in dict(sequence_len=sequence_len, n_layer=n_layer, n_head=n_head,
                                     n_kv_head=n_kv_head, n_embd=n_embd, rotary_base=rotary_base,
                                     norm_eps=norm_eps, softcap=softcap, arch=arch, window_pattern=window_pattern,
                                     image_positions=image_positions).items() if v is not UNSET}
    if checkpoint is None:
        if checkpoint_format != "auto":
            raise ConfigError(f"decoder nanochat: checkpoint_format {checkpoint_format!r} needs a checkpoint")
        if vocab_size is None:
            raise ConfigError("decoder nanochat: needs vocab_size (vlmkit passes the tokenizer's) or a checkpoint")
        return make_gpt(vocab_size, given, image_id)
    return load_pretrained(checkpoint, checkpoint_format, vocab_size, given, image_id)


def make_gpt(vocab_size, kwargs, image_id=None):
    """The GPT of ``kwargs["arch"]`` (default 2025-10) with the other kwargs."""
    kwargs = dict(kwargs)
    arch = kwargs.pop("arch", OCT)
    if arch not in ARCHS:
        raise ConfigError(f"arch {arch!r} is not one of {', '.join(ARCHS)} (quote it in YAML)")
    if arch == OCT:
        extra = [k for k in HEAD_ONLY if k in kwargs]
        if extra:
            raise ConfigError(f"{', '.join(extra)}: only with arch {HEAD!r} (the {OCT} GPT has no windows, smear "
                              f"or value embeddings)")
        return GPT(vocab_size, **kwargs)
    return GPT2026(vocab_size, image_id=image_id, **kwargs)


def load_pretrained(checkpoint, checkpoint_format="auto", vocab_size=None, given=None, image_id=None):
    """Build a GPT from a native or HF nanochat checkpoint; see the module docstring."""
    given = dict(given or {})
    fmt, weights_path, config, config_source = resolve_checkpoint(checkpoint, checkpoint_format)
    tied = config.pop("_tied", False)
    config.setdefault("arch", OCT)  # HF NanoChat and meta files without window_pattern are NC-OCT (§1.1)
    for key, value in given.items():  # the recipe may only repeat what the checkpoint says
        if key in config and not _same(value, config[key]):
            raise ConfigError(f"decoder nanochat: {key} is {value!r} in the recipe but {config[key]!r} in the "
                              f"checkpoint ({config_source}); leave {key} out to take it from the checkpoint")
    kwargs = {**ARCH_SETTINGS[config["arch"]], **given, **config}
    ckpt_vocab = kwargs.pop("vocab_size")
    target_vocab = ckpt_vocab if vocab_size is None else int(vocab_size)
    if target_vocab < ckpt_vocab:
        raise ConfigError(f"decoder nanochat: the checkpoint's vocab_size {ckpt_vocab} ({config_source}) is larger "
                          f"than the tokenizer's {target_vocab}; use the checkpoint's own tokenizer")
    sizes = ", ".join(f"{k}={kwargs[k]}" for k in SIZE_KEYS)

    if on_meta():  # dry run: the config from the files, no weights
        model = _gpt(target_vocab, kwargs, config_source, image_id)
        grown = f" -> {target_vocab} (grown for the tokenizer)" if target_vocab > ckpt_vocab else ""
        print0(f"decoder: meta device, weights not read from {weights_path} ({fmt}, arch {kwargs['arch']}; "
               f"{sizes}, vocab {ckpt_vocab}{grown})")
        return model

    state = {k.removeprefix("_orig_mod."): v for k, v in read_state_dict(weights_path).items()}  # not lstrip
    if fmt == "hf":
        state = hf_to_native(state)
        if tied and "lm_head.weight" not in state and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
    with torch.device("meta"):
        model = _gpt(ckpt_vocab, kwargs, config_source, image_id)
    model.to_empty(device=torch.empty(0).device)  # uninitialised; every tensor is overwritten, rotary rebuilt
    # strict and all-or-nothing: every key and shape is checked before a tensor is copied (bf16 -> fp32 cast)
    report = load_state(model, state, weights_path, strict=True, name=f"a nanochat GPT ({sizes})")
    del state
    print0(f"decoder: loaded {len(report['loaded'])} tensors from {weights_path} ({fmt}, arch {kwargs['arch']}; "
          f"{sizes}, vocab {ckpt_vocab}, "
          f"norm_eps {model.config.norm_eps}, rotary_base {model.config.rotary_base}, softcap {model.config.softcap})")
    if target_vocab > ckpt_vocab:
        model.grow_vocab(target_vocab)
        print0(f"decoder: vocab grown {ckpt_vocab} -> {target_vocab} for the tokenizer "
              f"(old rows untouched; new wte rows ~ N(0,1), new lm_head rows zero)")
    return model


def _same(a, b):
    if a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return str(a).upper() == str(b).upper()  # arch, window_pattern (nanochat upper-cases the pattern)
    return float(a) == float(b)


def _gpt(vocab_size, kwargs, config_source, image_id=None):
    try:
        return make_gpt(vocab_size, kwargs, image_id)
    except ConfigError as e:
        raise ConfigError(f"decoder nanochat: the checkpoint's config ({config_source}) is not a nanochat GPT: "
                          f"{e}") from e


# ---------------------------------------------------------------- finding the files and the config

def _step_files(folder):
    files = glob.glob(os.path.join(folder, "model_[0-9][0-9][0-9][0-9][0-9][0-9].pt"))
    return sorted(files, key=lambda p: int(re.findall(r"model_(\d{6})\.pt$", p)[0]))


def resolve_checkpoint(checkpoint, checkpoint_format="auto"):
    """(format, weights file, config dict in GPT's names incl. vocab_size, where the config came from)."""
    if checkpoint_format not in FORMATS:
        raise ConfigError(f"decoder nanochat: checkpoint_format {checkpoint_format!r} is not one of "
                          f"{', '.join(FORMATS)}")
    path = resolve(checkpoint, "checkpoint", HUB_FILES)  # a local path, or a hub name (core/hub.py)
    if not os.path.exists(path):
        raise ConfigError(f"decoder nanochat: checkpoint {path} does not exist")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    fmt = checkpoint_format
    if fmt == "auto":
        if os.path.isdir(path):
            fmt = "native" if _step_files(path) else "hf" if os.path.isfile(os.path.join(path, "config.json")) else None
        else:
            fmt = "native" if path.endswith(".pt") else "hf"
        if fmt is None:
            raise ConfigError(f"decoder nanochat: {path} holds neither model_XXXXXX.pt + meta_XXXXXX.json (nanochat) "
                              f"nor config.json + {' or '.join(HF_WEIGHT_FILES)} (transformers)")
    if fmt == "native":
        if os.path.isdir(path):
            steps = _step_files(path)
            if not steps:
                raise ConfigError(f"decoder nanochat: no model_XXXXXX.pt in {path}")
            path = steps[-1]  # the largest step, as nanochat's find_last_step
        m = re.search(r"model_(\d+)\.pt$", path)
        if not m:
            raise ConfigError(f"decoder nanochat: native checkpoint {path} is not named model_XXXXXX.pt, so its "
                              f"meta_XXXXXX.json cannot be found")
        meta_path = os.path.join(os.path.dirname(path), f"meta_{m.group(1)}.json")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"decoder nanochat: {meta_path} is missing; the model config of {path} is read from "
                              f"its meta_XXXXXX.json (model_config), never guessed")
        meta = read_json(meta_path)
        if not isinstance(meta.get("model_config"), dict):
            raise ConfigError(f"decoder nanochat: {meta_path} has no model_config")
        return "native", path, native_config(meta["model_config"], meta_path), f"{meta_path} model_config"
    # hf
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"decoder nanochat: {config_path} is missing; an HF NanoChat checkpoint is a folder with "
                          f"config.json and {' or '.join(HF_WEIGHT_FILES)}")
    if os.path.isdir(path):
        path = resolve_weights_path(path)  # model.safetensors, its sharded index, or pytorch_model.bin
    return "hf", path, hf_config(read_json(config_path), config_path), config_path


def native_config(model_config, source):
    """meta["model_config"] -> GPT keyword arguments: nanochat's six GPTConfig keys (NC-OCT), or seven with
    ``window_pattern``, which only NC-HEAD writes (§1.2): then arch 2026-07."""
    keys = ("vocab_size",) + SIZE_KEYS
    missing = [k for k in keys if k not in model_config]
    extra = sorted(set(model_config) - set(keys) - {"window_pattern"})
    if missing:
        raise ConfigError(f"decoder nanochat: {source} model_config lacks {', '.join(missing)}")
    if extra:
        raise ConfigError(f"decoder nanochat: {source} model_config has {', '.join(extra)}, which neither nanochat "
                          f"architecture vlmkit implements ({', '.join(ARCHS)}) has")
    config = {k: int(model_config[k]) for k in keys}
    if "window_pattern" in model_config:
        config.update(arch=HEAD, window_pattern=str(model_config["window_pattern"]))
    return config


def hf_config(cfg, source):
    """HF NanoChatConfig (config.json) -> GPT keyword arguments, eps and rope base included (§6)."""
    if "model_config" in cfg or "n_layer" in cfg:  # a config.json holding nanochat's own keys
        return native_config(cfg.get("model_config", cfg), source)
    if cfg.get("model_type", "nanochat") != "nanochat":
        raise ConfigError(f"decoder nanochat: {source} is model_type {cfg['model_type']!r}, not nanochat")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ConfigError(f"decoder nanochat: {source} lacks {key}")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if cfg.get("intermediate_size", 4 * hidden) != 4 * hidden:
        raise ConfigError(f"decoder nanochat: {source} intermediate_size {cfg['intermediate_size']} is not "
                          f"4 x hidden_size {hidden}, as nanochat's MLP is")
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"decoder nanochat: {source} head_dim {cfg['head_dim']} is not hidden_size/heads")
    if cfg.get("hidden_act", "relu2") != "relu2" or cfg.get("attention_bias", False):
        raise ConfigError(f"decoder nanochat: {source} needs hidden_act relu2 and no attention_bias")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"decoder nanochat: {source} uses rope type {rope.get('rope_type')!r}; only default")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))  # transformers 4: top level; 5: rope_parameters
    out = dict(vocab_size=int(cfg["vocab_size"]), sequence_len=int(cfg.get("max_position_embeddings", 2048)),
               n_layer=int(cfg["num_hidden_layers"]), n_head=heads,
               n_kv_head=int(cfg.get("num_key_value_heads") or heads), n_embd=hidden,
               rotary_base=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
               softcap=cfg.get("final_logit_softcapping", 15.0))
    if out["softcap"] is not None:
        out["softcap"] = float(out["softcap"])
    if cfg.get("tie_word_embeddings", False):
        out["_tied"] = True
    return out


@hookimpl
def vlmkit_register(registry):
    registry.add("decoder", "nanochat", nanochat_decoder)
