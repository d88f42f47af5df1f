"""Pretrained vision weights: other projects' key names -> vlmkit's (docs/architecture.md §2.7, §3).

A helper module: it registers nothing. The mapping functions are pure (a state
dict in, a vlmkit-named state dict out); reading files and the checked,
all-or-nothing copy are ``core.weights``. ``load_sam`` / ``load_clip`` /
``load_deepencoder`` tie the two together for the encoder plugins and print
what was loaded from where and what starts fresh.

SAM layouts (``SAMEncoder(weights=..., weights_format=...)``):
- ``hf``: transformers ``SamModel`` / ``SamVisionModel`` (``vision_encoder.`` or bare);
  no compressor, so net_2 / net_3 start fresh.
- ``segment_anything``: the original ``sam_vit_b_01ec64.pth`` (``image_encoder.``);
  names are DeepSeek-OCR's already; net_2 / net_3 start fresh.
- ``deepseek_ocr2``: transformers' ``deepseek_ocr2`` SAM encoder (HF SAM names plus
  ``proj.conv1`` / ``proj.conv2`` = net_2 / net_3), bare or under ``vision_tower.sam_encoder.``.
- ``deepseek_ocr``: DeepSeek-OCR's own checkpoint (``model.sam_model.`` or ``sam_model.``;
  also DeepSeek-OCR-2's original files), compressor included.
- ``vlmkit``: SAMEncoder's own names, bare or under ``sam.`` / ``encoder.sam.`` / ``encoder.``.
CLIP layouts (``CLIPVisionTower(weights=..., weights_format=...)``): ``hf``
(``CLIPModel`` / ``CLIPVisionModel``), ``deepseek_ocr`` (``model.vision_model.``) and ``vlmkit``.
"""
import os
import re

import torch

from core import hub
from core.distributed import print0
from core.errors import ConfigError
from core.weights import empty_report, first_keys, load_state, on_meta, read_state_dict, resolve_weights_path

SAM_FORMATS = ("hf", "segment_anything", "deepseek_ocr2", "deepseek_ocr", "vlmkit")
CLIP_FORMATS = ("hf", "deepseek_ocr", "vlmkit")
# checkpoints that carry no compressor: net_2 / net_3 start fresh when loading them
SAM_FORMATS_WITHOUT_COMPRESSOR = ("hf", "segment_anything")

# DeepSeek-OCR's language model: never the encoder's business (docs/architecture.md §2.7)
_DSO_LM = ("embed_tokens.", "layers.", "norm.", "lm_head.")


def _rename(key, rules):
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key, count=1)
    return key


def _strip(sd, prefix):
    """The keys under ``prefix``, without it; every other key dropped."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _under(sd, prefixes):
    """The first prefix that some key starts with, or None."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return prefix
    return None


# ---- SAM ----------------------------------------------------------------------------------------

# HF SAM vision names -> DeepSeek-OCR / vlmkit names (docs/architecture.md §3.1)
_HF_SAM_RULES = (
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"^neck\.conv1\.", "neck.0."),
    (r"^neck\.layer_norm1\.", "neck.1."),
    (r"^neck\.conv2\.", "neck.2."),
    (r"^neck\.layer_norm2\.", "neck.3."),
)
# transformers deepseek_ocr2: the compressor is `proj` (its conversion_mapping: sam_model.net_2 <-> proj.conv1)
_DS2_SAM_RULES = _HF_SAM_RULES + (
    (r"^proj\.conv1\.", "net_2."),
    (r"^proj\.conv2\.", "net_3."),
)
_HF_SAM_DROP = ("prompt_encoder.", "mask_decoder.", "shared_image_embedding.")


def sam_from_hf(sd):
    """transformers SamModel / SamVisionModel (keys under ``vision_encoder.`` or bare) -> SAMEncoder names.

    The prompt encoder, mask decoder and shared image embedding are dropped; any
    other key is passed on (renamed where a rule applies) so the loader reports it.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith(_HF_SAM_DROP):
            continue
        if key.startswith("vision_encoder."):
            key = key[len("vision_encoder."):]
        out[_rename(key, _HF_SAM_RULES)] = value
    return out


def sam_from_segment_anything(sd):
    """segment-anything's ``sam_vit_b_01ec64.pth``: strip ``image_encoder.``, drop the prompt encoder and mask
    decoder."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            continue
        if key.startswith("image_encoder."):
            key = key[len("image_encoder."):]
        out[key] = value
    return out


