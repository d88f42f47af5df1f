"""Freeze policies by parameter-name glob, and the presets from the project's history.

``{name: glob, frozen: ["encoder.sam.*"], trainable: [...], lr_multipliers: {"encoder.clip.*": 0.1}}``

Patterns match full parameter names (``encoder.sam.blocks.0.attn.qkv.weight``)
with fnmatch. ``trainable`` patterns are applied after ``frozen`` ones, so
``frozen: ["*"], trainable: ["encoder.sam.net_*"]`` trains only the compressor
convs. ``lr_multipliers`` scale the stage's lr for the trainable parameters
they match. A pattern that matches no parameter is an error: a typo must not
silently train what was meant to be frozen.

``{name: preset, preset: NAME}`` names a known split (DESIGN.md history):
``all_trainable``, ``sam_frozen`` (DeepSeek-OCR stage 2), and
``compressor_and_projector`` (only net_2/net_3, the projector and the layout
tokens train: the LLaVA-style phase 1 of the original project).
"""
from fnmatch import fnmatch

from core import ConfigError, hookimpl

PRESETS = {
    "all_trainable": {},
    "sam_frozen": {"frozen": ["encoder.sam.*"]},
    "compressor_and_projector": {"frozen": ["*"], "trainable": ["encoder.sam.net_*", "projector.*",
                                                                "image_newline", "view_separator"]},
}


class GlobFreeze:
    def __init__(self, frozen=(), trainable=(), lr_multipliers=None):
        self.frozen, self.trainable = list(frozen), list(trainable)
        self.lr_multipliers = dict(lr_multipliers or {})

    @hookimpl
    def vlmkit_freeze(self, model, stage):
        names = [n for n, _ in model.named_parameters()]
        for pattern in self.frozen + self.trainable + list(self.lr_multipliers):
            if not any(fnmatch(n, pattern) for n in names):
                raise ConfigError(f"stage {stage.name}: freeze pattern {pattern!r} matches no parameter "
                                  f"(names look like {names[0]!r})")
        multipliers = {}
        for name, p in model.named_parameters():
            if any(fnmatch(name, pat) for pat in self.frozen):
                p.requires_grad_(False)
            if any(fnmatch(name, pat) for pat in self.trainable):
                p.requires_grad_(True)
            for pattern, factor in self.lr_multipliers.items():  # this parameter's requires_grad is final here
                if p.requires_grad and fnmatch(name, pattern):
                    multipliers[name] = multipliers.get(name, 1.0) * factor
        return multipliers


class PresetFreeze(GlobFreeze):
    def __init__(self, preset):
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        super().__init__(**PRESETS[preset])


@hookimpl
def vlmkit_register(registry):
    registry.add("freeze", "glob", GlobFreeze)
    registry.add("freeze", "preset", PresetFreeze)
