"""LoRA adapters through peft: a stage's ``adapters: [{name: lora, r: 16, alpha: 32, dropout: 0.05, targets: [...]}]``.

``targets`` are fnmatch globs over module names (``decoder.*.attn.*``, ``encoder.clip.*``), as freeze
globs are over parameter names; every matched layer peft's LoRA supports (Linear, Conv1d/2d/3d,
Embedding) gets an adapter, containers and other layers are passed over. A pattern that matches no
such layer is an error. ``use_dora`` (weight-decomposed LoRA) and ``use_rslora`` (alpha / sqrt(r)
instead of alpha / r) are peft's own.

peft's layer-level API puts its LoRA layers in place of the matched ones (``inject_adapter_in_model``
with the matched names as ``target_modules``): the model stays vlmkit's, only those layers change,
and merging folds each back into a plain layer. peft is optional: ``pip install vlmkit[lora]``.
"""
from fnmatch import fnmatch

from torch import nn

from core import ConfigError, hookimpl

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
ADAPTER_NAME = "default"  # peft's name for the adapter inside a layer: parameters are lora_A.default.weight ...


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("the lora adapter needs peft: pip install 'vlmkit[lora]' (or pip install peft)") from None
    return peft


class LoRA:
    def __init__(self, targets, r=16, alpha=32.0, dropout=0.0, use_dora=False, use_rslora=False):
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"targets must be a non-empty list of module-name globs, not {targets!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"r must be a whole number of at least 1, not {r!r}")
        if not alpha > 0:
            raise ConfigError(f"alpha must be positive, not {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), not {dropout!r}")
        self.peft = _peft()
        self.targets, self.r, self.alpha, self.dropout = list(targets), r, float(alpha), float(dropout)
        self.use_dora, self.use_rslora = use_dora, use_rslora
        self.wrapped = []  # the module names this adapter replaced, for merging

    def _matched(self, model, frozen):
        """The names of the layers the targets match, less those a component freezes by design (never called)."""
        tuner = self.peft.tuners.tuners_utils.BaseTunerLayer
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED)
                  and not all(f"{n}.{p}" in frozen for p, _ in m.named_parameters(recurse=False))}
        for pattern in self.targets:
            if not any(fnmatch(n, pattern) for n in layers):
                raise ConfigError(f"target {pattern!r} matches no layer LoRA can adapt "
                                  f"(Linear, Conv, Embedding; names look like {next(iter(layers), '?')!r})")
        names = [n for n in layers if any(fnmatch(n, p) for p in self.targets)]
        taken = [n for n, m in model.named_modules() if isinstance(m, tuner)]
        for name in names:
            if any(name == t or name.startswith(t + ".") for t in taken):
                raise ConfigError(f"{name} already has an adapter (another entry of this stage's adapters); "
                                  f"one adapter per layer")
        return names

    @hookimpl
    def vlmkit_adapter_attach(self, model, frozen):
        names = self._matched(model, frozen)
        config = self.peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names,
                                      use_dora=self.use_dora, use_rslora=self.use_rslora, bias="none")
        self.peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        vars(model).pop("peft_config", None)  # peft leaves its config on the model; vlmkit's meta json keeps ours
        self.wrapped = names

    @hookimpl
    def vlmkit_adapter_merge(self, model):
        for name in self.wrapped:
            layer = model.get_submodule(name)
            layer.merge(safe_merge=True)  # refuses to write non-finite weights
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
        self.wrapped = []


@hookimpl
def vlmkit_register(registry):
    registry.add("adapter", "lora", LoRA)
