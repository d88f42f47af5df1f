"""Freeze policies: which parameters train, at which lr, and what the optimizer holds."""
import pytest

from core.errors import ConfigError
from core.recipe import Component, Stage
from core.registry import load_plugins
from core.train import apply_freeze, parameter_groups, set_train_mode
from tests.helpers import tiny


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def freeze(plugins, *components):
    pm, registry = plugins
    model, _ = tiny(registry)
    stage = Stage(name="s", steps=1, freeze=list(components))
    return model, apply_freeze(registry, pm, model, stage, "stages.0")


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_presets(plugins):
    model, _ = freeze(plugins, Component("preset", {"preset": "sam_frozen"}))
    names = trainable_names(model)
    assert not any(n.startswith("encoder.sam.") for n in names) and any(n.startswith("encoder.clip.") for n in names)
    model, _ = freeze(plugins, Component("preset", {"preset": "compressor_and_projector"}))
    assert trainable_names(model) == {"encoder.sam.net_2.weight", "encoder.sam.net_3.weight", "projector.layers.weight",
                                      "projector.layers.bias", "image_newline", "view_separator"}
    model, _ = freeze(plugins, Component("preset", {"preset": "all_trainable"}))
    assert "encoder.clip.embeddings.patch_embedding.weight" not in trainable_names(model)  # frozen by design


def test_frozen_modules_are_in_eval_mode(plugins):
    model, _ = freeze(plugins, Component("glob", {"frozen": ["encoder.sam.*"]}))
    set_train_mode(model)
    assert not model.encoder.sam.training and model.encoder.clip.training and model.decoder.training


def test_lr_multipliers_and_optimizer_groups(plugins):
    model, multipliers = freeze(plugins, Component("glob", {"frozen": ["encoder.sam.*"], "trainable": ["encoder.*"],
                                                            "lr_multipliers": {"encoder.clip.*": 0.1}}))
    assert "encoder.clip.embeddings.patch_embedding.weight" not in trainable_names(model)  # still off
    groups = parameter_groups(model, {}, multipliers, lr=1e-3)
    by_factor = {g["lr_multiplier"]: g for g in groups}
    assert set(by_factor) == {0.1, 1.0} and by_factor[0.1]["lr"] == pytest.approx(1e-4)
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_pattern_that_matches_nothing_is_an_error(plugins):
    with pytest.raises(ConfigError, match="freeze pattern 'encoder.sma.\\*' matches no parameter"):
        freeze(plugins, Component("glob", {"frozen": ["encoder.sma.*"]}))
    with pytest.raises(ConfigError, match="stages.0.freeze.0: freeze 'preset': preset must be one of"):
        freeze(plugins, Component("preset", {"preset": "nope"}))
