"""Tiny transformers models, tokenizers and hub caches the hf tests build themselves (no network).

- ``tokenizer_folder(path, bos=True)``: a byte-level BPE trained on a few strings, wrapped in
  PreTrainedTokenizerFast and saved; without ``bos`` it has none (as Qwen's).
- ``lm_folder(path, family, vocab_size)``: a 2-layer, hidden-64 model of ``family`` (FAMILIES) with
  random N(0, 0.2) weights (transformers' own init gives near-uniform logits, where greedy picks would
  tie), saved with save_pretrained; returns the model in eval mode.
- ``hub_repo(cache, name, folder)``: ``folder``'s files as huggingface_hub's cache holds a downloaded
  repository (models--owner--name/snapshots/COMMIT/..., refs/main).
"""
import os
import shutil

import torch

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "Free OCR.", "vision tokens",
         "1234567890 !?;:,.", "Ünïcödé and mixed Case"] * 8
FAMILIES = {
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=True),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False),
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tokenizer_folder(path, bos=True, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "</s>", "<pad>"] if bos else ["<|endoftext|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS, trainer)
    names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>") if bos else dict(eos_token="<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **names).save_pretrained(path)
    return str(path)


def lm_folder(path, family, vocab_size, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = dict(FAMILIES[family])
    config = AutoConfig.for_model(config.pop("model_type"), vocab_size=vocab_size, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model.eval()


def hub_repo(cache, name, folder, commit=COMMIT):
    """Copy ``folder`` into ``cache`` as the hub repository ``name`` at ``commit`` (its main branch)."""
    repo = os.path.join(cache, "models--" + name.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(folder, snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot
