"""The hook layer (core/hooks.py): pluggy calls the behaviour hooks, so tryfirst/trylast and wrappers mean
what pluggy documents; answers come in recipe order otherwise; a fault or a bad answer names the plugin;
behaviour objects answer only while attached."""
import pytest
import torch

from core import hookimpl
from core.errors import ConfigError, PluginError
from core.hooks import attach, new_plugin_manager, register
from core.metrics import score_pairs
from core.recipe import Component, Stage
from core.registry import Registry, load_plugins
from core.train import apply_freeze
from plugins.metrics.exact import ExactMatch


class Logger:
    """Appends its name to ``seen`` for every record."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    @hookimpl
    def vlmkit_log(self, record):
        self.seen.append(self.name)


class First(Logger):
    @hookimpl(tryfirst=True)
    def vlmkit_log(self, record):
        self.seen.append(self.name)


class Last(Logger):
    @hookimpl(trylast=True)
    def vlmkit_log(self, record):
        self.seen.append(self.name)


def logged(loggers):
    pm = new_plugin_manager()
    with attach(pm, loggers, "loggers"):
        pm.hook.vlmkit_log(record={"event": "train"})
    return pm


@pytest.mark.parametrize("kinds, order", [
    ((Logger, Logger, Logger), "abc"),  # no option: the recipe's order
    ((Logger, First, Logger), "bac"),
    ((Last, Logger, Logger), "bca"),
    ((Last, First, First), "bca"),  # two tryfirst keep their recipe order among themselves
])
def test_answers_come_in_recipe_order_unless_tryfirst_or_trylast(kinds, order):
    seen = []
    logged([kind(name, seen) for kind, name in zip(kinds, "abc")])
    assert "".join(seen) == order


def test_behaviour_objects_answer_only_while_attached():
    seen = []
    pm = logged([Logger("a", seen)])
    pm.hook.vlmkit_log(record={"event": "train"})
    assert seen == ["a"] and pm.get_plugins() == set()


class Ned:
    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        return {"gap": abs(len(pred) - len(gt)) / 3}

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        return {"gap": sum(r["gap"] for r in rows) / len(rows)}


class Rounding:
    """A wrapper=True metric: sees the other metrics' per-sample answers and hands on rounded ones."""

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def vlmkit_metric_score(self, pred, gt):
        answers = yield
        self.seen.append(answers)
        return [{k: round(v, 1) for k, v in a.items()} for a in answers]

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        return None


@pytest.mark.parametrize("wrapper_first", [True, False])
def test_a_wrapper_runs_around_the_others_and_can_change_their_answers(wrapper_first):
    rounding = Rounding()
    metrics = [rounding, Ned()] if wrapper_first else [Ned(), rounding]
    rows, aggregate = score_pairs(metrics, [("1", "ab", "abcd")])
    assert rounding.seen == [[{"gap": 2 / 3}]]  # the answers it was given
    assert rows == [{"id": "1", "gap": 0.7}] and aggregate == {"gap": 0.7}


class WrappingLogger:
    def __init__(self, seen):
        self.seen = seen

    @hookimpl(wrapper=True)
    def vlmkit_log(self, record):
        self.seen.append("before")
        answers = yield
        self.seen.append("after")
        return answers


def test_a_wrapper_of_a_hook_without_answers_runs():  # it was an unstarted generator before
    seen = []
    logged([WrappingLogger(seen), Logger("a", seen)])
    assert seen == ["before", "a", "after"]


class HalfLr:
    @hookimpl
    def vlmkit_freeze(self, model, stage):
        return {"weight": 0.5}


class Quadruple:
    """An old-style hookwrapper: reads pluggy's Result and replaces it."""

    @hookimpl(hookwrapper=True)
    def vlmkit_freeze(self, model, stage):
        outcome = yield
        outcome.force_result(outcome.get_result() + [{"weight": 4.0}])


def freeze_registry(**policies):
    registry = Registry()
    for name, cls in policies.items():
        registry.add("freeze", name, cls)
    return registry


def test_a_hookwrapper_sees_and_replaces_the_answers_of_a_stage_freeze():
    registry = freeze_registry(half=HalfLr, quadruple=Quadruple)
    stage = Stage(name="s", steps=1, freeze=[Component("quadruple"), Component("half")])
    multipliers = apply_freeze(registry, new_plugin_manager(), torch.nn.Linear(2, 2), stage, "stages.0")
    assert multipliers == {"weight": 2.0}  # 0.5 from the policy, times the 4.0 the wrapper added


def test_a_misspelt_hook_is_one_line_naming_the_plugin():
    class Typo:
        @hookimpl
        def vlmkit_lg(self, record):
            pass

    with pytest.raises(ConfigError, match=r"loggers\.0 \(Typo from [\w.]*test_hooks\): vlmkit_lg is not a vlmkit "
                                          r"hook \(did you mean 'vlmkit_log'\?\)"):
        attach(new_plugin_manager(), [Typo()], "loggers")

    class Specname:
        @hookimpl(specname="vlmkit_lgo")
        def log(self, record):
            pass

    with pytest.raises(ConfigError, match=r"loggers\.0 \(Specname .*unknown hook 'vlmkit_lgo'"):
        attach(new_plugin_manager(), [Specname()], "loggers")


