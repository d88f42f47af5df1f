"""A transformers tokenizer (``AutoTokenizer``) with ``<|image|>`` added: the partner of the hf_causal_lm decoder.

    tokenizer: {name: hf, model: Qwen/Qwen3-0.6B}      # a hub name (core/hub.py) or a local folder

- ``<|image|>`` is added as a special token unless the tokenizer has it; ``vocab_size`` is ``len(tokenizer)``
  afterwards, so the decoder grows its embeddings to hold it (a model whose embedding matrix is padded
  past the tokenizer, like Qwen3's, already has the row).
- bos / eos / pad are the tokenizer's own, or the tokens ``bos_token`` / ``eos_token`` / ``pad_token``
  name. A tokenizer without a bos token (Qwen's) starts sequences with its eos token, as Qwen's
  pretraining separates documents; one without a pad token pads with eos (padded targets are never scored).
- ``encode`` treats special-token text in the input as ordinary text (as nanochat's ``encode_ordinary``):
  an OCR answer that reads "<|endoftext|>" must not end the sequence. ``decode`` skips special ids, and
  ids past the tokenizer (a padded embedding matrix's spare rows) have no text.
- ``export_hf(out_dir)`` writes the tokenizer files, ``<|image|>`` included (``python -m core.export``).
- ``image_token``: a model that has its own placeholder names it (DeepSeek-OCR 2: ``<image>``, already in its
  vocabulary, so nothing is added).
- ``dry_run_ids: {vocab_size, bos_id, eos_id, image_id[, pad_id]}``: used only while the model is built on the
  meta device (``--dry-run``, core.generate's rebuild) and ``model`` cannot be had (no local folder, not in the
  hub cache offline), so a dry run shows the real model without the files; encoding text then says they are missing.
Needs transformers (``pip install 'vlmkit[hf]'``).
"""
import os

from core import hookimpl
from core.errors import ConfigError
from core.hub import resolve

IMAGE_TOKEN = "<|image|>"
# what a tokenizer folder may hold; a hub repository's weights are not downloaded for it
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def load_auto_tokenizer(folder, where="model"):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("tokenizer hf needs transformers: pip install 'vlmkit[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{where}: {folder} holds no tokenizer transformers can read ({type(e).__name__}: "
                          f"{first})") from e


def _building_on_meta():
    import torch
    return torch.empty(()).is_meta


def _folder(model, dry_run):
    """The tokenizer's folder; None when it cannot be had and ``dry_run`` lets the stand-in ids serve."""
    try:
        folder = resolve(model, "model", TOKENIZER_FILES)
    except ConfigError:
        if not dry_run:
            raise
        return None
    return None if dry_run and not os.path.exists(folder) else folder


class HFTokenizer:
    def __init__(self, model, bos_token=None, eos_token=None, pad_token=None, image_token=IMAGE_TOKEN,
                 dry_run_ids: dict | None = None):
        self.model, self.image_token, self._tok = model, image_token, None
        folder = _folder(model, dry_run=dry_run_ids is not None and _building_on_meta())
        if folder is None:
            self._stand_in(dry_run_ids)
            return
        if not os.path.isdir(folder):
            raise ConfigError(f"model: {folder} is not a folder (a hub name, or a folder save_pretrained wrote)")
        self._tok = tok = load_auto_tokenizer(folder)
        if image_token not in tok.get_vocab():  # added as a special token, the tokenizer's own specials kept
            from tokenizers import AddedToken
            tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        self.vocab_size = len(tok)
        self.image_id = tok.convert_tokens_to_ids(image_token)
        self.eos_id = self._id("eos_token", eos_token, tok.eos_token_id)
        if self.eos_id is None:
            raise ConfigError(f"model: {model}'s tokenizer has no eos token; name one with eos_token")
        self.bos_id = self._id("bos_token", bos_token, tok.bos_token_id, self.eos_id)
        self.pad_id = self._id("pad_token", pad_token, tok.pad_token_id, self.eos_id)
        self._special_ids = frozenset(tok.all_special_ids) | {self.image_id, self.bos_id, self.eos_id, self.pad_id}

    def _stand_in(self, ids):
        keys = ("vocab_size", "bos_id", "eos_id", "image_id")
        missing = [k for k in keys if not isinstance(ids.get(k), int)]
        if missing:
            raise ConfigError(f"dry_run_ids: needs the integers {', '.join(keys)}; missing {', '.join(missing)}")
        self.vocab_size, self.bos_id, self.eos_id, self.image_id = (ids[k] for k in keys)
        self.pad_id = ids.get("pad_id", self.eos_id)

    def _tokenizer(self):
        if self._tok is None:
            raise ConfigError(f"tokenizer hf: {self.model} is not here (the model was built for a dry run)")
        return self._tok

    def _id(self, key, token, own, fallback=None):
        """The id of the token the recipe names under ``key``, else the tokenizer's own, else ``fallback``."""
        if token is None:
            return own if own is not None else fallback
        if token not in self._tok.get_vocab():
            raise ConfigError(f"{key}: {token!r} is not a token of {self.model}'s tokenizer")
        return self._tok.convert_tokens_to_ids(token)

    def special_id(self, name):
        if name not in self._tokenizer().get_vocab():
            raise KeyError(f"unknown token {name!r}")
        return self._tok.convert_tokens_to_ids(name)

    def encode(self, text):
        return self._tokenizer().encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids):
        keep = [i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in self._special_ids]
        return self._tokenizer().decode(keep, clean_up_tokenization_spaces=False)  # the text as read, spaces untouched

    def export_hf(self, out_dir):
        """The tokenizer files, the image token included, where transformers' AutoTokenizer reads them."""
        self._tokenizer().save_pretrained(out_dir)
        return f"tokenizer ({type(self._tok).__name__}, {self.vocab_size} tokens with {self.image_token})"


@hookimpl
def vlmkit_register(registry):
    registry.add("tokenizer", "hf", HFTokenizer)
