"""Multi-turn conversations (LLaVA-Instruct style) -> token ids with the loss on the answers only.

A conversation is a list of turns ``{"from": "human" | "gpt", "value": text}``
(LLaVA's keys; ``user``/``assistant`` and ``role``/``content`` are accepted
too). Turns alternate, starting with the human. The first human turn may
contain one ``<image>`` marker: it becomes the image's placeholder tokens.

Rendering is DeepSeek-OCR's "plain" format (docs/architecture.md §2.6): no role
tags; the sequence is ``bos``, then each human turn's text, then each answer's
text followed by ``eos``. The loss is on the answers and their ``eos`` only,
so the model learns when to stop; everything else has target -1.
"""
from core.errors import ConfigError

IMAGE_MARKER = "<image>"
IGNORE = -1  # target of positions that carry no loss (prompt, image, padding)
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def normalise_turns(turns, where="conversation"):
    """-> [(role, text)] with roles human/gpt, alternating and starting with human; or ConfigError."""
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConfigError(f"{where}.{i}: a turn is a mapping with from/value")
        speaker = turn.get("from", turn.get("role"))
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None  # a list or mapping is no role
        text = turn.get("value", turn.get("content"))
        if role is None or not isinstance(text, str):
            raise ConfigError(f"{where}.{i}: needs 'from' (human/gpt) and a string 'value'")
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise ConfigError(f"{where}.{i}: turns must alternate human, gpt, ... (got {role})")
        out.append((role, text))
    return out


def encode_conversation(tokenizer, turns, num_image_tokens, max_len, where="conversation"):
    """-> (input_ids, targets, has_image, cut). ``num_image_tokens`` replaces the first turn's <image>.

    Truncation keeps whole leading turns: a pair that does not fit in ``max_len``
    inputs is dropped with everything after it; a first answer that does not fit is cut,
    keeping its eos. No answer left -> ConfigError.
    """
    pairs = normalise_turns(turns, where)
    seq, mask = [tokenizer.bos_id], [False]
    has_image, cut = False, False
    for i, (role, text) in enumerate(pairs):
        if role == "human":
            ids = _human_ids(tokenizer, text, num_image_tokens, first=(i == 0), where=f"{where}.{i}")
            has_image = has_image or (i == 0 and IMAGE_MARKER in text)
            piece, piece_mask = ids, [False] * len(ids)
        else:
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            piece, piece_mask = ids, [True] * len(ids)
        room = max_len + 1 - len(seq)  # inputs = seq[:-1] must stay within max_len
        if len(piece) > room:
            cut = True
            if role == "gpt" and i == 1 and room > 1:  # cut the first answer, keep its eos
                seq += piece[:room - 1] + [tokenizer.eos_id]
                mask += [True] * room
            break
        seq += piece
        mask += piece_mask
    if not any(mask):
        raise ConfigError(f"{where}: no answer fits in max_len {max_len}")
    while not mask[-1]:  # a trailing human turn predicts nothing
        seq.pop()
        mask.pop()
    targets = [t if m else IGNORE for t, m in zip(seq[1:], mask[1:])]
    return seq[:-1], targets, has_image, cut


def _human_ids(tokenizer, text, num_image_tokens, first, where):
    if IMAGE_MARKER not in text:
        return tokenizer.encode(text)
    if not first or text.count(IMAGE_MARKER) > 1:
        raise ConfigError(f"{where}: only the first human turn may hold <image>, once")
    before, _, after = text.partition(IMAGE_MARKER)
    return tokenizer.encode(before) + [tokenizer.image_id] * num_image_tokens + tokenizer.encode(after)
