import textwrap

import pytest

from core.errors import ConfigError
from core.recipe import apply_override, load_recipe
from tests.helpers import GRID_RECIPE


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


MINIMAL = """\
model:
  encoder: {name: deepencoder, image_size: 64}
  projector: linear
  decoder: {name: nanochat, n_layer: 1}
  tokenizer: bytes
data:
  dataset: {name: synthetic_ocr}
stages:
  - name: a
    steps: 5
    lr: 1e-3
"""


def test_default_recipe_loads_with_overrides():
    recipe = load_recipe(GRID_RECIPE, ["stages.0.steps=7", "run.dir=/tmp/x", "stages.1.betas=[0.8, 0.9]"])
    assert recipe.stages[0].steps == 7
    assert recipe.run.dir == "/tmp/x"
    assert recipe.stages[1].betas == [0.8, 0.9]
    assert recipe.stages[1].init_from.parts == ["encoder"]
    assert recipe.model.decoder.name == "nanochat"


def test_components_and_yaml11_floats(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.model.projector.name == "linear" and recipe.model.projector.args == {}
    assert recipe.model.decoder.args == {"n_layer": 1}
    assert recipe.stages[0].lr == pytest.approx(1e-3)  # "1e-3" is a string in YAML 1.1
    assert [m.name for m in recipe.eval.metrics] == ["fox", "ned", "exact"]


@pytest.mark.parametrize("text, override, expected", [
    (MINIMAL + "    lrr: 3\n", [], r"r.yaml:12: stages.0.lrr: unknown key \(did you mean 'lr'\?\)"),
    (MINIMAL.replace("steps: 5", "steps: five"), [], r"r.yaml:10: stages.0.steps: expected int, got str 'five'"),
    (MINIMAL, ["stages.3.steps=1"], r"override 'stages.3.steps=1': stages.3: no list item '3'"),
    (MINIMAL, ["stages.0.steps"], r"override 'stages.0.steps': expected key.path=value"),
    (MINIMAL, ["run.seed=abc"], r"run.seed: expected int, got str 'abc'"),
    (MINIMAL.replace("  - name: a\n    steps: 5\n", "  - name: a\n"), [], r"r.yaml:9: stages.0: missing key 'steps'"),
    (MINIMAL + "    schedule: linear\n", [], r"r.yaml:12: stages.0.schedule: must be constant, step or cosine"),
], ids=["unknown-key", "wrong-type", "bad-index", "no-equals", "override-type", "missing", "bad-choice"])
def test_errors_name_the_key_and_line(tmp_path, text, override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_recipe(write(tmp_path, text), override)


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe 'nope.yaml' does not exist"):
        load_recipe("nope.yaml")


def test_override_through_a_value_is_refused():
    with pytest.raises(ConfigError, match="run.seed is a value, not a section"):
        apply_override({"run": {"seed": 1}}, "run.seed.x=2")


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size=-1", "override 'data.batch_size=-1': data.batch_size: must be at least 1, not -1"),
    ("stages.0={name: a, steps: -2}", "override 'stages.0={name: a, steps: -2}': stages.0.steps: must be at least 0"),
    ("data.on_bad_sample=maybe", "override 'data.on_bad_sample=maybe': data.on_bad_sample: must be skip or error"),
], ids=["value", "inside-a-replaced-section", "choice"])
def test_an_override_error_names_the_override_not_a_line_of_the_file(tmp_path, override, expected):
    """The file's line holds another value: blaming it sends the user to the wrong place."""
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, MINIMAL), [override])
    assert str(e.value).startswith(expected) and "r.yaml" not in str(e.value), str(e.value)


def test_brace_patterns_and_plain_strings_in_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    # bash expands an unquoted data.dataset.train=x/train-{000000..000002}.tar into three words; the key gets
    # all three (the shards dataset takes a list), not silently the last
    expanded = [f"data.dataset.train=x/train-00000{i}.tar" for i in range(3)]
    assert load_recipe(path, expanded).data.dataset.args["train"] == [f"x/train-00000{i}.tar" for i in range(3)]
    quoted = load_recipe(path, ["data.dataset.train=x/train-{000000..000002}.tar"])
    assert quoted.data.dataset.args["train"] == "x/train-{000000..000002}.tar"
    # not YAML, but plainly a string: taken as typed
    assert load_recipe(path, ["data.prompt=<image>: read: it"]).data.prompt == "<image>: read: it"
    flow = "data.dataset={name: shards, train: '/x/train-{000000..000002}.tar'}"
    assert load_recipe(path, [flow]).data.dataset.args == {"train": "/x/train-{000000..000002}.tar"}
    with pytest.raises(ConfigError, match=r"override .*: the value is not valid YAML \(.*\); inside .* quote"):
        load_recipe(path, [flow.replace("'", "")])
    with pytest.raises(ConfigError, match=r"^override run.seed given 2 times in a row: run.seed: expected int, got"):
        load_recipe(path, ["run.seed=1", "run.seed=2"])
    # given again after another key, a later override replaces the earlier one, as it always has
    assert load_recipe(path, ["run.seed=1", "data.batch_size=3", "run.seed=2"]).run.seed == 2