_DSO_SAM_PREFIXES = ("model.sam_model.", "sam_model.")  # DeepSeek-OCR's SAM, ``model.`` stripped by vLLM
_DS2_SAM_PREFIXES = ("model.vision_tower.sam_encoder.", "vision_tower.sam_encoder.", "sam_encoder.")


def sam_from_deepseek_ocr2(sd):
    """transformers ``deepseek_ocr2`` SAM-with-compressor -> SAMEncoder names (net_2 / net_3 included).

    The encoder saved alone has bare keys; inside the whole model they sit under
    ``model.vision_tower.sam_encoder.`` and everything else (the Qwen2 encoder, the LM) is dropped.
    """
    prefix = _under(sd, _DS2_SAM_PREFIXES)
    out = {}
    for key, value in sd.items():
        if prefix is not None:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        out[_rename(key, _DS2_SAM_RULES)] = value
    return out


def sam_from_deepseek_ocr(sd):
    """DeepSeek-OCR's checkpoint (``model.sam_model.*``, or ``sam_model.*`` as vLLM strips it): the SAM part."""
    prefix = _under(sd, _DSO_SAM_PREFIXES)
    return dict(sd) if prefix is None else _strip(sd, prefix)


def _vlmkit_sub(sd, prefixes, marker):
    """vlmkit names, bare or under the first of ``prefixes`` that holds ``marker``."""
    if marker in sd:
        return dict(sd)
    for prefix in prefixes:
        if prefix + marker in sd:
            return _strip(sd, prefix)
    return dict(sd)


def sam_from_vlmkit(sd):
    return _vlmkit_sub(sd, ("sam.", "encoder.sam.", "encoder."), "patch_embed.proj.weight")


SAM_MAPPERS = {
    "hf": sam_from_hf,
    "segment_anything": sam_from_segment_anything,
    "deepseek_ocr2": sam_from_deepseek_ocr2,
    "deepseek_ocr": sam_from_deepseek_ocr,
    "vlmkit": sam_from_vlmkit,
}


def detect_sam_format(sd):
    """The SAM layout a state dict is in, from its key names; None when none fits."""
    keys = list(sd)
    if any(k.startswith(_DSO_SAM_PREFIXES) for k in keys):
        return "deepseek_ocr"
    if any(k.startswith("image_encoder.") for k in keys):
        return "segment_anything"
    if any(k.startswith(_DS2_SAM_PREFIXES) for k in keys) or "proj.conv1.weight" in sd:
        return "deepseek_ocr2"
    if any(k.startswith(("vision_encoder.", "patch_embed.projection.")) for k in keys):
        return "hf"
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "vlmkit"
    return None


# ---- CLIP ---------------------------------------------------------------------------------------

_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_CLIP_DROP = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "post_layernorm.")


def _fill_position_ids(out, prefix=""):
    """DeepSeek-OCR keeps ``position_ids`` as a persistent buffer; files that lack it get arange
    (docs/architecture.md §3.2). ``prefix``: where the CLIP tower's keys sit (``clip.`` in a whole DeepEncoder)."""
    pos = out.get(f"{prefix}embeddings.position_embedding.weight")
    if pos is not None and f"{prefix}embeddings.position_ids" not in out:
        out[f"{prefix}embeddings.position_ids"] = torch.arange(pos.shape[0])[None]
    return out


