"""DeepSeek-OCR 2 as vlmkit components against transformers' DeepseekOcr2 (docs/architecture.md §7).

A tiny random DeepSeek-OCR 2 (recipes/deepseek_ocr2_tiny.yaml's sizes) and a small BPE tokenizer are built
with transformers and saved with save_pretrained in both key layouts; vlmkit loads either and must give
transformers' logits and greedy tokens, with the global view alone, with crops and with the 256 queries;
a recipe trains it and its export loads in transformers with vlmkit's logits.
"""
import json
import os

import pytest
import torch
from PIL import Image

from core.errors import ConfigError
from core.generate import generate, image_prompt_ids, load_checkpoint
from core.images import image_views
from core.model import build_model
from core.recipe import Component, Crops, ModelConfig, load_recipe
from tests.helpers import ROOT, good_sample, run_cli, write_shard
from tests.tiny_recipe import run

transformers = pytest.importorskip("transformers")

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>"]
SAM = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4, window_size=4,
           global_attn_indexes=[1], output_channels=8, downsample_channels=[12, 24])
QWEN2 = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
            mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=1.5)
TINY_RECIPE = os.path.join(ROOT, "recipes", "deepseek_ocr2_tiny.yaml")
PROMPT = "\nFree OCR."


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Free OCR. hello world", "the quick brown fox jumps over"], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                                pad_token=SPECIALS[2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model in eval mode, {"original": folder, "transformers": folder}): random weights, every
    tensor far from its init (zero position tables, unit norms) so a misplaced one shows."""
    hf_tok = tiny_tokenizer()
    config = transformers.DeepseekOcr2Config(
        vision_config={"sam_config": SAM, "encoder_config": QWEN2},
        text_config={**TEXT, "vocab_size": len(hf_tok), "bos_token_id": hf_tok.bos_token_id,
                     "eos_token_id": hf_tok.eos_token_id},
        image_token_id=hf_tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = transformers.DeepseekOcr2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.2)
    folders = {}
    for layout in ("original", "transformers"):
        folders[layout] = str(tmp_path_factory.mktemp(layout))
        model.save_pretrained(folders[layout], save_original_format=layout == "original")
        hf_tok.save_pretrained(folders[layout])
    return model, folders


def model_config(folder, image_size=32, crops=None, tokenizer=None, **decoder):
    return ModelConfig(encoder=Component("deepseek_ocr2", {"image_size": image_size, "weights": folder}),
                       projector=Component("linear"),
                       decoder=Component("deepseek_v2_moe", {"weights": folder, **decoder}),
                       tokenizer=Component("hf", {"model": tokenizer or folder, "image_token": "<image>"}),
                       crops=crops)


def page(width, height, seed=0):
    """A noisy RGB image: every pixel matters, so a resize or crop that differs shows."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def prompt_ids(model, tokenizer, grid=None):
    return torch.tensor([image_prompt_ids(model, tokenizer, "<image>" + PROMPT, grid)])


@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_both_layouts_give_transformers_logits_global_view(tiny, registry, layout):
    reference, folders = tiny
    model, tokenizer = build_model(model_config(folders[layout]), registry)
    model.eval()
    assert "image_newline" not in dict(model.named_parameters())  # DeepSeek-OCR 2 has none
    ids = prompt_ids(model, tokenizer)
    assert int((ids == tokenizer.image_id).sum()) == 144 + 1  # 4 SAM tokens -> the 144 queries, + separator
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixels, ids)["logits"]
        theirs = reference(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_256_queries_above_144_sam_tokens(tiny, registry):
    """208 px: SAM's 52x52 map -> 13x13 = 169 tokens > 144, so the 256 queries (16x16); the position tables
    are resized from 8x8 as transformers resizes them."""
    reference, folders = tiny
    model, tokenizer = build_model(model_config(folders["original"], image_size=208), registry)
    assert model.encoder.grid_size(208, 208) == (16, 16)
    ids = prompt_ids(model.eval(), tokenizer)
    pixels = torch.randn(1, 3, 208, 208)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, ids)["logits"],
                                   reference(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)


def test_crops_match_transformers_processor_and_logits(tiny, registry):
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil
    reference, folders = tiny
    model, tokenizer = build_model(model_config(folders["transformers"], crops=Crops(32, 2, 6)), registry)
    image = page(80, 40)  # 2:1 -> two 32 px tiles; the global view's padding is even (both round it alike)
    pixels, tiles, grid = image_views(image, model.image_size, model.tiling)
    processed = DeepseekOcr2ImageProcessorPil(size={"height": 32, "width": 32}, tile_size=32)(
        images=[image], return_tensors="pt")
    assert grid == (2, 1) and processed["num_local_patches"].tolist() == [2]
    torch.testing.assert_close(pixels[None], processed["pixel_values"], atol=1e-6, rtol=0)
    torch.testing.assert_close(tiles, processed["pixel_values_local"], atol=1e-6, rtol=0)
    ids = prompt_ids(model.eval(), tokenizer, grid)
    assert int((ids == tokenizer.image_id).sum()) == 2 * 144 + 144 + 1  # the tiles, the global view, separator
    with torch.no_grad():
        ours = model(pixels[None], ids, tiles=tiles, grids=[grid])["logits"]
        theirs = reference(input_ids=ids, pixel_values=processed["pixel_values"],
                           pixel_values_local=processed["pixel_values_local"], num_local_patches=[2]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_generation_gives_transformers_tokens(tiny, registry):
    reference, folders = tiny
    model, tokenizer = build_model(model_config(folders["original"]), registry)
    ids = prompt_ids(model.eval(), tokenizer)
    pixels = torch.randn(1, 3, 32, 32)
    ours = generate(model, tokenizer, pixels, ids[0].tolist(), max_new_tokens=12)[0]
    # vlmkit never emits <image> and stops at eos or bos: the same rules for transformers
    out = reference.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                             suppress_tokens=[tokenizer.image_id], eos_token_id=[tokenizer.eos_id, tokenizer.bos_id])
    theirs = out[0, ids.shape[1]:].tolist()
    stop = next((i for i, t in enumerate(theirs) if t in (tokenizer.eos_id, tokenizer.bos_id)), len(theirs))
    assert len(ours) > 0 and ours == theirs[:stop]


