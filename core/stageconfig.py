"""What a stage builds where it differs from the recipe's sections: ``stages.N.model`` and ``stages.N.dataset``
hold changes, merged into ``model`` and ``data.dataset`` key by key (nested mappings merged; a component of
another ``name`` takes only the arguments given).

DeepSeek-OCR trains its encoder with a small language model and reads with the large one (docs/architecture.md
§2.7): the default recipe's stage 1 builds a 1-layer decoder. Its stage 1 also reads the training lines as
drawn and stage 2 adds rendering variations, which delay the start of reading (docs/results.md, 2026-12-07).
"""
import attrs

from core.recipe import Component


def stage_model(recipe, index):
    """The ModelConfig stage ``index`` builds."""
    changes = recipe.stages[index].model or {}
    return attrs.evolve(recipe.model, **{key: changed(getattr(recipe.model, key), change)
                                         for key, change in changes.items()})


def stage_dataset(recipe, index):
    """The dataset Component stage ``index`` trains on."""
    return changed(recipe.data.dataset, recipe.stages[index].dataset or {})


def dataset_key(recipe, index):
    """The recipe key that names stage ``index``'s dataset in errors: its own changes, or data.dataset."""
    return f"stages.{index}.dataset" if recipe.stages[index].dataset else "data.dataset"


def changed(component, change):
    """``component`` with the mapping ``change`` merged in."""
    args = {k: v for k, v in change.items() if k != "name"}
    name = change.get("name", component.name)
    return Component(name, _merged(component.args, args) if name == component.name else args)


def _merged(base, change):
    out = dict(base)
    for key, value in change.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
