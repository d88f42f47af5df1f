"""DeepSeek-OCR 2 checkpoint folders as transformers writes them: key names, config, sizes (docs/architecture.md §7).

A helper module: it registers nothing. The ``deepseek_ocr2`` encoder and the ``deepseek_v2_moe`` decoder
load their parts of one folder through it; ``plugins/deepseek_ocr2_export.py`` writes one.

Key layouts (§7.6); both load, transformers' ``save_pretrained`` writes the first by default:

* ``original``, the release's names: ``model.sam_model.*``, ``model.qwen2_model.model.model.{layers,norm}.*``,
  ``model.qwen2_model.query_{768,1024}.*``, ``model.projector.layers.*``, ``model.view_seperator`` (sic),
  the language model's ``model.{embed_tokens,layers,norm}.*`` with one tensor per expert, ``lm_head.*``;
* ``transformers`` (``save_original_format=False``): ``model.vision_tower.{sam_encoder,vision_encoder}.*``,
  ``model.vision_tower.query_{768,1024}_resolution.*``, ``model.multi_modal_projector.*``,
  ``model.view_separator``, ``model.language_model.*`` with the experts stacked, ``lm_head.*``.

vlmkit's names: ``encoder.{sam,qwen2,query_768,query_1024}.*``, ``projector.layers.*``, ``view_separator``,
``decoder.{model,lm_head}.*``; the experts stacked as transformers stacks them (the decoder is its modules).
"""
import dataclasses
import os
import re

import torch

from core.distributed import print0
from core.errors import ConfigError
from core.hub import resolve
from core.jsonfiles import read_json
from core.weights import first_keys, on_meta, read_state_dict
from plugins.encoders.pretrained import sam_from_deepseek_ocr2

# (vlmkit prefix, checkpoint prefix), looked up in this order
ORIGINAL = (
    ("encoder.sam.", "model.sam_model."),
    ("encoder.qwen2.", "model.qwen2_model.model.model."),
    ("encoder.query_", "model.qwen2_model.query_"),
    ("projector.layers.", "model.projector.layers."),
    ("view_separator", "model.view_seperator"),
    ("decoder.lm_head.", "lm_head."),
    ("decoder.model.", "model."),  # last: the language model is what remains under model.
)
TRANSFORMERS = (  # SAM's keys (model.vision_tower.sam_encoder.*) go through sam_from_deepseek_ocr2
    ("encoder.qwen2.", "model.vision_tower.vision_encoder."),
    ("encoder.query_768.", "model.vision_tower.query_768_resolution."),
    ("encoder.query_1024.", "model.vision_tower.query_1024_resolution."),
    ("projector.layers.", "model.multi_modal_projector."),
    ("view_separator", "model.view_separator"),
    ("decoder.lm_head.", "lm_head."),
    ("decoder.model.", "model.language_model."),
)
TRANSFORMERS_SAM = "model.vision_tower.sam_encoder."
VISION_PARTS = ("encoder.", "projector.", "view_separator")

# The released model's sizes (§7.1-7.3): what a recipe gets without a checkpoint (a dry run shows them)
SAM_DEFAULTS = dict(patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0, window_size=14,
                    global_attn_indexes=[2, 5, 8, 11], out_chans=256, downsample_channels=[512, 896])
