"""VisionLanguageModel: encoder -> projector -> vision token layout -> decoder.

The encoder declares its layout (``token_layout``, core/contracts.py); two exist:

* ``rows`` (the default; DeepSeek-OCR, docs/architecture.md §2.3). One global view: the
  projected h x w grid gets ``image_newline`` appended to every row and one
  ``view_separator`` at the end, h*(w+1)+1 embeddings that replace the same
  number of ``<|image|>`` placeholder tokens in the prompt. 1024 px, patch 16,
  downsample 4 gives 16*17+1 = 273; the tiny default obeys the same rule.
  With crops (``model.crops``, core/images.py) an image larger than a tile also has
  across x down local tiles: their grids are joined into one (down*h2) x (across*w2)
  map, each row followed by the newline, and these local rows come FIRST, then the
  global rows and the separator (DeepSeek-OCR's order; §2.3).
* ``flat`` (DeepSeek-OCR 2, §7.4): no newline (the model has no ``image_newline``); each
  view's grid is flattened row-major, the tiles one after another (row-major), then the
  global view, then the separator: h*w+1 tokens plus h2*w2 per tile.

The count differs per image with crops, so each sample's sequence is merged into its own placeholders.

Image embeddings are merged *before* the decoder's input RMSNorm (nanochat
norms right after wte), so their scale is irrelevant (docs/architecture.md §5).
"""
import contextlib

import torch
import torch.utils.checkpoint
from torch import nn

from core.distributed import print0
from core.errors import ConfigError, PluginError
from core.images import LAYOUTS, Tiling, image_hw
from core.weights import load_state, on_meta


