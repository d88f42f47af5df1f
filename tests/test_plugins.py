"""Plugins (docs/plugins.md): discovery of built-ins, an installed distribution's entry point and a recipe's
plugin files; and what a broken plugin does, through python -m core.run in-process. A misspelt or unmarked hook
is one line and exit 2 before training; a fault in plugin code names the plugin with its traceback, exit 3; a
duplicate name blames the plugin that came second; plugins: paths are relative to the recipe and
python -m core.generate finds them again."""
import json
import os
import textwrap

import pytest
from PIL import Image

from core import generate
from core.errors import ConfigError
from core.registry import Registry, load_plugins
from tests.helpers import GRID_RECIPE
from tests.tiny_recipe import run, write_recipe

ENCODER_PLUGIN = '''
import torch
from core import hookimpl


class PoolEncoder(torch.nn.Module):
    """Average-pools 8x8 pixel blocks into a grid of learned features."""

    def __init__(self, image_size=64, dim=32):
        super().__init__()
        self.image_size, self.out_dim = image_size, dim
        self.proj = torch.nn.Conv2d(3, dim, kernel_size=8, stride=8)

    def grid_size(self, height, width):
        return height // 8, width // 8

    def forward(self, pixel_values):
        return self.proj(pixel_values).permute(0, 2, 3, 1)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "pool_encoder", PoolEncoder)
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


def test_builtins_are_discovered():
    _, registry = load_plugins()
    names = {(k, n) for k, n, _ in registry.listing()}
    for expected in [("encoder", "deepencoder"), ("encoder", "sam"), ("encoder", "clip"), ("decoder", "nanochat"),
                     ("projector", "linear"), ("tokenizer", "bytes"), ("dataset", "synthetic_ocr"),
                     ("metric", "fox"), ("metric", "ned"), ("regulariser", "ctc"), ("freeze", "glob"),
                     ("logger", "jsonl")]:
        assert expected in names


def test_unknown_name_lists_known_and_closest():
    _, registry = load_plugins()
    with pytest.raises(ConfigError, match=r"model.encoder: unknown encoder 'deepencodr' \(did you mean "
                                          r"'deepencoder'\?\); known: clip, deepencoder, deepseek_ocr2, sam"):
        registry.get("encoder", "deepencodr", where="model.encoder")


def test_build_rejects_unknown_argument_by_key_path():
    registry = Registry()
    registry.add("projector", "p", lambda in_dim, out_dim, bias=True: None)
    with pytest.raises(ConfigError, match=r"model.projector.bais: .* takes no argument 'bais' \(did you mean 'bias'"):
        registry.build("projector", "p", where="model.projector", in_dim=1, out_dim=2, bais=False)


def test_duplicate_registration_names_the_first_source():
    registry = Registry()
    registry.source = "built-in a"
    registry.add("metric", "m", object)
    registry.source = "recipe plugin b"
    with pytest.raises(ConfigError, match="metric 'm' is already registered by built-in a"):
        registry.add("metric", "m", object)


def test_entry_point_encoder_is_used_by_a_recipe(tmp_path, cli, monkeypatch):
    site = installed_distribution(tmp_path / "site", ENCODER_PLUGIN, dist="mypkg", name="my", module="my_encoder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe_with_encoder(GRID_RECIPE))
    short = [f"run.dir={tmp_path / 'run'}", f"data.dataset.cache_dir={tmp_path / 'cache'}", "run.threads=1",
             "stages.0.steps=2", "stages.1.steps=2", "stages.0.probe_every=0", "stages.1.probe_every=0",
             "stages.0.monitor_every=0", "stages.1.monitor_every=0", "stages.1.freeze=[]", "stages.0.regularisers=[]",
             "stages.1.regularisers=[]", "data.batch_size=4", "data.dataset.train_samples=64",
             "data.dataset.samples_per_shard=64", "data.dataset.eval_samples=4", "eval.samples=4"]
    monkeypatch.syspath_prepend(str(site))  # importlib.metadata reads sys.path: the dist-info is now installed
    _, registry = load_plugins()
    assert registry.source_of("encoder", "pool_encoder") == "entry point my (mypkg)"
    result = cli("core.run", str(recipe), *short)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    table = {name: t + f for name, t, f in next(e for e in events if e["event"] == "stage_start")["parameters"]}
    assert table["encoder"] == 3 * 8 * 8 * 64 + 64  # the plugin's conv is the encoder that trained
    monkeypatch.undo()  # without the package on the path the same recipe names the unknown encoder
    missing = cli("core.run", str(recipe), "--dry-run")
    assert missing.returncode == 2 and "unknown encoder 'pool_encoder'" in missing.stderr


def _recipe_with_encoder(path):
    text = open(path).read()
    start = text.index("  encoder:\n")
    end = text.index("  projector:")
    return text[:start] + "  encoder: {name: pool_encoder, image_size: 32, dim: 64}\n" + text[end:]


# ---- broken plugins

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


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_fails_before_training_naming_the_plugin(tmp_path, tiny_data, capsys, case):
    old, new = BROKEN[case]
    assert old in COMPONENT
    (tmp_path / "myplugin.py").write_text(COMPONENT.replace(old, new))
    # the plugin's regulariser is used by the LAST stage: a fault must still stop the run before stage 1 trains
    recipe = write_recipe(tmp_path, tiny_data, extra="plugins: [myplugin.py]\n")
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


def test_exit_codes_and_tracebacks_through_the_command_line(tmp_path, tiny_data, cli):
    (tmp_path / "myplugin.py").write_text(COMPONENT.replace(*BROKEN["constructor_raises"]))
    recipe = write_recipe(tmp_path, tiny_data, extra="plugins: [myplugin.py]\n")
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
def test_plugins_beside_the_recipe_and_generate_finds_them_again(tmp_path, tiny_data, monkeypatch, capsys, entry):
    """A .py path relative to the recipe, and a module beside it, from another working directory; the
    checkpoint's meta keeps absolute paths, so python -m core.generate rebuilds the plugin's projector."""
    n = "file" if entry.endswith(".py") else "module"
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / f"doubling_{n}.py").write_text(PROJECTOR)
    recipe = write_recipe(folder, tiny_data, extra=f"plugins: [{entry.format(n=n)}]\n")
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
def test_a_plugin_that_is_not_there_names_the_recipe_line(tmp_path, tiny_data, capsys, entry, words):
    recipe = write_recipe(tmp_path, tiny_data, extra=textwrap.dedent(f"""\
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
def test_a_broken_metric_fails_before_training_not_after(tmp_path, tiny_data, capsys, score, words):
    (tmp_path / "broken_metric.py").write_text(METRIC.replace("SCORE", score))
    recipe = write_recipe(tmp_path, tiny_data, extra="plugins: [broken_metric.py]\n")
    recipe.write_text(recipe.read_text().replace("eval: null", "eval: {samples: 2, metrics: [exact, broken]}"))
    assert run(recipe) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: plugin metrics.1 (Broken from ") and words in last
    assert not (tmp_path / "run" / "a").exists()
