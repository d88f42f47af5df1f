"""Weights by hub name (core/hub.py) from a hub cache the tests build, with HF_HUB_OFFLINE=1: no network."""
import os

import pytest
import torch
from safetensors.torch import save_file

from core import hub
from core.errors import ConfigError
from plugins.encoders.sam import SAMEncoder
from tests import hf_tiny
from tests.helpers import DEFAULT_RECIPE, random_gpt

pytest.importorskip("huggingface_hub")  # the hf extra

SAM = dict(image_size=64, patch_size=8, dim=32, depth=2, heads=2, window_size=2, global_attn_indexes=[1],
           out_chans=32, downsample_channels=[24, 40])
NANOCHAT = dict(vocab_size=260, sequence_len=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub is pointed at, offline; set after it was imported."""
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_names_resolve_from_the_cache_and_local_paths_stay(cache, tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    snapshot = hf_tiny.hub_repo(str(cache), "acme/tiny", str(source))
    assert hub.resolve("acme/tiny", "model") == snapshot
    assert hub.resolve(f"acme/tiny@{hf_tiny.COMMIT}", "model") == snapshot
    assert hub.resolve("acme/tiny/config.json", "model") == os.path.join(snapshot, "config.json")
    assert hub.resolve(str(source), "model") == str(source)  # a local path stays, existing or not
    assert hub.resolve(str(tmp_path / "absent"), "model") == str(tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("src/config.json", "model") == "src/config.json"  # relative, and it exists: local

    # HF_HOME without HF_HUB_CACHE: the cache is HF_HOME/hub, read when resolve runs
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub.resolve("acme/tiny", "model") == snapshot


@pytest.mark.parametrize("name, says", [
    ("acme/nope", "acme/nope is not in the hub cache"),
    ("acme/tiny/weights.bin", "weights.bin of acme/tiny is not in the hub cache"),
    ("acme/tiny@v9", "acme/tiny@v9 is not in the hub cache"),
])
def test_unknown_names_and_missing_files_are_one_line_naming_key_and_name(cache, tmp_path, name, says):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    hf_tiny.hub_repo(str(cache), "acme/tiny", str(tmp_path / "src"))
    with pytest.raises(ConfigError) as e:
        hub.resolve(name, "model.decoder.model")
    assert one_line(e) == (f"model.decoder.model: {name!r} is not a local path, and on the hub: {says} "
                           f"{cache}, and HF_HUB_OFFLINE is set")


@torch.no_grad()
def test_decoder_and_tokenizer_by_hub_name(cache, tmp_path, registry):
    pytest.importorskip("transformers")
    folder = tmp_path / "llama"
    hf_tiny.tokenizer_folder(folder)
    from transformers import AutoTokenizer
    ref = hf_tiny.lm_folder(folder, "llama", len(AutoTokenizer.from_pretrained(folder)))
    hf_tiny.hub_repo(str(cache), "acme/tiny-llama", str(folder))
    tok = registry.build("tokenizer", "hf", model="acme/tiny-llama")
    decoder = registry.build("decoder", "hf_causal_lm", vocab_size=tok.vocab_size, model="acme/tiny-llama")
    ids = torch.tensor([tok.encode("the quick brown fox")])
    assert torch.allclose(decoder(decoder.embed(ids))[..., :-1], ref(input_ids=ids).logits, atol=1e-5)
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((folder / "config.json").read_text())
    hf_tiny.hub_repo(str(cache), "acme/config-only", str(tmp_path / "config_only"))
    with torch.device("meta"):  # a dry run reads config.json alone
        meta = registry.build("decoder", "hf_causal_lm", vocab_size=tok.vocab_size, model="acme/config-only")
    assert meta.n_layer == 2 and meta.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError) as e:
        registry.build("decoder", "hf_causal_lm", where="model.decoder", vocab_size=300, model="acme/absent")
    assert one_line(e).startswith("model.decoder: decoder 'hf_causal_lm': model: 'acme/absent' is not a local path")


@torch.no_grad()
def test_nanochat_checkpoint_and_sam_weights_by_hub_name(cache, tmp_path, registry):
    pytest.importorskip("transformers")
    gpt = random_gpt(NANOCHAT)
    gpt.export_hf(str(tmp_path / "nanochat"), None)  # transformers' NanoChat layout
    hf_tiny.hub_repo(str(cache), "acme/nanochat-tiny", str(tmp_path / "nanochat"))
    loaded = registry.build("decoder", "nanochat", vocab_size=260, checkpoint="acme/nanochat-tiny")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), gpt.state_dict().values()))

    torch.manual_seed(0)
    sam = SAMEncoder(**SAM)
    (tmp_path / "sam").mkdir()
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(tmp_path / "sam" / "model.safetensors"))
    hf_tiny.hub_repo(str(cache), "acme/sam-tiny", str(tmp_path / "sam"))
    for name in ("acme/sam-tiny", "acme/sam-tiny/model.safetensors"):  # the repository, or one file in it
        again = SAMEncoder(**SAM, weights=name)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sam.state_dict().values()))
    with pytest.raises(ConfigError) as e:
        SAMEncoder(**SAM, weights="acme/sam-absent")
    assert "sam.weights: 'acme/sam-absent' is not a local path" in one_line(e)


def test_recipe_with_an_unknown_hub_name_is_one_error_line(cache, cli):
    recipe = DEFAULT_RECIPE.replace("two_stage.yaml", "hf_decoder.yaml")
    result = cli("core.run", recipe, "--dry-run", "model.tokenizer={name: hf, model: acme/no-such-model}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: model.tokenizer: tokenizer 'hf': model: 'acme/no-such-model' is not a local "
                               "path, and on the hub: acme/no-such-model is not in the hub cache")
