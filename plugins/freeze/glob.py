"""Freeze policies by parameter-name glob: ``{name: glob, frozen: ["encoder.sam.*"]}``.

Patterns match full parameter names (``encoder.sam.blocks.0.attn.qkv.weight``)
with fnmatch. ``trainable`` patterns are applied after ``frozen`` ones, so
``frozen: ["encoder.*"], trainable: ["encoder.sam.net_*"]`` trains only the
compressor convs. A pattern that matches no parameter is an error: a typo must
not silently train what was meant to be frozen.
"""
from fnmatch import fnmatch

from core import ConfigError, hookimpl


class GlobFreeze:
    def __init__(self, frozen=(), trainable=()):
        self.frozen, self.trainable = list(frozen), list(trainable)

    @hookimpl
    def vlmkit_freeze(self, model, stage):
        names = [n for n, _ in model.named_parameters()]
        for pattern in self.frozen + self.trainable:
            if not any(fnmatch(n, pattern) for n in names):
                raise ConfigError(f"stage {stage.name}: freeze pattern {pattern!r} matches no parameter "
                                  f"(names look like {names[0]!r})")
        for name, p in model.named_parameters():
            if any(fnmatch(name, pat) for pat in self.frozen):
                p.requires_grad_(False)
            if any(fnmatch(name, pat) for pat in self.trainable):
                p.requires_grad_(True)


@hookimpl
def vlmkit_register(registry):
    registry.add("freeze", "glob", GlobFreeze)
