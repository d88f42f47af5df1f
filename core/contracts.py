"""What a plugin must implement: one Protocol per component kind, checked when a component is built.

A plugin registers factories (``core/hookspecs.py``, ``vlmkit_register``); the registry calls a
factory with the recipe's keyword arguments plus the objects below that its signature names
(``CONTEXT``), then checks the object it got against its kind's Protocol here: a missing
required member is one error line naming the component and the plugin that registered it.
Subclassing these Protocols is optional; having the members is not. Members marked optional
in a Protocol's docstring are looked up with ``getattr`` and may be left out.

Behaviour kinds (freeze, adapter, regulariser, metric, logger) are objects whose ``@hookimpl`` methods
the core calls through pluggy (``core/hookspecs.py`` documents each hook); ``BEHAVIOUR_HOOKS``
says which hooks each kind must implement.
"""
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from core.hookspecs import impl_options

# Objects the core hands a factory, by parameter name, when its signature names them; never from
# the recipe (a recipe key of the same name is an error).
CONTEXT = {
    "projector": ("in_dim", "out_dim"),  # the encoder's out_dim, the decoder's n_embd
    "decoder": ("vocab_size", "image_id"),  # the tokenizer's vocabulary, <|image|> included; <|image|>'s id
    "regulariser": ("model", "tokenizer"),  # the stage's freshly built VisionLanguageModel
    "freeze": (),
    "adapter": (),
    "logger": ("run_dir",),  # the run folder (absolute)
}


class Encoder(Protocol):
    """Images -> a grid of features. An ``nn.Module``.

    ``image_size``: the global view, an int S (a square S x S, DeepSeek-OCR's) or [height, width] (a
    rectangle, e.g. a text strip; other images are padded to its aspect): core.images.image_hw reads both.
    ``forward(pixel_values)``: (B, 3, H, W) in [-1, 1], (H, W) the view's size -> (B, h, w, out_dim),
    rows top to bottom. ``grid_size(height, width)`` -> (h, w), the grid an image of that size gives.
    Optional: ``muon_matrices() -> iterable of parameter names`` (relative to the encoder) that a stage's
    ``muon_parts: [encoder]`` orthogonalises (default: core.muon.muon_matrices);
    ``feature_parts() -> {name: slice}`` (which output channels come from which
    sub-network; the collapse monitor scores each, parameter tables list each);
    ``pretrained_extras: dict`` (tensors of the whole model that came with the encoder's
    checkpoint: ``projector.*``, ``image_newline``, ``view_separator``; loaded by the model builder);
    ``token_layout: str`` (how core/model.py lays the projected grids out as decoder tokens:
    ``"rows"``, the default, DeepSeek-OCR's rows + newline; ``"flat"``, DeepSeek-OCR 2's flattened
    views without newline; docs/architecture.md §7.4);
    ``export_hf(out_dir, model, tokenizer) -> str``: write the whole vision-language ``model`` as a
    folder transformers' ``from_pretrained`` loads (config, safetensors, tokenizer and processor files),
    for an architecture transformers has; return one line saying what was written. ``python -m
    core.export`` asks the encoder first (a model is named by its vision side), then the decoder.
    """
    image_size: int | Sequence[int]
    out_dim: int

    def grid_size(self, height: int, width: int) -> tuple: ...

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class Projector(Protocol):
    """(B, h, w, in_dim) -> (B, h, w, out_dim). An ``nn.Module``; built with ``in_dim``, ``out_dim``."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...


class Decoder(Protocol):
    """A decoder-only language model taking embeddings. An ``nn.Module``; built with ``vocab_size``.

    ``embed(ids)``: (B, T) -> (B, T, n_embd), before any norm (vision tokens replace rows of it).
    ``forward(embeds, targets=None, kv_cache=None)``: logits (B, T, vocab) or, with ``targets``
    (-1 = no loss), the mean cross-entropy. ``make_kv_cache(batch_size, seq_len)``: a cache
    that ``forward`` fills and reads one chunk after another (generation).
    Optional: ``muon_matrices() -> iterable of parameter names`` (relative to the decoder) that
    ``optimizer: muon`` orthogonalises; without it every 2-D weight of the decoder's
    ``nn.ModuleList`` blocks (and any convolution filter) is taken: core.muon.muon_matrices.
    ``export_hf(out_dir, tokenizer) -> str``: write the language model as a folder transformers'
    ``from_pretrained`` loads (its special ids from ``tokenizer``);
    return one line saying what was written (``python -m core.export``). ``reads_ids: bool``: when
    true, every call also passes ``ids=`` (B, T), the token ids behind the embeddings, the <|image|> id
    at vision positions (a decoder with value embeddings looked up by id needs them).
    ``keeps_last: bool``: when true, ``forward`` also takes ``last_only=True`` and then returns the
    logits of the last position only, (B, 1, vocab): generation's prefill runs the head once per row
    instead of once per prompt position (at a 65,536 vocabulary that is most of the prefill's time).
    """
    n_embd: int

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def make_kv_cache(self, batch_size: int, seq_len: int) -> object: ...

    def __call__(self, embeds: torch.Tensor, targets=None, kv_cache=None) -> torch.Tensor: ...


class Tokenizer(Protocol):
    """Text <-> ids, with the special tokens vlmkit's layout needs.

    ``image_id`` is the ``<|image|>`` placeholder; ``eos_id`` ends an answer (generation stops
    there); ``pad_id`` fills short rows (never a target). ``decode`` skips special ids.
    Optional: ``export_hf(out_dir) -> str``: write the tokenizer files transformers' ``AutoTokenizer``
    reads, with the same ids; return one line saying what was written.
    """
    vocab_size: int
    bos_id: int
    eos_id: int
    image_id: int
    pad_id: int

    def encode(self, text: str) -> list: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class Dataset(Protocol):
    """Where the samples are: ``shards(split)`` -> the shard paths of ``"train"`` or ``"eval"``.

    A shard is a WebDataset tar: per sample an image (png/jpg/jpeg/webp) and its text (txt), or a
    LLaVA-style ``json`` conversation (docs/data.md, "Your own data"). A dataset may write its shards
    on first use (``synthetic_ocr`` renders and caches them); optional ``writes_shards = True`` says so,
    and ``--dry-run`` (core/datacheck.py) then does not call ``shards``.
    """

    def shards(self, split: str) -> list: ...


class Source(Protocol):
    """A format that ``python -m core.shards FORMAT SOURCE`` reads into shards.

    ``read(source, images_root)`` yields ``core.sources.Item`` (one sample, files not read yet) or
    ``core.sources.Skip`` (reason, where); malformed input raises ConfigError naming file, line
    and key. ``needs``: "file", "folder" or "either", what SOURCE must be.
    """
    needs: str

    def read(self, source: str, images_root=None) -> Iterable: ...


class MetricInput(Protocol):
    """A file format ``python -m core.metrics --format NAME`` scores: other systems' outputs.

    ``read(pred_path, gt_path)`` -> a list of ``(id, pred, gt, page)`` (page None, or a page key
    that page-averaging metrics group by). ``needs_gt``: whether ``--gt`` is required (False: the
    file holds both sides, and ``--gt`` is refused). Optional: ``several_gt: bool``: when true,
    ``gt_path`` may also be a list of paths (``--gt``/``--tests`` given several, as a shell expands
    ``BENCH/*.jsonl``); otherwise several are refused in one line.
    """
    needs_gt: bool

    def read(self, pred_path: str, gt_path=None) -> list: ...


PROTOCOLS = {"encoder": Encoder, "projector": Projector, "decoder": Decoder, "tokenizer": Tokenizer,
             "dataset": Dataset, "source": Source, "metric_input": MetricInput}
BEHAVIOUR_HOOKS = {
    "freeze": ("vlmkit_freeze",),
    "adapter": ("vlmkit_adapter_attach", "vlmkit_adapter_merge"),
    "regulariser": ("vlmkit_regulariser_loss",),
    "metric": ("vlmkit_metric_score", "vlmkit_metric_aggregate"),
    "logger": ("vlmkit_log",),
}


def required_members(protocol):
    """The member names a Protocol declares: annotated attributes and methods (``__call__`` included)."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and (not n.startswith("_") or n == "__call__")}
    return sorted(names)


def implemented_hooks(obj):
    """The hooks ``obj``'s ``@hookimpl`` members implement: each one's name, or the hook its ``specname`` names."""
    names = dir(obj)
    marks = [impl_options(getattr(obj, n, None)) for n in names]
    return {(m.get("specname") or n) for n, m in zip(names, marks) if m is not None}


def missing_members(kind, obj):
    """The members ``obj`` lacks for its ``kind`` (Protocol members, or the behaviour hooks); [] if none."""
    if kind in PROTOCOLS:
        return [n for n in required_members(PROTOCOLS[kind]) if not hasattr(obj, n)]
    return [h for h in BEHAVIOUR_HOOKS.get(kind, ()) if h not in implemented_hooks(obj)]
