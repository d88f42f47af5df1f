"""core.stream's training stream: rank/worker splitting, exact resume, bad data (tiny shards written here)."""
import collections
import io
import itertools
import json
import re
import struct
import tarfile
import warnings
import zlib

import pytest
import torch
import webdataset as wds
from PIL import Image

from core.data import eval_samples
from core.stream import train_batches
from core.errors import ConfigError
from core.recipe import load_recipe
from plugins.tokenizers.bytes import ByteTokenizer as Bytes  # bos 256, eos 257, image 258, pad 259
from tests.helpers import GRID_RECIPE

PROMPT = "<image>\nFree OCR."
PREFIX = 1 + 4 + len("\nFree OCR.")  # bos, 4 image tokens, the prompt's tail
MAX_LEN = PREFIX + 12  # room for 12 answer bytes


def png(size=8, shade=0):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 0)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width, height):
    """A PNG that claims width x height pixels in a few bytes: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_shard(path, samples):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def good(key, shade=0):
    return {"__key__": key, "png": png(shade=shade), "txt": key.encode()}  # the text names the sample


def shard_set(tmp_path, shards, per_shard):
    return [write_shard(tmp_path / f"train-{s:06d}.tar", [good(f"s{s}_{i}", 9 * i) for i in range(per_shard)])
            for s in range(shards)]


def stream(paths, **kw):
    args = dict(tokenizer=Bytes(), image_size=8, prompt=PROMPT, num_image_tokens=4, max_len=MAX_LEN,
                batch_size=3, shuffle_buffer=4)
    return train_batches(paths, **{**args, **kw})


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


# ---- splitting over ranks and workers

@pytest.mark.parametrize("shards, per_shard", [(6, 5), (3, 7)], ids=["more-shards-than-slots", "fewer-shards"])
def test_one_epoch_reads_every_sample_once_over_2_ranks_x_2_workers(tmp_path, monkeypatch, shards, per_shard):
    paths = shard_set(tmp_path, shards, per_shard)
    seen = collections.Counter()
    for rank in range(2):
        seen.update(keys_of(stream(paths, num_workers=2, rank=rank, world_size=2, epochs=1, seed=5)))
    assert seen == {f"s{s}_{i}": 1 for s in range(shards) for i in range(per_shard)}
    monkeypatch.setenv("RANK", "1")  # no explicit rank: torch.distributed is not initialised, so the environment
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = keys_of(stream(paths, num_workers=0, epochs=1, seed=5))
    assert rank1 == keys_of(stream(paths, num_workers=0, epochs=1, seed=5, rank=1, world_size=2))
    assert not set(rank1) & set(keys_of(stream(paths, num_workers=0, epochs=1, seed=5, rank=0)))


def test_environment_rank_errors_name_the_variable(tmp_path, monkeypatch):
    paths = shard_set(tmp_path, 1, 2)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="RANK='one'"):
        stream(paths)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="rank 2 is outside world size 2"):
        stream(paths)


def test_epochs_reshuffle_and_resample_is_deterministic(tmp_path):
    paths = shard_set(tmp_path, 4, 4)
    two = keys_of(stream(paths, epochs=2))
    assert sorted(two[:16]) == sorted(two[16:]) and two[:16] != two[16:]
    a = keys_of(itertools.islice(stream(paths, resample=True), 12))
    assert a == keys_of(itertools.islice(stream(paths, resample=True), 12))
    assert a != keys_of(itertools.islice(stream(paths, resample=True, seed=1), 12))
    assert set(a) <= {f"s{s}_{i}" for s in range(4) for i in range(4)}


# ---- position

@pytest.mark.parametrize("workers, taken", [(0, 7), (2, 9)])
def test_resume_continues_exactly(tmp_path, workers, taken):
    paths = shard_set(tmp_path, 4, 10)
    paths.append(write_shard(tmp_path / "train-000004.tar", [good("t0"), {"__key__": "t1", "png": b"x", "txt": b"x"},
                                                             good("t2"), good("t3")]))
    more = 12  # 44 samples over 2 workers: the resumed part crosses an epoch boundary
    reference = stream(paths, num_workers=workers)
    expected = list(itertools.islice(reference, taken + more))
    first = stream(paths, num_workers=workers)
    assert keys_of(itertools.islice(first, taken)) == keys_of(expected[:taken])
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able; workers have prefetched beyond it
    first.close()
    resumed = stream(paths, num_workers=workers)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed, more))
    assert keys_of(got) == keys_of(expected[taken:])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, expected[taken:])
               for k in ("pixel_values", "input_ids", "targets"))
    assert resumed.report() == reference.report() and set(reference.report()) == {"bad_image"}  # not re-counted
    for it in (reference, resumed):
        it.close()
    with pytest.raises(ConfigError, match="num_workers"):
        stream(paths, num_workers=workers + 1).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        stream(paths, num_workers=workers, seed=3).load_state_dict(state)


# ---- bad data

def corrupt_set(tmp_path):
    """A shard with one sample of each kind of damage, and a tar that breaks off in its fifth sample."""
    bad = write_shard(tmp_path / "bad.tar", [
        good("g0"), good("g1"),
        {"__key__": "undecodable", "png": b"\x89PNG not really", "txt": b"x"},
        {"__key__": "zero", "png": b"", "txt": b"x"},
        {"__key__": "bomb", "png": png_header_only(30000, 30000), "txt": b"x"},  # Pillow alone would raise
        {"__key__": "notext", "png": png()},
        {"__key__": "latin1", "png": png(), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "wrongkeys", "json": b"{}", "cls": b"3"},
        {"__key__": "noimage", "txt": b"words"},
        {"__key__": "long", "png": png(), "txt": b"far too long for twelve bytes"},
        good("g2"), good("g3")])
    whole = write_shard(tmp_path / "cut.tar", [good(f"c{i}", 40 * i) for i in range(6)])
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
    path = write_shard(tmp_path / "a.tar", [good("small"), {"__key__": "big", "png": png(size=16), "txt": b"b"}])
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


def test_data_config_keys(tmp_path):
    base = [f"data.dataset.cache_dir={tmp_path}"]
    data = load_recipe(GRID_RECIPE, base).data
    assert (data.on_bad_sample, data.on_long_target, data.resample) == ("skip", "truncate", False)
    assert data.max_image_pixels == Image.MAX_IMAGE_PIXELS
    assert load_recipe(GRID_RECIPE, base + ["data.max_image_pixels=null"]).data.max_image_pixels is None
    for override, key in (("data.on_bad_sample=warn", "on_bad_sample"), ("data.on_long_target=cut", "on_long_target"),
                          ("data.max_image_pixels=0", "max_image_pixels")):
        with pytest.raises(ConfigError, match=rf"data: .*{key}"):
            load_recipe(GRID_RECIPE, base + [override])


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
