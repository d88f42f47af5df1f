"""Issue 15, the plugin contract (faults 14-17), through python -m core.run (its main, in-process, and one real
process): a misspelt or unmarked hook is one line and exit 2 before training; a fault in plugin code names
the plugin with its traceback, exit 3; a duplicate name blames the plugin that came second; plugins: paths
are relative to the recipe and python -m core.generate finds them again."""
import os
import textwrap

import pytest
from PIL import Image

from core import generate
from core.registry import load_plugins
from tests.tiny_recipe import run, write_recipe

COMPONENT = '''
import torch
from core import hookimpl
from core.errors import ConfigError


class Reg:
    def __init__(self, weight=1.0):
        self.weight = weight

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        return {"zero": torch.zeros(())}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "reg", Reg)
'''

BROKEN = {  # name -> (replace this in COMPONENT, with this)
    "hook_misspelt": ("def vlmkit_register(registry)", "def vlmkit_regster(registry)"),
    "method_misspelt": ("def vlmkit_regulariser_loss(", "def vlmkit_regulariser_los("),
    "hook_unmarked": ("@hookimpl\ndef vlmkit_register", "def vlmkit_register"),
    "method_unmarked": ("    @hookimpl\n    def vlmkit_regulariser_loss", "    def vlmkit_regulariser_loss"),
    "hook_argument": ("def vlmkit_register(registry):\n    registry", "def vlmkit_register(registy):\n    registy"),
    "method_argument": ("(self, model, batch, outputs)", "(self, model, batch, output)"),
    "register_raises": ("    registry.add(", "    raise RuntimeError('bug in register')\n    registry.add("),
    "import_raises": ("class Reg:", "raise ImportError('bug at import')\n\n\nclass Reg:"),
    "constructor_raises": ("        self.weight = weight", "        raise ValueError('bug in the constructor')"),
    "constructor_config_error": ("        self.weight = weight", "        raise ConfigError('weight must be positive')"),
    "loss_raises": ('        return {"zero"', '        raise KeyError("bug in the loss")\n        return {"zero"'),
    "loss_returns_float": ('{"zero": torch.zeros(())}', '{"zero": 0.0}'),
    "loss_named_loss": ('{"zero": torch.zeros(())}', '{"loss": torch.zeros(())}'),
    "factory_not_callable": ('registry.add("regulariser", "reg", Reg)', 'registry.add("regulariser", "reg", Reg())'),
}
DURING_TRAINING = ("loss_raises", "loss_returns_float", "loss_named_loss")  # the first step calls the hook
# (exit code, what the error line says): 2 = the plugin contract or the recipe, one line; 3 = the plugin's code
EXPECTED = {
    "hook_misspelt": (2, "vlmkit_regster is not a vlmkit hook (did you mean 'vlmkit_register'?)"),
    "method_misspelt": (2, "vlmkit_regulariser_los is not a vlmkit hook (did you mean 'vlmkit_regulariser_loss'?)"),
    "hook_unmarked": (2, "vlmkit_register is not marked @hookimpl"),
    "method_unmarked": (2, "vlmkit_regulariser_loss is not marked @hookimpl"),
    "hook_argument": (3, "vlmkit_register(registy) at "),
    "method_argument": (3, "vlmkit_regulariser_loss(model, batch, output) at "),
    "register_raises": (3, "vlmkit_register failed: RuntimeError: bug in register"),
    "import_raises": (3, "failed to import: ImportError: bug at import"),
    "constructor_raises": (3, "failed while being built: ValueError: bug in the constructor"),
    "constructor_config_error": (2, "stages.1.regularisers.0: regulariser 'reg': weight must be positive"),
    "loss_raises": (3, "vlmkit_regulariser_loss failed: KeyError: 'bug in the loss'"),
    "loss_returns_float": (3, "returned {'zero': 0.0}; it must return {name: scalar tensor}"),
    "loss_named_loss": (2, "stages.1.regularisers: two loss terms are named 'loss'"),
    "factory_not_callable": (2, "regulariser 'reg': the factory must be a class or function, not Reg"),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_fails_before_training_naming_the_plugin(tmp_path, cache, capsys, case):
    old, new = BROKEN[case]
    assert old in COMPONENT
    (tmp_path / "myplugin.py").write_text(COMPONENT.replace(old, new))
    # the plugin's regulariser is used by the LAST stage: a fault must still stop the run before stage 1 trains
    recipe = write_recipe(tmp_path, cache, extra="plugins: [myplugin.py]\n")
    code = run(recipe, "stages.1.regularisers=[reg]")
    err = capsys.readouterr().err
    expected_code, words = EXPECTED[case]
    assert code == expected_code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last, err
    if case not in ("constructor_config_error", "loss_named_loss"):  # these name the recipe key
        assert "myplugin" in last
    if expected_code == 2:
        assert "Traceback" not in err  # one line (after the progress bars of the steps that ran)
        assert err.strip().count("\n") == 0 or case in DURING_TRAINING
    else:
        assert "Traceback (most recent call last)" in err or " at " in last  # its author gets the place
    if case not in DURING_TRAINING:  # every other fault is found before a step is trained
        assert not (tmp_path / "run" / "a").exists()


def test_exit_codes_and_tracebacks_through_a_real_process(tmp_path, cache, cli):
    (tmp_path / "myplugin.py").write_text(COMPONENT.replace(*BROKEN["constructor_raises"]))
    recipe = write_recipe(tmp_path, cache, extra="plugins: [myplugin.py]\n")
    result = cli("core.run", str(recipe), "stages.0.regularisers=[reg]", "--dry-run")
    assert result.returncode == 3
    assert 'myplugin.py", line' in result.stderr and "raise ValueError('bug in the constructor')" in result.stderr
    typo = cli("core.run", str(recipe), "stages.0.regularisers=[{name: reg, wieght: 2}]", "--dry-run")
    assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0
    assert "stages.0.regularisers.0.wieght: regulariser 'reg' takes no argument 'wieght'" in typo.stderr


ENTRY_POINT = '''
from core import hookimpl
from plugins.encoders.sam import SAMEncoder


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "sam", SAMEncoder)  # the built-in's name
'''


def installed_distribution(site, body, dist="vlmkit-broken", name="dup", module="dup_plugin"):
    """A real installed distribution on ``site``: a dist-info folder whose entry point importlib.metadata finds."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vlmkit]\n{name} = {module}\n")
    return site


def test_a_duplicate_from_an_entry_point_blames_the_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(installed_distribution(tmp_path / "site", ENTRY_POINT)))
    from core.run import main
    assert main(["--list-plugins"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: plugin entry point dup (vlmkit-broken): encoder 'sam' is already registered by "
                   "built-in plugins.encoders.sam")


def test_a_duplicate_from_a_recipe_plugin_blames_the_recipe_plugin(tmp_path, monkeypatch):
    body = ENTRY_POINT.replace('"sam"', '"pool"')
    monkeypatch.syspath_prepend(str(installed_distribution(tmp_path / "site", body, module="pool_plugin")))
    (tmp_path / "again.py").write_text(body)
    with pytest.raises(Exception, match=r"plugin recipe plugin .*again.py: encoder 'pool' is already registered "
                                        r"by entry point dup \(vlmkit-broken\)"):
        load_plugins([str(tmp_path / "again.py")])


PROJECTOR = '''
import torch
from core import hookimpl


class Doubling(torch.nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = torch.nn.Linear(in_dim, out_dim)

    def forward(self, features):
        return 2 * self.linear(features)


@hookimpl
def vlmkit_register(registry):
    registry.add("projector", "doubling", Doubling)
'''


@pytest.mark.parametrize("entry", ["./doubling_{n}.py", "doubling_{n}"])
def test_plugins_beside_the_recipe_and_generate_finds_them_again(tmp_path, cache, monkeypatch, capsys, entry):
    """A .py path relative to the recipe, and a module beside it, from another working directory; the
    checkpoint's meta keeps absolute paths, so python -m core.generate rebuilds the plugin's projector."""
    n = "file" if entry.endswith(".py") else "module"
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / f"doubling_{n}.py").write_text(PROJECTOR)
    recipe = write_recipe(folder, cache, extra=f"plugins: [{entry.format(n=n)}]\n")
    recipe.write_text(recipe.read_text().replace("projector: {name: linear}", "projector: {name: doubling}"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run(recipe) == 0
    image = elsewhere / "page.png"
    Image.new("RGB", (32, 32), "white").save(image)
    capsys.readouterr()
    assert generate.main([str(folder / "run" / "b"), str(image), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")


@pytest.mark.parametrize("entry, words", [("./missing.py", "plugin file {folder}/missing.py does not exist"),
                                          ("missing_module", "cannot import plugin module 'missing_module'")])
def test_a_plugin_that_is_not_there_names_the_recipe_line(tmp_path, cache, capsys, entry, words):
    recipe = write_recipe(tmp_path, cache, extra=textwrap.dedent(f"""\
        plugins:
          - {entry}
        """))
    line = recipe.read_text().splitlines().index(f"  - {entry}") + 1
    assert run(recipe) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {recipe}:{line}: plugins.0: {words.format(folder=tmp_path)}") and "\n" not in err
    assert "PYTHONPATH" in err or entry.endswith(".py")
    assert os.path.isabs(str(recipe))


METRIC = '''
from core import hookimpl


class Broken:
    @hookimpl
    def vlmkit_metric_score(self, pred, gt):
        return SCORE

    @hookimpl
    def vlmkit_metric_aggregate(self, rows):
        return {"broken": 0.0}


@hookimpl
def vlmkit_register(registry):
    registry.add("metric", "broken", Broken)
'''


@pytest.mark.parametrize("score, words", [("len(pred) / 0", "vlmkit_metric_score failed: ZeroDivisionError"),
                                          ("0.5", "returned 0.5; it must return {value name: value}")])
def test_a_broken_metric_fails_before_training_not_after(tmp_path, cache, capsys, score, words):
    (tmp_path / "broken_metric.py").write_text(METRIC.replace("SCORE", score))
    recipe = write_recipe(tmp_path, cache, extra="plugins: [broken_metric.py]\n")
    recipe.write_text(recipe.read_text().replace("eval: null", "eval: {samples: 2, metrics: [exact, broken]}"))
    assert run(recipe) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: plugin metrics.1 (Broken from ") and words in last
    assert not (tmp_path / "run" / "a").exists()
