"""nanochat's GPT with the Oct-2025 semantics (NC-OCT, karpathy/nanochat@a088b7a).

NC-OCT is what the public HF d20 checkpoints were trained with (docs/architecture.md §1.1): wte, n_layer
blocks and an untied lm_head, nothing else (no value embeddings, no lambdas, no smear/backout).
Module names match the native state_dict (§1.6) so those checkpoints load with strict=True.

Interface used by vlmkit (the vision-language model merges image embeddings between the two calls):
    embeds = gpt.embed(idx)                      # (B,T) -> (B,T,n_embd), no norm
    logits = gpt(embeds, kv_cache=cache)         # float (B,T,V), softcapped
    loss   = gpt(embeds, targets)                # cross-entropy, targets -1 are ignored
    cache  = gpt.make_kv_cache(batch_size, seq_len)
    gpt.grow_vocab(65537)                        # after pretrained weights load (adds <|image|>)

The ``nanochat`` decoder is registered by ``nanochat_pretrained.py`` (``nanochat_decoder``): GPT's arguments
plus ``checkpoint`` / ``checkpoint_format`` to load native or HF nanochat weights, and ``arch``: this file is
"2025-10"; nanochat_2026.py's GPT2026 ("2026-07", NC-HEAD) subclasses GPT and shares the blocks (whose value
embeddings, windows and q/k scale stay off here), the rotary tables and the KV cache.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cpulinear import Linear, linear
from core.errors import ConfigError
from core.weights import on_meta
from plugins.decoders import nanochat_hf


@dataclass
class GPTConfig:
    vocab_size: int
    sequence_len: int = 1024   # NC-OCT defaults, docs/architecture.md §1.2; d20 uses 2048
    n_layer: int = 12
    n_head: int = 6            # query heads
    n_kv_head: int = 6         # key/value heads (GQA when < n_head)
    n_embd: int = 768
    rotary_base: float = 10000.0  # NC-OCT 10000, NC-HEAD 100000 (§1.4)
    norm_eps: float = None     # None: torch uses finfo(dtype).eps, as native (§1.4, §6)
    softcap: float = 15.0      # 15·tanh(logits/15) (§1.4)


def norm(x, eps=None):
    # RMSNorm without a learnable weight (§1.4)
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary_emb(x, cos, sin):
    """x: (B,T,H,D); cos = [cos, cos], sin = [sin, -sin]: (1,T,1,D) from rotary_tables.

    Half-split convention, rotates by -θ (§1.4): y1 = x1·cos + x2·sin, y2 = x2·cos - x1·sin. Written as
    x·cos + swap_halves(x)·sin it is two multiplies instead of four, bit for bit the same numbers.
    """
    d = x.size(-1) // 2
    swapped = torch.cat([x[..., d:], x[..., :d]], dim=-1)
    return (x * cos + swapped * sin).to(x.dtype)


def rotary_tables(seq_len, head_dim, base, device=None):
    """cos and signed sin for apply_rotary_emb, (1, seq_len, 1, head_dim) in fp32.

    Native NC-OCT keeps them in bf16; fp32 makes this model the same function as the HF
    NanoChat port (docs/architecture.md §6), at a small cost in speed.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1)[None, :, None, :], torch.cat([sin, -sin], -1)[None, :, None, :]