def clip_from_hf(sd):
    """transformers CLIPModel / CLIPVisionModel -> CLIPVisionTower names (docs/architecture.md §3.2).

    Keys under ``vision_model.`` (CLIPModel, older CLIPVisionModel) or bare (CLIPVisionModel
    in transformers 5); q, k, v fused into ``qkv_proj`` (cat on dim 0, in that order);
    ``encoder.layers`` -> ``transformer.layers``; post_layernorm, the projections, the text
    model and logit_scale dropped; ``position_ids`` filled with arange when absent.
    A layer with only some of q, k, v keeps those under their own names, so the loader reports them.
    """
    if any(k.startswith("vision_model.") for k in sd):
        sd = _strip(sd, "vision_model.")
    out, parts = {}, {}
    for key, value in sd.items():
        if key.startswith(_HF_CLIP_DROP):
            continue
        m = _QKV.match(key)
        if m:
            parts.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = (key, value)
            continue
        out[re.sub(r"^encoder\.layers\.", "transformer.layers.", key)] = value
    for (layer, kind), qkv in sorted(parts.items()):
        if set(qkv) == {"q", "k", "v"}:
            fused = torch.cat([qkv[s][1] for s in "qkv"], dim=0)
            out[f"transformer.layers.{layer}.self_attn.qkv_proj.{kind}"] = fused
        else:
            out.update(dict(qkv.values()))
    return _fill_position_ids(out)


def clip_from_deepseek_ocr(sd):
    """DeepSeek-OCR's checkpoint (``model.vision_model.*`` or ``vision_model.*``): the CLIP part, DeepSeek-OCR names."""
    prefix = _under(sd, ("model.vision_model.", "vision_model."))
    return _fill_position_ids(dict(sd) if prefix is None else _strip(sd, prefix))


def clip_from_vlmkit(sd):
    return _vlmkit_sub(sd, ("clip.", "encoder.clip.", "encoder."), "pre_layrnorm.weight")


CLIP_MAPPERS = {"hf": clip_from_hf, "deepseek_ocr": clip_from_deepseek_ocr, "vlmkit": clip_from_vlmkit}


def detect_clip_format(sd):
    keys = list(sd)
    if any(".self_attn.q_proj." in k for k in keys) or any(k.startswith(("encoder.layers.", "vision_model.encoder."))
                                                           for k in keys):
        return "hf"
    if any(k.startswith(("model.vision_model.", "vision_model.")) for k in keys):
        return "deepseek_ocr"
    if any(k.endswith("pre_layrnorm.weight") for k in keys):
        return "vlmkit"
    return None


# ---- the whole DeepEncoder from DeepSeek-OCR -------------------------------------------------------

def deepencoder_from_deepseek_ocr(sd):
    """DeepSeek-OCR's checkpoint -> (DeepEncoder state dict, extras for the whole model) (docs/architecture.md §2.7).

    ``model.sam_model.*`` -> ``sam.*``, ``model.vision_model.*`` -> ``clip.*``; the
    language model is dropped. The extras belong to the VisionLanguageModel, not the
    encoder: ``projector.*`` (``projector.layers.{weight,bias}``), ``image_newline`` and
    ``view_separator`` (spelt ``view_seperator`` in the file). Keys under no known name
    stay in the first dict, so the loader reports them. ``model.`` may be absent (vLLM strips it).
    """
    p = "model." if any(k.startswith("model.") for k in sd) else ""
    enc, extras = {}, {}
    for key, value in sd.items():
        rest = key[len(p):] if key.startswith(p) else None
        if rest is None:
            if not key.startswith("lm_head."):
                enc[key] = value
        elif rest.startswith("sam_model."):
            enc["sam." + rest[len("sam_model."):]] = value
        elif rest.startswith("vision_model."):
            enc["clip." + rest[len("vision_model."):]] = value
        elif rest.startswith("projector."):
            extras[rest] = value
        elif rest == "image_newline":
            extras["image_newline"] = value
        elif rest == "view_seperator":
            extras["view_separator"] = value
        elif not rest.startswith(_DSO_LM):
            enc[key] = value
    return _fill_position_ids(enc, "clip."), extras


def _is_dso_lm_key(key):
    rest = key[len("model."):] if key.startswith("model.") else key
    return rest.startswith(_DSO_LM) or key.startswith("lm_head.")


# ---- loading, for the plugins ---------------------------------------------------------------------

# what is downloaded of a hub repository named as weights: configs and safetensors (a .pth is named as a file)
HUB_WEIGHT_FILES = ["*.json", "*.safetensors"]


