"""nanochat decoder from pretrained weights (native and HF layouts) and nanochat's BPE tokenizer, tiny sizes."""
import json
import os
import pickle

import pytest
import torch

from core.errors import ConfigError
from core.registry import Registry
from plugins.decoders import nanochat_pretrained
from plugins.decoders.nanochat import GPT
from plugins.decoders.nanochat_pretrained import nanochat_decoder
from tests import helpers

TINY = dict(vocab_size=300, sequence_len=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def random_gpt(seed=0, **kw):
    return helpers.random_gpt(TINY, seed, **kw)


def write_native(folder, model, step, compiled=True, **meta_overrides):
    """nanochat's layout: model_XXXXXX.pt (raw state_dict, torch.compile prefixes) + meta_XXXXXX.json."""
    os.makedirs(folder, exist_ok=True)
    prefix = "_orig_mod." if compiled else ""
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, os.path.join(folder, f"model_{step:06d}.pt"))
    c = model.config
    model_config = dict(sequence_len=c.sequence_len, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                        n_kv_head=c.n_kv_head, n_embd=c.n_embd)
    model_config.update(meta_overrides)
    with open(os.path.join(folder, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "val_loss": 1.0, "model_config": model_config}, f, indent=2)
    return os.path.join(folder, f"model_{step:06d}.pt")


@pytest.fixture
def native_dir(tmp_path):
    folder = tmp_path / "chatsft_checkpoints" / "d2"
    write_native(str(folder), random_gpt(seed=1), step=300)  # an older step: the folder means the largest
    model = random_gpt(seed=0)
    write_native(str(folder), model, step=650)
    return folder, model


def build(**kw):
    registry = Registry()
    nanochat_pretrained.vlmkit_register(registry)
    return registry.build("decoder", "nanochat", where="model.decoder", **kw)


@torch.no_grad()
def test_native_folder_loads_largest_step_with_config_from_meta(native_dir, capsys):
    folder, model = native_dir
    loaded = build(vocab_size=300, checkpoint=str(folder))  # no sizes in the recipe: all from meta
    assert isinstance(loaded, GPT) and loaded.config == model.config
    assert loaded.config.norm_eps is None  # native: finfo eps
    sd, ref = loaded.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    ids = torch.randint(0, 300, (2, 7))
    assert torch.equal(loaded(loaded.embed(ids)), model(model.embed(ids)))
    assert "model_000650.pt" in capsys.readouterr().out
    # a file path, the sizes repeated in the recipe, no prefixes: the same
    plain = write_native(str(folder / "plain"), model, step=1, compiled=False)
    again = nanochat_decoder(vocab_size=300, n_layer=2, n_embd=64, n_head=2, checkpoint=plain)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_recipe_size_disagreeing_with_meta_names_the_key(tmp_path):
    write_native(str(tmp_path), random_gpt(n_layer=3), step=5)  # a "d32" checkpoint in a "d20" recipe
    with pytest.raises(ConfigError) as e:
        build(vocab_size=300, n_layer=2, checkpoint=str(tmp_path))
    msg = str(e.value)
    assert "n_layer" in msg and "2" in msg and "3" in msg and "meta_000005.json" in msg and "\n" not in msg


def test_truncated_checkpoint_names_the_file(native_dir):
    folder, _ = native_dir
    path = folder / "model_000650.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="model_000650.pt"):
        build(vocab_size=300, checkpoint=str(folder))


def test_missing_key_and_missing_meta(tmp_path):
    model = random_gpt()
    path = write_native(str(tmp_path), model, step=7)
    state = torch.load(path, weights_only=True)
    del state["_orig_mod.transformer.h.1.mlp.c_fc.weight"]
    state["_orig_mod.transformer.h.0.attn.ve_gate.weight"] = torch.zeros(1, 12)  # an NC-HEAD extra
    torch.save(state, path)
    with pytest.raises(ConfigError) as e:
        build(vocab_size=300, checkpoint=path)
    msg = str(e.value)
    assert "model_000007.pt" in msg and "transformer.h.1.mlp.c_fc.weight" in msg and "ve_gate" in msg
    os.remove(tmp_path / "meta_000007.json")
    with pytest.raises(ConfigError, match="meta_000007.json"):
        build(vocab_size=300, checkpoint=path)


@torch.no_grad()
def test_vocab_growth_keeps_old_logits(native_dir, capsys):
    folder, model = native_dir
    grown = build(vocab_size=301, checkpoint=str(folder))  # the tokenizer adds <|image|>
    assert grown.vocab_size == 301 and grown.transformer.wte.weight.shape == (301, 64)
    assert "300 -> 301" in capsys.readouterr().out
    ids = torch.randint(0, 300, (2, 6))
    before, after = model(model.embed(ids)), grown(grown.embed(ids))
    assert after.shape == (2, 6, 301) and torch.equal(after[..., :300], before)
    with pytest.raises(ConfigError, match="larger than the tokenizer"):
        build(vocab_size=299, checkpoint=str(folder))


def test_meta_device_reads_config_only(native_dir):
    folder, _ = native_dir
    with torch.device("meta"):
        model = build(vocab_size=301, checkpoint=str(folder))
    assert model.lm_head.weight.is_meta and model.vocab_size == 301 and model.config.n_layer == 2
    with torch.device("meta"), pytest.raises(ConfigError, match="n_embd"):
        build(vocab_size=301, n_embd=128, checkpoint=str(folder))


def _hf_model(tmp_path, eps=None, rope_theta=None):
    transformers = pytest.importorskip("transformers")
    kw = {} if eps is None else {"rms_norm_eps": eps}
    if rope_theta is not None:  # transformers 5 keeps it in rope_parameters, 4 at the top level
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config = transformers.NanoChatConfig(vocab_size=300, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, **kw)
    torch.manual_seed(0)
    hf = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(str(tmp_path / "hf"))
    return hf