class VisionLanguageModel(nn.Module):
    def __init__(self, encoder, projector, decoder, image_token_id, tiling=None):
        super().__init__()
        self.encoder, self.projector, self.decoder = encoder, projector, decoder
        self.image_token_id = image_token_id
        self.tiling = tiling  # core.images.Tiling, or None: the global view alone
        self.layout = getattr(encoder, "token_layout", "rows")
        if self.layout not in LAYOUTS:
            raise PluginError(f"encoder {type(encoder).__name__}: token_layout {self.layout!r} is not one of "
                              f"{', '.join(LAYOUTS)}")
        n_embd = decoder.n_embd
        # docs/architecture.md §2.3: randn * 1/sqrt(n_embed). DeepSeek-OCR spells it "view_seperator";
        # loaders map the name.
        newline = nn.Parameter(torch.randn(n_embd) / n_embd ** 0.5) if self.layout == "rows" else None
        self.register_parameter("image_newline", newline)  # None in the flat layout: no such tensor at all
        self.view_separator = nn.Parameter(torch.randn(n_embd) / n_embd ** 0.5)

    @property
    def image_size(self):
        return self.encoder.image_size

    def num_image_tokens(self, grid=None):
        """Placeholders for an image with crop grid ``grid`` (across, down), or None: the global view alone."""
        h, w = self.encoder.grid_size(*image_hw(self.image_size))
        count = (h * (w + 1) if self.layout == "rows" else h * w) + 1
        if grid is None:
            return count
        if self.tiling is None:
            raise ValueError(f"a crop grid {tuple(grid)} for a model without crops (model.crops)")
        return count + self.tiling.local_tokens(tuple(grid))

    def describe_layout(self):
        """One line for --dry-run: the global view's tokens and where they come from."""
        height, width = image_hw(self.image_size)
        h, w = self.encoder.grid_size(height, width)
        rows = f"{h} rows of {w} + newline" if self.layout == "rows" else f"{h}x{w} flattened, no newline"
        n = self.num_image_tokens()
        return f"image {height}x{width} -> grid {h}x{w} -> {n} vision tokens ({rows}, + 1 separator)"

    def encode_images(self, pixel_values):
        """(B,3,H,W) -> (vision features (B,h,w,C_enc), vision tokens (B, n, n_embd)), n = num_image_tokens()."""
        features = self.encoder(pixel_values)
        grid = self.projector(features)
        b, h, w, c = grid.shape
        if self.layout == "rows":
            newline = self.image_newline.to(grid.dtype).expand(b, h, 1, c)
            tokens = torch.cat([grid, newline], dim=2).reshape(b, h * (w + 1), c)
        else:
            tokens = grid.reshape(b, h * w, c)
        separator = self.view_separator.to(grid.dtype).expand(b, 1, c)
        return features, torch.cat([tokens, separator], dim=1)

    def _local_tokens(self, local, grid):
        """One image's projected tiles (across*down, h2, w2, C), row-major -> its local tokens (n, C)."""
        across, down = grid
        _, h2, w2, c = local.shape
        if self.layout == "flat":
            return local.reshape(-1, c)  # tile after tile (DeepSeek-OCR 2, §7.4)
        rows = (local.reshape(down, across, h2, w2, c).permute(0, 2, 1, 3, 4)
                .reshape(down * h2, across * w2, c))  # the tiles' grids side by side (DeepSeek-OCR's permute)
        newline = self.image_newline.to(local.dtype).expand(down * h2, 1, c)
        return torch.cat([rows, newline], dim=1).reshape(-1, c)

    def encode_views(self, pixel_values, tiles=None, grids=None):
        """Global views plus crops -> (global features, global tokens, per-sample token sequences).

        ``tiles`` (N, 3, t, t): every sample's tiles, in sample order, each row-major; ``grids``: per
        sample (across, down) or None (no crops). The sequences are a list of (n_i, n_embd): local rows
        then the global view's tokens; without ``tiles`` they are the global tokens themselves (B, n, C).
        """
        features, global_tokens = self.encode_images(pixel_values)
        if tiles is None:
            if grids is not None and any(g is not None for g in grids):
                raise ValueError("crop grids without tiles")
            return features, global_tokens, global_tokens
        if grids is None or len(grids) != pixel_values.shape[0]:
            raise ValueError(f"tiles need one grid (or None) per image; got {grids!r} for {pixel_values.shape[0]}")
        grids = [None if g is None else tuple(g) for g in grids]  # DataLoader workers turn tuples into lists
        counts = [0 if g is None else g[0] * g[1] for g in grids]
        if sum(counts) != tiles.shape[0]:
            raise ValueError(f"grids {grids} need {sum(counts)} tiles; got {tiles.shape[0]}")
        local = self.projector(self.encoder(tiles))  # (N, h2, w2, C): all tiles of the batch in one pass
        sequences, start = [], 0
        for grid, count, view in zip(grids, counts, global_tokens):
            if grid is None:
                sequences.append(view)
                continue
            tokens = self._local_tokens(local[start:start + count], grid)
            sequences.append(torch.cat([tokens, view]))  # local first, then the global view + separator
            start += count
        return features, global_tokens, sequences

    def merge(self, input_ids, vision_tokens):
        """Token embeddings with each sequence's <|image|> positions replaced, in order, by its vision tokens.

        ``vision_tokens``: (B, n, C), or a list of B (n_i, C) when the counts differ (crops).
        """
        embeds = self.decoder.embed(input_ids)
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1).tolist()
        expected = [len(v) for v in vision_tokens]
        if counts != expected:
            shown = expected[0] if len(set(expected)) == 1 else expected  # one count, or one per sequence
            raise ValueError(f"each sequence needs {shown} <|image|> tokens; got {counts}")
        flat = vision_tokens if torch.is_tensor(vision_tokens) else torch.cat(list(vision_tokens))
        return embeds.masked_scatter(is_image.unsqueeze(-1), flat.to(embeds.dtype))

    def forward(self, pixel_values, input_ids, targets=None, tiles=None, grids=None):
        """``pixel_values`` None: a text-only batch, which skips the vision tower (DESIGN.md).

        ``vision_features`` / ``vision_tokens`` in the output are the global view's, (B,h,w,C) and
        (B, num_image_tokens(), n_embd), with or without crops: what regularisers and the collapse monitor read.
        """
        if pixel_values is None:
            if bool((input_ids == self.image_token_id).any()):
                raise ValueError("a text-only batch (no pixel_values) holds <|image|> tokens")
            features, vision_tokens, embeds = None, None, self.decoder.embed(input_ids)
        else:
            features, vision_tokens, sequences = self.encode_views(pixel_values, tiles, grids)
            embeds = self.merge(input_ids, sequences)
        out = {"vision_features": features, "vision_tokens": vision_tokens}
        ids = token_ids(self.decoder, input_ids)
        if targets is None:
            out["logits"] = self.decoder(embeds, **ids)
        else:
            out["loss"] = self.decoder(embeds, targets=targets, **ids)
        return out


