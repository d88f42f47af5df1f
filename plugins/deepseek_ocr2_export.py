"""A vlmkit DeepSeek-OCR 2 as a folder transformers' ``DeepseekOcr2ForConditionalGeneration`` loads
(docs/architecture.md §7.7). A helper module: it registers nothing; the ``deepseek_ocr2`` encoder's
``export_hf`` calls it.

The folder is what transformers' ``save_pretrained`` writes: ``config.json`` (model_type deepseek_ocr2),
``generation_config.json``, ``model.safetensors`` in the original release's key names (one tensor per
expert; transformers converts them as it loads), and the processor (``DeepseekOcr2Processor``: the PIL
image processor with the model's view and crop sizes, and the tokenizer's files).
"""
import os

from safetensors.torch import save_file

from core.errors import ConfigError
from plugins import deepseek_ocr2_format as fmt


def sam_config(encoder):
    """The encoder's SAM settings as transformers' DeepseekOcr2SamVisionConfig fields."""
    settings = {"position_image_size": encoder.image_size, **encoder.sam_settings}
    if tuple(encoder.sam.strides) != ((2, 2), (2, 2)) or len(settings["downsample_channels"]) != 2:
        raise ConfigError("export: transformers' DeepSeek-OCR 2 has exactly two stride-2 compressor convs")
    if not all(isinstance(settings.get(k), int) for k in ("patch_size", "window_size", "position_image_size")):
        raise ConfigError("export: transformers' DeepSeek-OCR 2 SAM needs square patches, windows and images")
    names = {ours: theirs for theirs, ours in fmt.SAM_NAMES.items()}
    config = {names[k]: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if k in names}
    return {**config, **fmt.SAM_FIXED}


def hf_config(model, tokenizer):
    """transformers' DeepseekOcr2Config of ``model``, the tokenizer's special ids in it."""
    from transformers import DeepseekOcr2Config
    text = model.decoder.config.to_dict()
    text.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    vision = {"sam_config": sam_config(model.encoder), "encoder_config": model.encoder.qwen2.config.to_dict()}
    return DeepseekOcr2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_id,
                              architectures=["DeepseekOcr2ForConditionalGeneration"])


def processor(model, tokenizer, out_dir):
    """transformers' DeepseekOcr2Processor for the model's global view, crops (model.crops) and the tokenizer
    files already written to ``out_dir``."""
    from transformers import AutoTokenizer
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil
    from transformers.models.deepseek_ocr2.processing_deepseek_ocr2 import DeepseekOcr2Processor
    size, tiling = model.encoder.image_size, model.tiling
    images = DeepseekOcr2ImageProcessorPil(
        size={"height": size, "width": size}, crop_to_patches=tiling is not None,
        # without crops transformers' global view is tile_size pixels: the model's own size then
        tile_size=tiling.tile_size if tiling else size,
        min_patches=tiling.min_tiles if tiling else 2, max_patches=tiling.max_tiles if tiling else 6)
    downsample = 2 ** len(model.encoder.sam.strides)
    out = DeepseekOcr2Processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(out_dir),
                                patch_size=model.encoder.sam.patch_size, downsample_ratio=downsample)
    if out.image_token_id != tokenizer.image_id:
        raise ConfigError(f"export: transformers' processor takes {out.image_token!r} (id {out.image_token_id}) for "
                          f"the image, the model {tokenizer.image_token!r} (id {tokenizer.image_id})")
    return out


def export_hf(out_dir, model, tokenizer):
    """Write ``model`` (a VisionLanguageModel with the deepseek_ocr2 encoder, a linear projector and the
    deepseek_v2_moe decoder) and ``tokenizer`` (one with ``export_hf``: the ``hf`` tokenizer) to ``out_dir``;
    returns the line python -m core.export prints."""
    decoder_config = getattr(model.decoder, "config", None)
    if type(model.projector).__name__ != "LinearProjector" or not hasattr(decoder_config, "n_routed_experts"):
        raise ConfigError("export: DeepSeek-OCR 2's layout needs the linear projector and the deepseek_v2_moe decoder")
    if not hasattr(tokenizer, "export_hf"):
        raise ConfigError(f"export: the tokenizer {type(tokenizer).__name__} has no transformers form; "
                          f"DeepSeek-OCR 2 is exported with its own (tokenizer: {{name: hf}})")
    config = hf_config(model, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    state = fmt.to_original({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    _generation_config(config).save_pretrained(out_dir)
    tokenizer.export_hf(out_dir)
    processor(model, tokenizer, out_dir).save_pretrained(out_dir)
    return (f"DeepSeek-OCR 2 for transformers' DeepseekOcr2ForConditionalGeneration: config, {len(state)} tensors "
            f"in the original key names, tokenizer and processor")


def _generation_config(config):
    from transformers import GenerationConfig
    text = config.text_config
    return GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                            pad_token_id=text.pad_token_id)