class ReluSquared(torch.autograd.Function):
    """relu(x)² (§1.4) with a two-op backward, 2·relu(x)·grad, that keeps only relu(x) for it
    (autograd's pow + relu keeps both tensors and runs four ops)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * 2 * r


def attend(q, k, v, cached, window=None):
    """SDPA over (B,H,T,D) queries and the keys so far; ``window`` w: query i sees keys i-w..i (§1.6).

    Without a window, NC-OCT's three cases (§1.4): Tq == Tk (also no cache) plain causal; Tq == 1 every
    cached key; otherwise the whole cached prefix and causal within the new chunk.
    """
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if window is not None and Tk > window + 1:
        if Tq == 1:  # one new token: the last window + 1 keys
            return F.scaled_dot_product_attention(q, k[:, :, -window - 1:], v[:, :, -window - 1:], enable_gqa=gqa)
        rows = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        cols = torch.arange(Tk, device=q.device)[None]
        mask = (cols <= rows) & (rows - cols <= window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if not cached or Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


VE_GATE_CHANNELS = 12  # NC-HEAD's value-embedding gate reads the first 12 channels of the block input (§1.6)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, value_embed=False, qk_scale=1.0):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache this layer writes
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.norm_eps
        self.qk_scale = qk_scale  # NC-HEAD: 1.2 on q and on k after the QK-norm (§1.4)
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=False)
        if value_embed:  # one gate per kv head (§1.6)
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, cos_sin, kv_cache=None, ve=None, window=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # one matmul for q, k and v, and the rotary and QK-norm run once over q and k together: fewer,
        # larger ops (the state_dict keeps nanochat's three matrices)
        layers = (self.c_q, self.c_k, self.c_v)
        if all(type(layer) is Linear for layer in layers):
            qkv = linear(x, torch.cat([layer.weight for layer in layers]))
        else:  # a wrapped layer (an adapter, core/adapters.py) computes more than its weight: call each
            qkv = torch.cat([layer(x) for layer in layers], dim=-1)
        qkv = qkv.view(B, T, H + 2 * Hkv, D)
        qk, v = qkv.split([H + Hkv, Hkv], dim=2)  # split, not slices: its backward is one cat, not zeros + copies
        if ve is not None:  # v += 3·σ(gate)·ve, a gate per kv head (§1.6)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        qk = norm(apply_rotary_emb(qk, *cos_sin), self.eps)  # QK-norm comes after the rotary (§1.4)
        if self.qk_scale != 1.0:
            qk = qk * self.qk_scale
        q, k = qk.split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B,H,T,D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # now the whole prefix
        y = attend(q, k, v, kv_cache is not None, window)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(ReluSquared.apply(self.c_fc(x)))  # relu² (§1.4)


class Block(nn.Module):
    def __init__(self, config, layer_idx, **attention):
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer_idx, **attention)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None, ve=None, window=None):
        x = x + self.attn(norm(x, self.eps), cos_sin, kv_cache, ve, window)  # pre-norm, no dropout
        return x + self.mlp(norm(x, self.eps))


class GPT(nn.Module):
    reads_ids = False  # forward needs only the embeddings (core/contracts.py, Decoder)
    keeps_last = True  # forward(last_only=True): the head on the last position only (generation's prefill)

    def __init__(self, vocab_size, sequence_len=1024, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 rotary_base=10000.0, norm_eps=None, softcap=15.0):
        super().__init__()
        self._setup(GPTConfig(vocab_size, sequence_len, n_layer, n_head, n_kv_head, n_embd,
                              rotary_base, norm_eps, softcap))

    def _setup(self, config):
        """Check the sizes, build the modules and the rotary tables, initialise unless on meta."""
        if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
            raise ConfigError(f"n_embd {config.n_embd} must split into n_head {config.n_head} heads of even size")
        if config.n_head % config.n_kv_head:
            raise ConfigError(f"n_head {config.n_head} must be a multiple of n_kv_head {config.n_kv_head}")
        self.config = config
        self._build(config)
        # 10x the training length so generation can run past it (§1.4); not in the state_dict
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self._set_rotary()
        if not on_meta(self):  # on meta: to_empty() then init_weights() (§1.9)
            self.init_weights()

    def _build(self, c):
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            h=nn.ModuleList([Block(c, i) for i in range(c.n_layer)]),
        ))
        self.lm_head = Linear(c.n_embd, c.vocab_size, bias=False)  # untied from wte

    @property
    def n_embd(self):
        return self.config.n_embd

    @property
    def vocab_size(self):
        return self.config.vocab_size

    def _set_rotary(self, device=None):
        c = self.config
        self.cos, self.sin = rotary_tables(10 * c.sequence_len, c.n_embd // c.n_head, c.rotary_base,
                                           device=device or self.lm_head.weight.device)

    def _apply(self, fn, recurse=True):
        # Recompute the tables after every move or cast: .to(bfloat16) keeps them fp32, and
        # to_empty() (meta -> device) leaves valid tables instead of uninitialised memory.
        super()._apply(fn, recurse)
        self._set_rotary()
        return self

    @torch.no_grad()
    def init_weights(self):
        """NC-OCT init (docs/architecture.md §1.5). Native also casts wte to bf16 on CUDA; we leave dtypes to the
        caller."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        # zero output projections: every block starts as the identity, the model as uniform logits
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._set_rotary()

    def embed(self, idx):
        """Token ids (B,T) -> embeddings (B,T,n_embd). The norm is applied in forward, so image
        embeddings merged in between are normalised the same way (docs/architecture.md §5)."""
        return self.transformer.wte(idx)

    def forward(self, embeds, targets=None, kv_cache=None, loss_reduction="mean", ids=None, last_only=False):
        B, T, C = embeds.shape
        if self.cos.device != embeds.device:  # built on meta, then load_state_dict(assign=True)
            self._set_rotary(embeds.device)
        T0 = 0 if kv_cache is None else kv_cache.get_pos()  # rotary offset (§1.4)
        if self.cos.size(1) < T0 + T:
            raise ValueError(f"sequence end {T0 + T} exceeds the rotary table ({self.cos.size(1)} positions)")
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        eps = self.config.norm_eps
        # the norm right after the embedding (§1.4 step 1), the blocks, the final norm
        x = self.trunk(norm(embeds, eps), cos_sin, kv_cache, ids)
        if targets is None:
            return self.logits(norm(x[:, -1:] if last_only else x, eps))
        x = norm(x, eps)
        # the head and the loss only where there is a target (masked targets are -1, §1.4): an OCR sample's
        # image and prompt positions never are, and at d20 the head is 65536 x 1280 per position
        flat = targets.reshape(-1)
        scored = flat != -1
        loss = F.cross_entropy(self.logits(x.reshape(-1, C)[scored]), flat[scored], reduction=loss_reduction)
        if loss_reduction == "none":  # per position, 0 where masked (as ignore_index gives)
            return loss.new_zeros(flat.shape).masked_scatter(scored, loss)
        return loss

    def trunk(self, x, cos_sin, kv_cache, ids):
        """The normed embeddings through the blocks; NC-OCT reads no token ids."""
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        return x

    def logits(self, x):
        """Final hidden states -> float logits, softcapped (§1.4)."""
        return self.capped(self.lm_head(x).float())

    def capped(self, logits):
        """cap·tanh(logits/cap), or the logits as they are when softcap is 0 or None (§1.4)."""
        if self.config.softcap:
            cap = self.config.softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def make_kv_cache(self, batch_size, seq_len):
        """An empty cache shaped for this model, as nanochat's Engine builds it (§1.8)."""
        c = self.config
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)

    def export_hf(self, out_dir, tokenizer):
        """This model as transformers' NanoChatForCausalLM folder (``python -m core.export``; core/contracts.py)."""
        return nanochat_hf.export_hf(self, out_dir, tokenizer)

    @torch.no_grad()
    def grow_vocab(self, new_vocab_size):
        """Append rows to wte and lm_head; existing rows stay bit-identical.

        New wte rows ~ N(0, 1) like init_weights; new lm_head rows are zero, so every existing
        logit is unchanged. Call before building the optimizer (the Parameters are replaced).
        """
        old = self.config.vocab_size
        if new_vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {new_vocab_size}")
        n = new_vocab_size - old
        if n == 0:
            return
        wte, head = self.transformer.wte, self.lm_head
        w = wte.weight
        rows = torch.randn(n, w.size(1), dtype=w.dtype, device=w.device)
        wte.weight = nn.Parameter(torch.cat([w, rows]), requires_grad=w.requires_grad)
        wte.num_embeddings = new_vocab_size
        h = head.weight
        head.weight = nn.Parameter(torch.cat([h, h.new_zeros(n, h.size(1))]), requires_grad=h.requires_grad)
        head.out_features = new_vocab_size
        self.config.vocab_size = new_vocab_size


