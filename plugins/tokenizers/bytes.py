"""A byte-level tokenizer: ids 0..255 are UTF-8 bytes, then a few special tokens.

It needs no training and no files, so the tiny CPU recipes use it. Its interface is the one
the nanochat BPE tokenizer implements too: vocab_size, bos_id, eos_id, image_id, pad_id,
special_id(name), encode(text), decode(ids).
"""
from core import hookimpl
from core.errors import ConfigError

SPECIAL_TOKENS = ("<|bos|>", "<|assistant_end|>", "<|image|>", "<|pad|>")  # ids 256, 257, 258, 259


class ByteTokenizer:
    def __init__(self):
        self._special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.bos_id = self._special["<|bos|>"]
        self.eos_id = self._special["<|assistant_end|>"]  # generation stops here, as in nanochat's chat
        self.image_id = self._special["<|image|>"]
        self.pad_id = self._special["<|pad|>"]

    def special_id(self, name):
        if name not in self._special:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special[name]

    def encode(self, text):
        # Special-token text is not parsed (like nanochat's encode_ordinary): "<|bos|>" is 7 bytes.
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        # special ids are skipped; a cut-off or invalid UTF-8 sequence becomes U+FFFD
        return out.decode("utf-8", errors="replace")

    def export_hf(self, out_dir):
        """The same ids as a transformers tokenizer (``python -m core.export``): byte-level BPE without merges,
        so every byte is its own token, with id = the byte; the special tokens follow at 256.."""
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
            from transformers import PreTrainedTokenizerFast
            from transformers.convert_slow_tokenizer import bytes_to_unicode
        except ImportError:
            raise ConfigError("exporting the bytes tokenizer needs transformers: pip install 'vlmkit[hf]'") from None
        chars = bytes_to_unicode()  # byte-level BPE's printable stand-in for each byte
        backend = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(SPECIAL_TOKENS))  # appended in order: 256, 257, ...
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                       pad_token="<|pad|>")
        fast.save_pretrained(out_dir)
        return f"tokenizer (bytes as byte-level BPE without merges, {self.vocab_size} tokens)"


@hookimpl
def vlmkit_register(registry):
    registry.add("tokenizer", "bytes", ByteTokenizer)
