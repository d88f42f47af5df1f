"""transformers' NanoChat layout (``NanoChatForCausalLM``): the key names both ways, and writing a GPT in it.

A helper module: it registers nothing. ``nanochat_pretrained`` reads HF NanoChat checkpoints with
``hf_to_native``; ``GPT.export_hf`` (``python -m core.export``) writes one with ``export_hf``. The
config read back from a config.json is ``nanochat_pretrained.hf_config``; ``hf_config_of`` is its inverse.
"""
import re

import torch

from core.errors import ConfigError

# (HF NanoChatForCausalLM name, nanochat's name), {} the layer index: transformers' converter (§1.9);
# read one way to load HF checkpoints and the other to export (export_hf). lm_head keeps its name.
KEY_PAIRS = [
    ("model.embed_tokens.weight", "transformer.wte.weight"),
    ("model.layers.{}.self_attn.q_proj.weight", "transformer.h.{}.attn.c_q.weight"),
    ("model.layers.{}.self_attn.k_proj.weight", "transformer.h.{}.attn.c_k.weight"),
    ("model.layers.{}.self_attn.v_proj.weight", "transformer.h.{}.attn.c_v.weight"),
    ("model.layers.{}.self_attn.o_proj.weight", "transformer.h.{}.attn.c_proj.weight"),
    ("model.layers.{}.mlp.fc1.weight", "transformer.h.{}.mlp.c_fc.weight"),
    ("model.layers.{}.mlp.fc2.weight", "transformer.h.{}.mlp.c_proj.weight"),
]


def _rules(pairs):
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst.replace("{}", r"\1"))
            for src, dst in pairs]


_HF_TO_NATIVE = _rules(KEY_PAIRS)
_NATIVE_TO_HF = _rules([(native, hf) for hf, native in KEY_PAIRS])


def _rename(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def hf_to_native(state):
    """Rename HF NanoChatForCausalLM keys to nanochat's (the inverse of transformers' converter, §1.9).

    lm_head.weight keeps its name; keys already in nanochat's names pass unchanged; anything else is left
    as it is and the strict check reports it as unexpected.
    """
    return _rename(state, _HF_TO_NATIVE)


def native_to_hf(state):
    """nanochat's keys -> HF NanoChatForCausalLM's (transformers' converter, §1.9)."""
    return _rename(state, _NATIVE_TO_HF)


def hf_config_of(gpt, tokenizer=None):
    """NanoChatConfig keyword arguments for a GPT: the inverse of hf_config (§1.9, §6).

    native's weightless RMSNorm uses finfo eps (``norm_eps`` None), which is written as fp32's, the
    value that makes the two implementations one function (§6).
    """
    c = gpt.config
    out = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd,
               num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
               max_position_embeddings=c.sequence_len, hidden_act="relu2", attention_bias=False,
               rms_norm_eps=float(torch.finfo(torch.float32).eps if c.norm_eps is None else c.norm_eps),
               rope_parameters={"rope_type": "default", "rope_theta": float(c.rotary_base)},
               final_logit_softcapping=float(c.softcap) if c.softcap else None, tie_word_embeddings=False)
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return out


def export_hf(gpt, out_dir, tokenizer=None):
    """Write ``gpt`` as transformers' NanoChatForCausalLM (config.json, model.safetensors); the load is strict."""
    try:
        from transformers import NanoChatConfig, NanoChatForCausalLM
    except ImportError:
        raise ConfigError("exporting the nanochat decoder needs transformers with NanoChat: "
                          "pip install 'vlmkit[hf]'") from None
    state = native_to_hf({k: v.detach() for k, v in gpt.state_dict().items()})
    with torch.device("meta"):
        hf = NanoChatForCausalLM(NanoChatConfig(**hf_config_of(gpt, tokenizer)))
    hf.load_state_dict(state, strict=True, assign=True)  # every tensor named, none left over
    hf.save_pretrained(out_dir)
    return f"language model NanoChatForCausalLM (nanochat layout of transformers, vocab {gpt.config.vocab_size})"
