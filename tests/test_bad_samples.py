"""Issue 15, bad data (faults 2 and 3): what used to crash or train silently is a bad sample with its own
reason, counted in skip mode and one line naming shard, key and reason in error mode."""
import io
import json
import os
import re
import tarfile

import pytest
from PIL import Image

from core.badsamples import REASONS
from core.data import eval_samples
from core.errors import ConfigError
from core.shardreader import read_shard
from core.stream import train_batches
from plugins.tokenizers.bytes import ByteTokenizer as Bytes
from tests.helpers import ROOT

PROMPT = "<image>\nFree OCR."


def png(shade=0):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members):
    """A tar of (name, bytes) members in exactly this order (repeats allowed, unlike a dict of a sample)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good(key):
    return [(f"{key}.png", png()), (f"{key}.txt", key.encode())]


def conversation(speaker, answer="abc", marker=True):
    turns = [{"from": speaker, "value": ("<image>\n" if marker else "") + "Read it."}, {"from": "gpt", "value": answer}]
    return json.dumps({"conversations": turns}).encode()


def batches(paths, text_only=False, **kw):
    args = dict(tokenizer=Bytes(), image_size=8, prompt=PROMPT, num_image_tokens=4, max_len=48, batch_size=2,
                shuffle_buffer=1, epochs=1, text_only=text_only)
    return train_batches(paths, **{**args, **kw})


def read(paths, **kw):
    """(keys trained on, the report) of one epoch."""
    it = batches(paths, **kw)
    keys = [k for b in it for k in b["keys"]]
    return keys, it.report()


def bad_set(tmp_path):
    """Good samples g0..g2 around one bad sample per case."""
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    return {
        "from_list": [("b.png", png()), ("b.json", conversation(["human"]))],
        "from_object": [("b.png", png()), ("b.json", conversation({"role": "human"}))],
        "deep_json": [("b.png", png()), ("b.json", deep)],
        "no_marker": [("b.png", png()), ("b.json", conversation("human", marker=False))],
        "empty_txt": [("b.png", png()), ("b.txt", b"")],
        "blank_txt": [("b.png", png()), ("b.txt", b" \n\t ")],
        "repeated_members": [("b.png", png()), ("b.txt", b"one"), ("b.png", png(9)), ("b.txt", b"two")],
    }


EXPECTED = {"from_list": "bad_conversation", "from_object": "bad_conversation", "deep_json": "bad_json",
            "no_marker": "bad_conversation", "empty_txt": "empty_text", "blank_txt": "empty_text",
            "repeated_members": "duplicate_key"}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_bad_sample_is_counted_under_its_reason_and_stops_error_mode(tmp_path, case):
    members = good("g0") + bad_set(tmp_path)[case] + good("g1") + good("g2")
    path = write_tar(tmp_path / f"{case}.tar", members)
    keys, report = read([path])
    assert sorted(keys) == ["g0", "g1", "g2"]
    assert report == {EXPECTED[case]: {path: 1}}
    with pytest.raises(ConfigError) as e:
        read([path], on_bad_sample="error")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"data: shard {path!r}, sample 'b': {EXPECTED[case]}")


def test_a_key_that_comes_back_after_other_samples_is_a_duplicate(tmp_path):
    path = write_tar(tmp_path / "again.tar", good("d1") + good("d2") + [("d1.png", png(5)), ("d1.txt", b"late")])
    keys, report = read([path])
    assert sorted(keys) == ["d1", "d2"] and report == {"duplicate_key": {path: 1}}
    raws = list(read_shard(path))
    assert raws[-1]["__bad__"] == "duplicate_key" and "appears again" in raws[-1]["__detail__"]
    assert not {"png", "txt"} & set(raws[-1])  # neither copy's members are handed on


def test_members_may_not_set_the_readers_own_keys(tmp_path):
    path = write_tar(tmp_path / "keys.tar", good("k") + [("k.__key__", b"other"), ("k.__bad__", b"x")])
    (raw,) = read_shard(path)
    assert raw["__key__"] == "k" and "__bad__" not in raw


def test_a_conversation_in_the_text_stream_with_an_image_marker_is_bad(tmp_path):
    """<|image|> placeholders with no pixels used to crash the model's forward pass."""
    path = write_tar(tmp_path / "text.tar", [("t0.txt", b"plain"), ("t1.json", conversation("human")),
                                             ("t2.json", conversation("human", marker=False))])
    keys, report = read([path], text_only=True)
    assert sorted(keys) == ["t0", "t2"] and report == {"bad_conversation": {path: 1}}


def test_empty_text_is_skipped_in_the_text_stream_and_kept_for_evaluation(tmp_path):
    path = write_tar(tmp_path / "empty.tar", [("t0.txt", b"plain"), ("t1.txt", b"")])
    assert read([path], text_only=True) == (["t0"], {"empty_text": {path: 1}})
    pages = write_tar(tmp_path / "pages.tar", good("p0") + [("p1.png", png()), ("p1.txt", b"")])
    held = eval_samples([pages], say=None)
    assert [s["text"] for s in held] == ["p0", ""] and held.report == {}  # a blank benchmark page still scores


def test_the_data_docs_list_every_bad_sample_reason():
    with open(os.path.join(ROOT, "docs", "data.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("### Bad samples"):]
    section = section[:section.index("\n### ", 1)]
    missing = [reason for reason in REASONS if not re.search(rf"`{reason}`", section)]
    assert not missing, missing


def test_deeply_nested_json_in_a_users_file_is_one_error_line(tmp_path):
    from core.jsonfiles import jsonl_records, read_json
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "deep.jsonl").write_text('{"a": 1}\n' + deep + "\n")
    with pytest.raises(ConfigError, match="deep.json: JSON nested deeper"):
        read_json(tmp_path / "deep.json")
    with pytest.raises(ConfigError, match="deep.jsonl:2: JSON nested deeper"):
        list(jsonl_records(tmp_path / "deep.jsonl"))
