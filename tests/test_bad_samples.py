"""Bad samples (core/badsamples.py; docs/data.md "Bad samples" and §2): each kind of damage, in a sample or in
the tar around it, is skipped and counted by reason and shard, stops error mode with one line naming shard, key
and reason, and is reported at the end of each stage. What used to crash or train silently is one of them."""
import gzip
import io
import itertools
import json
import os
import re
import struct
import tarfile
import warnings
import zlib

import pytest
import webdataset as wds
from PIL import Image

from core.badsamples import REASONS as ALL_REASONS
from core.data import eval_samples
from core.errors import ConfigError
from core.recipe import load_recipe
from core.shardreader import read_shard
from core.stream import train_batches
from plugins.tokenizers.bytes import ByteTokenizer as Bytes  # bos 256, eos 257, image 258, pad 259
from tests.helpers import PROMPT, keys_of, stream, GRID_RECIPE, ROOT, good_sample, png, write_shard





def png_header_only(width, height):
    """A PNG that claims width x height pixels in a few bytes: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---- a sample's image, text or keys

def test_bad_samples_are_skipped_and_counted(tmp_path):
    page = png(size=64)
    path = write_shard(tmp_path / "bad.tar", [{"__key__": "broken", "png": b"not a png", "txt": b"x"},
                                              {"__key__": "mute", "jpg": page},
                                              *({"__key__": f"good{i}", "png": page, "txt": b"ok"} for i in range(6))])
    it = train_batches([path], Bytes(), 64, PROMPT, 8, 64, batch_size=3, shuffle_buffer=1)
    keys = [k for batch in itertools.islice(it, 2) for k in batch["keys"]]
    assert sorted(keys) == [f"good{i}" for i in range(6)]
    assert it.report() == {"bad_image": {path: 1}, "missing_text": {path: 1}}  # by reason and shard
    assert it.stats == {"bad_image": 1, "missing_text": 1}


def corrupt_set(tmp_path):
    """A shard with one sample of each kind of damage, and a tar that breaks off in its fifth sample."""
    bad = write_shard(tmp_path / "bad.tar", [
        good_sample("g0"), good_sample("g1"),
        {"__key__": "undecodable", "png": b"\x89PNG not really", "txt": b"x"},
        {"__key__": "zero", "png": b"", "txt": b"x"},
        {"__key__": "bomb", "png": png_header_only(30000, 30000), "txt": b"x"},  # Pillow alone would raise
        {"__key__": "notext", "png": png()},
        {"__key__": "latin1", "png": png(), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "wrongkeys", "json": b"{}", "cls": b"3"},
        {"__key__": "noimage", "txt": b"words"},
        {"__key__": "long", "png": png(), "txt": b"far too long for twelve bytes"},
        good_sample("g2"), good_sample("g3")])
    whole = write_shard(tmp_path / "cut.tar", [good_sample(f"c{i}", 40 * i) for i in range(6)])
    data = open(whole, "rb").read()
    with tarfile.open(whole) as tar:
        c4 = next(m for m in tar.getmembers() if m.name == "c4.png")
    cut = str(tmp_path / "cut-short.tar")
    with open(cut, "wb") as f:
        f.write(data[:c4.offset_data + 20])  # ends inside c4's image bytes
    return bad, cut


REASONS = ["bad_image", "empty_image", "image_too_large", "missing_text", "bad_text", "wrong_keys",
           "missing_image"]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_counted_by_reason_and_shard(tmp_path, workers):
    bad, cut = corrupt_set(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        it = stream([bad, cut], num_workers=workers, epochs=1)
        keys = keys_of(it)
    assert sorted(keys) == ["c0", "c1", "c2", "c3", "g0", "g1", "g2", "g3", "long"]  # every good sample, once
    assert it.report() == {**{reason: {bad: 1} for reason in REASONS}, "truncated_target": {bad: 1},
                           "truncated_shard": {cut: 1}}
    skipped = stream([bad], on_long_target="skip", epochs=1)
    assert "long" not in keys_of(skipped) and skipped.report()["long_target"] == {bad: 1}
    held = eval_samples([bad, cut], say=None)
    assert [s["key"] for s in held] == ["g0", "g1", "long", "g2", "g3", "c0", "c1", "c2", "c3"]
    assert held.report == {**{reason: {bad: 1} for reason in REASONS}, "truncated_shard": {cut: 1}}


def test_pixel_limit_is_a_data_setting(tmp_path):
    path = write_shard(tmp_path / "a.tar", [good_sample("small"), {"__key__": "big", "png": png(size=16), "txt": b"b"}])
    it = stream([path], max_image_pixels=100, epochs=1, batch_size=1)
    assert keys_of(it) == ["small"] and it.report() == {"image_too_large": {path: 1}}
    assert len(eval_samples([path], max_image_pixels=None)) == 2  # null: no limit


@pytest.mark.parametrize("workers", [0, 2])
def test_on_bad_sample_error_names_shard_and_key(tmp_path, workers):
    bad, cut = corrupt_set(tmp_path)
    with pytest.raises(ConfigError) as e:
        list(stream([bad], num_workers=workers, on_bad_sample="error", shuffle_buffer=1, epochs=1))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"data: shard {bad!r}, sample 'undecodable': bad_image (")
    broken = f"shard {cut!r}, sample 'c4': truncated_shard (the tar breaks off in this sample"
    with pytest.raises(ConfigError, match=re.escape(broken)):
        list(stream([cut], on_bad_sample="error", epochs=1))
    with pytest.raises(ConfigError, match="sample 'undecodable': bad_image .cannot identify image file. "):
        eval_samples([bad], on_bad_sample="error")


def test_nothing_usable_stops_instead_of_hanging(tmp_path):
    path = write_shard(tmp_path / "junk.tar", [{"__key__": f"j{i}", "png": b"junk", "txt": b"x"} for i in range(3)])
    with pytest.raises(ConfigError, match="no usable sample in 1 shard"):
        next(stream([path]))


# ---- members in a given order, conversations, json

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


def read(paths, **kw):
    """(keys trained on, the report) of one epoch."""
    it = stream(paths, max_len=48, batch_size=2, shuffle_buffer=1, epochs=1, **kw)
    keys = [k for b in it for k in b["keys"]]
    return keys, it.report()


def bad_set():
    """One bad sample per case, to go between good samples."""
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    return {
        "from_list": [("b.png", png()), ("b.json", conversation(["human"]))],
        "from_object": [("b.png", png()), ("b.json", conversation({"role": "human"}))],
        "deep_json": [("b.png", png()), ("b.json", deep)],
        "no_marker": [("b.png", png()), ("b.json", conversation("human", marker=False))],
        "empty_txt": [("b.png", png()), ("b.txt", b"")],
        "blank_txt": [("b.png", png()), ("b.txt", b" \n\t ")],
        "repeated_members": [("b.png", png()), ("b.txt", b"one"), ("b.png", png(shade=9)), ("b.txt", b"two")],
    }


EXPECTED = {"from_list": "bad_conversation", "from_object": "bad_conversation", "deep_json": "bad_json",
            "no_marker": "bad_conversation", "empty_txt": "empty_text", "blank_txt": "empty_text",
            "repeated_members": "duplicate_key"}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_bad_sample_is_counted_under_its_reason_and_stops_error_mode(tmp_path, case):
    members = good("g0") + bad_set()[case] + good("g1") + good("g2")
    path = write_tar(tmp_path / f"{case}.tar", members)
    keys, report = read([path])
    assert sorted(keys) == ["g0", "g1", "g2"]
    assert report == {EXPECTED[case]: {path: 1}}
    with pytest.raises(ConfigError) as e:
        read([path], on_bad_sample="error")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"data: shard {path!r}, sample 'b': {EXPECTED[case]}")


def test_a_key_that_comes_back_after_other_samples_is_a_duplicate(tmp_path):
    path = write_tar(tmp_path / "again.tar", good("d1") + good("d2") + [("d1.png", png(shade=5)), ("d1.txt", b"late")])
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


def test_deeply_nested_json_in_a_users_file_is_one_error_line(tmp_path):
    from core.jsonfiles import jsonl_records, read_json
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "deep.jsonl").write_text('{"a": 1}\n' + deep + "\n")
    with pytest.raises(ConfigError, match="deep.json: JSON nested deeper"):
        read_json(tmp_path / "deep.json")
    with pytest.raises(ConfigError, match="deep.jsonl:2: JSON nested deeper"):
        list(jsonl_records(tmp_path / "deep.jsonl"))


# ---- a damaged tar: counted, never a silent end of the shard (core/shardreader.py)

KEYS = [f"d{i}" for i in range(6)]


def tar_bytes(keys=KEYS):
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        for i, key in enumerate(keys):
            sink.write(good_sample(key, 30 * i))
    return buf.getvalue()


def header_offset(data, name):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return next(m.offset for m in tar.getmembers() if m.name == name)


def tar_stream(path, **kw):
    return stream([str(path)], prompt="<image>\nOCR", max_len=40, batch_size=2, shuffle_buffer=1, epochs=1, **kw)


def keys_and_bad(path):
    raws = list(read_shard(str(path)))
    return [r["__key__"] for r in raws if "__bad__" not in r], [(r["__bad__"], r["__key__"]) for r in raws
                                                               if "__bad__" in r]


def test_a_wrong_header_checksum_mid_tar_is_counted_and_stops_error_mode(tmp_path):
    data = bytearray(tar_bytes())
    at = header_offset(data, "d2.png")  # the third sample's first header
    data[at + 148:at + 156] = b"0000000\0"  # a checksum that does not match the header
    path = tmp_path / "badsum.tar"
    path.write_bytes(bytes(data))
    keys, bad = keys_and_bad(path)
    assert keys == ["d0"] and bad == [("truncated_shard", "d1")]  # d1 may lack members: dropped, and named
    it = tar_stream(path)
    assert [k for b in it for k in b["keys"]] == ["d0"]
    assert it.report() == {"truncated_shard": {str(path): 1}}
    with pytest.raises(ConfigError) as e:
        list(tar_stream(path, on_bad_sample="error"))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"data: shard {str(path)!r}, sample 'd1': truncated_shard (the tar breaks off")
    assert f"unreadable member header at offset {at}" in str(e.value)
    with pytest.raises(ConfigError, match="truncated_shard"):
        eval_samples([str(path)], on_bad_sample="error")


def test_a_zeroed_header_mid_tar_is_not_taken_for_the_end(tmp_path):
    data = bytearray(tar_bytes())
    at = header_offset(data, "d3.png")
    data[at:at + 512] = bytes(512)  # tarfile reads a zero block as the end of the archive
    path = tmp_path / "zeroed.tar"
    path.write_bytes(bytes(data))
    keys, bad = keys_and_bad(path)
    assert keys == ["d0", "d1"] and bad == [("truncated_shard", "d2")]  # d2 may lack members: dropped
    two = tmp_path / "two.tar"  # a second archive appended: its samples would be lost without a word
    two.write_bytes(tar_bytes(KEYS[:2]) + tar_bytes(["e0"]))
    assert keys_and_bad(two)[1] == [("truncated_shard", "d1")]


def test_every_corrupted_tar_gz_is_counted(tmp_path):
    """tarfile's streaming gzip checks no CRC: a flipped byte that still inflates gave wrong bytes, or a header
    that ends the archive early, silently. Each corrupted copy must now end in one counted item, unless it
    still inflates to the very same bytes (a flip in a Huffman table entry no symbol uses)."""
    original = tar_bytes()
    data = gzip.compress(original, mtime=0)
    whole = tmp_path / "ok.tar.gz"
    whole.write_bytes(data)
    assert keys_and_bad(whole) == (KEYS, [])
    for n, at in enumerate(range(20, len(data) - 8, (len(data) - 28) // 40)):
        damaged = bytearray(data)
        damaged[at] ^= 0xFF
        path = tmp_path / f"x{n}.tar.gz"
        path.write_bytes(bytes(damaged))
        keys, bad = keys_and_bad(path)
        try:
            intact = gzip.decompress(bytes(damaged)) == original  # gzip checks the CRC: the truth here
        except (OSError, EOFError, zlib.error):
            intact = False
        if intact:
            assert (keys, bad) == (KEYS, []), at
        else:
            assert len(bad) == 1 and bad[0][0] == "truncated_shard", (at, keys, bad)
            assert keys == KEYS[:len(keys)]  # only samples before the damage, in order


# ---- the settings, the docs and the report

def test_data_config_keys(tmp_path):
    base = [f"data.dataset.cache_dir={tmp_path}"]
    data = load_recipe(GRID_RECIPE, base).data
    assert (data.on_bad_sample, data.on_long_target, data.resample) == ("skip", "truncate", False)
    assert data.max_image_pixels == Image.MAX_IMAGE_PIXELS
    assert load_recipe(GRID_RECIPE, base + ["data.max_image_pixels=null"]).data.max_image_pixels is None
    for override, key in (("data.on_bad_sample=warn", "on_bad_sample"), ("data.on_long_target=cut", "on_long_target"),
                          ("data.max_image_pixels=0", "max_image_pixels")):
        with pytest.raises(ConfigError, match=rf"^override '{re.escape(override)}': data\.{key}: "):
            load_recipe(GRID_RECIPE, base + [override])


def test_the_data_docs_list_every_bad_sample_reason():
    with open(os.path.join(ROOT, "docs", "data.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("### Bad samples"):]
    section = section[:section.index("\n### ", 1)]
    missing = [reason for reason in ALL_REASONS if not re.search(rf"`{reason}`", section)]
    assert not missing, missing


def test_training_prints_and_logs_the_report(tmp_path, capsys):
    from core.run import main
    bad, cut = corrupt_set(tmp_path)
    rc = main([GRID_RECIPE, f"run.dir={tmp_path / 'run'}", "data.batch_size=4", "data.num_workers=1",
               f"data.dataset={{name: shards, train: ['{bad}', '{cut}'], eval: '{bad}'}}",
               "stages.0.steps=2", "stages.1.steps=1", "stages.0.probe_every=0", "stages.1.probe_every=0",
               "eval.samples=3", "eval.max_new_tokens=2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^data report, stage vis_tok: \d sample\(s\) skipped", out, re.M), out
    assert "data report, eval split (3 samples read): 7 sample(s) skipped" in out
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    reports = [e for e in events if e["event"] == "data_report"]
    assert [e["stage"] for e in reports if e["stage"] != "eval"] == ["vis_tok", "vis_mid"]
    assert [e["stage"] for e in reports].count("eval") == 1
    assert set(reports[0]["report"]) <= set(REASONS) | {"truncated_shard", "truncated_target"}
    assert all(n == 1 and shard in (bad, cut)
               for e in reports for by in e["report"].values() for shard, n in by.items())
