"""DeepSeek-OCR 2's vision encoder: SAM ViT-B with its compressor, then a Qwen2 encoder reading SAM's map
with learned queries (docs/architecture.md §7.2).

* ``sam``: vlmkit's SAMEncoder (plugins/encoders/sam.py), the same network DeepSeek-OCR 2 uses (neck, then two
  stride-2 convs to the Qwen2 width); its position tables are stored for ``position_image_size`` (1024 px)
  and resized for other inputs (768 px tiles), as the release does.
* ``qwen2``: transformers' ``DeepseekOcr2VisionEncoder`` (Qwen2 decoder layers, rotary positions 0..N+Q-1,
  the mask "causal, or both positions among the N SAM tokens"), used as it is: the library's module, not a copy.
* ``query_768`` (144 queries) / ``query_1024`` (256): appended after SAM's N row-major tokens, the first when
  N <= 144; after the final norm only the query positions are kept.

Output: (B, q, q, C) with q*q queries (12x12 or 16x16), so the contract's grid holds; the layout is
``flat`` (core/model.py): no newline, the tiles' tokens one tile after another, then the global view and
the separator. ``weights`` names a DeepSeek-OCR 2 checkpoint folder (or hub name) in either key layout
(plugins/deepseek_ocr2_format.py): SAM, the Qwen2 encoder and the queries load exactly or not at all; the
projector and separator go to the model builder (``pretrained_extras``); the sizes come from its config.json.
"""
import math

import torch
import torch.nn as nn

from core import hookimpl
from core.distributed import print0
from core.errors import ConfigError
from core.weights import load_state, on_meta
from plugins import deepseek_ocr2_format as fmt
from plugins.encoders.sam import SAMEncoder

QUERIES = {"query_768": 144, "query_1024": 256}  # (name, count): the release's two tables (§7.2)


def _vision_encoder(settings, given):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2VisionEncoderConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2VisionEncoder
    try:
        return DeepseekOcr2VisionEncoder(fmt.hf_config(DeepseekOcr2VisionEncoderConfig, settings, given))
    except ConfigError as e:
        raise ConfigError(f"qwen2: {e}") from e


def _from_checkpoint(weights):
    """(folder, its SAM settings, its Qwen2 encoder config, where they came from); all None without one."""
    folder, config = (None, None) if weights is None else fmt.checkpoint_folder(weights, "model.encoder.weights")
    if folder is None:
        return None, None, None, None
    source = f"{folder}/config.json"
    vision = config.get("vision_config") or {}
    sam = fmt.sam_from_config(vision.get("sam_config") or {}, source)
    return folder, sam, vision.get("encoder_config") or {}, source


class DeepseekOCR2Encoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, q, q, qwen2.hidden_size); the defaults are the released sizes."""

    token_layout = "flat"

    def __init__(self, image_size=1024, sam: dict | None = None, qwen2: dict | None = None, weights=None):
        super().__init__()
        fmt.need_transformers("encoder deepseek_ocr2")
        if not isinstance(image_size, int):
            raise ConfigError(f"image_size: DeepSeek-OCR 2's global view is a square; got {image_size!r}")
        folder, sam_file, qwen2_file, source = _from_checkpoint(weights)
        self.sam_settings = fmt.settle(fmt.SAM_DEFAULTS, sam_file, dict(sam or {}), "model.encoder.sam", source)
        qwen2 = dict(qwen2 or {})
        settings = fmt.settle(fmt.QWEN2_DEFAULTS, qwen2_file, qwen2, "model.encoder.qwen2", source)
        self.image_size = image_size
        self.sam = SAMEncoder(image_size=image_size, **self.sam_settings)
        self.qwen2 = _vision_encoder(settings, qwen2)
        width = self.qwen2.config.hidden_size
        if self.sam.out_dim != width:
            raise ConfigError(f"sam.downsample_channels[-1] ({self.sam.out_dim}) must equal qwen2.hidden_size "
                              f"({width}): SAM's map is the Qwen2 encoder's input")
        for name, count in QUERIES.items():
            setattr(self, name, nn.Embedding(count, width))
            nn.init.normal_(getattr(self, name).weight, std=self.qwen2.config.initializer_range)  # transformers' init
        self.out_dim = width
        self.pretrained_extras = {}
        self.pretrained_report = None
        if folder is not None:
            self.load_pretrained(folder)

    def load_pretrained(self, folder):
        """SAM, the Qwen2 encoder and the queries from a checkpoint folder; the projector and the separator
        kept for the model builder."""
        if on_meta(self):
            print0(f"encoder: built on the meta device, weights in {folder} not read")
            return None
        state = fmt.read_part(folder, vision=True, source=folder)
        mine = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        self.pretrained_extras = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        self.pretrained_report = load_state(self, mine, folder, name="the DeepSeek-OCR 2 encoder")
        fmt.refresh_rotary(self)
        print0(f"encoder: loaded {len(self.pretrained_report['loaded'])} tensors from {folder} "
               f"(DeepSeek-OCR 2); kept for the model builder: {', '.join(sorted(self.pretrained_extras))}")
        return self.pretrained_report

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        fmt.refresh_rotary(self)  # after to_empty() and casts: see refresh_rotary
        return self

    def grid_size(self, height, width):
        """12x12 (144 queries) when SAM gives <= 144 tokens, else 16x16 (§7.2)."""
        h, w = self.sam.grid_size(height, width)
        count = QUERIES["query_768"] if h * w <= QUERIES["query_768"] else QUERIES["query_1024"]
        side = math.isqrt(count)
        return side, side

    def forward(self, pixel_values):
        sam_map = self.sam.forward_features(pixel_values)  # (B, C, h, w)
        b, _, h, w = sam_map.shape
        tokens = sam_map.flatten(2).transpose(1, 2)  # row-major, as the release flattens it
        table, other = ((self.query_768, self.query_1024) if h * w <= QUERIES["query_768"]
                        else (self.query_1024, self.query_768))
        # the other table joins with weight 0: under DDP every parameter must take part in every step
        queries = (table.weight + other.weight[:0].sum()).to(tokens.dtype).unsqueeze(0).expand(b, -1, -1)
        out = self.qwen2(inputs_embeds=torch.cat([tokens, queries], dim=1), num_patches=h * w).last_hidden_state
        side = math.isqrt(table.num_embeddings)
        return out[:, h * w:].reshape(b, side, side, -1)

    def export_hf(self, out_dir, model, tokenizer):
        """Write ``model`` (this encoder's VisionLanguageModel) as a folder transformers' DeepseekOcr2 loads
        (core/contracts.py; python -m core.export calls it)."""
        from plugins.deepseek_ocr2_export import export_hf
        return export_hf(out_dir, model, tokenizer)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "deepseek_ocr2", DeepseekOCR2Encoder)