@pytest.mark.parametrize("eps, rope_theta", [(None, None), (torch.finfo(torch.float32).eps, 50000.0)])
@torch.no_grad()
def test_hf_layout_gives_the_same_logits(tmp_path, eps, rope_theta):
    hf = _hf_model(tmp_path, eps, rope_theta)
    loaded = build(vocab_size=300, checkpoint=str(tmp_path / "hf"))
    assert loaded.config.norm_eps == hf.config.rms_norm_eps  # eps read from config.json (§6): 1e-6 by default
    assert loaded.config.rotary_base == (rope_theta or 10000.0)
    assert loaded.config.n_kv_head == 1 and loaded.config.sequence_len == 32
    ids = torch.randint(0, 300, (2, 9))
    ours = loaded(loaded.embed(ids))
    theirs = hf(input_ids=ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4, (ours - theirs).abs().max().item()
    assert theirs.std() > 1.0  # the comparison is not between near-zero logits


def test_hf_config_of_transformers_4():
    from plugins.decoders.nanochat_pretrained import hf_config
    cfg = dict(model_type="nanochat", hidden_size=1280, intermediate_size=5120, num_hidden_layers=20,
               num_attention_heads=10, num_key_value_heads=10, vocab_size=65536, max_position_embeddings=2048,
               rope_theta=10000.0, rms_norm_eps=1e-6, final_logit_softcapping=15.0)
    assert hf_config(cfg, "config.json") == dict(vocab_size=65536, sequence_len=2048, n_layer=20, n_head=10,
                                                 n_kv_head=10, n_embd=1280, rotary_base=10000.0, norm_eps=1e-6,
                                                 softcap=15.0)
    with pytest.raises(ConfigError, match="intermediate_size"):
        hf_config({**cfg, "intermediate_size": 8192}, "config.json")


def test_hf_layout_mismatch_and_growth(tmp_path):
    _hf_model(tmp_path)
    with pytest.raises(ConfigError, match="n_head is 4 in the recipe but 2"):
        build(vocab_size=300, n_head=4, checkpoint=str(tmp_path / "hf"))
    grown = build(vocab_size=301, checkpoint=str(tmp_path / "hf" / "model.safetensors"), checkpoint_format="hf")
    assert grown.vocab_size == 301


# ---------------------------------------------------------------- tokenizer

SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


@pytest.fixture
def tiny_tokenizer_files(tmp_path):
    """A tiny nanochat-style Encoding: 256 bytes + 4 merges, then the 9 specials in the last 9 ids."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"he", b"ll", b"hell", b"hello"):
        ranks[merge] = len(ranks)
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIALS)}
    enc = tiktoken.Encoding("rustbpe", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    pkl = tmp_path / "tokenizer" / "tokenizer.pkl"
    pkl.parent.mkdir()
    with open(pkl, "wb") as f:
        pickle.dump(enc, f)
    return pkl, enc


def test_tokenizer_safe_export_and_pickle(tiny_tokenizer_files):
    from plugins.tokenizers import nanochat_bpe
    from plugins.tokenizers.nanochat_bpe import NanochatBPETokenizer, export_tokenizer
    pkl, enc = tiny_tokenizer_files
    with pytest.raises(ConfigError, match="allow_pickle.*runs code|runs code.*allow_pickle"):
        NanochatBPETokenizer(pkl)
    with pytest.raises(ConfigError, match="allow_pickle"):
        NanochatBPETokenizer(pkl.parent)  # the folder holds only the pickle
    exported = export_tokenizer(pkl, pkl.parent / nanochat_bpe.EXPORT_NAME)
    with open(exported) as f:
        assert json.load(f)["format"] == nanochat_bpe.FORMAT
    registry = Registry()
    nanochat_bpe.vlmkit_register(registry)
    safe = registry.build("tokenizer", "nanochat_bpe", path=str(pkl.parent))  # the folder now has the export
    unpickled = NanochatBPETokenizer(pkl, allow_pickle=True)
    for tok in (safe, unpickled):
        assert tok.vocab_size == 270 and tok.image_id == 269 == enc.n_vocab  # <|image|> = base vocab size
        assert tok.bos_id == 260 and tok.eos_id == 264 == tok.pad_id
        assert tok.special_id("<|assistant_start|>") == 263 and tok.special_id("<|image|>") == 269
        for text in ["hello world, hello!", "", "Grüße 東京 12345 🙂\n\ttab"]:
            ids = tok.encode(text)
            assert ids == enc.encode_ordinary(text) and tok.decode(ids) == text
        assert tok.encode("hello") == [259]  # the merges apply
        ids = tok.encode("<|bos|>hi<|image|>")
        assert tok.bos_id not in ids and tok.image_id not in ids and tok.decode(ids) == "<|bos|>hi<|image|>"
        assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.image_id, tok.eos_id]) == "hi"
        with pytest.raises(ValueError):
            tok.decode([270])
        with pytest.raises(KeyError):
            tok.special_id("<|pad|>")
    with pytest.raises(ConfigError, match="pickle"):  # a pickle under a JSON name is still refused
        renamed = pkl.parent / "other.json"
        renamed.write_bytes(pkl.read_bytes())
        NanochatBPETokenizer(renamed)


def test_tokenizer_without_tiktoken_says_pip_install(monkeypatch, tmp_path):
    import sys

    from plugins.tokenizers.nanochat_bpe import NanochatBPETokenizer
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ConfigError, match="pip install tiktoken"):
        NanochatBPETokenizer(tmp_path)
