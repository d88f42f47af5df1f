"""Named components by kind, and plugin discovery.

Plugins come from three places, loaded in this order:
1. built-ins: every module under the ``plugins`` package (found by walking it,
   not by name);
2. installed distributions' entry points in the group ``vlmkit``;
3. module paths listed under ``plugins:`` in a recipe.
A later plugin may not reuse a (kind, name) pair that an earlier one added.
"""
import difflib
import importlib
import inspect
import pkgutil

import pluggy

from core import hookspecs
from core.errors import ConfigError

KINDS = ("encoder", "projector", "decoder", "tokenizer", "dataset", "metric",
         "regulariser", "freeze", "logger")
ENTRY_POINT_GROUP = "vlmkit"
BUILTIN_PACKAGE = "plugins"


class Registry:
    """Factories by (kind, name), with where each came from."""

    def __init__(self):
        self._factories = {kind: {} for kind in KINDS}
        self._sources = {kind: {} for kind in KINDS}
        self.source = "<direct>"  # set by load_plugins while a plugin registers

    def add(self, kind, name, factory):
        if kind not in self._factories:
            raise ConfigError(f"plugin {self.source}: unknown component kind {kind!r}{_closest(kind, KINDS)}; "
                              f"kinds are {', '.join(KINDS)}")
        if name in self._factories[kind]:
            raise ConfigError(f"plugin {self.source}: {kind} {name!r} is already registered by "
                              f"{self._sources[kind][name]}")
        self._factories[kind][name] = factory
        self._sources[kind][name] = self.source

    def names(self, kind):
        return sorted(self._factories[kind])

    def get(self, kind, name, where=None):
        if kind not in self._factories:
            raise ConfigError(f"unknown component kind {kind!r}")
        if name not in self._factories[kind]:
            known = ", ".join(self.names(kind)) or "none"
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {kind} {name!r}{_closest(name, self.names(kind))}; known: {known}")
        return self._factories[kind][name]

    def build(self, kind, name, where=None, context=None, **kwargs):
        """Call the factory with kwargs; unknown or missing arguments name the recipe key.

        ``context`` holds objects the core can offer (model, tokenizer, run_dir): each
        is passed only to factories whose signature names it, never from the recipe.
        """
        factory = self.get(kind, name, where)
        at = where or f"{kind} {name!r}"
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            params = sig.parameters
            takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
            accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            for key in context or {}:
                if key in kwargs:
                    raise ConfigError(f"{where or kind}.{key}: is set by vlmkit, not by the recipe")
                if key in params:
                    kwargs[key] = context[key]
            if not takes_any:
                for key in kwargs:
                    if key not in accepted:
                        raise ConfigError(f"{at}.{key}: {kind} {name!r} takes no argument {key!r}"
                                          f"{_closest(key, accepted)}; it takes: {', '.join(accepted)}")
            missing = [n for n, p in params.items()
                       if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                       and n not in kwargs]
            if missing:
                raise ConfigError(f"{at}: {kind} {name!r} needs {', '.join(missing)}")
        try:
            return factory(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{at}: {kind} {name!r}: {e}") from e

    def build_all(self, kind, components, where, context=None):
        """Build a recipe list of components (``.name`` + ``.args``); errors name ``where.INDEX``."""
        return [self.build(kind, c.name, where=f"{where}.{j}", context=context, **c.args)
                for j, c in enumerate(components)]

    def listing(self):
        """Rows of (kind, name, source), sorted."""
        return [(kind, name, self._sources[kind][name]) for kind in KINDS for name in self.names(kind)]


def _closest(word, candidates):
    match = difflib.get_close_matches(str(word), list(candidates), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _builtin_modules():
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.walk_packages(package.__path__, prefix=BUILTIN_PACKAGE + "."):
        if not info.ispkg:
            yield info.name


def new_plugin_manager():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(extra_modules=(), entry_points=True):
    """Discover plugins and return (plugin_manager, registry) with every component registered."""
    pm = new_plugin_manager()
    for modname in _builtin_modules():
        pm.register(importlib.import_module(modname), name=modname)
    if entry_points:
        _load_entry_points(pm)
    for i, modname in enumerate(extra_modules):
        try:
            module = importlib.import_module(modname)
        except ImportError as e:
            raise ConfigError(f"plugins.{i}: cannot import plugin module {modname!r}: {e}") from e
        if pm.is_registered(module):
            continue
        pm.register(module, name=modname)
    registry = Registry()
    for impl in reversed(pm.hook.vlmkit_register.get_hookimpls()):  # pluggy keeps them last-registered-first
        registry.source = _describe_source(pm, impl.plugin_name)
        impl.function(registry=registry)
    registry.source = "<direct>"
    return pm, registry


def _load_entry_points(pm):
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?")
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must say who it is
            raise ConfigError(f"entry point {ep.name!r} of {dist} ({ep.value}) failed to load: {e}") from e
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=f"entry point {ep.name} ({dist})")


def _describe_source(pm, plugin_name):
    if plugin_name.startswith(BUILTIN_PACKAGE + "."):
        return f"built-in {plugin_name}"
    if plugin_name.startswith("entry point "):
        return plugin_name
    return f"recipe plugin {plugin_name}"
