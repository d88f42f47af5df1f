"""Repetition: DeepSeek-OCR's no-repeat-n-gram rule in generation, stopping loops, and the repetition metric.

The looping model: a tiny nanochat decoder whose blocks are the identity (nanochat's init zeroes their
output projections), so the last hidden state is the normalised embedding of the last token. Token
embeddings are one-hot on three axes ("a", "b", everything else) and lm_head maps them to the next
token: after "a" comes "b", after anything else "a", with "c" always second. Greedy decoding therefore
writes "abab..." for every image, whatever the image: a 2-character pattern repeated to the end.
"""
import json

import attrs
import pytest
import torch
from PIL import Image

from core import checkpoint
from core.generate import main as generate_main
from core.metrics import main as metrics_main
from core.model import build_model
from core.registry import load_plugins
from core.repetition import Repetition, ends_in_loop, tail_repeats
from tests.helpers import TINY

PROMPT = "<image>\nFree OCR."
A, B, C = ord("a"), ord("b"), ord("c")


def looping_model():
    model, tokenizer = build_model(TINY, load_plugins()[1])
    decoder = model.decoder
    with torch.no_grad():
        wte, head = decoder.transformer.wte.weight, decoder.lm_head.weight
        wte.zero_()
        wte[:, 2] = 1.0  # every token: "other"
        wte[A], wte[B] = torch.eye(wte.shape[1])[0], torch.eye(wte.shape[1])[1]
        head.zero_()
        head[B, 0] = 1.0  # after "a": "b"
        head[A, 1] = head[A, 2] = 1.0  # after "b" or anything else: "a"
        head[C, :3] = 0.5  # always the runner-up
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    model, _ = looping_model()
    meta = {"stage": "s", "model": attrs.asdict(TINY), "prompt": PROMPT, "plugins": []}
    checkpoint.save_checkpoint(str(root / "stage"), 1, model, meta)
    image = str(root / "page.png")
    Image.new("RGB", (32, 32), "white").save(image)
    return root, image


def _read(cli_args, root, image, capsys, name):
    out = root / f"{name}.jsonl"
    assert generate_main([str(root / "stage"), image, "--out", str(out), "--max-new-tokens", "120", *cli_args]) == 0
    capsys.readouterr()
    return json.loads(out.read_text(encoding="utf-8"))["text"]


def test_tail_repeats_olmocr_rule():
    assert tail_repeats("abab") == [1, 2, 1, 1, 0]
    assert tail_repeats("x" + "ab" * 31) == [1, 31, 1, 15, 1]
    assert ends_in_loop("x" + "ab" * 31) and not ends_in_loop("x" + "ab" * 30)  # more than 30 repeats
    assert ends_in_loop("word \n\t" * 6 + "a " * 31)  # whitespace runs read as one space
    assert not ends_in_loop("abcdef" * 40)  # a 6-character pattern is too long for the rule
    assert not ends_in_loop("")


def test_banned_tokens_follow_the_ngram_window_and_exemptions():
    rule = Repetition(ngram=3, window=90)
    assert rule.banned([A, B, A]) == set()
    assert rule.banned([A, B, A, B]) == {A}  # "a b a" would repeat
    assert Repetition(ngram=3, window=3).banned([A, B, C, C, A, B]) == set()  # the earlier "a b" is outside the window
    assert Repetition(ngram=3, exempt={A}).banned([A, B, A, B]) == set()
    assert Repetition(ngram=1).banned([A, B, A]) == {A, B}


def test_looping_output_without_and_with_no_repeat_ngram(saved, capsys, tmp_path):
    root, image = saved
    looping = _read([], root, image, capsys, "plain")
    assert looping == "ab" * 60 and ends_in_loop(looping)
    fixed = _read(["--no-repeat-ngram", "3"], root, image, capsys, "ngram")
    assert not ends_in_loop(fixed)
    ids = list(fixed.encode())  # one byte, one token
    starts = {}
    for i in range(len(ids) - 2):
        starts.setdefault(tuple(ids[i:i + 3]), []).append(i)
    gaps = [b - a for s in starts.values() for a, b in zip(s, s[1:])]
    # a 3-gram recurs only once its first copy has left the 90-token window; over 120 tokens some do
    assert gaps and min(gaps) >= 90 - 3 + 2
    stopped = _read(["--stop-loops"], root, image, capsys, "stopped")
    assert stopped == "ab" * 31  # stopped as soon as its last 2 characters repeat 31 times
    # the repetition metric counts the looping output only
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                 for i, t in enumerate([looping, fixed, stopped])))
    (tmp_path / "gt.jsonl").write_text("".join(json.dumps({"id": i, "text": "ab"}) + "\n" for i in range(3)))
    rows = tmp_path / "rows.jsonl"
    assert metrics_main(["repetition", "--pred", str(tmp_path / "pred.jsonl"), "--gt", str(tmp_path / "gt.jsonl"),
                         "--per-sample", str(rows)]) == 0
    agg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [json.loads(line)["repetition"] for line in rows.read_text().splitlines()] == [1.0, 0.0, 1.0]
    assert agg == {"repetition_rate": 2 / 3, "repetition_loops": 2}


def test_eval_section_reaches_decoding():
    from core.errors import ConfigError
    from core.evaluate import decode_samples
    from core.recipe import EvalConfig
    from core.repetition import from_eval
    model, tokenizer = looping_model()
    samples = [{"image": Image.new("RGB", (32, 32), "white"), "text": "ab", "key": "0"}]
    plain = decode_samples(model, tokenizer, samples, PROMPT, "cpu", max_new_tokens=70)
    config = EvalConfig(no_repeat_ngram=3, no_repeat_exempt=["a", str(B)])  # a one-token string, an id
    exempt = decode_samples(model, tokenizer, samples, PROMPT, "cpu", 70, repetition=from_eval(config, tokenizer))
    assert plain == exempt == ["ab" * 35]  # "a" and "b" are never banned: the loop stays
    config = EvalConfig(no_repeat_ngram=3, stop_loops=True)
    assert not ends_in_loop(decode_samples(model, tokenizer, samples, PROMPT, "cpu", 70,
                                           repetition=from_eval(config, tokenizer))[0])
    with pytest.raises(ConfigError, match="eval.no_repeat_exempt: '<td>' is 4 tokens"):
        from_eval(EvalConfig(no_repeat_exempt=["<td>"]), tokenizer)