def token_ids(decoder, ids):
    """The ``ids=`` keyword for a decoder that reads the token ids behind its embeddings (``reads_ids``,
    core/contracts.py Decoder), the <|image|> id at vision positions; {} for one that does not."""
    return {"ids": ids} if getattr(decoder, "reads_ids", False) else {}


def last_only(decoder):
    """The ``last_only=True`` keyword for a decoder that can give the last position's logits alone
    (``keeps_last``, core/contracts.py Decoder); {} for one that cannot (generation then slices)."""
    return {"last_only": True} if getattr(decoder, "keeps_last", False) else {}


@contextlib.contextmanager
def evaluating(model):
    """Eval mode inside; afterwards every module's own mode back, so frozen parts stay in eval mode
    (``model.train(was_training)`` would wake them)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def build_model(model_config, registry):
    """Build (model, tokenizer) from the recipe's ``model`` section by registered names."""
    tok = model_config.tokenizer
    tokenizer = registry.build("tokenizer", tok.name, where="model.tokenizer", **tok.args)
    enc = model_config.encoder
    encoder = registry.build("encoder", enc.name, where="model.encoder", **enc.args)
    dec = model_config.decoder
    if "vocab_size" in dec.args and dec.args["vocab_size"] != tokenizer.vocab_size:
        raise ConfigError(f"model.decoder.vocab_size: {dec.args['vocab_size']} does not match the tokenizer's "
                          f"{tokenizer.vocab_size}; leave it out, it is taken from the tokenizer")
    decoder = registry.build("decoder", dec.name, where="model.decoder", context={"image_id": tokenizer.image_id},
                             **{"vocab_size": tokenizer.vocab_size, **dec.args})
    proj = model_config.projector
    projector = registry.build("projector", proj.name, where="model.projector",
                               in_dim=encoder.out_dim, out_dim=decoder.n_embd, **proj.args)
    tiling = Tiling.for_encoder(encoder, model_config.crops)
    model = VisionLanguageModel(encoder, projector, decoder, tokenizer.image_id, tiling)
    extras = getattr(encoder, "pretrained_extras", None)  # e.g. DeepSeek-OCR's projector and layout tokens
    if extras:
        _load_extras(model, extras)
    return model, tokenizer


def checkpoint_activations(model, components, where="activation_checkpointing"):
    """Recompute the blocks of the named components (e.g. ``encoder.sam``, ``decoder``) in the backward pass.

    Every module in an ``nn.ModuleList`` inside the component is a block; its activations are
    dropped after the forward and recomputed for the gradients, trading compute for memory
    (the original project ran out of memory at seq 4096, batch 8, on an H100). Only while
    training with gradients: generation and evaluation run the blocks as they are.
    """
    for i, path in enumerate(components):
        try:
            component = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"{where}.{i}: the model has no component {path!r}") from None
        blocks = [b for m in component.modules() if isinstance(m, nn.ModuleList) for b in m]
        if not blocks:
            raise ConfigError(f"{where}.{i}: {path!r} has no list of blocks to checkpoint")
        for block in blocks:
            block.forward = _recomputed(block, block.forward)


def _recomputed(block, forward):
    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def _load_extras(model, extras):
    """The projector and layout tokens that came with the encoder's checkpoint (DeepSeek-OCR's)."""
    source = "model.encoder.weights"
    projector = {k.removeprefix("projector."): v for k, v in extras.items() if k.startswith("projector.")}
    vectors = {k: v for k, v in extras.items() if not k.startswith("projector.")}
    for name, value in vectors.items():
        target = getattr(model, name, None)
        if not isinstance(target, nn.Parameter) or target.shape != value.shape:
            raise ConfigError(f"{source}: {name} {tuple(value.shape)} does not fit the model "
                              f"({None if target is None else tuple(target.shape)})")
    if projector:
        load_state(model.projector, projector, source=source, name="projector")
    if not on_meta(model):
        with torch.no_grad():
            for name, value in vectors.items():
                getattr(model, name).copy_(value)
    print0(f"model: {', '.join(sorted(extras))} from the encoder's checkpoint")