class KVCache:
    """NC-OCT KV cache (docs/architecture.md §1.8): one tensor (L, 2, B, H, T, D), allocated on the
    first insert with that k's dtype and device. Batch, then heads, then positions: a swapped
    order once asked for 225 GB (DESIGN.md). H is the number of KV heads."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache = None
        self.pos = 0
        self.smear = None  # NC-HEAD: what the next position smears from (nanochat_2026.py)

    def reset(self):
        self.pos = 0
        self.smear = None

    def get_pos(self):
        return self.pos

    def prefill(self, other):
        """Copy other's filled positions into this empty cache; other's batch may be 1 (broadcast)."""
        if self.kv_cache is not None or other.kv_cache is None:
            raise ValueError("prefill needs an empty cache and a filled one")
        L, _, B, H, T, D = self.kv_shape
        oL, _, oB, oH, _, oD = other.kv_cache.shape
        if (oL, oH, oD) != (L, H, D) or oB not in (1, B):
            raise ValueError(f"cannot prefill a cache {self.kv_shape} from {tuple(other.kv_cache.shape)}")
        self.kv_shape = (L, 2, B, H, max(T, other.pos), D)
        self.kv_cache = other.kv_cache.new_empty(self.kv_shape)
        self.kv_cache[..., :other.pos, :] = other.kv_cache[..., :other.pos, :]
        self.pos = other.pos
        if other.smear is not None:
            self.smear = tuple(t.expand(B, *t.shape[1:]).clone() for t in other.smear)

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (B,H,T,D) at pos..pos+T of layer_idx; return the views over 0..pos+T."""
        if self.kv_cache is None:
            self.kv_cache = torch.empty(self.kv_shape, dtype=k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv_cache.size(4):  # grow: +1024, rounded up to a multiple of 1024 (§1.8)
            t_needed = (t1 + 1024 + 1023) // 1024 * 1024
            extra = list(self.kv_cache.shape)
            extra[4] = t_needed - self.kv_cache.size(4)
            self.kv_cache = torch.cat([self.kv_cache, self.kv_cache.new_empty(extra)], dim=4).contiguous()
            self.kv_shape = tuple(self.kv_cache.shape)
        self.kv_cache[layer_idx, 0, :, :, t0:t1] = k
        self.kv_cache[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.kv_cache.size(0) - 1:  # every layer has written this chunk
            self.pos = t1
        return self.kv_cache[layer_idx, 0, :, :, :t1], self.kv_cache[layer_idx, 1, :, :, :t1]
