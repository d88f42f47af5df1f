"""Any transformers causal language model (``AutoModelForCausalLM``) as vlmkit's decoder.

    decoder: {name: hf_causal_lm, model: Qwen/Qwen3-0.6B}          # released weights: a hub name or a folder
    decoder: {name: hf_causal_lm, config: {model_type: llama, hidden_size: 64, ...}}   # random weights
    decoder: {name: hf_causal_lm, model: Qwen/Qwen3-0.6B, config: {num_hidden_layers: 4}}  # its config, changed

- ``model`` alone loads the weights (``from_pretrained``); with ``config`` the model is built from the
  config, the model's with those keys changed, or (without ``model``) transformers' defaults for
  ``model_type``, with random weights (transformers' init). A key the config class does not know is an
  error, not silently kept. Without ``model`` the vocabulary is the tokenizer's unless config names one.
- The embeddings grow to the tokenizer's size when it is larger (``resize_token_embeddings``: new rows
  drawn around the mean of the old ones); a matrix padded past the tokenizer keeps its size.
- ``dtype``: float32 (default) or bfloat16, the dtype of the weights; ``run.precision: bf16`` autocasts
  either. ``attn_implementation``: transformers' (``sdpa``, ``eager``, ...); default: its choice.
- Generation uses transformers' own cache (``DynamicCache``) through the Decoder contract, so
  ``core.generate`` runs it unchanged; positions continue from the cache's length.
- The parameters are transformers' modules under ``lm.`` (``decoder.lm.model.layers.3.mlp.up_proj.weight``):
  the decoder layers are its ``nn.ModuleList``, so activation checkpointing, FSDP and Muon find them
  the way they find nanochat's blocks. Tied input and output embeddings are one tensor, stored once in
  vlmkit's checkpoints (under the embedding's name).
- ``export_hf`` writes the language model with ``save_pretrained`` (``python -m core.export``).
A dry run (meta device) reads only config.json. Needs transformers (``pip install 'vlmkit[hf]'``).
"""
import inspect
import os

import torch
import torch.nn.functional as F
from torch import nn

