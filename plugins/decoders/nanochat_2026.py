"""nanochat's GPT as of July 2026 (NC-HEAD, karpathy/nanochat@92d63d4): the ``nanochat`` decoder's ``arch: 2026-07``.

What it adds to NC-OCT's GPT (nanochat.py, whose blocks, rotary tables and KV cache it shares), after
docs/architecture.md §1.4-1.6:
- the vocabulary padded to a multiple of 64 in wte, lm_head and the value embeddings; logits cropped, then capped;
- smear: each position adds a gated share of the previous position's normed embedding;
- per-layer resid and x0 lambdas, and a backout of the middle block's output before the final norm;
- value embeddings looked up by token id on alternating layers (the last included), gated per kv head;
- sliding windows tiled from ``window_pattern`` (the last layer long); q and k times 1.2 after the QK-norm;
  rotary base 100000; nanochat's init.

Value embeddings and smear read token ids, so ``forward`` takes them (``ids=``, ``reads_ids``: vlmkit's model and
generation pass them, the ``<|image|>`` id at vision positions); what a vision position gets is
``image_positions`` (docs/architecture.md §5.1).

KV cache: the cache carries the last position's normed embedding, so a prefill in chunks (image, then text) and
one-token decoding smear exactly as one pass does. nanochat's own cache does the same for one-token calls but
leaves the first position of a multi-token call on a non-empty cache unsmeared; its Engine never makes one.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.cpulinear import Linear
from core.errors import ConfigError
from plugins.decoders.nanochat import GPT, Block, GPTConfig

PAD_VOCAB_TO = 64
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels (§1.6)
QK_SCALE = 1.2
# image_positions -> (value embedding at a vision position, smear into, within and out of vision positions)
IMAGE_RULES = {"token": (True, True), "learned": (True, False), "none": (False, False)}


def padded(vocab_size):
    return -(-vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO


def has_value_embed(layer, n_layer):
    """Alternating layers, the last one included (§1.6)."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(pattern, n_layer, sequence_len):
    """Per layer, how many earlier keys a query sees: "L" sequence_len, "S" a quarter of it rounded up to a
    multiple of 128; the pattern tiled over the layers and the last layer long (§1.6)."""
    long, short = sequence_len, -(-sequence_len // 4 // 128) * 128
    sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(n_layer)]
    sizes[-1] = long
    return sizes


@dataclass
class GPT2026Config(GPTConfig):
    window_pattern: str = "SSSL"
    image_positions: str = "none"
    image_id: int = None  # the <|image|> placeholder id; None: every position is text


