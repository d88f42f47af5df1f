"""nanochat as it is today (arch 2026-07, NC-HEAD): checkpoints written by nanochat's own code, its tokenizer.pkl,
the image-position rules, and KV-cache exactness with images.

tests/data/nanochat_today/ was written by karpathy/nanochat@92d63d4 itself (its README says how): checkpoints in
its checkpoint_manager layout, the fp32 CPU logits nanochat computes for them, and its Engine's greedy tokens.
"""
import os
import pickle

import pytest
import torch

from core.errors import ConfigError
from core.generate import generate
from core.model import build_model
from core.recipe import Component, ModelConfig, load_recipe
from core.registry import Registry, load_plugins
from plugins.decoders import nanochat_pretrained
from plugins.decoders.nanochat_2026 import IMAGE_RULES, GPT2026, window_sizes
from tests.helpers import ROOT, TINY

DATA = os.path.join(ROOT, "tests", "data", "nanochat_today")
FIXTURES = {"base": 42, "compiled": 7}  # folder -> its step
# the tokenizer the fixtures go with: 256 bytes, these merges, nanochat's 9 specials (271 ids)
MERGES = (b"th", b"he", b"the", b" t", b"in", b" the")
SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")  # nanochat's split pattern (docs/architecture.md §1.10)
VOCAB, IMAGE = 271, 271  # <|image|> is appended: id 271, vocabulary 272 (padded rows 320 either way)


def build(**kw):
    registry = Registry()
    nanochat_pretrained.vlmkit_register(registry)
    return registry.build("decoder", "nanochat", where="model.decoder", **kw)


def reference(name):
    return torch.load(os.path.join(DATA, name, "reference.pt"), weights_only=True)


def random_2026(seed=0, **kw):
    """A small 2026-07 GPT with every tensor moved off its init (N(0, 0.3) added), windows of 128 in 160+ tokens."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB + 1, sequence_len=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                 window_pattern="SL", image_id=IMAGE)
    model = GPT2026(**{**sizes, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


# ---------------------------------------------------------------- nanochat's own checkpoints

@pytest.mark.parametrize("name", FIXTURES)
@torch.no_grad()
def test_nanochat_checkpoint_gives_nanochats_logits(name):
    step = FIXTURES[name]
    state = torch.load(os.path.join(DATA, name, f"model_{step:06d}.pt"), weights_only=True)
    prefix = "_orig_mod." if name == "compiled" else ""
    assert state[prefix + "transformer.wte.weight"].dtype == torch.bfloat16  # as nanochat stores them
    assert all(k.startswith(prefix) for k in state)
    model = build(vocab_size=VOCAB, checkpoint=os.path.join(DATA, name))  # the folder: arch and sizes from meta
    assert isinstance(model, GPT2026) and model.config.rotary_base == 100000.0
    assert model.transformer.wte.weight.shape[0] == 320 and model.transformer.wte.weight.dtype == torch.float32
    ref = reference(name)
    ids = ref["ids"]
    if name == "base":  # windows shorter than the sequence, GQA: what the fixture is there to exercise
        assert model.windows == [128, 128, 256] and ids.shape[1] > 129 and model.config.n_kv_head < model.config.n_head
    logits = model(model.embed(ids), ids=ids)
    assert logits.shape == ref["logits"].shape and ref["logits"].std() > 0.5
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FIXTURES)
@torch.no_grad()
def test_greedy_continuation_is_nanochats_engine(name):
    model = build(vocab_size=VOCAB, checkpoint=os.path.join(DATA, name))
    ref = reference(name)
    prompt, expected = ref["prompt"][None], ref["greedy"].tolist()
    cache = model.make_kv_cache(1, 4)  # too short on purpose: it grows
    logits = model(model.embed(prompt), kv_cache=cache, ids=prompt)[:, -1]
    tokens = []
    for _ in expected:
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token.item())
        logits = model(model.embed(token), kv_cache=cache, ids=token)[:, -1]
    assert tokens == expected


@torch.no_grad()
def test_image_token_added_to_a_nanochat_checkpoint():
    grown = build(vocab_size=VOCAB + 1, checkpoint=os.path.join(DATA, "base"), image_positions="token")
    assert grown.config.vocab_size == VOCAB + 1 and grown.transformer.wte.weight.shape[0] == 320  # a padding row
    ref = reference("base")
    logits = grown(grown.embed(ref["ids"]), ids=ref["ids"])
    assert (logits[..., :VOCAB] - ref["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(logits[..., IMAGE], torch.zeros_like(logits[..., IMAGE]))  # a zero head row
    assert all(not t.weight[IMAGE].any() for t in grown.value_embeds.values())  # it starts with no value embedding


def test_architecture_options_and_mismatches():
    with pytest.raises(ConfigError, match="window_pattern: only with arch '2026-07'"):
        build(vocab_size=300, window_pattern="SSSL")
    with pytest.raises(ConfigError, match="arch '2026' is not one of 2025-10, 2026-07"):
        build(vocab_size=300, arch="2026")
    with pytest.raises(ConfigError, match="arch is '2025-10' in the recipe but '2026-07'"):
        build(vocab_size=VOCAB, arch="2025-10", checkpoint=os.path.join(DATA, "base"))
    with pytest.raises(ConfigError, match="window_pattern 'SXL'"):
        build(vocab_size=300, arch="2026-07", window_pattern="SXL")
    with pytest.raises(ConfigError, match="image_positions 'skip'"):
        build(vocab_size=300, arch="2026-07", image_positions="skip")
    # nanochat's d20 at 2048: short windows of 512, layers 3, 7, 11, 15 and 19 long (docs/architecture.md §1.6)
    assert window_sizes("SSSL", 20, 2048) == [512, 512, 512, 2048] * 5
    assert window_sizes("SSSL", 3, 256) == [128, 128, 256]  # the last layer always long


# ---------------------------------------------------------------- image positions and the KV cache

def _image_sequence(model, batch=2, images=40, text=100, seed=1):
    """bos, ``images`` vision positions (random embeddings under the <|image|> id, as the VLM merges), text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((batch, 1), 262), torch.full((batch, images), IMAGE),
                     torch.randint(0, 262, (batch, text), generator=g)], dim=1)
    embeds = model.embed(ids)
    embeds[:, 1:1 + images] = torch.randn(batch, images, model.n_embd, generator=g)
    return ids, embeds


