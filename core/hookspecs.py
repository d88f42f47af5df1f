"""The plugin contract's hooks: every vlmkit hook, documented in this one file.

A plugin is a module (or any object) with functions decorated by ``@hookimpl``. There are two
layers, as in pytest:

1. **Registration.** A plugin module implements ``vlmkit_register(registry)`` and adds named
   component factories of the kinds in ``core.registry.KINDS``. A recipe then builds
   components by name: ``{name: sam, dim: 768, ...}`` calls the registered factory with the
   remaining keys as keyword arguments. What each kind's object must provide is declared in
   ``core/contracts.py`` and checked when it is built.

2. **Behaviour.** The objects a recipe chooses for freezing, adapting, regularising, scoring and
   logging implement the behaviour hooks below. The core attaches them to the plugin manager for
   the span they act in (a stage's freeze policies while they freeze, its adapters while they
   attach or merge, its regularisers while it trains, an evaluation's metrics while they score,
   the loggers for the run: ``core.hooks.attach``) and calls ``pm.hook.<hook>(...)``. pluggy does
   the calling: without options the objects answer in the order the recipe lists them,
   ``tryfirst``/``trylast`` move one to the front or the back, and a ``wrapper=True`` (or
   old-style ``hookwrapper=True``) generator runs around the others and may replace their
   answers. The core combines the answers as each hook's docstring says; answers of ``None`` are
   dropped, as pluggy does. A plugin module's own hook function answers for as long as the
   plugins are loaded (an always-on logger).

Why pluggy for behaviour, not plain methods: one hook call combines several objects (a stage's
regularisers, a run's loggers), an installed plugin module can answer a hook everywhere without a
recipe line, and pluggy's ordering options and wrappers let a plugin wrap the others' answers.
Every ``vlmkit_*`` name a plugin defines must be one of these hooks and be marked ``@hookimpl``;
anything else is an error naming the plugin (``core.hooks.check_hook_names`` and pluggy's
``check_pending``), so a misspelt hook fails instead of never being called.

Core imports no concrete plugin: it discovers them (``core.registry``).
"""
import pluggy

PROJECT = "vlmkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


IMPL_MARK = PROJECT + "_impl"  # the attribute @hookimpl sets on a function: its options


def impl_options(function):
    """The options ``@hookimpl`` gave ``function`` (tryfirst, wrapper, specname, ...), or None if unmarked."""
    return getattr(function, IMPL_MARK, None)


def is_hookimpl(function):
    """Whether ``function`` is marked ``@hookimpl``."""
    return impl_options(function) is not None


@hookspec
def vlmkit_register(registry):
    """Add this plugin's components: ``registry.add(kind, name, factory)``.

    ``factory`` is a class or function called with the recipe's keyword
    arguments. Called once per plugin when plugins are loaded.
    """


@hookspec
def vlmkit_freeze(model, stage):
    """Decide which parameters of ``model`` train in ``stage`` (a freeze policy).

    Called at the start of each stage on the freshly built model (every
    parameter trainable except what a component freezes by design, such as
    CLIP's bypassed patch embedding in the DeepEncoder), after ``init_from``
    weights are loaded; in a stage with ``adapters`` every parameter starts frozen
    instead, so a policy's ``trainable`` opens base parameters on purpose (they
    train beside the adapters). Implementations set ``requires_grad``; the
    trainer then puts every module whose parameters are all frozen in eval mode
    and builds the optimizer over exactly the trainable parameters. ``stage``
    is the ``core.recipe.Stage`` being run. May return ``{parameter name:
    lr multiplier}`` for trainable parameters that should learn at a multiple
    of the stage's lr (several policies naming one parameter multiply).
    """


@hookspec
def vlmkit_adapter_attach(model, frozen):
    """Put this adapter into ``model`` in place (LoRA and the like), adding its parameters.

    Returns None or ``{parameter name: lr multiplier}`` for the parameters it added.

    Called once per stage with adapters, after the freeze policies: every base parameter is frozen
    except those a policy opened on purpose (``trainable``). The parameters the hook adds are the
    adapter: they are trained, and they and the opened base parameters are all an adapter checkpoint
    holds (core/adapters.py). ``frozen`` names the parameters a component freezes by design (CLIP's
    bypassed patch embedding): layers made only of those are never called, so leave them alone.
    Also called to rebuild a checkpoint's model (``python -m core.generate``, ``core.merge``).
    """


@hookspec
def vlmkit_adapter_merge(model):
    """Fold this adapter into the weights of the layers it wrapped and put the plain layers back.

    Afterwards ``model.state_dict()`` has the names and shapes of the model without adapters
    (``python -m core.merge``). Returns None.
    """


@hookspec
def vlmkit_regulariser_loss(model, batch, outputs):
    """Return ``{name: scalar tensor}`` of extra losses for this training step, or None.

    ``batch`` is the dict from ``core.data.collate`` (pixel_values, input_ids, targets,
    texts, keys, and with crops tiles and grids); ``outputs`` is
    ``VisionLanguageModel.forward``'s dict (``loss``, ``vision_features`` before
    the projector, ``vision_tokens`` after it, laid out with newlines and
    separator, both the global view's even with crops; both None for a
    text-only batch, for which a vision regulariser returns None). Each loss is multiplied
    by the regulariser's own weight *before* being returned; the trainer adds
    them to the next-token loss and logs each one under its name. A
    regulariser that is an ``nn.Module`` has its parameters trained with the
    model and saved in the stage checkpoint.
    """


@hookspec
def vlmkit_metric_score(pred, gt):
    """Score one sample: return ``{value_name: float | None}``.

    ``pred`` is the system's text, ``gt`` the ground truth. ``None`` marks a
    value that is undefined for this sample (for example NED of two empty
    strings); aggregation decides what undefined means and documents it.
    Value names must be unique across the metrics used together.
    """


@hookspec
def vlmkit_metric_aggregate(rows):
    """Aggregate per-sample rows (dicts merged over all metrics) into ``{name: value}``.

    Each metric aggregates the value names it produced, documenting how
    (plain mean over samples, page averages, exclusions).
    """


@hookspec
def vlmkit_log(record):
    """Receive one log record (a flat dict with at least ``event``).

    Events: ``stage_start``, ``train`` (every ``run.log_every`` steps),
    ``checkpoint``, ``stage_end``, ``eval``. Loggers write them somewhere.
    """
