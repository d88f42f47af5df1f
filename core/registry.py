"""Named components by kind, and plugin discovery.

Plugins come from three places, loaded in this order:
1. built-ins: every module under the ``plugins`` package (found by walking it, not by name);
2. installed distributions' entry points in the group ``vlmkit``;
3. the ``plugins:`` of a recipe: module names, or ``.py`` files (a relative path is taken from
   the recipe's folder, core/recipe.py resolves it).
A later plugin may not reuse a (kind, name) pair that an earlier one added; the error names both.

Every ``vlmkit_*`` function or method of a plugin must be a known hook marked ``@hookimpl``: a
misspelt or unmarked one is an error naming the plugin and the name (pytest's check_pending).
A component is checked against its kind's contract (core/contracts.py) when it is built.
"""
import contextlib
import importlib
import inspect
import pkgutil

import pluggy

from core import contracts, hookspecs
from core.errors import ConfigError, PluginError, closest
from core.pluginfiles import import_plugin

KINDS = ("encoder", "projector", "decoder", "tokenizer", "dataset", "source", "metric", "metric_input",
         "regulariser", "freeze", "adapter", "logger")
ENTRY_POINT_GROUP = "vlmkit"
BUILTIN_PACKAGE = "plugins"
HOOK_PREFIX = hookspecs.PROJECT + "_"
HOOKS = sorted(n for n in vars(hookspecs) if n.startswith(HOOK_PREFIX))


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
        becomes a PluginError naming the plugin, with the original traceback.
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
        check_hook_names(component, f"{self.source_of(kind, name)} ({at}: {kind} {name!r})")
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


# ---- hooks: every vlmkit_* name must be a known, marked hook

def new_plugin_manager():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def check_hook_names(plugin, label):
    """Check the ``vlmkit_*`` callables of ``plugin`` (a module or a component object) before pluggy sees them.

    A name that is not a known hook (a misspelling would never be called) or a function not marked
    ``@hookimpl`` is a ConfigError naming ``label`` and the name. A hook whose required arguments the
    hook does not pass (``def vlmkit_register(registy)``) is a fault in the plugin's code: a PluginError
    naming the plugin, the function's file and line, and the arguments the hook gives."""
    for attr in dir(plugin):
        if not attr.startswith(HOOK_PREFIX):
            continue
        value = getattr(plugin, attr, None)
        if not callable(value):
            continue
        if attr not in HOOKS:
            raise ConfigError(f"plugin {label}: {attr} is not a vlmkit hook{closest(attr, HOOKS)}; "
                              f"hooks are {', '.join(HOOKS)} (core/hookspecs.py)")
        if not hookspecs.is_hookimpl(value):
            raise ConfigError(f"plugin {label}: {attr} is not marked @hookimpl (from core import hookimpl), "
                              f"so vlmkit would never call it")
        _check_arguments(value, attr, label)