class GPT2026(GPT):
    """NC-HEAD's GPT; the same interface as GPT plus ``ids=`` in forward (the module docstring)."""
    reads_ids = True

    def __init__(self, vocab_size, sequence_len=2048, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 rotary_base=100000.0, norm_eps=None, softcap=15.0, window_pattern="SSSL", image_positions="none",
                 image_id=None):
        nn.Module.__init__(self)  # not GPT.__init__: that one builds NC-OCT's config
        pattern = str(window_pattern).upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise ConfigError(f"window_pattern {window_pattern!r}: letters S (short window) and L (long) only")
        if image_positions not in IMAGE_RULES:
            raise ConfigError(f"image_positions {image_positions!r} is not one of {', '.join(IMAGE_RULES)}")
        if n_embd < SMEAR_CHANNELS:
            raise ConfigError(f"n_embd {n_embd}: the 2026-07 GPT needs at least {SMEAR_CHANNELS} (its smear gate)")
        self.windows = window_sizes(pattern, n_layer, sequence_len)
        self._setup(GPT2026Config(vocab_size, sequence_len, n_layer, n_head, n_kv_head, n_embd, rotary_base,
                                  norm_eps, softcap, pattern, image_positions, image_id))

    def _build(self, c):
        rows, head_dim = padded(c.vocab_size), c.n_embd // c.n_head
        ve_layers = [i for i in range(c.n_layer) if has_value_embed(i, c.n_layer)]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, c.n_embd),
            h=nn.ModuleList([Block(c, i, value_embed=i in ve_layers, qk_scale=QK_SCALE) for i in range(c.n_layer)]),
        ))
        self.lm_head = Linear(c.n_embd, rows, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(c.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(c.n_layer))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(rows, c.n_kv_head * head_dim) for i in ve_layers})

    @torch.no_grad()
    def init_weights(self):
        """NC-HEAD's init (docs/architecture.md §1.5); dtypes are left to the caller."""
        c = self.config
        s = 3 ** 0.5 * c.n_embd ** -0.5  # uniform with the std of N(0, 1/n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            attn = block.attn
            for linear in (attn.c_q, attn.c_k, attn.c_v):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if hasattr(attn, "ve_gate"):
                nn.init.uniform_(attn.ve_gate.weight, 0.0, 0.02)
        depth = [i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * d for d in depth]))
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * d for d in depth]))
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -s, s)
        self._set_rotary()

    def trunk(self, x, cos_sin, kv_cache, ids):
        """Smear, then the blocks with lambdas, value embeddings and windows, then the backout (§1.6)."""
        if ids is None:
            raise TypeError("the 2026-07 nanochat GPT needs the token ids (forward's ids=) for its value embeddings")
        if ids.shape != x.shape[:2]:
            raise ValueError(f"ids {tuple(ids.shape)} do not match the embeddings {tuple(x.shape[:2])}")
        text = ids != self.config.image_id if self.config.image_id is not None else None
        x = x0 = self.smear(x, text, kv_cache)
        middle = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, cos_sin, kv_cache, self.value_embed(i, ids, text, x.dtype), self.windows[i])
            if i == self.config.n_layer // 2:
                middle = x
        return x - self.backout_lambda.to(x.dtype) * middle

    def smear(self, x, text, kv_cache=None):
        """x_t += smear_lambda·σ(smear_gate·x_t[:24])·x_{t-1}; the first position of a sequence is left alone.

        With a cache, position 0 of this call smears from the last position of the previous call. ``text``
        (B,T) bool, or None (all text): under image_positions learned or none no position smears when it or
        its predecessor is a vision position.
        """
        carried = None if kv_cache is None else kv_cache.smear
        if text is None:
            text = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if kv_cache is not None:
            kv_cache.smear = (x[:, -1:], text[:, -1:])
        if carried is None:
            cur, cur_text, prev, prev_text = x[:, 1:], text[:, 1:], x[:, :-1], text[:, :-1]
        else:
            cur, cur_text = x, text
            prev, prev_text = torch.cat([carried[0], x[:, :-1]], dim=1), torch.cat([carried[1], text[:, :-1]], dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(cur[..., :SMEAR_CHANNELS]))
        if not IMAGE_RULES[self.config.image_positions][1] and self.config.image_id is not None:
            gate = gate * (cur_text & prev_text).unsqueeze(-1).to(gate.dtype)
        smeared = cur + gate * prev
        return smeared if carried is not None else torch.cat([x[:, :1], smeared], dim=1)

    def value_embed(self, layer, ids, text, dtype):
        """Layer ``layer``'s value embeddings of ``ids`` (None on a layer without); zero at vision positions
        under image_positions none."""
        if str(layer) not in self.value_embeds:
            return None
        ve = self.value_embeds[str(layer)](ids).to(dtype)
        if text is not None and not IMAGE_RULES[self.config.image_positions][0]:
            ve = ve * text.unsqueeze(-1).to(dtype)
        return ve

    def logits(self, x):
        """The padded head, cropped to the vocabulary, in float, then capped (§1.4)."""
        return self.capped(self.lm_head(x)[..., :self.config.vocab_size].float())

    @torch.no_grad()
    def grow_vocab(self, new_vocab_size):
        """Give ids vocab_size..new_vocab_size - 1 rows (padding rows first, more if needed); old rows untouched.

        The new ids' wte rows ~ N(0, 0.8) as NC-HEAD's init; their lm_head and value-embedding rows are zero, so
        every existing logit is unchanged and a new id starts with no value embedding.
        """
        old = self.config.vocab_size
        if new_vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {new_vocab_size}")
        rows = padded(new_vocab_size)
        wte = _with_rows(self.transformer.wte, rows)
        wte[old:new_vocab_size].normal_(0.0, 0.8)
        for table in (self.lm_head, *self.value_embeds.values()):
            _with_rows(table, rows)[old:new_vocab_size] = 0
        self.config.vocab_size = new_vocab_size


def _with_rows(module, rows):
    """An Embedding's or Linear's weight with at least ``rows`` rows (zeros appended); returns the weight."""
    w = module.weight
    if w.size(0) < rows:
        module.weight = nn.Parameter(torch.cat([w, w.new_zeros(rows - w.size(0), w.size(1))]),
                                     requires_grad=w.requires_grad)
        if isinstance(module, nn.Embedding):
            module.num_embeddings = rows
        else:
            module.out_features = rows
    return module.weight