@pytest.mark.parametrize("rule", IMAGE_RULES)
@torch.no_grad()
def test_chunked_prefill_and_cached_decoding_equal_one_pass(rule):
    model = random_2026(image_positions=rule)
    ids, embeds = _image_sequence(model)
    full = model(embeds, ids=ids)
    cache = model.make_kv_cache(2, 8)
    # bos + image, then the text prompt in two chunks: an image|text and a text|text boundary between calls
    chunks = [model(embeds[:, a:b], kv_cache=cache, ids=ids[:, a:b]) for a, b in ((0, 41), (41, 90), (90, None))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    logits = chunks[-1][:, -1]
    for _ in range(6):  # past the 128-token window: decoding slices the cached keys
        token = logits.argmax(-1, keepdim=True)
        ids, embeds = torch.cat([ids, token], dim=1), torch.cat([embeds, model.embed(token)], dim=1)
        logits = model(model.embed(token), kv_cache=cache, ids=token)[:, -1]
        torch.testing.assert_close(logits, model(embeds, ids=ids)[:, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_what_an_image_position_gets():
    ids, _ = _image_sequence(random_2026())
    for rule, (value_embed, smear_images) in IMAGE_RULES.items():
        model = random_2026(image_positions=rule)
        _, embeds = _image_sequence(model)
        before = model(embeds, ids=ids)
        for table in model.value_embeds.values():
            table.weight[IMAGE] += 1.0  # the placeholder's value-embedding rows
        after = model(embeds, ids=ids)
        assert torch.equal(before, after) != value_embed, rule
        x = torch.randn(2, ids.shape[1], model.n_embd)
        changed = (model.smear(x, ids != IMAGE) != x).any(-1)
        expected = torch.ones_like(changed)
        expected[:, 0] = False  # the first position has nothing to smear
        if not smear_images:  # nothing into, within or out of the image (positions 1..40, and 41 after it)
            expected[:, 1:42] = False
        assert torch.equal(changed, expected), rule
    text = torch.randint(0, 262, (1, 20))  # without images every rule is the same function
    outputs = [random_2026(image_positions=rule)(random_2026().embed(text), ids=text) for rule in IMAGE_RULES]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


@torch.no_grad()
def test_vlm_generation_with_and_without_cache():
    registry = load_plugins()[1]
    decoder = Component("nanochat", {**TINY.decoder.args, "arch": "2026-07", "n_kv_head": 1})
    torch.manual_seed(0)
    config = ModelConfig(encoder=TINY.encoder, projector=TINY.projector, decoder=decoder, tokenizer=TINY.tokenizer)
    model, tokenizer = build_model(config, registry)
    assert model.decoder.config.image_id == tokenizer.image_id  # from the build context
    for p in model.decoder.parameters():  # off the init, whose zero projections would make every logit tie
        p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    prompt = [tokenizer.bos_id] + [tokenizer.image_id] * model.num_image_tokens() + tokenizer.encode("\nOCR:")
    cached = generate(model, tokenizer, pixels, prompt, 12)
    assert cached == generate(model, tokenizer, pixels, prompt, 12, use_cache=False)
    assert len(set(map(tuple, cached))) == 2  # the two images read differently


def test_d26_recipe_dry_run_shows_the_real_decoder():
    recipe = load_recipe(os.path.join(ROOT, "recipes", "deepseek_ocr_d26.yaml"),
                         ["model.tokenizer.path=/nonexistent/tokenizer.pkl"])
    with torch.device("meta"):
        model, tokenizer = build_model(recipe.model, load_plugins()[1])
    c = model.decoder.config
    assert (c.n_layer, c.n_embd, c.vocab_size, tokenizer.image_id) == (26, 1664, 32769, 32768)
    rows, layers_with_ve = 32832, 13  # 32769 padded to a multiple of 64; the odd layers
    expected = (2 * rows * c.n_embd + layers_with_ve * rows * c.n_embd + c.n_layer * 12 * c.n_embd ** 2
                + layers_with_ve * c.n_kv_head * 12 + 2 * c.n_layer + 24 + 2)
    assert sum(p.numel() for p in model.decoder.parameters()) == expected


# ---------------------------------------------------------------- nanochat's tokenizer.pkl

def test_tokenizer_pkl_round_trip_with_the_image_token(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from plugins.tokenizers.nanochat_bpe import NanochatBPETokenizer
    ranks = {bytes([i]): i for i in range(256)}
    for merge in MERGES:
        ranks[merge] = len(ranks)
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIALS)}
    enc = tiktoken.Encoding("rustbpe", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(pickle.dumps(enc))
    tok = NanochatBPETokenizer(str(pkl), allow_pickle=True, vocab_size=VOCAB)
    assert (tok.vocab_size, tok.image_id, tok.bos_id, tok.eos_id) == (VOCAB + 1, IMAGE, 262, 266)
    for text in ["in the thin heather", "digits 12345 grouped by two", "Grüße 東京 🙂\n", ""]:
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text) and tok.decode(ids) == text
    assert tok.encode(" the") == [261]  # the merges apply
    assert tok.decode([tok.bos_id, *tok.encode("the"), tok.image_id, tok.eos_id]) == "the"
    decoder = build(vocab_size=tok.vocab_size, checkpoint=os.path.join(DATA, "base"))
    assert decoder.config.vocab_size == tok.vocab_size  # the checkpoint grown by <|image|>
