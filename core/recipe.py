"""The recipe: an attrs schema for every key, YAML loading, and key=value overrides.

Every recipe key is declared here. A component is a mapping with a ``name``
(looked up in the registry) and the keyword arguments of its constructor:
``{name: nanochat, n_layer: 20}``. Errors name the key path and, where it
exists in the file, the YAML line: ``recipes/x.yaml:14: stages.0.lr: ...``.
"""
import math
import os
import types
import typing

import attrs
import PIL.Image
import yaml

from core import yamlfile
from core.badsamples import ON_BAD_SAMPLE, ON_LONG_TARGET
from core.errors import ConfigError, closest
from core.pluginfiles import resolve_plugin_paths
from core.yamlfile import apply_override


@attrs.define
class Component:
    """A registry component: its name and its constructor's keyword arguments."""
    name: str
    args: dict = attrs.field(factory=dict)


class FieldError(ValueError):
    """A value outside what its key allows; ``key`` names the field, so the error names the recipe key and line."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key = key


def check_ranges(obj, at_least):
    """FieldError for the first ``{key: lowest allowed}`` value below its bound or not finite; else it fails
    far from the recipe (log_every 0 divides by zero, checkpoint_keep -1 deletes the new checkpoint)."""
    for key, low in at_least.items():
        value = getattr(obj, key)
        if value is None:
            continue
        if not math.isfinite(value):
            raise FieldError(key, f"must be a finite number, not {value}")
        if value < low:
            raise FieldError(key, f"must be at least {low}, not {value}")


@attrs.define
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # None: the idle cores, re-checked while training (core/threads.py)
    log_every: int = 20
    resume: str = "never"  # auto: continue an interrupted run in run.dir from its checkpoints (core/resume.py)
    precision: str = "fp32"  # bf16: autocast the forward pass to bfloat16 (GPUs; works, slowly, on CPUs)
    compile: bool = False  # torch.compile the training forward (minutes of compiling; pays off on long GPU runs)
    parallel: str = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2 shards the model; core/distributed.py)

    def __attrs_post_init__(self):
        for key, *options in (("resume", "never", "auto"), ("precision", "fp32", "bf16"), ("parallel", "ddp", "fsdp")):
            if getattr(self, key) not in options:
                raise FieldError(key, f"must be {' or '.join(options)}, not {getattr(self, key)!r}")
        check_ranges(self, {"log_every": 1, "threads": 1})


@attrs.define
class Crops:
    """DeepSeek-OCR's gundam crops (core/images.py, docs/architecture.md §2.4): local tiles besides the global view.

    Under ``model`` because they set how many vision tokens an image becomes, so a checkpoint's
    meta json carries them to ``python -m core.generate``.
    """
    tile_size: int = 640
    min_tiles: int = 2  # DeepSeek-OCR's min_num
    max_tiles: int = 9  # DeepSeek-OCR's max_num in HF infer; vLLM's MAX_CROPS is 6

    def __attrs_post_init__(self):
        if self.tile_size < 1:
            raise FieldError("tile_size", f"must be at least 1, not {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, not min_tiles {self.min_tiles}, "
                             f"max_tiles {self.max_tiles}")


COMPONENTS = ("encoder", "projector", "decoder", "tokenizer")  # the components of ModelConfig
MODEL_PARTS = tuple(c for c in COMPONENTS if c != "tokenizer")  # the components with weights


@attrs.define
class ModelConfig:
    encoder: Component
    projector: Component
    decoder: Component
    tokenizer: Component
    crops: Crops | None = None  # off: the global view alone


@attrs.define
class DataConfig:
    dataset: Component
    prompt: str = "<image>\nFree OCR."
    batch_size: int = 16
    max_len: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resample: bool = False  # false: epochs, each a fresh shard order; true: shards drawn with replacement, endless
    on_bad_sample: str = "skip"  # skip: count by reason and shard (printed per stage) | error: stop, naming shard + key
    on_long_target: str = "truncate"  # a text longer than max_len allows: truncate | skip (counted either way)
    max_image_pixels: int | None = PIL.Image.MAX_IMAGE_PIXELS  # larger images are bad samples; null: no limit
    text_dataset: Component | None = None  # text-only samples for a stage's text_ratio

    def __attrs_post_init__(self):
        for key, options in (("on_bad_sample", ON_BAD_SAMPLE), ("on_long_target", ON_LONG_TARGET)):
            if getattr(self, key) not in options:
                raise FieldError(key, f"must be {' or '.join(options)}, not {getattr(self, key)!r}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise FieldError("max_image_pixels", f"must be at least 1 (or null: no limit), not {self.max_image_pixels}")
        check_ranges(self, {"batch_size": 1, "max_len": 1, "num_workers": 0, "shuffle_buffer": 0})


@attrs.define
class InitFrom:
    """Start a stage from saved weights: a checkpoint file, a run folder's stage ("stage:NAME"), and which parts."""
    path: str
    parts: list[str] = attrs.field(factory=lambda: ["encoder", "projector", "decoder", "vision_layout"])


