"""The byte tokenizer: UTF-8 bytes plus special tokens."""
import pytest

from core.registry import Registry
from plugins.tokenizers import bytes as bytes_tokenizer
from plugins.tokenizers.bytes import ByteTokenizer


def test_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.image_id, tok.pad_id) == (256, 257, 258, 259)
    assert tok.special_id("<|assistant_end|>") == tok.eos_id
    assert tok.special_id("<|image|>") == tok.image_id
    with pytest.raises(KeyError):
        tok.special_id("<|user_start|>")


@pytest.mark.parametrize("text", ["Hello, world! 123", "", "Grüße, 東京 — ∑x² 🙂\n\ttab"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_specials_not_parsed_and_skipped_on_decode():
    tok = ByteTokenizer()
    ids = tok.encode("<|image|>a")
    assert len(ids) == len("<|image|>a") and tok.image_id not in ids
    assert tok.decode(ids) == "<|image|>a"
    spliced = [tok.bos_id] + [tok.image_id] * 3 + tok.encode("é") + [tok.eos_id, tok.pad_id]
    assert tok.decode(spliced) == "é"


def test_decode_invalid_utf8_and_range():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("é")[:1] + tok.encode("x")) == "\ufffdx"
    with pytest.raises(ValueError):
        tok.decode([260])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_registers_tokenizer():
    registry = Registry()
    bytes_tokenizer.vlmkit_register(registry)
    assert isinstance(registry.build("tokenizer", "bytes"), ByteTokenizer)
