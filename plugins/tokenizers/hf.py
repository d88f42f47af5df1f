"""A transformers tokenizer (``tokenizer.json`` and its files) under vlmkit's Tokenizer contract.

``path``: a folder or a hub name (core/hub.py). ``image_token``: the token the model's image placeholders
use, which must be one token of the vocabulary (DeepSeek-OCR 2: ``<image>``). bos, eos and pad are the
tokenizer's own (pad falls back to eos; padded targets are never scored). ``encode`` adds no special
tokens but reads special-token text (``<|grounding|>``) as those tokens, as the model's processor does;
``decode`` skips special tokens. ``vocab_size`` is ``len(tokenizer)``, added tokens included.

``dry_run_ids: {vocab_size, bos_id, eos_id, image_id[, pad_id]}``: used only while the model is built
on the meta device (``--dry-run``, or core.generate's rebuild) and ``path`` is no local folder, so a
dry run shows the real model without the files; encoding or decoding text then says the files are missing.
"""
import os

from core import hookimpl
from core.errors import ConfigError
from core.hub import resolve

STAND_IN_KEYS = ("vocab_size", "bos_id", "eos_id", "image_id")


def _building_on_meta():
    import torch
    return torch.empty(()).is_meta


class HFTokenizer:
    def __init__(self, path, image_token="<image>", dry_run_ids: dict | None = None):
        self.path, self.image_token, self.hf = str(path), image_token, None
        if dry_run_ids is not None and not os.path.exists(os.path.expanduser(self.path)) and _building_on_meta():
            self._stand_in(dry_run_ids)
            return
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ConfigError(f"tokenizer hf needs transformers (pip install 'vlmkit[hf]'): {e}") from e
        folder = resolve(self.path, "model.tokenizer.path")
        try:
            self.hf = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # no tokenizer files, a broken tokenizer.json: one line
            raise ConfigError(f"path: {folder} holds no tokenizer transformers can read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        vocab = self.hf.get_vocab()
        if image_token not in vocab:
            raise ConfigError(f"image_token: {image_token!r} is not a token of {folder}")
        self.vocab_size = len(self.hf)
        self.image_id = vocab[image_token]
        self.bos_id, self.eos_id = self.hf.bos_token_id, self.hf.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ConfigError(f"path: the tokenizer in {folder} has no bos or no eos token; vlmkit's prompts need both")
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id

    def _stand_in(self, ids):
        missing = [k for k in STAND_IN_KEYS if not isinstance(ids.get(k), int)]
        if missing:
            raise ConfigError(f"dry_run_ids: needs the integers {', '.join(STAND_IN_KEYS)}; missing {missing}")
        self.vocab_size, self.bos_id, self.eos_id, self.image_id = (ids[k] for k in STAND_IN_KEYS)
        self.pad_id = ids.get("pad_id", self.eos_id)

    def _tokenizer(self):
        if self.hf is None:
            raise ConfigError(f"tokenizer hf: {self.path} is not here (the model was built for a dry run); "
                              f"download it or name a local folder")
        return self.hf

    def encode(self, text):
        return self._tokenizer().encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self._tokenizer().decode([int(i) for i in ids], skip_special_tokens=True)


@hookimpl
def vlmkit_register(registry):
    registry.add("tokenizer", "hf", HFTokenizer)
