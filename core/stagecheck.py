"""Every stage of a recipe built on the meta device before anything trains (``check_stages``): its model, freeze
policies, adapters and regularisers, the sequence lengths its decoder must take, and the weights its ``init_from``
names (a file that exists, an earlier stage, parts of the same keys and shapes in both stages). A broken recipe
or plugin of the last stage then fails at once, not hours in. python -m core.run calls it at the start of a run
and of ``--dry-run``.
"""
import os

import torch

from core import checkpoint
from core.data import prompt_prefix
from core.errors import ConfigError
from core.metrics import score_pairs
from core.model import build_model, checkpoint_activations, token_ids
from core.recipe import run_folder
from core.report import format_parameter_table, parameter_table
from core.stageconfig import stage_model
from core.train import freeze_and_adapt
from core.weights import compare_keys, describe_problems


def check_stages(recipe, pm, registry, show=False):
    """Build every stage on the meta device (no memory, no weights, no data): its model, freeze policies and
    regularisers (building checks their hooks: core.hooks.check_plugin), and its init_from file; then the
    eval metrics. ``show`` prints each stage's parameter table, regulariser heads included, as training
    does. Returns the last stage's (model, tokenizer)."""
    model = tokenizer = None
    built = {}  # stage name -> its model's plain state dict (meta tensors): what a later stage's init_from loads
    for i, stage in enumerate(recipe.stages):
        where, title = f"stages.{i}", f"stage {i + 1}/{len(recipe.stages)} {stage.name!r}"
        if stage.steps == 0:
            if show:
                print(f"{title}: steps 0, skipped\n")
            continue
        with torch.device("meta"):
            model, tokenizer = build_model(stage_model(recipe, i), registry)
            plain = model.state_dict()  # before adapters rename what they wrap
            check_lengths(recipe, model, tokenizer)  # per stage (stages.N.model), before plugins hook the model
            freeze_and_adapt(registry, pm, model, stage, where)
            regularisers = registry.build_all("regulariser", stage.regularisers, f"{where}.regularisers",
                                              context={"model": model, "tokenizer": tokenizer})
        checkpoint_activations(model, stage.activation_checkpointing, f"{where}.activation_checkpointing")
        if stage.init_from is not None:
            check_init_from(recipe, i, stage.init_from, built, plain)
        built[stage.name] = plain
        if show:
            heads = {f"regulariser.{c.name}": r for c, r in zip(stage.regularisers, regularisers)
                     if isinstance(r, torch.nn.Module)}
            print(format_parameter_table(parameter_table(model, heads), title=f"{title}: parameters (meta device)"),
                  end="\n\n")
    if recipe.eval is not None:  # scored once on a made-up pair: a metric that fails fails now, not after training
        score_pairs(registry.build_all("metric", recipe.eval.metrics, "eval.metrics"), [("check", "a b c", "a b")],
                    pm=pm)
    return model, tokenizer


def check_init_from(recipe, index, init_from, built, state):
    """A stage's init_from before anything trains: known parts; a file that exists; ``stage:NAME`` an earlier
    stage this run trains, or a folder an earlier run left in run.dir (a stage skipped with steps: 0); the parts
    of the same keys and shapes in both (``built``: earlier stages' state dicts, ``state``: this one's)."""
    where = f"stages.{index}.init_from"
    checkpoint.check_parts(init_from.parts, f"{where}.parts")
    if not init_from.path.startswith("stage:"):
        checkpoint.resolve(init_from.path, None, init_from.parts)
        return
    name = init_from.path[len("stage:"):]
    earlier = [s.name for s in recipe.stages[:index] if s.steps]
    folder = os.path.join(run_folder(recipe), name)
    if name not in earlier and not os.path.isdir(folder):
        raise ConfigError(f"{where}.path: {init_from.path!r} names no earlier stage this run trains "
                          f"({', '.join(earlier) or 'none'}), and {folder} does not exist")
    if name in built:  # e.g. stage 1 trains a smaller decoder (stages.N.model) than stage 2 reads with
        prefixes = tuple(x for p in init_from.parts for x in checkpoint.PARTS[p])
        mine, theirs = ({k: v for k, v in d.items() if k.startswith(prefixes)} for d in (state, built[name]))
        problems = describe_problems(compare_keys(mine, theirs))
        if problems:
            raise ConfigError(f"{where}.parts: stage {name!r} builds {'+'.join(init_from.parts)} otherwise than "
                              f"this stage (stages.N.model); {problems}")


def check_lengths(recipe, model, tokenizer):
    """The decoder must take the longest sequence the recipe asks of it: data.max_len in training, the prompt
    with its vision tokens plus eval.max_new_tokens in the probe and evaluation. Run it on the meta device
    (shapes only, no compute) so a decoder that refuses (nanochat's rotary table) says so now, not after
    training."""
    needs = [("data.max_len", recipe.data.max_len, "")]
    if recipe.eval is not None:
        vision = max([model.num_image_tokens()] + [model.num_image_tokens(g) for g in
                                                   (model.tiling.grids() if model.tiling else ())])
        try:
            prompt = len(prompt_prefix(tokenizer, recipe.data.prompt, vision))
        except ConfigError:  # a bad prompt is named when the stage starts; a dry run may lack the tokenizer file
            prompt = None
        if prompt is not None:
            needs.append(("eval.max_new_tokens", prompt + recipe.eval.max_new_tokens,
                          f" (the prompt with {vision} vision tokens is {prompt}, + {recipe.eval.max_new_tokens} new)"))
    for key, length, detail in needs:
        with torch.device("meta"):
            embeds = torch.zeros(1, length, model.decoder.n_embd)
            ids = token_ids(model.decoder, torch.zeros(1, length, dtype=torch.long))  # for a decoder that reads them
        try:
            model.decoder(embeds, **ids)
        except ValueError as e:
            raise ConfigError(f"{key}: sequences of {length} tokens{detail} do not fit the decoder: {e}") from e
        except Exception:
            pass