QWEN2_DEFAULTS = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=131072,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
TEXT_DEFAULTS = dict(hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896, num_hidden_layers=12,
                     num_attention_heads=10, num_key_value_heads=10, n_routed_experts=64, num_experts_per_tok=6,
                     n_shared_experts=2, routed_scaling_factor=1.0, topk_method="greedy", rms_norm_eps=1e-6,
                     hidden_act="silu", max_position_embeddings=8192,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# transformers' SAM config -> SAMEncoder's arguments; what SAMEncoder always has must be what the file says
SAM_NAMES = dict(patch_size="patch_size", hidden_size="dim", num_hidden_layers="depth",
                 num_attention_heads="heads", mlp_ratio="mlp_ratio", window_size="window_size",
                 global_attn_indexes="global_attn_indexes", output_channels="out_chans",
                 downsample_channels="downsample_channels", image_size="position_image_size")
SAM_FIXED = dict(hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, use_abs_pos=True, use_rel_pos=True)


def need_transformers(what):
    """ConfigError unless transformers with DeepSeek-OCR 2 is installed (an optional dependency)."""
    try:
        import transformers.models.deepseek_ocr2  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{what} needs transformers 5.23 or newer (pip install 'vlmkit[hf]'): {e}") from e


# ---- key names

def layout_of(keys):
    """``original``, ``transformers``, ``mixed`` or None, from a checkpoint's key names."""
    keys = list(keys)
    ours = any(k.startswith(("model.vision_tower.", "model.language_model.")) for k in keys)
    original = any(k.startswith(("model.sam_model.", "model.qwen2_model.", "model.embed_tokens.")) for k in keys)
    return {(True, False): "transformers", (False, True): "original", (True, True): "mixed"}.get((ours, original))


def _rename(key, table, forward=True):
    """``key`` under the first matching prefix of ``table`` (vlmkit -> file when not ``forward``), or None."""
    for ours, theirs in table:
        src, dst = (theirs, ours) if forward else (ours, theirs)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_vlmkit(state, source):
    """A checkpoint's state dict (either layout) -> vlmkit's names. Keys under no known name keep theirs, so
    the loader reports them."""
    layout = layout_of(state)
    if layout is None:
        raise ConfigError(f"{source}: not a DeepSeek-OCR 2 checkpoint: neither model.sam_model.* (the original "
                          f"names) nor model.vision_tower.* (transformers') (keys: {first_keys(sorted(state))})")
    if layout == "mixed":
        raise ConfigError(f"{source}: mixes the original key names (model.sam_model.*, model.embed_tokens.*) with "
                          f"transformers' (model.vision_tower.*, model.language_model.*)")
    table = ORIGINAL if layout == "original" else TRANSFORMERS
    out = {}
    if layout == "transformers":
        sam = {k: v for k, v in state.items() if k.startswith(TRANSFORMERS_SAM)}
        out.update({"encoder.sam." + k: v for k, v in sam_from_deepseek_ocr2(sam).items()})
        state = {k: v for k, v in state.items() if not k.startswith(TRANSFORMERS_SAM)}
    for key, value in state.items():
        out[_rename(key, table) or key] = value
    return merge_experts(out) if layout == "original" else out


def to_original(state):
    """vlmkit's names -> the original release's (what transformers' save_pretrained writes), one tensor per expert."""
    out = {}
    for key, value in split_experts(state).items():
        name = _rename(key, ORIGINAL, forward=False)
        if name is None:
            raise ValueError(f"{key}: no DeepSeek-OCR 2 checkpoint name for it")
        out[name] = value
    return out


_EXPERT = re.compile(r"^(decoder\.model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def merge_experts(state):
    """One tensor per expert -> transformers' stacked ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I).
    A layer whose experts are not all there (0..E-1, each with gate, up and down) stays as it is."""
    layers, out = {}, {}
    for key, value in state.items():
        m = _EXPERT.match(key)
        if m:
            layers.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
        else:
            out[key] = value
    for prefix, parts in layers.items():
        n = 1 + max(j for j, _ in parts)
        if len(parts) != 3 * n or any((j, w) not in parts for j in range(n) for w in ("gate", "up", "down")):
            out.update({f"{prefix}.{j}.{w}_proj.weight": v for (j, w), v in parts.items()})
            continue
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[j, "gate"], parts[j, "up"]]) for j in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[j, "down"] for j in range(n)])
    return out


def split_experts(state):
    """The inverse of merge_experts; the pieces are copies (a file cannot hold views of one tensor)."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if not (prefix.endswith(".mlp.experts") and name in ("gate_up_proj", "down_proj")):
            out[key] = value
        elif name == "down_proj":
            out.update({f"{prefix}.{j}.down_proj.weight": w.clone() for j, w in enumerate(value)})
        else:
            for j, w in enumerate(value):
                gate, up = w.chunk(2)
                out[f"{prefix}.{j}.gate_proj.weight"], out[f"{prefix}.{j}.up_proj.weight"] = gate.clone(), up.clone()
    return out


def read_part(folder, vision, source):
    """The vision tensors (encoder, projector, separator) or the language model's of a checkpoint folder, in
    vlmkit's names; only those are read from disk."""
    theirs = [t for table in (ORIGINAL, TRANSFORMERS) for ours, t in table if ours.startswith(VISION_PARTS)]
    vision_keys = (*theirs, TRANSFORMERS_SAM)
    state = to_vlmkit(read_state_dict(folder, keep=lambda k: k.startswith(vision_keys) == vision), source)
    # a key under no known name stays in the part that read it, whose load then reports it
    if vision:
        return {k: v for k, v in state.items() if not k.startswith("decoder.")}
    return {k: v for k, v in state.items() if not k.startswith(VISION_PARTS)}