from core import hookimpl
from core.distributed import print0
from core.errors import ConfigError
from core.hub import resolve
from core.weights import on_meta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ["*.json", "*.safetensors"]  # config, generation config, weights (and their index)
CONFIG_FILES = ["config.json"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("decoder hf_causal_lm needs transformers: pip install 'vlmkit[hf]'") from None
    return transformers


def _one_line(e):
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"


def hf_causal_lm(vocab_size=None, model=None, config=None, dtype="float32", attn_implementation=None):
    """The ``hf_causal_lm`` decoder; see the module docstring."""
    if model is None and not config:
        raise ConfigError("needs model (a hub name or a folder) or config (model_type and sizes)")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"config: expected a mapping of config keys, got {type(config).__name__}")
    transformers = _transformers()
    fresh = bool(config) or on_meta()  # on the meta device no weights are read
    folder = resolve(model, "model", CONFIG_FILES if fresh else WEIGHT_FILES) if model is not None else None
    if folder is not None and not os.path.isdir(folder):
        raise ConfigError(f"model: {folder} is not a folder (a hub name, or a folder save_pretrained wrote)")
    cfg = build_config(transformers, folder, dict(config or {}), vocab_size)
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = transformers.AutoModelForCausalLM
    try:
        lm = auto.from_config(cfg, **kwargs) if fresh else auto.from_pretrained(folder, config=cfg, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise ConfigError(f"{'config' if fresh else 'model'}: transformers cannot build a causal language model "
                          f"from {model or cfg.model_type} ({_one_line(e)})") from e
    decoder = HFCausalLM(lm)
    grow = vocab_size is not None and vocab_size > decoder.vocab_size
    if not on_meta():  # on meta (a dry run, core.generate's rebuild) stdout is the parameter table, or the answers
        print0(f"decoder: {type(lm).__name__} ({cfg.model_type}, {decoder.n_layer} layers, hidden {decoder.n_embd}, "
               f"vocab {decoder.vocab_size}{f' -> {vocab_size} for the tokenizer' if grow else ''}), "
               f"{'random weights' if fresh else f'weights from {folder}'}")
    if grow:
        lm.resize_token_embeddings(vocab_size, mean_resizing=not on_meta())
    return decoder


def build_config(transformers, folder, overrides, vocab_size):
    """The model's config (``folder``'s, or transformers' defaults for ``model_type``) with ``overrides`` applied."""
    auto = transformers.AutoConfig
    model_type = overrides.pop("model_type", None)
    try:
        if folder is not None:
            base = auto.from_pretrained(folder)
            if model_type not in (None, base.model_type):
                raise ConfigError(f"config.model_type: {model_type!r}, but {folder} is {base.model_type!r}")
        elif model_type is None:
            raise ConfigError("config: needs model_type (e.g. llama, qwen3) when there is no model")
        else:
            base = auto.for_model(model_type)
    except (OSError, ValueError, KeyError) as e:  # no config.json, or a model_type transformers does not know
        if folder is not None:
            raise ConfigError(f"model: {folder} has no config transformers reads ({_one_line(e)})") from e
        raise ConfigError(f"config.model_type: {model_type!r} is not a model type transformers "
                          f"{transformers.__version__} knows") from e
    if folder is None and vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    values = base.to_dict()
    known = set(values)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        values.pop("layer_types", None)  # one entry per layer: the config class derives it again
    try:
        cfg = type(base).from_dict({**values, **overrides})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config: {_one_line(e)}") from e
    unknown = sorted(k for k in set(cfg.to_dict()) - known if k in overrides)  # kept as-is, never read
    if unknown:
        raise ConfigError(f"config: {', '.join(unknown)} is not a key of {type(base).__name__}")
    return cfg


class HFCausalLM(nn.Module):
    """A transformers ``...ForCausalLM`` behind vlmkit's Decoder contract (core/contracts.py)."""
    keeps_last = True  # forward(last_only=True) is transformers' logits_to_keep=1

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        params = inspect.signature(lm.forward).parameters  # transformers 5.2x renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        text = lm.config.get_text_config()
        self.n_embd = text.hidden_size
        self.n_layer = text.num_hidden_layers
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self.register_state_dict_post_hook(_store_tied_once)
        self.register_load_state_dict_pre_hook(_restore_tied)

    @property
    def vocab_size(self):
        return self.lm.get_input_embeddings().num_embeddings

    def embed(self, ids):
        return self.lm.get_input_embeddings()(ids)

    def forward(self, embeds, targets=None, kv_cache=None, last_only=False):
        """Logits (float) or, with ``targets`` (-1: none), the mean cross-entropy over the targets.

        The head runs only at positions where some row has a target (an OCR sample's image and prompt
        never have one); the family's own logit processing (softcapping, scaling) stays transformers'.
        """
        start = 0 if kv_cache is None else kv_cache.get_seq_length()
        end = start + embeds.shape[1]
        if self.max_positions and end > self.max_positions:
            raise ValueError(f"sequence end {end} exceeds the model's max_position_embeddings ({self.max_positions})")
        if targets is None:
            out = self.lm(inputs_embeds=embeds, use_cache=kv_cache is not None, logits_to_keep=int(last_only),
                          **{self._cache_arg: kv_cache})
            return out.logits.float()
        keep = (targets != -1).any(dim=0).nonzero().squeeze(1)
        logits = self.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=keep).logits
        kept = targets[:, keep]
        scored = kept != -1
        return F.cross_entropy(logits[scored].float(), kept[scored])

    def make_kv_cache(self, batch_size, seq_len):
        """transformers' DynamicCache: it grows as forward fills it, so the sizes are not needed."""
        from transformers import DynamicCache
        return DynamicCache(config=self.lm.config)

    def _apply(self, fn, recurse=True):
        # A model built on the meta device and moved with to_empty() (core.generate rebuilding a checkpoint's
        # model) gets a new tensor per module: tied embeddings come apart, so they are tied again; and its
        # non-persistent buffers (rotary frequencies), in no checkpoint, would be uninitialised memory, so
        # transformers' own init computes them again, as its from_pretrained does.
        tied = _tied(self)
        owners = [m for m in self.lm.modules() if any(b is not None and b.is_meta for n, b in m._buffers.items()
                                                     if n in m._non_persistent_buffers_set)]
        super()._apply(fn, recurse)
        for alias, name in tied.items():
            parent, _, attr = alias.rpartition(".")
            setattr(self.get_submodule(parent), attr, self.get_parameter(name))
        with torch.no_grad():
            for module in owners:
                if not any(b.is_meta for b in module.buffers(recurse=False)):
                    self.lm._init_weights(module)
        return self

    def export_hf(self, out_dir, tokenizer):
        """The language model as transformers saves it (config, generation config, safetensors)."""
        self.lm.config.update(_special_ids(tokenizer))
        generation = getattr(self.lm, "generation_config", None)
        if generation is not None:
            for key, value in _special_ids(tokenizer).items():
                setattr(generation, key, value)
        self.lm.save_pretrained(out_dir)
        return f"language model {type(self.lm).__name__} ({self.lm.config.model_type}, vocab {self.vocab_size})"


def _special_ids(tokenizer):
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def _tied(module):
    """{alias: name} for parameters that are the same tensor as an earlier one (tied embeddings)."""
    first, aliases = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _store_tied_once(module, state_dict, prefix, local_metadata):
    # safetensors refuses two names for one tensor; the alias is restored on load (_restore_tied)
    for alias in _tied(module):
        state_dict.pop(prefix + alias, None)


def _restore_tied(module, state_dict, prefix, *args):
    for alias, name in _tied(module).items():
        if prefix + name in state_dict:
            state_dict.setdefault(prefix + alias, state_dict[prefix + name])


@hookimpl
def vlmkit_register(registry):
    registry.add("decoder", "hf_causal_lm", hf_causal_lm)