def test_router_logits_stay_float32_under_bf16_autocast(tiny, registry):
    """run.precision bf16 autocasts the forward; the router must still score experts in float32 (§7.3)."""
    _, folders = tiny
    decoder = build_model(model_config(folders["original"]), registry)[0].decoder
    seen = []
    for module in decoder.modules():
        if type(module).__name__ == "DeepseekOcr2TextTopkRouter":
            module.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder(decoder.embed(torch.tensor([[1, 2, 3]])))
    assert seen == [torch.float32, torch.float32]  # two sparse layers


def test_recipe_sizes_must_agree_with_the_checkpoint(tiny, registry, tmp_path):
    _, folders = tiny
    with pytest.raises(ConfigError, match=r"model\.decoder\.hidden_size: 64 in the recipe but 32"):
        build_model(model_config(folders["original"], hidden_size=64), registry)
    with pytest.raises(ConfigError, match="hiden_size: not a field"):
        build_model(model_config(folders["original"], hiden_size=32), registry)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama', not transformers' deepseek_ocr2"):
        build_model(model_config(str(tmp_path), tokenizer=folders["original"]), registry)


@pytest.mark.parametrize("layout, stray, words", [
    ("transformers", "model.vision_tower.stray", "unexpected 1: model.vision_tower.stray"),
    ("original", "model.sam_model.stray", "unexpected 1: sam.stray"),
    ("original", "model.language_model.stray", "mixes the original key names"),
])
def test_a_tensor_under_no_known_name_is_reported(tiny, registry, tmp_path, layout, stray, words):
    from safetensors.torch import load_file, save_file
    _, folders = tiny
    state = load_file(os.path.join(folders[layout], "model.safetensors"))
    save_file({**state, stray: torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(folders[layout], "config.json")).read())
    with pytest.raises(ConfigError, match=words):
        build_model(model_config(str(tmp_path), tokenizer=folders[layout]), registry)


def test_tiny_recipe_trains_from_scratch(tmp_path, cli):
    result = cli("core.run", TINY_RECIPE, f"run.dir={tmp_path / 'run'}", f"data.dataset.cache_dir={tmp_path}",
                 "eval=null")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["event"] == "train" and "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_export_after_training_loads_in_transformers(tiny, tmp_path, cli):
    """Start from the checkpoint with its tokenizer, train a few steps, export: transformers' from_pretrained
    gives vlmkit's logits, and the weights are the trained ones (not the checkpoint's)."""
    reference, folders = tiny
    folder, run_dir = folders["original"], tmp_path / "run"
    code = run(TINY_RECIPE, f"run.dir={run_dir}", f"data.dataset.cache_dir={tmp_path}", "eval=null",
               f"model.encoder.weights={folder}", f"model.decoder.weights={folder}",
               "model.tokenizer={name: hf, image_token: <image>, model: " + folder + "}")
    assert code == 0
    out = tmp_path / "export"
    result = cli("core.export", run_dir / "train", out)
    assert result.returncode == 0 and "DeepseekOcr2ForConditionalGeneration" in result.stdout, result.stderr
    model, tokenizer, _ = load_checkpoint(str(run_dir / "train"))
    exported = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(out).eval()
    ids = prompt_ids(model, tokenizer)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixels, ids)["logits"]
        torch.testing.assert_close(exported(input_ids=ids, pixel_values=pixels).logits, ours, atol=1e-4, rtol=0)
        assert not torch.allclose(reference(input_ids=ids, pixel_values=pixels).logits, ours, atol=1e-3)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.image_token_id == tokenizer.image_id
    assert processor.tokenizer.encode(PROMPT, add_special_tokens=False) == tokenizer.encode(PROMPT)


def test_gpu_recipe_dry_run_shows_the_release_without_files(tmp_path, registry):
    """No checkpoint anywhere (an empty hub cache, offline): the dry run builds the released sizes on the meta
    device, and its parameter count is transformers' for the configuration the export would write."""
    from plugins.deepseek_ocr2_export import hf_config
    recipe_path = os.path.join(ROOT, "recipes", "deepseek_ocr2.yaml")
    no_data = run_cli("core.run", recipe_path, "--dry-run", env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    # the model is described first; then the data section is checked, and the recipe's shards are not here
    assert no_data.returncode == 2 and "error: data.dataset.train: shard" in no_data.stderr, no_data.stderr
    shard = write_shard(tmp_path / "train-000000.tar", [good_sample("a")])
    result = run_cli("core.run", recipe_path, "--dry-run", f"data.dataset.train={shard}", f"data.dataset.eval={shard}",
                     env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-> 257 vision tokens" in no_data.stdout
    assert "-> 257 vision tokens" in result.stdout and "6x1: 1121" in result.stdout
    total = next(line for line in result.stdout.splitlines() if line.startswith("total")).split()[1:]
    overrides = ["model.encoder.weights=null", "model.decoder.weights=null", f"model.tokenizer.model={tmp_path}/none"]
    with torch.device("meta"):
        model, tokenizer = build_model(load_recipe(recipe_path, overrides).model, registry)
        release = transformers.DeepseekOcr2ForConditionalGeneration(hf_config(model, tokenizer))
    assert sum(int(n.replace(",", "")) for n in total) == sum(p.numel() for p in release.parameters())