# ---- config and sizes

def checkpoint_folder(weights, where):
    """(local folder, its config.json as a dict) for a recipe's ``weights`` (a folder or a hub name).

    While the model is built on the meta device (a dry run) only the json files are fetched, and a checkpoint
    that cannot be had gives (None, None): the recipe's sizes, else the release's, stand in."""
    if on_meta():
        try:
            return checkpoint_folder_files(resolve(weights, where, allow_patterns=["*.json"]), weights, where)
        except ConfigError as e:
            print0(f"{e}; built on the meta device, so the recipe's (else the release's) sizes stand in")
            return None, None
    return checkpoint_folder_files(resolve(weights, where), weights, where)


def checkpoint_folder_files(folder, weights, where):
    if not os.path.isdir(folder):
        raise ConfigError(f"{where}: {weights} is not a folder; a DeepSeek-OCR 2 checkpoint is a save_pretrained "
                          f"folder (config.json and its safetensors)")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: {folder} has no config.json")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("model_type") != "deepseek_ocr2":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ConfigError(f"{path}: model_type {found!r}, not transformers' deepseek_ocr2 (save the model with "
                          f"transformers 5's DeepseekOcr2ForConditionalGeneration.save_pretrained)")
    return folder, config


def sam_from_config(sam_config, source):
    """transformers' SAM config (a dict) -> SAMEncoder's arguments; a feature SAMEncoder lacks is an error."""
    for key, value in SAM_FIXED.items():
        if key in sam_config and sam_config[key] != value:
            raise ConfigError(f"{source}: sam_config.{key} is {sam_config[key]!r}; vlmkit's SAM has {value!r}")
    args = {ours: sam_config[theirs] for theirs, ours in SAM_NAMES.items() if theirs in sam_config}
    mlp_dim = sam_config.get("mlp_dim")
    if mlp_dim is not None and mlp_dim != int(args["dim"] * args.get("mlp_ratio", 4.0)):
        raise ConfigError(f"{source}: sam_config.mlp_dim {mlp_dim} is not hidden_size * mlp_ratio")
    return args


def settle(defaults, from_file, given, where, source):
    """The settings a part is built with: the recipe's (``given``) over the file's over ``defaults``. With a
    checkpoint the recipe may only repeat what it says."""
    for key, value in given.items():
        if from_file is not None and key in from_file and _plain(from_file[key]) != _plain(value):
            raise ConfigError(f"{where}.{key}: {value!r} in the recipe but {from_file[key]!r} in {source}; "
                              f"leave it out to take the checkpoint's")
    return {**defaults, **(from_file or {}), **given}


def hf_config(config_class, settings, given):
    """transformers' ``config_class`` built from ``settings``; the recipe's own keys (``given``) must be its fields
    (transformers would keep a misspelt one as an unused attribute)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a field of transformers' {config_class.__name__}")
    try:
        return config_class(**settings)
    except Exception as e:  # huggingface_hub's strict validation raises its own error types
        raise ConfigError(" ".join(str(e).split())) from e


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def refresh_rotary(module):
    """Recompute the rotary tables of transformers' modules under ``module``, fp32 on their device: they are
    non-persistent buffers, which to_empty() (meta -> device, core.generate's rebuild) leaves uninitialised
    and a cast to bf16 would round."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for rotary in module.modules():
        if not hasattr(rotary, "original_inv_freq") or rotary.inv_freq.is_meta:
            continue
        init = (rotary.compute_default_rope_parameters if rotary.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[rotary.rope_type])
        inv_freq, rotary.attention_scaling = init(rotary.config)
        rotary.inv_freq = inv_freq.to(device=rotary.inv_freq.device, dtype=torch.float32)
        rotary.original_inv_freq = rotary.inv_freq.clone()