@attrs.define
class Stage:
    name: str
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.95])
    warmup: int = 0
    schedule: str = "constant"  # constant | step | cosine
    decay_every: int | None = None  # step schedule: multiply by decay_factor every N steps
    decay_factor: float = 0.1
    optimizer: str = "adamw"  # adamw | muon: nanochat's Muon for the matrices of muon_parts, AdamW for the rest
    muon_lr: float = 0.02  # docs/architecture.md §1.7
    muon_parts: list[str] = attrs.field(factory=lambda: ["decoder"])  # core/muon.py muon_matrices: + encoder
    grad_clip: float = 1.0
    grad_accum: int = 1  # batches per optimizer step (the effective batch is batch_size * grad_accum * ranks)
    activation_checkpointing: list[str] = attrs.field(factory=list)  # components whose blocks recompute in backward
    batch_size: int | None = None  # default: data.batch_size
    freeze: list[Component] = attrs.field(factory=list)
    regularisers: list[Component] = attrs.field(factory=list)
    adapters: list[Component] = attrs.field(factory=list)  # train these instead of the base (core/adapters.py)
    init_from: InitFrom | None = None
    checkpoint_every: int = 0  # 0: only at the end of the stage
    checkpoint_keep: int | None = None  # keep the newest N checkpoints of the stage (None: all)
    probe_every: int = 0  # >0: every N steps greedy-decode eval.probe_samples held-out samples and log exact/NED
    stop_when_exact: bool = False  # with probe_every: stop the stage once every probe sample is read exactly
    monitor_every: int = 0  # >0: every N steps log the collapse monitor (core/monitor.py)
    text_ratio: float = 0.0  # the share of steps that train on a text-only batch from data.text_dataset
    model: dict | None = None  # this stage's changes to model, e.g. {decoder: {n_layer: 1}} (core/stageconfig.py)
    dataset: dict | None = None  # this stage's changes to data.dataset, e.g. {effects: {blur: 0.5}}

    def __attrs_post_init__(self):
        if self.optimizer not in ("adamw", "muon"):
            raise FieldError("optimizer", f"must be adamw or muon, not {self.optimizer!r}")
        if not set(self.muon_parts) <= set(MODEL_PARTS):
            raise FieldError("muon_parts", f"parts are {', '.join(MODEL_PARTS)}, not {self.muon_parts}")
        if self.grad_accum < 1:
            raise FieldError("grad_accum", f"must be at least 1, not {self.grad_accum}")
        if not 0.0 <= self.text_ratio <= 1.0:
            raise FieldError("text_ratio", f"must lie in [0, 1], not {self.text_ratio}")
        for key, change in (self.model or {}).items():
            if key not in COMPONENTS or not isinstance(change, dict):
                raise FieldError(f"model.{key}", f"a stage changes components ({', '.join(COMPONENTS)}), each with "
                                                 f"a mapping of arguments, not {key}: {change!r}")
        if self.schedule not in ("constant", "step", "cosine"):
            raise FieldError("schedule", f"must be constant, step or cosine, not {self.schedule!r}")
        # steps: 0 skips the stage (core/run.py says so); a negative count has no meaning
        check_ranges(self, {"steps": 0, "lr": 0, "weight_decay": 0, "warmup": 0, "decay_every": 1,
                            "decay_factor": 0, "muon_lr": 0, "grad_clip": 0, "batch_size": 1,
                            "checkpoint_every": 0, "checkpoint_keep": 1, "probe_every": 0, "monitor_every": 0})
        if self.schedule == "step" and self.decay_every is None:  # else the lr would silently stay constant
            raise FieldError("decay_every", "schedule: step needs decay_every (steps between decays)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FieldError("betas", f"must be two numbers in [0, 1), not {self.betas}")


@attrs.define
class EvalConfig:
    samples: int = 256
    probe_samples: int = 64  # the first N eval samples, decoded during training when a stage sets probe_every
    show_samples: int = 8  # per-sample lines printed at the end (all go to eval_samples.jsonl)
    max_new_tokens: int = 64
    batch_size: int = 32
    metrics: list[Component] = attrs.field(factory=lambda: [Component("fox"), Component("ned"), Component("exact")])
    no_repeat_ngram: int = 0  # >0: DeepSeek-OCR's no-repeat-n-gram rule while decoding (core/repetition.py)
    no_repeat_window: int = 90  # the generated tokens no_repeat_ngram looks back over
    no_repeat_exempt: list[str] = attrs.field(factory=list)  # token ids (or one-token strings) never banned
    stop_loops: bool = False  # stop a sample whose text ends in a loop (a 1-5 character pattern > 30 times)

    def __attrs_post_init__(self):
        check_ranges(self, {"samples": 1, "probe_samples": 1, "show_samples": 0, "max_new_tokens": 1,
                            "batch_size": 1, "no_repeat_ngram": 0, "no_repeat_window": 1})


@attrs.define
class Recipe:
    model: ModelConfig
    data: DataConfig
    stages: list[Stage]
    run: RunConfig = attrs.field(factory=RunConfig)
    eval: EvalConfig | None = attrs.field(factory=EvalConfig)
    plugins: list[str] = attrs.field(factory=list)
    loggers: list[Component] = attrs.field(factory=lambda: [Component("jsonl")])
    source: str = attrs.field(default="<recipe>", metadata={"internal": True})


# ---------------------------------------------------------------- loading

def load_recipe(path, overrides=()):
    """Read a YAML recipe, apply ``a.b.0.c=value`` overrides, and validate it into a Recipe."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = yamlfile.load(text)  # YAML 1.2 floats: 1e-5 is a number (core/yamlfile.py)
        lines = yamlfile.line_numbers(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model, data, stages, ...)")
    given = {}
    for key, item, label, value in yamlfile.overrides(overrides):
        apply_override(raw, item, value)
        for line in [k for k in lines if k == key or k.startswith(key + ".")]:
            del lines[line]  # an overridden key (and what it held) is no longer on that line
        given[key] = label
    where = _Where(path, lines, given)
    recipe = structure(Recipe, raw, "", where)
    if not recipe.stages:
        raise where.error("stages", "a recipe needs at least one stage")
    for i, stage in enumerate(recipe.stages):
        if stage.text_ratio > 0 and recipe.data.text_dataset is None:
            raise where.error(f"stages.{i}.text_ratio", "text-only steps need data.text_dataset")
        names = [c.name for c in stage.regularisers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # a regulariser's head is trained and saved under its name: a second would replace the first
            raise where.error(f"stages.{i}.regularisers", f"{twice[0]!r} is listed twice; a stage takes each "
                                                          f"regulariser once (give one a larger weight instead)")
        if stage.optimizer == "muon" and stage.adapters:  # Muon would take the adapters' low-rank factors
            raise where.error(f"stages.{i}.optimizer", "muon orthogonalises whole weight matrices; a stage with "
                                                       "adapters trains their low-rank factors with adamw")
        if stage.optimizer == "muon" and recipe.run.parallel == "fsdp":  # Muon orthogonalises whole matrices
            raise where.error(f"stages.{i}.optimizer",
                              "muon needs whole matrices; it does not work with run.parallel: fsdp")
    if recipe.run.compile and recipe.run.parallel == "fsdp":
        raise where.error("run.compile", "not supported with run.parallel: fsdp (untested together); use ddp")
    if all(stage.steps == 0 for stage in recipe.stages):
        raise where.error("stages", "every stage has steps: 0; there is nothing to train or evaluate")
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise where.error("stages", f"stage names must be unique (they name the stage folders): {names}")
    recipe.plugins = resolve_plugin_paths(recipe.plugins, os.path.dirname(os.path.abspath(path)), where)
    recipe.source = path
    return recipe


def run_folder(recipe):
    """The run's folder, run.dir made absolute."""
    return os.path.abspath(os.path.expanduser(recipe.run.dir))


def model_config_from_meta(model_meta, source):
    """The ``model`` section saved in a checkpoint's meta json (attrs.asdict form) -> ModelConfig."""
    raw = {k: {"name": v["name"], **v.get("args", {})} if k in COMPONENTS else v for k, v in model_meta.items()}
    return structure(ModelConfig, raw, "model", _Where(source, {}))


class _Where:
    """Where a recipe key came from: a line of the file, or an override (``overrides``: {key: label})."""

    def __init__(self, path, lines, overrides=None):
        self.path, self.lines, self.overrides = path, lines, overrides or {}

    def error(self, keypath, message):
        # the nearest enclosing key that an override set or that is on a known line
        probe = keypath
        while probe and probe not in self.lines and probe not in self.overrides:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
        where = self.overrides.get(probe) or (f"{self.path}:{line}" if line else self.path)
        return ConfigError(f"{where}: {keypath or '<top>'}: {message}")


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def structure(tp, value, path, where):
    """Turn raw YAML data into ``tp`` (an attrs class, Component, list, Optional, scalar), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return structure(options[0], value, path, where)
    if tp is Component:
        return _structure_component(value, path, where)
    if attrs.has(tp):
        return _structure_attrs(tp, value, path, where)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise where.error(path, f"expected a list, got {_describe(value)}")
        return [structure(item_type, v, _join(path, i), where) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise where.error(path, f"expected a mapping, got {_describe(value)}")
        return value
    return _structure_scalar(tp, value, path, where)


def _structure_scalar(tp, value, path, where):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"recipe schema has an unsupported type {tp!r} at {path}")
    raise where.error(path, f"expected {tp.__name__}, got {_describe(value)}")


def _structure_component(value, path, where):
    if isinstance(value, str):
        return Component(value)
    if not isinstance(value, dict) or "name" not in value:
        raise where.error(path, f"expected a component mapping with a 'name' key, got {_describe(value)}")
    args = dict(value)
    name = args.pop("name")
    if not isinstance(name, str):
        raise where.error(_join(path, "name"), f"expected a component name, got {_describe(name)}")
    return Component(name, args)


def _structure_attrs(cls, value, path, where):
    if not isinstance(value, dict):
        raise where.error(path, f"expected a mapping for {cls.__name__}, got {_describe(value)}")
    fields = {f.name: f for f in attrs.fields(cls) if not f.metadata.get("internal")}
    for key in value:
        if key not in fields:
            raise where.error(_join(path, key), f"unknown key{closest(key, fields)}; {path or 'the recipe'} takes: "
                                                f"{', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = structure(field.type, value[name], _join(path, name), where)
        elif field.default is attrs.NOTHING:
            raise where.error(path, f"missing key {name!r}")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise where.error(_join(path, e.key), str(e)) from e
    except ValueError as e:
        raise where.error(path, str(e)) from e


def _describe(value):
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"