def locate(path, who, module):
    """The weight file for ``path``: a local file or folder, or a hub name (core/hub.py) downloaded once.

    On the meta device (a dry run) nothing is read: a local path must exist, a hub name is not looked up
    (the stage that loads it does); None then.
    """
    if on_meta(module) and hub.parse(path) is not None and not os.path.exists(os.path.expanduser(str(path))):
        print0(f"{who}: built on the meta device, weights {path} (a hub name) not looked up")
        return None
    located = resolve_weights_path(hub.resolve(path, f"{who}.weights", HUB_WEIGHT_FILES))
    if on_meta(module):
        print0(f"{who}: built on the meta device, weights {located} not read")
    return located


def _check_format(who, fmt, formats):
    if fmt != "auto" and fmt not in formats:
        raise ConfigError(f"{who}.weights_format: {fmt!r} is not one of auto, {', '.join(formats)}")


def _fresh_note(report):
    return f"; starting fresh (not in the file): {first_keys(report['fresh'], 8)}" if report["fresh"] else ""


def _load_layout(module, path, fmt, who, kind, formats, detect, mappers, skip_for=lambda fmt: ()):
    """Read a weight file, pick its layout (given or detected), map the names and load all-or-nothing."""
    _check_format(who, fmt, formats)
    path = locate(path, who, module)
    if on_meta(module):  # a dry run: the file is not read, but a local one must be there
        return empty_report()
    sd = read_state_dict(path)
    if fmt == "auto":
        fmt = detect(sd)
        if fmt is None:
            raise ConfigError(f"{path}: cannot tell which {kind} weight layout this is "
                              f"(keys: {first_keys(sorted(sd))}); set {who}.weights_format to one of "
                              f"{', '.join(formats)}")
    report = load_state(module, mappers[fmt](sd), f"{path} ({fmt} layout)", skip_prefixes=skip_for(fmt),
                        name=f"{who} ({type(module).__name__})")
    print0(f"{who}: loaded {len(report['loaded'])} tensors from {path} ({fmt} layout){_fresh_note(report)}")
    return report


def load_sam(module, path, fmt="auto", who="sam"):
    """Load a SAM weight file into a SAMEncoder; return the core.weights report (empty on meta).

    HF and segment-anything files have no compressor: net_2/net_3 start fresh, and the log says so.
    """
    def skip_for(fmt):
        return tuple(f"{n}." for n in module.compressor) if fmt in SAM_FORMATS_WITHOUT_COMPRESSOR else ()
    return _load_layout(module, path, fmt, who, "SAM", SAM_FORMATS, detect_sam_format, SAM_MAPPERS, skip_for)


def load_clip(module, path, fmt="auto", who="clip"):
    """Load a CLIP weight file into a CLIPVisionTower; return the core.weights report (empty on meta)."""
    return _load_layout(module, path, fmt, who, "CLIP", CLIP_FORMATS, detect_clip_format, CLIP_MAPPERS)


def load_deepencoder(module, path, who="deepencoder"):
    """Load DeepSeek-OCR's checkpoint into a DeepEncoder; return (report, extras) (empty on meta).

    Only the vision tensors are read (a safetensors checkpoint's language model stays on disk).
    """
    path = locate(path, who, module)
    if on_meta(module):
        return empty_report(), {}
    sd = read_state_dict(path, keep=lambda k: not _is_dso_lm_key(k))
    if not any(k.startswith(_DSO_SAM_PREFIXES) for k in sd):
        raise ConfigError(f"{path}: not a DeepSeek-OCR checkpoint: no model.sam_model.* keys "
                          f"(keys: {first_keys(sorted(sd))})")
    enc, extras = deepencoder_from_deepseek_ocr(sd)
    report = load_state(module, enc, f"{path} (DeepSeek-OCR layout)", name=f"{who} ({type(module).__name__})")
    n_sam = sum(k.startswith("sam.") for k in report["loaded"])
    n_clip = sum(k.startswith("clip.") for k in report["loaded"])
    kept = (f"; kept for the model builder: {first_keys(sorted(extras), 8)}" if extras
            else "; the file has no projector, image_newline or view_seperator")
    print0(f"{who}: loaded {len(report['loaded'])} tensors from {path} (DeepSeek-OCR layout): "
          f"sam {n_sam}, clip {n_clip}{kept}")
    return report, extras
