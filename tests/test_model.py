"""VisionLanguageModel: token layout, merge, generation with cached vision embeddings, checkpoints."""
import pytest
import torch

from core import checkpoint
from core.errors import ConfigError
from core.generate import generate
from core.model import build_model
from core.report import parameter_table
from core.recipe import Component, ModelConfig
from tests.helpers import REAL, TINY, tiny

def prompt_ids(model, tok, text=""):
    return [tok.bos_id] + [tok.image_id] * model.num_image_tokens() + tok.encode("\nOCR:" + text)


def test_real_size_layout_and_counts_on_meta(registry):
    with torch.device("meta"):
        model, _ = build_model(REAL, registry)
    assert model.num_image_tokens() == 273  # (16 + 1) * 16 + 1, DESIGN.md
    counts = {name: t + f for name, t, f in parameter_table(model)}
    assert counts["projector"] == 2_622_720  # docs/architecture.md §2.3: Linear(2048 -> 1280) with bias
    assert abs(counts["encoder.sam"] - 95.57e6) < 0.1e6
    assert abs(counts["encoder.clip"] - 303.2e6) < 0.2e6


def test_layout_rows_newlines_separator(registry):
    model, tok = tiny(registry)
    pixels = torch.randn(2, 3, 32, 32)
    features, tokens = model.encode_images(pixels)
    h, w = features.shape[1:3]
    assert (h, w) == (4, 4) and tokens.shape == (2, h * (w + 1) + 1, 32)
    grid = model.projector(features)
    for r in range(h):
        torch.testing.assert_close(tokens[:, r * (w + 1):r * (w + 1) + w], grid[:, r])
        torch.testing.assert_close(tokens[:, r * (w + 1) + w], model.image_newline.expand(2, -1))
    torch.testing.assert_close(tokens[:, -1], model.view_separator.expand(2, -1))


def test_merge_replaces_placeholders_in_order(registry):
    model, tok = tiny(registry)
    n = model.num_image_tokens()
    ids = torch.tensor([prompt_ids(model, tok, "ab")])
    vision = torch.randn(1, n, 32)
    merged = model.merge(ids, vision)
    torch.testing.assert_close(merged[0, 1:1 + n], vision[0])
    torch.testing.assert_close(merged[0, 0], model.decoder.embed(ids)[0, 0])
    with pytest.raises(ValueError, match=f"needs {n} <\\|image\\|> tokens; got \\[{n - 1}\\]"):
        one_short = ids.clone()
        one_short[0, 1] = tok.encode("a")[0]
        model.merge(one_short, vision)


def test_cached_generation_equals_naive_and_runs_vision_once(registry):
    model, tok = tiny(registry, seed=3)
    model.eval()
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    pixels = torch.randn(3, 3, 32, 32)
    ids = prompt_ids(model, tok)
    cached = generate(model, tok, pixels, ids, max_new_tokens=20, use_cache=True)
    assert len(calls) == 1  # once per call for the whole batch, not once per token
    naive = generate(model, tok, pixels, ids, max_new_tokens=20, use_cache=False)
    assert cached == naive
    assert all(tok.image_id not in row for row in cached)


def test_checkpoint_parts_round_trip(registry, tmp_path):
    model, _ = tiny(registry, seed=1)
    path = checkpoint.save_checkpoint(str(tmp_path / "s"), 7, model, {"note": "x"})
    assert checkpoint.latest(str(tmp_path / "s")) == path
    assert checkpoint.read_meta(path)["step"] == 7
    fresh, _ = tiny(registry, seed=2)
    encoder_file = checkpoint.resolve(str(tmp_path / "s"), str(tmp_path), ["encoder"])
    assert encoder_file.endswith("encoder_000007.safetensors")
    checkpoint.load_parts(fresh, encoder_file, ["encoder"])
    pairs = [(k, torch.equal(a, b)) for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values())]
    assert all(same for k, same in pairs if k.startswith("encoder."))
    assert not any(same for k, same in pairs if k.startswith(("projector.", "image_newline", "decoder.transformer.wte")))


def test_mismatched_checkpoint_names_keys_and_loads_nothing(registry, tmp_path):
    model, _ = tiny(registry)
    path = checkpoint.save_checkpoint(str(tmp_path / "s"), 1, model, {})
    other_config = ModelConfig(TINY.encoder, TINY.projector,
                               Component("nanochat", {**TINY.decoder.args, "n_embd": 64}), TINY.tokenizer)
    other, _ = build_model(other_config, registry)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match=r"model_000001.safetensors: does not fit the model's decoder; "
                                          r"shape-mismatched \d+: decoder.lm_head.weight"):
        checkpoint.load_parts(other, path, ["decoder"])
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ConfigError, match="bad.safetensors: not a readable safetensors file"):
        checkpoint.load_parts(other, str(tmp_path / "bad.safetensors"), ["decoder"])


@pytest.mark.parametrize("mode, tokens", [("tiny", 73), ("small", 111), ("base", 273), ("large", 421)])
def test_resolution_modes_keep_pretrained_shapes(registry, mode, tokens):
    """docs/architecture.md §2.4: DSO's modes; position tables stay at 1024 px so one checkpoint fits all."""
    config = ModelConfig(Component("deepencoder", {"mode": mode}), REAL.projector, REAL.decoder, REAL.tokenizer)
    with torch.device("meta"):
        model, _ = build_model(config, registry)
    assert model.num_image_tokens() == tokens
    assert model.encoder.sam.pos_embed.shape == (1, 64, 64, 768)
    assert model.encoder.clip.embeddings.position_embedding.weight.shape == (257, 1024)


def test_deepseek_ocr_extras_reach_the_model(registry, tmp_path):
    """A DeepSeek-OCR-style checkpoint carries the projector and layout tokens: they load into the model."""
    from safetensors.torch import save_file
    model, _ = tiny(registry, seed=4)
    state = {}
    for k, v in model.state_dict().items():
        for ours, theirs in (("encoder.sam.", "model.sam_model."), ("encoder.clip.", "model.vision_model."),
                             ("projector.", "model.projector."), ("image_newline", "model.image_newline"),
                             ("view_separator", "model.view_seperator")):  # sic: DSO's spelling
            if k.startswith(ours):
                state[theirs + k[len(ours):]] = v.contiguous()
    save_file(state, str(tmp_path / "dso.safetensors"))
    encoder = Component("deepencoder", {**TINY.encoder.args, "weights": str(tmp_path / "dso.safetensors")})
    loaded, _ = build_model(ModelConfig(encoder, TINY.projector, TINY.decoder, TINY.tokenizer), registry)
    for key, value in model.state_dict().items():
        if not key.startswith("decoder."):
            assert torch.equal(loaded.state_dict()[key], value), key


def test_text_only_batch_skips_the_vision_tower(registry):
    model, tok = tiny(registry)
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[tok.bos_id] + tok.encode("plain text")])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), tok.eos_id)], dim=1)
    out = model(None, ids, targets)
    assert calls == [] and out["vision_tokens"] is None and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.encoder.sam.patch_embed.proj.weight.grad is None
    with pytest.raises(ValueError, match="text-only batch .* holds <\\|image\\|> tokens"):
        model(None, torch.tensor([prompt_ids(model, tok)]))