def _check_arguments(function, hook, label):
    spec = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return  # a callable without a signature: pluggy's own check decides
    unknown = [n for n, p in params.items() if p.default is p.empty and n not in spec
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if unknown:
        at = _defined_at(function)
        raise PluginError(f"plugin {label}: {hook}({', '.join(params)}){at} takes {', '.join(unknown)}, which the "
                          f"hook does not pass{closest(unknown[0], spec)}; the hook is {hook}({', '.join(spec)}) "
                          f"(core/hookspecs.py)")


def _defined_at(function):
    """' at FILE:LINE' of a function or bound method, for messages that have no traceback to show."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return f" at {code.co_filename}:{code.co_firstlineno}" if code else ""


def register(pm, plugin, label):
    """Register ``plugin`` with the plugin manager after checking its hook names and arguments."""
    check_hook_names(plugin, label)
    try:
        pm.register(plugin, name=label)
    except pluggy.PluginValidationError as e:  # pluggy validates before it changes anything
        raise PluginError(f"plugin {label}: {' '.join(str(e).split())}") from e
    try:
        pm.check_pending()  # a @hookimpl under a name that is not a hook (with specname, say)
    except pluggy.PluginValidationError as e:
        pm.unregister(plugin)
        raise ConfigError(f"plugin {label}: {' '.join(str(e).split())}") from e


def behaviour_label(where, index, obj):
    """How messages name a behaviour object: its recipe place, class and module."""
    return f"{where}.{index} ({type(obj).__name__} from {type(obj).__module__})"


@contextlib.contextmanager
def attached(pm, objects, where):
    """The behaviour ``objects`` (a stage's freeze policies or regularisers, metrics, loggers) answer their
    hooks inside the block (``call_in_order``)."""
    done = []
    try:
        for i, obj in enumerate(objects):
            register(pm, obj, behaviour_label(where, i, obj))
            done.append(obj)
        yield pm.hook
    finally:
        for obj in done:
            pm.unregister(obj)


def _mapping_of(check, what):
    def answer_ok(answer):
        return isinstance(answer, dict) and all(isinstance(k, str) and check(v) for k, v in answer.items())
    return answer_ok, what


ANSWERS = {  # what each hook's implementations must return (None is always allowed): core/hookspecs.py
    "vlmkit_regulariser_loss": _mapping_of(lambda v: hasattr(v, "backward") and v.numel() == 1,
                                           "{name: scalar tensor}"),
    "vlmkit_freeze": _mapping_of(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                 "{parameter name: lr multiplier}"),
    "vlmkit_adapter_attach": _mapping_of(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                         "{parameter name: lr multiplier}"),
    "vlmkit_metric_score": _mapping_of(lambda v: True, "{value name: value}"),
    "vlmkit_metric_aggregate": _mapping_of(lambda v: True, "{name: value}"),
}


def call_in_order(hook, **kwargs):
    """A hook's answers in registration order, None answers dropped.

    Each implementation is called on its own (pluggy would call them last-registered first and let an
    exception out without saying whose it is): an exception from plugin code becomes a PluginError naming
    the plugin and the hook, with the plugin's traceback; a ConfigError (a recipe mistake it reports) passes.
    An answer of the wrong shape (ANSWERS) is a PluginError naming the plugin too, not a crash later in
    code that is not the plugin's."""
    answers = []
    answer_ok, shape = ANSWERS.get(hook.name, (lambda answer: True, ""))
    for impl in hook.get_hookimpls():
        answer = plugin_call(f"plugin {impl.plugin_name}", impl.function, _name=hook.name,
                             **{name: kwargs[name] for name in impl.argnames})
        if answer is None:
            continue
        if not answer_ok(answer):
            text = repr(answer)
            raise PluginError(f"plugin {impl.plugin_name}: {hook.name}{_defined_at(impl.function)} returned {text[:80]}"
                              f"{'...' if len(text) > 80 else ''}; it must return {shape} or None (core/hookspecs.py)")
        answers.append(answer)
    return answers


def plugin_call(where, function, *args, _name=None, **kwargs):
    """``function(*args, **kwargs)`` of a plugin (a dataset's ``shards``, a hook): an exception from its code
    becomes a PluginError naming ``where`` and the function (``_name``, else its own), with the traceback;
    a ConfigError (a recipe mistake the plugin reports) passes."""
    try:
        return function(*args, **kwargs)
    except (ConfigError, PluginError):
        raise
    except Exception as e:
        name = _name or getattr(function, "__qualname__", repr(function))
        raise PluginError(f"{where}: {name} failed: {type(e).__name__}: {e}") from e


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
    pm = new_plugin_manager()
    found = list(_builtin_modules())
    if entry_points:
        found += list(_entry_point_plugins())
    found += [(f"recipe plugin {m}", import_plugin(m, f"plugins.{i}")) for i, m in enumerate(extra_modules)]
    loaded = []
    for label, plugin in found:
        if pm.is_registered(plugin):
            continue  # the same module through two routes (an entry point to a built-in, say)
        register(pm, plugin, label)
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
