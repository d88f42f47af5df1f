"""The hook layer: plugins registered with pluggy, which calls every behaviour hook; faults name the plugin.

A plugin is registered through ``register``: a module at load time (core/registry.py), or a behaviour object
a recipe chose (a freeze policy, adapter, regulariser, metric or logger) for the span it acts in (``attach``: a stage's
freeze, a stage's training, one scoring, the run). The core then calls ``pm.hook.vlmkit_X(...)`` and pluggy
does the calling as it documents: implementations last registered first (``attach`` registers a recipe list
last to first, so answers come in recipe order), ``tryfirst``/``trylast`` move one to the front or the back,
and a ``wrapper=True`` (or old-style ``hookwrapper=True``) generator runs around the others and sees, or
replaces, their answers.

pluggy is not handed the plugin itself but a stand-in whose functions call the plugin's own, so that an
exception from plugin code becomes a PluginError naming the plugin and the hook (with its traceback; a
ConfigError passes), and an answer of the wrong shape (``ANSWERS``) is a PluginError naming it too, not a
crash later in code that is not the plugin's. ``check_plugin`` runs every check registering would run, on a
plugin manager of its own: the registry calls it on each behaviour object it builds, so a broken one fails
when the recipe is checked, before anything trains.
"""
import functools
import inspect

import pluggy

from core import hookspecs
from core.errors import ConfigError, PluginError, closest, plugin_call

HOOK_PREFIX = hookspecs.PROJECT + "_"
HOOKS = sorted(n for n in vars(hookspecs) if n.startswith(HOOK_PREFIX))
FIRSTRESULT = {h for h in HOOKS if getattr(getattr(hookspecs, h), hookspecs.PROJECT + "_spec")["firstresult"]}
# vlmkit_register is called by the registry itself, once per plugin in load order (so a duplicate name blames
# the plugin that came second): pluggy never calls it, and these options would mean nothing
NO_OPTIONS = {"vlmkit_register": ("tryfirst", "trylast", "wrapper", "hookwrapper", "specname")}


def new_plugin_manager():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


# ---- names and arguments: every vlmkit_* name must be a known, marked hook

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
        raise PluginError(f"plugin {label}: {hook}({', '.join(params)}){_defined_at(function)} takes "
                          f"{', '.join(unknown)}, which the hook does not pass{closest(unknown[0], spec)}; "
                          f"the hook is {hook}({', '.join(spec)}) (core/hookspecs.py)")


