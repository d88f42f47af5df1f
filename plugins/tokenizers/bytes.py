"""A byte-level tokenizer: ids 0..255 are UTF-8 bytes, then a few special tokens.

It needs no training and no files, so the tiny CPU recipes use it. Its interface is the one
the nanochat BPE tokenizer implements too: vocab_size, bos_id, eos_id, image_id, pad_id,
special_id(name), encode(text), decode(ids).
"""
from core import hookimpl

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


@hookimpl
def vlmkit_register(registry):
    registry.add("tokenizer", "bytes", ByteTokenizer)
