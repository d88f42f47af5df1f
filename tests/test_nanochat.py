"""nanochat GPT (NC-OCT) and its KV cache, at tiny sizes on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.registry import Registry
from plugins.decoders import nanochat_pretrained
from plugins.decoders.nanochat import GPT, KVCache, ReluSquared, apply_rotary_emb
from tests.helpers import random_gpt

TINY = dict(vocab_size=50, sequence_len=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def tiny(seed=0, **kw):
    return random_gpt(TINY, seed, **kw)


@torch.no_grad()
def test_kv_cache_generation_matches_full_recompute():
    model = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    cache = model.make_kv_cache(batch_size=2, seq_len=ids.size(1))  # too short: must grow
    logits = model(model.embed(ids), kv_cache=cache)
    for step in range(12):
        full = model(model.embed(ids))
        torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=0)
        nxt = logits[:, -1].argmax(-1)
        assert torch.equal(nxt, full[:, -1].argmax(-1)), f"step {step}"
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        logits = model(model.embed(nxt[:, None]), kv_cache=cache)  # Tq == 1
    assert cache.get_pos() == ids.size(1)


@torch.no_grad()
def test_kv_cache_chunk_after_prefix():
    # 1 < Tq < Tk: the cached prefix plus a causal chunk
    model = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    cache = model.make_kv_cache(2, 16)
    model(model.embed(ids[:, :5]), kv_cache=cache)
    chunk = model(model.embed(ids[:, 5:]), kv_cache=cache)
    torch.testing.assert_close(chunk, model(model.embed(ids))[:, 5:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_prefill_batch1_to_batch3():
    model = tiny()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 6))
    one = model.make_kv_cache(1, prompt.size(1))
    model(model.embed(prompt), kv_cache=one)
    three = model.make_kv_cache(3, 10)
    three.prefill(one)
    assert three.get_pos() == 6 and three.kv_cache.shape[2] == 3
    nxt = torch.tensor([[1], [2], [3]])
    logits = model(model.embed(nxt), kv_cache=three)[:, -1]
    full = model(model.embed(torch.cat([prompt.expand(3, -1), nxt], dim=1)))[:, -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


def test_kv_cache_layout_and_growth():
    L, B, H, T, D = 2, 3, 4, 5, 8
    cache = KVCache(batch_size=B, num_heads=H, seq_len=T, head_dim=D, num_layers=L)
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    for layer in range(L):
        kv, vv = cache.insert_kv(layer, k, v)
        assert cache.get_pos() == (0 if layer < L - 1 else T)  # pos moves after the last layer
    assert cache.kv_cache.shape == (L, 2, B, H, T, D)
    k2, v2 = torch.randn(B, H, 3, D), torch.randn(B, H, 3, D)
    for layer in range(L):
        kv, vv = cache.insert_kv(layer, k2, v2)
    assert cache.kv_cache.shape[:4] == (L, 2, B, H) and cache.kv_cache.size(4) >= T + 3
    assert cache.kv_cache.size(4) % 1024 == 0
    assert kv.shape == (B, H, T + 3, D)
    assert torch.equal(kv, torch.cat([k, k2], dim=2)) and torch.equal(vv, torch.cat([v, v2], dim=2))
    cache.reset()
    assert cache.get_pos() == 0


@torch.no_grad()
def test_loss_ignores_minus_one_and_softcap_bounds():
    model = tiny()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    targets = torch.randint(0, TINY["vocab_size"], (2, 8))
    targets[:, -2:] = -1
    emb = model.embed(ids)
    loss = model(emb, targets)
    logits = model(emb)
    keep = targets != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))
    # perturbing the last input changes only the last (ignored) position's logits
    emb2 = emb.clone()
    emb2[:, -1] += 1.0
    assert not torch.allclose(model(emb2)[:, -1], logits[:, -1])
    torch.testing.assert_close(model(emb2, targets), loss, atol=0, rtol=0)
    per_token = model(emb, targets, loss_reduction="none")
    assert per_token.shape == (16,) and (per_token.view(2, 8)[:, -2:] == 0).all()
    # softcap: 15·tanh(z/15) keeps |logits| <= 15 even with a huge head
    model.lm_head.weight.mul_(1000.0)
    big = model(emb)
    assert big.dtype == torch.float32 and big.abs().max() <= 15.0 and big.abs().max() > 14.0


def test_rotary_convention_by_hand():
    model = GPT(vocab_size=8, sequence_len=4, n_layer=1, n_head=1, n_kv_head=1, n_embd=4)
    # tables for x·cos + swap_halves(x)·sin: [cos, cos] and [sin, -sin] over the head dim
    assert model.cos.dtype == torch.float32 and model.cos.shape == (1, 40, 1, 4)  # 10·sequence_len
    cos, sin = model.cos[:, 1:2], model.sin[:, 1:2]  # position 1
    theta = torch.tensor([1.0, 1.0 / 10000 ** (2 / 4)])  # inv_freq = base^(-2j/D)
    c, s = theta.cos(), theta.sin()
    torch.testing.assert_close(cos.flatten(), torch.cat([c, c]))
    torch.testing.assert_close(sin.flatten(), torch.cat([s, -s]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    x1, x2 = x[..., :2].flatten(), x[..., 2:].flatten()
    expected = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c])  # rotation by -θ
    assert torch.equal(apply_rotary_emb(x, cos, sin).flatten(), expected)  # bit for bit


def test_relu_squared_gradient():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    x.data[:4] = torch.tensor([0.0, -1.0, 1e-3, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(ReluSquared.apply, (x,))
    y = torch.randn(3, 5, requires_grad=True)
    g = torch.randn(3, 5)
    ours = torch.autograd.grad(ReluSquared.apply(y), y, g)[0]
    plain = torch.autograd.grad(torch.relu(y).square(), y, g)[0]
    assert torch.equal(ReluSquared.apply(y), torch.relu(y).square()) and torch.equal(ours, plain)


@torch.no_grad()
def test_qk_norm_after_rotary(monkeypatch):
    # With non-orthogonal "rotary" tables the order is observable: norm last gives unit-RMS q, k.
    model = tiny()
    model.cos.fill_(2.0)
    model.sin.fill_(0.5)
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q, k))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(model.embed(torch.randint(0, TINY["vocab_size"], (2, 6))))
    assert len(seen) == TINY["n_layer"]
    for q, k in seen:
        for t in (q, k):
            torch.testing.assert_close(t.pow(2).mean(-1).sqrt(), torch.ones(t.shape[:-1]), atol=1e-4, rtol=0)


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(n_head=4, n_kv_head=2)
    assert gqa.transformer.h[0].attn.c_k.weight.shape == (2 * 8, 32)
    mha = GPT(**{**TINY, "n_head": 4, "n_kv_head": 4}).eval()
    sd = gqa.state_dict()
    for key in sd:
        if key.endswith(("attn.c_k.weight", "attn.c_v.weight")):  # query head h uses kv head h // 2
            sd[key] = sd[key].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    emb = gqa.embed(torch.randint(0, TINY["vocab_size"], (2, 7)))
    torch.testing.assert_close(gqa(emb), mha(emb), atol=1e-5, rtol=0)


def test_d20_on_meta_device():
    with torch.device("meta"):
        model = GPT(vocab_size=65536, sequence_len=2048, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)
    assert sum(p.numel() for p in model.parameters()) == 560_988_160  # docs/architecture.md §1.1, §1.6
    sd = model.state_dict()
    expected = {"transformer.wte.weight": (65536, 1280), "lm_head.weight": (65536, 1280)}
    for i in range(20):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            expected[f"transformer.h.{i}.attn.{name}.weight"] = (1280, 1280)
        expected[f"transformer.h.{i}.mlp.c_fc.weight"] = (5120, 1280)
        expected[f"transformer.h.{i}.mlp.c_proj.weight"] = (1280, 5120)
    assert len(expected) == 122
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # no rotary buffers


def test_meta_then_to_empty_and_init():
    with torch.device("meta"):
        model = GPT(**TINY)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = GPT(**TINY)
    assert torch.equal(model.cos, fresh.cos) and torch.equal(model.sin, fresh.sin)
    model.to(torch.bfloat16)
    assert model.cos.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    # meta + load_state_dict(assign=True) leaves the tables on meta: forward rebuilds them
    with torch.device("meta"):
        loaded = GPT(**TINY)
    loaded.load_state_dict(fresh.state_dict(), strict=True, assign=True)
    idx = torch.zeros(1, 2, dtype=torch.long)
    assert torch.equal(loaded(loaded.embed(idx)), fresh(fresh.embed(idx)))


def test_init_weights():
    torch.manual_seed(0)
    model = GPT(vocab_size=64, sequence_len=8, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    block = model.transformer.h[0]
    assert (model.lm_head.weight == 0).all()
    assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.05
    # std = 1/sqrt(fan_in)·min(1, sqrt(fan_out/fan_in)); c_fc: fan_out/fan_in = 4 -> 1/8
    assert abs(block.mlp.c_fc.weight.std().item() - 1 / math.sqrt(64)) < 0.005
    assert abs(block.attn.c_q.weight.std().item() - 1 / math.sqrt(64)) < 0.01
    logits = model(model.embed(torch.zeros(1, 3, dtype=torch.long)))
    assert (logits == 0).all()  # zero head: uniform prediction at init


@torch.no_grad()
def test_grow_vocab_keeps_old_rows():
    model = tiny()
    old_wte = model.transformer.wte.weight.clone()
    old_head = model.lm_head.weight.clone()
    emb = model.embed(torch.randint(0, 50, (1, 4)))
    before = model(emb)
    model.grow_vocab(51)
    assert model.vocab_size == 51 == model.config.vocab_size
    assert torch.equal(model.transformer.wte.weight[:50], old_wte)
    assert torch.equal(model.lm_head.weight[:50], old_head)
    assert (model.lm_head.weight[50] == 0).all() and model.transformer.wte.weight[50].abs().sum() > 0
    after = model(emb)
    assert after.shape == (1, 4, 51) and torch.equal(after[..., :50], before)
    model(model.embed(torch.tensor([[50]])))  # the new id embeds


def test_registers_decoder():
    registry = Registry()
    nanochat_pretrained.vlmkit_register(registry)
    model = registry.build("decoder", "nanochat", vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    assert isinstance(model, GPT) and model.n_embd == 16


def test_bad_head_split_is_refused():
    with pytest.raises(ConfigError, match="n_head"):
        GPT(vocab_size=8, n_embd=30, n_head=4)


@torch.no_grad()
def test_last_only_gives_the_last_positions_logits_with_and_without_cache():
    """Generation's prefill (core/contracts.py Decoder ``keeps_last``): the head on the last position alone."""
    model = tiny()
    assert model.keeps_last
    embeds = model.embed(torch.randint(0, TINY["vocab_size"], (2, 7)))
    last = model(embeds, last_only=True)
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, model(embeds)[:, -1:], atol=1e-5, rtol=0)
    cache = model.make_kv_cache(batch_size=2, seq_len=16)
    torch.testing.assert_close(model(embeds, kv_cache=cache, last_only=True), last, atol=1e-5, rtol=0)
    assert cache.get_pos() == 7  # every position went into the cache, only the head was cut