def _defined_at(function):
    """' at FILE:LINE' of a function or bound method, for messages that have no traceback to show."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return f" at {code.co_filename}:{code.co_firstlineno}" if code else ""


# ---- answers: what each hook's implementations must return

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


def _shown(value):
    text = repr(value)
    return text[:80] + ("..." if len(text) > 80 else "")


def _check_answer(hook, answer, where):
    answer_ok, shape = ANSWERS.get(hook, (lambda answer: True, ""))
    if answer is not None and not answer_ok(answer):
        raise PluginError(f"{where} returned {_shown(answer)}; it must return {shape} or None (core/hookspecs.py)")


def _check_answers(hook, answers, where):
    """What a wrapper hands on: the list of answers (one answer, or None, for a firstresult hook)."""
    if hook in FIRSTRESULT:  # none is today: each hook combines every answer
        answers = [] if answers is None else [answers]
    answer_ok, shape = ANSWERS.get(hook, (lambda answer: answer is not None, "answers"))
    if not isinstance(answers, list) or not all(a is not None and answer_ok(a) for a in answers):
        raise PluginError(f"{where} returned {_shown(answers)}; a wrapper must return the list of "
                          f"{shape} it was given, or one it made (core/hookspecs.py)")


# ---- the stand-in pluggy calls: each function calls the plugin's own and names it on a fault

def _plain(function, hook, where):
    @functools.wraps(function)
    def call(*args, **kwargs):
        answer = plugin_call(where, function, *args, _name=hook, **kwargs)
        _check_answer(hook, answer, f"{where}: {hook}{_defined_at(function)}")
        return answer
    return call


_YIELDED = object()


def _advance(step, value, where, thrown=None):
    """Run a wrapper's generator on with ``step(value)`` (its ``send`` or ``throw``): _YIELDED if it stopped
    at a yield, else what it returned. Its own exception becomes a PluginError naming ``where``; the one it
    was handed (``thrown``), a ConfigError and a PluginError pass."""
    try:
        step(value)
    except StopIteration as stop:
        return stop.value
    except (ConfigError, PluginError):
        raise
    except Exception as e:
        if e is thrown:
            raise
        raise PluginError(f"{where} failed: {type(e).__name__}: {e}") from e
    return _YIELDED


def _wrapper(function, hook, where, old_style):
    """A wrapper: runs to its one yield, where the other implementations run, then gets their answers
    (new style: the list, or their exception thrown in, and returns the answers to hand on; old style:
    pluggy's Result). A yield too few or too many, or answers of the wrong shape, name the plugin."""
    where = f"{where}: {hook}{_defined_at(function)} ({'hookwrapper' if old_style else 'wrapper'})"

    @functools.wraps(function)
    def call(*args, **kwargs):
        inner = function(*args, **kwargs)  # a generator: making it runs none of its code
        if _advance(inner.send, None, where) is not _YIELDED:
            raise PluginError(f"{where} did not yield; a wrapper yields once, where the others run")
        try:
            answers = yield
        except GeneratorExit:
            inner.close()
            raise
        except BaseException as e:  # an implementation inside failed: the wrapper sees it, as pluggy's would
            ended = _advance(inner.throw, e, where, thrown=e)
        else:
            ended = _advance(inner.send, answers, where)
        if ended is _YIELDED:
            inner.close()
            raise PluginError(f"{where} yielded twice; a wrapper yields once")
        if old_style:  # its answers are the Result's, which it may have replaced
            if answers.exception is None:
                _check_answers(hook, answers.get_result(), where)
            return None
        _check_answers(hook, ended, where)
        return ended
    return call


class StandIn:
    """What pluggy registers for a plugin: an object of its own (pluggy tells plugins apart by equality)."""

    def __init__(self, label):
        self.label = label

    def __repr__(self):
        return f"<hooks of plugin {self.label}>"


def _stand_in(pm, plugin, label):
    """A StandIn with ``plugin``'s hook implementations, each through ``_plain`` or ``_wrapper``, under the same
    names and options."""
    stand_in = StandIn(label)
    where = f"plugin {label}"
    for name in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, name)
        if opts is None:
            continue
        function, hook = getattr(plugin, name), opts.get("specname") or name
        refused = [o for o in NO_OPTIONS.get(hook, ()) if opts.get(o)]
        if refused:
            raise ConfigError(f"{where}: {hook} takes no @hookimpl({refused[0]}=...): vlmkit calls each plugin's "
                              f"{hook} itself, once, in load order (core/registry.py)")
        wraps = bool(opts.get("wrapper") or opts.get("hookwrapper"))
        if wraps != inspect.isgeneratorfunction(function):  # else pluggy would call it and never run its body
            raise PluginError(f"{where}: {name}{_defined_at(function)} " + (
                "is marked as a wrapper but is no generator function (a wrapper yields once)" if wraps else
                "is a generator function: mark it @hookimpl(wrapper=True) to wrap the others, or return its answer"))
        call = (_wrapper(function, hook, where, old_style=bool(opts.get("hookwrapper"))) if wraps
                else _plain(function, hook, where))
        setattr(call, hookspecs.IMPL_MARK, dict(opts))
        setattr(stand_in, name, call)
    return stand_in


# ---- registering: for good (a plugin module), or for a span (behaviour objects)

def register(pm, plugin, label):
    """Register ``plugin`` (through its stand-in, which is returned) after checking its hook names, arguments
    and options; pluggy's own validation and ``check_pending`` errors name ``label`` too."""
    check_hook_names(plugin, label)
    stand_in = _stand_in(pm, plugin, label)
    try:
        pm.register(stand_in, name=label)
    except pluggy.PluginValidationError as e:  # pluggy validates before it changes anything
        raise PluginError(f"plugin {label}: {' '.join(str(e).split())}") from e
    try:
        pm.check_pending()  # a @hookimpl under a name that is not a hook (with specname, say)
    except pluggy.PluginValidationError as e:
        pm.unregister(stand_in)
        raise ConfigError(f"plugin {label}: {' '.join(str(e).split())}") from e
    return stand_in


def check_plugin(plugin, label):
    """Everything ``register`` checks, on a plugin manager of its own (nothing is kept registered)."""
    register(new_plugin_manager(), plugin, label)


def behaviour_label(where, index, obj):
    """How messages name a behaviour object: its recipe place, class and module."""
    return f"{where}.{index} ({type(obj).__name__} from {type(obj).__module__})"


class Attachment:
    """Behaviour objects registered with a plugin manager from ``attach`` until ``close()``, or the end of
    the ``with`` block: the span in which they answer their hooks."""

    def __init__(self, pm, stand_ins):
        self.pm, self.stand_ins = pm, stand_ins

    def close(self):
        while self.stand_ins:
            self.pm.unregister(self.stand_ins.pop())

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def attach(pm, objects, where):
    """Register the recipe list ``objects`` (``where.INDEX`` names each in messages) so that, with no ordering
    option, they answer in list order: pluggy calls the last registered first, so the last is registered first."""
    attachment = Attachment(pm, [])
    try:
        for i in reversed(range(len(objects))):
            attachment.stand_ins.append(register(pm, objects[i], behaviour_label(where, i, objects[i])))
    except BaseException:
        attachment.close()
        raise
    return attachment