class Boom:
    @hookimpl
    def vlmkit_log(self, record):
        raise RuntimeError("disk full")


class FailingWrapper:
    @hookimpl(wrapper=True)
    def vlmkit_log(self, record):
        answers = yield
        raise KeyError("after")
        return answers


@pytest.mark.parametrize("loggers, named, words", [
    ([Logger("a", []), Boom()], r"loggers\.1 \(Boom from [\w.]*test_hooks\)",
     "vlmkit_log failed: RuntimeError: disk full"),
    ([FailingWrapper(), Logger("a", [])], r"loggers\.0 \(FailingWrapper from [\w.]*test_hooks\)",
     r"vlmkit_log at .* \(wrapper\) failed: KeyError: 'after'"),
    ([FailingWrapper(), Boom()], r"loggers\.1 \(Boom ", "RuntimeError: disk full"),  # the wrapper passes it on
])
def test_an_exception_in_plugin_code_names_the_plugin(loggers, named, words):
    with pytest.raises(PluginError, match=f"^plugin {named}.*{words}") as caught:
        logged(loggers)
    assert caught.value.__cause__ is not None  # the traceback the plugin's author needs


class BadAnswer:
    @hookimpl
    def vlmkit_freeze(self, model, stage):
        return {"weight": "half"}


class BadWrapper:
    @hookimpl(wrapper=True)
    def vlmkit_freeze(self, model, stage):
        answers = yield
        return answers[0]  # one answer, not the list


@pytest.mark.parametrize("cls, words", [
    (BadAnswer, r"stages\.0\.freeze\.1 \(BadAnswer .*returned \{'weight': 'half'\}; it must return "
                r"\{parameter name: lr multiplier\} or None"),
    (BadWrapper, r"stages\.0\.freeze\.1 \(BadWrapper .*\(wrapper\) returned \{'weight': 0\.5\}; a wrapper must "
                 r"return the list"),
])
def test_an_answer_of_the_wrong_shape_names_the_plugin(cls, words):
    registry = freeze_registry(half=HalfLr, bad=cls)
    stage = Stage(name="s", steps=1, freeze=[Component("half"), Component("bad")])
    with pytest.raises(PluginError, match=words):
        apply_freeze(registry, new_plugin_manager(), torch.nn.Linear(2, 2), stage, "stages.0")


def test_options_that_cannot_work_are_refused_at_registration():
    class Generator:
        @hookimpl
        def vlmkit_log(self, record):
            yield

    class NotAGenerator:
        @hookimpl(wrapper=True)
        def vlmkit_log(self, record):
            return None

    with pytest.raises(PluginError, match=r"loggers\.0 \(Generator .*is a generator function: mark it "
                                          r"@hookimpl\(wrapper=True\)"):
        attach(new_plugin_manager(), [Generator()], "loggers")
    with pytest.raises(PluginError, match=r"NotAGenerator .*is marked as a wrapper but is no generator function"):
        attach(new_plugin_manager(), [NotAGenerator()], "loggers")

    class Module:
        @staticmethod
        @hookimpl(tryfirst=True)
        def vlmkit_register(registry):
            pass

    with pytest.raises(ConfigError, match=r"^plugin mine: vlmkit_register takes no @hookimpl\(tryfirst=...\): "
                                          r"vlmkit calls each plugin's vlmkit_register itself, once, in load order"):
        register(new_plugin_manager(), Module(), "mine")


class NoYield:
    @hookimpl(wrapper=True)
    def vlmkit_log(self, record):
        if record:
            return []
        yield


class TwoYields:
    @hookimpl(wrapper=True)
    def vlmkit_log(self, record):
        yield
        yield


@pytest.mark.parametrize("cls, words", [(NoYield, "did not yield"), (TwoYields, "yielded twice")])
def test_a_wrapper_must_yield_once(cls, words):
    with pytest.raises(PluginError, match=rf"^plugin loggers\.0 \({cls.__name__} .*\(wrapper\) {words}"):
        logged([cls()])


PLUGIN = '''
from core import hookimpl


@hookimpl
def vlmkit_metric_score(pred, gt):
    return {"length": len(pred)}


@hookimpl
def vlmkit_metric_aggregate(rows):
    return {"length": sum(r["length"] for r in rows)}
'''


def test_a_loaded_plugin_module_answers_beside_the_recipe_metrics(tmp_path):
    (tmp_path / "always.py").write_text(PLUGIN)
    pm, _ = load_plugins([str(tmp_path / "always.py")], entry_points=False)
    rows, aggregate = score_pairs([ExactMatch()], [("1", "ab", "ab"), ("2", "abc", "x")], pm=pm)
    assert [list(r) for r in rows] == [["id", "exact", "length"]] * 2  # the recipe's metric first
    assert aggregate == {"exact": 0.5, "length": 5}
