"""VisionLanguageModel: encoder -> projector -> vision token layout -> decoder.

The layout is DeepSeek-OCR's for one global view (architecture.md §2.3): the
projected h x w grid gets ``image_newline`` appended to every row and one
``view_separator`` at the end, h*(w+1)+1 embeddings that replace the same
number of ``<|image|>`` placeholder tokens in the prompt. 1024 px, patch 16,
downsample 4 gives 16*17+1 = 273; the tiny default obeys the same rule.

Image embeddings are merged *before* the decoder's input RMSNorm (nanochat
norms right after wte), so their scale is irrelevant (architecture.md §5).
"""
import torch
import torch.utils.checkpoint
from torch import nn

from core.errors import ConfigError
from core.weights import load_state


class VisionLanguageModel(nn.Module):
    def __init__(self, encoder, projector, decoder, image_token_id):
        super().__init__()
        self.encoder, self.projector, self.decoder = encoder, projector, decoder
        self.image_token_id = image_token_id
        n_embd = decoder.n_embd
        # architecture.md §2.3: randn * 1/sqrt(n_embed). DSO spells it "view_seperator"; loaders map the name.
        self.image_newline = nn.Parameter(torch.randn(n_embd) / n_embd ** 0.5)
        self.view_separator = nn.Parameter(torch.randn(n_embd) / n_embd ** 0.5)

    @property
    def image_size(self):
        return self.encoder.image_size

    def num_image_tokens(self):
        h, w = self.encoder.grid_size(self.image_size, self.image_size)
        return h * (w + 1) + 1

    def encode_images(self, pixel_values):
        """(B,3,S,S) -> (vision features (B,h,w,C_enc), vision tokens (B, h*(w+1)+1, n_embd))."""
        features = self.encoder(pixel_values)
        grid = self.projector(features)
        b, h, w, c = grid.shape
        newline = self.image_newline.to(grid.dtype).expand(b, h, 1, c)
        rows = torch.cat([grid, newline], dim=2).reshape(b, h * (w + 1), c)
        separator = self.view_separator.to(grid.dtype).expand(b, 1, c)
        return features, torch.cat([rows, separator], dim=1)

    def merge(self, input_ids, vision_tokens):
        """Token embeddings with the <|image|> positions replaced, in order, by the vision tokens."""
        embeds = self.decoder.embed(input_ids)
        is_image = input_ids == self.image_token_id
        expected = vision_tokens.shape[1]
        counts = is_image.sum(dim=1)
        if not torch.all(counts == expected):
            raise ValueError(f"each sequence needs {expected} <|image|> tokens; got {counts.tolist()}")
        return embeds.masked_scatter(is_image.unsqueeze(-1), vision_tokens.to(embeds.dtype))

    def forward(self, pixel_values, input_ids, targets=None):
        """``pixel_values`` None: a text-only batch, which skips the vision tower (DESIGN.md)."""
        if pixel_values is None:
            if bool((input_ids == self.image_token_id).any()):
                raise ValueError("a text-only batch (no pixel_values) holds <|image|> tokens")
            features, vision_tokens, embeds = None, None, self.decoder.embed(input_ids)
        else:
            features, vision_tokens = self.encode_images(pixel_values)
            embeds = self.merge(input_ids, vision_tokens)
        out = {"vision_features": features, "vision_tokens": vision_tokens}
        if targets is None:
            out["logits"] = self.decoder(embeds)
        else:
            out["loss"] = self.decoder(embeds, targets=targets)
        return out


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
    decoder = registry.build("decoder", dec.name, where="model.decoder",
                             **{"vocab_size": tokenizer.vocab_size, **dec.args})
    proj = model_config.projector
    projector = registry.build("projector", proj.name, where="model.projector",
                               in_dim=encoder.out_dim, out_dim=decoder.n_embd, **proj.args)
    model = VisionLanguageModel(encoder, projector, decoder, tokenizer.image_id)
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
    if not model.image_newline.is_meta:
        with torch.no_grad():
            for name, value in vectors.items():
                getattr(model, name).copy_(value)
    print(f"model: {', '.join(sorted(extras))} from the encoder's checkpoint")


def parameter_table(model, component_depth=2):
    """Rows (component, trainable, frozen) grouping parameters by the first name parts (encoder.sam, decoder, ...)."""
    rows = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:component_depth]) if parts[0] == "encoder" and len(parts) > 2 else parts[0]
        trainable, frozen = rows.get(key, (0, 0))
        rows[key] = (trainable + p.numel(), frozen) if p.requires_grad else (trainable, frozen + p.numel())
    return [(k, t, f) for k, (t, f) in rows.items()]


def format_parameter_table(rows, title=""):
    width = max([len("component")] + [len(r[0]) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'component':<{width}}  {'trainable':>12}  {'frozen':>12}")
    for name, t, f in rows:
        lines.append(f"{name:<{width}}  {t:>12,}  {f:>12,}")
    total_t, total_f = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {total_t:>12,}  {total_f:>12,}")
    return "\n".join(lines)
