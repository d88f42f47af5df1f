import pytest

from core.conversation import encode_conversation
from core.errors import ConfigError
from plugins.tokenizers.bytes import ByteTokenizer

TOK = ByteTokenizer()
TURNS = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "ab"},
         {"from": "human", "value": "More"}, {"from": "gpt", "value": "c"}]


def test_loss_only_on_answers_and_their_eos():
    ids, targets, has_image, cut = encode_conversation(TOK, TURNS, num_image_tokens=3, max_len=100)
    assert not cut
    assert has_image
    full = ids + [targets[-1]]
    assert full[:4] == [TOK.bos_id] + [TOK.image_id] * 3
    supervised = [t for t in targets if t != -1]
    assert supervised == TOK.encode("ab") + [TOK.eos_id] + TOK.encode("c") + [TOK.eos_id]
    # every supervised target is the next input token (teacher forcing), nothing else is
    for i, t in enumerate(targets[:-1]):
        if t != -1:
            assert ids[i + 1] == t


def test_truncation_drops_whole_later_turns_and_keeps_eos():
    ids, targets, _, cut = encode_conversation(TOK, TURNS, num_image_tokens=3, max_len=14)
    assert cut
    supervised = [t for t in targets if t != -1]
    assert supervised == TOK.encode("ab") + [TOK.eos_id]
    ids, targets, _, _ = encode_conversation(TOK, TURNS[:2], num_image_tokens=3, max_len=12)
    assert len(ids) <= 12 and [t for t in targets if t != -1][-1] == TOK.eos_id


def test_text_only_and_bad_conversations():
    ids, targets, has_image, _ = encode_conversation(TOK, [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}], 5, 50)
    assert not has_image and TOK.image_id not in ids
    with pytest.raises(ConfigError, match=r"conv.1: turns must alternate"):
        encode_conversation(TOK, [TURNS[0], TURNS[0]], 3, 50, where="conv")
    with pytest.raises(ConfigError, match=r"conv.2: only the first human turn may hold <image>"):
        encode_conversation(TOK, TURNS[:2] + [{"from": "human", "value": "<image>"}, TURNS[3]], 3, 50, where="conv")
    with pytest.raises(ConfigError, match="no answer fits in max_len 4"):
        encode_conversation(TOK, TURNS, 3, 4)
