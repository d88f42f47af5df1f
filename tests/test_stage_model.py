"""stages.N.model: a stage builds the recipe's model with its own changes (DeepSeek-OCR trains its encoder with a
small decoder, then reads with the large one), and every path that builds a stage's model builds that one."""
import json

import pytest

from core.errors import ConfigError
from core.generate import load_checkpoint
from core.recipe import load_recipe
from core.stageconfig import stage_dataset, stage_model
from tests.helpers import GRID_RECIPE
from tests.tiny_recipe import run, write_recipe


def test_a_stage_merges_its_changes_into_the_model_key_by_key():
    recipe = load_recipe(GRID_RECIPE, ["stages.0.model={decoder: {n_layer: 1}, encoder: {sam: {depth: 1}}}",
                                       "stages.1.model={projector: {name: mlp, depth: 2}}"])
    first, second = stage_model(recipe, 0), stage_model(recipe, 1)
    assert first.decoder.args == {**recipe.model.decoder.args, "n_layer": 1}
    assert first.encoder.args["sam"] == {**recipe.model.encoder.args["sam"], "depth": 1}  # a nested mapping merged
    assert first.encoder.args["clip"] == recipe.model.encoder.args["clip"]
    assert first.projector == recipe.model.projector and first.tokenizer == recipe.model.tokenizer
    assert (second.projector.name, second.projector.args) == ("mlp", {"depth": 2})  # another component: its own args
    assert second.decoder == recipe.model.decoder
    assert recipe.model.decoder.args["n_layer"] != 1  # the recipe's model itself is untouched


@pytest.mark.parametrize("override, expected", [
    ("stages.0.model={decoderr: {n_layer: 1}}", "stages.0.model.decoderr: a stage changes components"),
    ("stages.0.model={decoder: 3}", "stages.0.model.decoder: a stage changes components"),
])
def test_a_bad_stage_model_names_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_recipe(GRID_RECIPE, [override])


def test_stage_one_trains_a_smaller_decoder_and_stage_two_takes_its_encoder(tmp_path, tiny_data):
    recipe = write_recipe(tmp_path, tiny_data)
    assert run(recipe, "stages.0.model={decoder: {n_layer: 1}}") == 0
    metas = {s: json.loads(next((tmp_path / "run" / s).glob("meta_*.json")).read_text()) for s in "ab"}
    assert metas["a"]["model"]["decoder"]["args"]["n_layer"] == 1
    assert metas["b"]["model"]["decoder"]["args"]["n_layer"] == 2
    for stage, layers in (("a", 1), ("b", 2)):  # each checkpoint rebuilds the model it was trained as
        model = load_checkpoint(str(tmp_path / "run" / stage))[0]
        assert len(model.decoder.transformer.h) == layers
    # resumed, the finished stage is rebuilt as it was trained (its weights load without a shape error)
    assert run(recipe, "stages.0.model={decoder: {n_layer: 1}}", "run.resume=auto") == 0


def test_a_part_of_another_shape_is_refused_before_anything_trains(tmp_path, tiny_data, capsys):
    recipe = write_recipe(tmp_path, tiny_data)
    code = run(recipe, "stages.0.model={decoder: {n_layer: 1}}", "stages.1.init_from.parts=[encoder,decoder]")
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "stages.1.init_from.parts: stage 'a' builds encoder+decoder otherwise" in err[-1]
    assert "decoder.transformer.h.1" in err[-1] and not (tmp_path / "run" / "a").exists()


def test_a_stage_trains_on_the_dataset_with_its_changes(tmp_path, tiny_data):
    recipe = load_recipe(GRID_RECIPE, ["stages.1.dataset={effects: {blur: 0.5}, seed: 3}"])
    assert stage_dataset(recipe, 0) == recipe.data.dataset
    second = stage_dataset(recipe, 1)
    assert second.args == {**recipe.data.dataset.args, "effects": {"blur": 0.5}, "seed": 3}

    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path, cache)
    assert run(recipe, "stages.1.dataset={train_samples: 32}") == 0
    rendered = sorted(p.parent.name for p in cache.rglob("train"))
    assert len(rendered) == 2  # stage b's shards: another set of arguments, another cache folder
    meta = json.loads(next((tmp_path / "run" / "b").glob("meta_*.json")).read_text())
    assert meta["train_state"]["stage"]["dataset"] == {"train_samples": 32}


def test_a_bad_stage_dataset_argument_is_named_before_anything_trains(tmp_path, tiny_data, capsys):
    recipe = write_recipe(tmp_path, tiny_data)
    assert run(recipe, "stages.1.dataset={train_sampels: 32}") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stages.1.dataset" in err and "train_sampels" in err and not (tmp_path / "run" / "a").exists()
