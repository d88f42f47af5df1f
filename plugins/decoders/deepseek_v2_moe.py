"""DeepSeek-OCR 2's language model, a DeepSeek-V2-style mixture of experts (docs/architecture.md §7.3).

transformers' ``DeepseekOcr2TextModel`` is the network, used as it is (the library's module, its
routing and its KV cache): grouped-query attention with rotate-half rotary positions (not MLA);
the first ``dense`` layers a SwiGLU MLP, the others a router (logits in fp32, softmax over all
experts, greedy top-k on those probabilities, no renormalisation, times ``routed_scaling_factor``)
plus shared experts added unweighted. vlmkit adds the head and the Decoder contract around it.

Arguments are transformers' ``DeepseekOcr2TextConfig`` fields (``hidden_size``, ``n_routed_experts``,
``mlp_layer_types`` ...; defaults: the released sizes, the first layer dense). ``weights``: a
DeepSeek-OCR 2 checkpoint folder or hub name in either key layout (plugins/deepseek_ocr2_format.py);
its text_config sets the sizes (the recipe may only repeat them) and the language model loads
exactly or not at all. The embedding has the checkpoint's rows; without one, the tokenizer's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import hookimpl
from core.distributed import print0
from core.errors import ConfigError
from core.weights import load_state, on_meta
from plugins import deepseek_ocr2_format as fmt


def text_config(settings, given):
    """transformers' DeepseekOcr2TextConfig from our settings; ``mlp_layer_types`` defaults to the first layer
    dense, the rest sparse (the release's ``first_k_dense_replace: 1``)."""
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
    settings = dict(settings)
    n = settings.get("num_hidden_layers")
    if isinstance(n, int) and settings.get("mlp_layer_types") is None:
        settings["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)
    if len(settings.get("mlp_layer_types") or ()) != n:
        raise ConfigError(f"mlp_layer_types: one entry per layer ({n}), got {settings.get('mlp_layer_types')}")
    return fmt.hf_config(DeepseekOcr2TextConfig, settings, given)


def _without_autocast(forward):
    """The router computes its logits in float32 (§7.3); under run.precision bf16's autocast its F.linear would
    run in bf16 and route differently from the release."""
    def run(hidden_states):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return forward(hidden_states)
    return run


class DeepseekV2MoE(nn.Module):
    """Embeddings in, logits out; see the module docstring."""
    keeps_last = True  # forward(last_only=True): the head on the last position only (generation's prefill)

    def __init__(self, vocab_size=None, weights=None, **config):
        super().__init__()
        fmt.need_transformers("decoder deepseek_v2_moe")
        from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
            DeepseekOcr2TextModel,
            DeepseekOcr2TextTopkRouter,
        )
        folder, checkpoint_config = None, None
        if weights is not None:
            folder, checkpoint_config = fmt.checkpoint_folder(weights, "model.decoder.weights")
        from_file = None if folder is None else checkpoint_config.get("text_config") or {}
        source = None if folder is None else f"{folder}/config.json"
        if folder is None and vocab_size is None:
            raise ConfigError("needs vocab_size (vlmkit passes the tokenizer's) or weights")
        settings = fmt.settle({**fmt.TEXT_DEFAULTS, "vocab_size": vocab_size}, from_file, config,
                              "model.decoder", source)
        if vocab_size is not None and vocab_size > settings["vocab_size"]:
            raise ConfigError(f"the tokenizer's {vocab_size} ids do not fit the checkpoint's {settings['vocab_size']} "
                              f"embedding rows ({source}); use the checkpoint's tokenizer")
        self.config = text_config(settings, config)
        self.model = DeepseekOcr2TextModel(self.config)
        for module in self.model.modules():
            if isinstance(module, DeepseekOcr2TextTopkRouter):
                module.forward = _without_autocast(module.forward)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=self.config.initializer_range)  # transformers' init
        if folder is not None:
            self.load_pretrained(folder)

    def load_pretrained(self, folder):
        if on_meta(self):
            print0(f"decoder: built on the meta device, weights in {folder} not read")
            return None
        state = {k.removeprefix("decoder."): v for k, v in fmt.read_part(folder, vision=False, source=folder).items()}
        report = load_state(self, state, folder, name="the DeepSeek-OCR 2 language model")
        fmt.refresh_rotary(self)
        print0(f"decoder: loaded {len(report['loaded'])} tensors from {folder} (DeepSeek-OCR 2)")
        return report

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        fmt.refresh_rotary(self)  # after to_empty() and casts: see refresh_rotary
        return self

    @property
    def n_embd(self):
        return self.config.hidden_size

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def forward(self, embeds, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        x = self.model(inputs_embeds=embeds, cache=kv_cache, use_cache=kv_cache is not None).last_hidden_state
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x).float()
        # the head only where there is a target (-1: none): 129280 rows per position are the largest activation
        flat = targets.reshape(-1)
        scored = flat != -1
        logits = self.lm_head(x.reshape(-1, x.shape[-1])[scored]).float()
        loss = F.cross_entropy(logits, flat[scored], reduction=loss_reduction)
        if loss_reduction == "none":  # per position, 0 where masked (as ignore_index gives)
            return loss.new_zeros(flat.shape).masked_scatter(scored, loss)
        return loss

    def make_kv_cache(self, batch_size, seq_len):
        """transformers' DynamicCache: it grows as forward fills it, so the sizes are not needed up front."""
        from transformers import DynamicCache
        return DynamicCache(config=self.config)

    def muon_matrices(self):
        """The attention and MLP matrices (2-D) of the layers; not the routers, whose rows score experts, nor
        the stacked experts (3-D), which AdamW takes."""
        return [name for name, p in self.named_parameters()
                if p.ndim == 2 and name.startswith("model.layers.") and not name.endswith(".mlp.gate.weight")]


@hookimpl
def vlmkit_register(registry):
    registry.add("decoder", "deepseek_v2_moe", DeepseekV2MoE)
