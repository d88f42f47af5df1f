"""Repetition while decoding: DeepSeek-OCR's no-repeat-n-gram rule, and olmOCR-Bench's test for a loop.

docs/reading-and-scoring.md, "Repetition". ``Repetition`` is what ``core.generate.generate`` takes:

* ``ngram`` N > 0: after each step, a token that would complete an N-gram already present among the
  last ``window`` generated tokens is banned (its logit set to -inf), except the ``exempt`` ids.
  Only the generated tokens count, not the prompt. DeepSeek-OCR's vLLM scripts use N 20-40 with
  windows of 50-90 and exempt its ``<td>``/``</td>`` ids (table cells repeat by nature).
* ``stop_loops``: a sample whose text already ends in a loop (``ends_in_loop``) stops there, as
  if it had written the stop token, instead of looping on to max_new_tokens.

``ends_in_loop`` is olmOCR-Bench's baseline rule: whitespace runs read as one space, and some
pattern of 1 to 5 characters repeats back to back more than 30 times at the end of the text.
"""
import re

from core.errors import ConfigError

LOOP_PATTERN = 5  # the longest pattern, in characters
LOOP_REPEATS = 30  # a loop repeats its pattern more than this many times
_TAIL_TOKENS = (LOOP_REPEATS + 2) * LOOP_PATTERN  # enough tokens (each >= 1 character) to see a loop end


def tail_repeats(text, longest=LOOP_PATTERN):
    """For each size 1..``longest``: how many times the last ``size`` characters occur back to back at the end."""
    text = re.sub(r"\s+", " ", text)
    counts = []
    for size in range(1, longest + 1):
        tail, count, pos = text[-size:], 0, len(text) - size
        while pos >= 0 and len(tail) == size and text[pos:pos + size] == tail:
            count, pos = count + 1, pos - size
        counts.append(count)
    return counts


def ends_in_loop(text, longest=LOOP_PATTERN, repeats=LOOP_REPEATS):
    """Whether ``text`` ends with a pattern of at most ``longest`` characters repeated more than ``repeats`` times."""
    return any(count > repeats for count in tail_repeats(text, longest))


def exempt_ids(items, tokenizer, where="--no-repeat-exempt"):
    """Token ids from ``items``: integers are ids; a string must encode to exactly one token."""
    ids = set()
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            ids.add(int(item))
            continue
        encoded = tokenizer.encode(str(item))
        if len(encoded) != 1:
            raise ConfigError(f"{where}: {item!r} is {len(encoded)} tokens, not one; give token ids instead")
        ids.add(encoded[0])
    return frozenset(ids)


class Repetition:
    """The anti-repetition settings of one decode: ``ngram`` (0: off), ``window``, ``exempt`` ids, ``stop_loops``."""

    def __init__(self, ngram=0, window=90, exempt=frozenset(), stop_loops=False):
        if ngram < 0 or window < 1:
            raise ValueError(f"ngram must be >= 0 and window >= 1, not {ngram} and {window}")
        self.ngram, self.window, self.exempt, self.stop_loops = ngram, window, frozenset(exempt), stop_loops

    def __bool__(self):
        return bool(self.ngram or self.stop_loops)

    def banned(self, ids):
        """The tokens that would repeat an ``ngram``-gram of ``ids`` (a sample's generated ids) within the window."""
        n = self.ngram
        if not n or len(ids) < n:
            return set()
        prefix = ids[len(ids) - n + 1:]  # the n-1 tokens a next token would complete
        last = prefix[-1] if prefix else None
        out = set()
        for i in range(max(0, len(ids) - self.window), len(ids) - n + 1):
            if (last is None or ids[i + n - 2] == last) and ids[i:i + n - 1] == prefix:
                out.add(ids[i + n - 1])
        return out - self.exempt

    def ban(self, logits, histories):
        """Set the banned tokens' logits of each row to -inf, in place."""
        for row, ids in enumerate(histories):
            banned = self.banned(ids)
            if banned:
                logits[row, list(banned)] = float("-inf")

    def record(self, tokens, histories, tokenizer):
        """Append this step's tokens; return, per row, whether its text now ends in a loop (with ``stop_loops``)."""
        caught = []
        for ids, token in zip(histories, tokens):
            ids.append(token)
            caught.append(self.stop_loops and ends_in_loop(tokenizer.decode(ids[-_TAIL_TOKENS:])))
        return caught


def from_eval(config, tokenizer):
    """The ``Repetition`` of a recipe's ``eval`` section (``no_repeat_*``, ``stop_loops``)."""
    return Repetition(config.no_repeat_ngram, config.no_repeat_window, stop_loops=config.stop_loops,
                      exempt=exempt_ids(config.no_repeat_exempt, tokenizer, where="eval.no_repeat_exempt"))
