"""Named components by kind, and plugin discovery.

Plugins come from three places, loaded in this order:
1. built-ins: every module under the ``plugins`` package (found by walking it, not by name);
2. installed distributions' entry points in the group ``vlmkit``;
3. the ``plugins:`` of a recipe: module names, or ``.py`` files (a relative path is taken from
   the recipe's folder, core/recipe.py resolves it).
A later plugin may not reuse a (kind, name) pair that an earlier one added; the error names both.

Every plugin module is registered with the run's plugin manager (core/hooks.py checks its hook names,
arguments and options, and makes a fault name the plugin). A component is checked against its kind's
contract (core/contracts.py) when it is built, a behaviour object also by the hook layer's checks.
"""
import importlib
import inspect
import pkgutil

from core import contracts, hooks
from core.errors import ConfigError, PluginError, closest, plugin_call
from core.pluginfiles import import_plugin

KINDS = ("encoder", "projector", "decoder", "tokenizer", "dataset", "source", "metric", "metric_input",
         "regulariser", "freeze", "adapter", "logger")
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
            raise ConfigError(f"plugin {self.source}: unknown component kind {kind!r}{closest(kind, KINDS)}; "
                              f"kinds are {', '.join(KINDS)}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"plugin {self.source}: a {kind} needs a name (a non-empty string), not {name!r}")
        if not callable(factory):  # else the first recipe that names it fails far from the plugin
            raise ConfigError(f"plugin {self.source}: {kind} {name!r}: the factory must be a class or function, "
                              f"not {type(factory).__name__}")
        if name in self._factories[kind]:
            raise ConfigError(f"plugin {self.source}: {kind} {name!r} is already registered by "
                              f"{self._sources[kind][name]}")
        self._factories[kind][name] = factory
        self._sources[kind][name] = self.source

    def names(self, kind):
        return sorted(self._factories[kind])

    def source_of(self, kind, name):
        return self._sources[kind].get(name, "<unknown>")

    def get(self, kind, name, where=None):
        if kind not in self._factories:
            raise ConfigError(f"unknown component kind {kind!r}")
        if name not in self._factories[kind]:
            known = ", ".join(self.names(kind)) or "none"
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {kind} {name!r}{closest(name, self.names(kind))}; known: {known}")
        return self._factories[kind][name]

    def build(self, kind, name, where=None, context=None, **kwargs):
        """Call the factory with kwargs and check what it returns against the kind's contract.

        ``context`` holds objects the core can offer (core.contracts.CONTEXT: model, tokenizer,
        run_dir, ...): each is passed only to factories whose signature names it, never from the
        recipe. Unknown or missing arguments, and a ConfigError the factory raises about its
        arguments, name the recipe key; any other exception is a fault in the plugin's code and
        becomes a PluginError naming the plugin, with the original traceback. A behaviour object gets
        every check registering it will run (``hooks.check_plugin``: hook names, arguments, options),
        so it fails when the recipe is checked, not when its hook is first called.
        """
        factory = self.get(kind, name, where)
        at = where or f"{kind} {name!r}"
        kwargs = self._arguments(factory, kind, name, at, where, context, kwargs)
        try:
            component = factory(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{at}: {kind} {name!r}: {e}") from e
        except Exception as e:  # the plugin's own bug: its author needs the traceback
            raise PluginError(f"{at}: {kind} {name!r} from {self.source_of(kind, name)} failed while being built: "
                              f"{type(e).__name__}: {e}") from e
        label = f"{self.source_of(kind, name)} ({at}: {kind} {name!r})"
        if kind in contracts.BEHAVIOUR_HOOKS:  # it will be registered with pluggy: all that checks, now
            hooks.check_plugin(component, label)
        else:  # never registered: a vlmkit_* method of it would never be called
            hooks.check_hook_names(component, label)
        missing = contracts.missing_members(kind, component)
        if missing:
            needs = (f"the {contracts.PROTOCOLS[kind].__name__} contract (core/contracts.py)"
                     if kind in contracts.PROTOCOLS else "@hookimpl methods (core/hookspecs.py)")
            raise ConfigError(f"{at}: {kind} {name!r} from {self.source_of(kind, name)} lacks "
                              f"{', '.join(missing)}, required by {needs}")
        return component

    @staticmethod
    def _arguments(factory, kind, name, at, where, context, kwargs):
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            return kwargs
        params = sig.parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        kwargs = dict(kwargs)
        for key in context or {}:
            if key in kwargs:
                raise ConfigError(f"{where or kind}.{key}: is set by vlmkit, not by the recipe")
            if key in params:
                kwargs[key] = context[key]
        if not takes_any:
            for key in kwargs:
                if key not in accepted:
                    raise ConfigError(f"{at}.{key}: {kind} {name!r} takes no argument {key!r}"
                                      f"{closest(key, accepted)}; it takes: {', '.join(accepted)}")
        for key, value in kwargs.items():  # the recipe's values against the defaults' types, where they tell
            if key in params and key not in (context or {}):
                _check_type(params[key].default, value, f"{at}.{key}")
        missing = [n for n, p in params.items()
                   if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and n not in kwargs]
        if missing:
            raise ConfigError(f"{at}: {kind} {name!r} needs {', '.join(missing)}")
        return kwargs

    def build_all(self, kind, components, where, context=None):
        """Build a recipe list of components (``.name`` + ``.args``); errors name ``where.INDEX``."""
        return [self.build(kind, c.name, where=f"{where}.{j}", context=context, **c.args)
                for j, c in enumerate(components)]

    def listing(self):
        """Rows of (kind, name, source), sorted."""
        return [(kind, name, self._sources[kind][name]) for kind in KINDS for name in self.names(kind)]


def _check_type(default, value, where):
    """A string where the default is a number, or a non-bool where it is a bool, fails at load naming the key,
    not inside torch at the first forward (``eps: "1e-5"``) or silently (``allow_pickle: "no"`` is true)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
    elif isinstance(default, (int, float)) and isinstance(value, str):
        raise ConfigError(f"{where}: expected a number, got the string {value!r}")


# ---- discovery

def _builtin_modules():
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.walk_packages(package.__path__, prefix=BUILTIN_PACKAGE + "."):
        if not info.ispkg:
            yield f"built-in {info.name}", importlib.import_module(info.name)


def _entry_point_plugins():
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?")
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must say who it is
            raise PluginError(f"entry point {ep.name!r} of {dist} ({ep.value}) failed to load: "
                              f"{type(e).__name__}: {e}") from e
        yield f"entry point {ep.name} ({dist})", plugin


def load_plugins(extra_modules=(), entry_points=True):
    """Discover plugins and return (plugin_manager, registry) with every component registered.

    Registration runs in the load order above (not pluggy's call order), so a duplicate name is
    blamed on the plugin that came second."""
    pm = hooks.new_plugin_manager()
    found = list(_builtin_modules())
    if entry_points:
        found += list(_entry_point_plugins())
    found += [(f"recipe plugin {m}", import_plugin(m, f"plugins.{i}")) for i, m in enumerate(extra_modules)]
    loaded = []
    for label, plugin in found:
        if any(plugin is earlier for _, earlier in loaded):
            continue  # the same module through two routes (an entry point to a built-in, say)
        hooks.register(pm, plugin, label)
        loaded.append((label, plugin))
    registry = Registry()
    for label, plugin in loaded:
        hook = getattr(plugin, "vlmkit_register", None)
        if hook is None:
            continue
        registry.source = label
        plugin_call(f"plugin {label}", hook, _name="vlmkit_register", registry=registry)
    registry.source = "<direct>"
    return pm, registry
