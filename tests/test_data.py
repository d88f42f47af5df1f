"""The data path's pieces: preprocess (core/images.py), encode_sample and collate (core/data.py), the training
stream over synthetic shards, and the synthetic_ocr / shards dataset plugins (bad samples: test_bad_samples.py)."""
import io
import itertools
import os
import re

import pytest
import torch
from PIL import Image

from core.data import IGNORE, collate, encode_sample, eval_samples
from core.images import preprocess
from core.errors import ConfigError
from core.registry import Registry
from core.stream import train_batches
from plugins.datasets import shards as shards_plugin
from plugins.datasets import synthetic_ocr
from plugins.datasets.shards import Shards
from plugins.datasets.synthetic_ocr import SyntheticOCR
from plugins.tokenizers.bytes import ByteTokenizer as Bytes  # bos 256, eos 257, image 258, pad 259

GREY = ((torch.tensor(127.0) / 255 - 0.5) / 0.5).item()  # pad colour (127,127,127) normalised, in float32
PROMPT = "<image>\nFree OCR."


def small(tmp, **kw):
    args = dict(cache_dir=str(tmp), vocabulary_size=300, train_samples=40, eval_samples=12, samples_per_shard=16)
    return SyntheticOCR(**{**args, **kw})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return small(tmp_path_factory.mktemp("synth"))


def batches(ds, seed=0, n=3, **kw):
    args = dict(tokenizer=Bytes(), image_size=64, prompt=PROMPT, num_image_tokens=8, max_len=64, batch_size=4)
    return list(itertools.islice(train_batches(ds.shards("train"), seed=seed, **{**args, **kw}), n))


# ---- preprocess

def test_preprocess_shape_and_range():
    assert pytest.approx((127 / 255 - 0.5) / 0.5, abs=1e-7) == GREY
    image = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    x = preprocess(image, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert preprocess(Image.new("L", (64, 64), 255), 64).eq(1).all()  # grey-scale input -> 3 channels
    assert preprocess(Image.new("RGB", (64, 64)), 64).eq(-1).all()


@pytest.mark.parametrize("width", [40, 80])  # exact fit, and a 2x downscale
def test_preprocess_pads_grey_and_centres(width):
    x = preprocess(Image.new("RGB", (width, width // 2), (255, 0, 0)), 40)  # wide: bands above and below
    assert torch.equal(x[:, :10], torch.full((3, 10, 40), GREY))
    assert torch.equal(x[:, 30:], torch.full((3, 10, 40), GREY))
    red = x[:, 10:30]
    assert torch.allclose(red[0], torch.ones(20, 40)) and torch.allclose(red[1:], -torch.ones(2, 20, 40))


def test_preprocess_applies_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 255, 255)).save(buf, format="PNG", exif=exif)
    x = preprocess(Image.open(buf), 40)  # upright it is 20 wide, 40 tall: grey bands left and right
    assert torch.equal(x[:, :, :10], torch.full((3, 40, 10), GREY)) and x[:, :, 10:30].eq(1).all()


# ---- tokens

def test_encode_sample_masks_prompt_and_image():
    tok = Bytes()
    inputs, targets = encode_sample(tok, "hello", PROMPT, num_image_tokens=4, max_len=100)
    prefix = [tok.bos_id] + [tok.image_id] * 4 + tok.encode("\nFree OCR.")
    assert inputs == prefix + tok.encode("hello")
    assert targets[:len(prefix) - 1] == [IGNORE] * (len(prefix) - 1)
    assert targets[len(prefix) - 1:] == tok.encode("hello") + [tok.eos_id]


def test_encode_sample_truncates_text_keeps_eos():
    tok = Bytes()
    prefix_len = 1 + 4 + len("\nFree OCR.")
    inputs, targets = encode_sample(tok, "hello", PROMPT, num_image_tokens=4, max_len=prefix_len + 3)
    assert len(inputs) == prefix_len + 3
    assert targets[prefix_len - 1:] == tok.encode("hel") + [tok.eos_id]
    with pytest.raises(ConfigError, match="max_len"):
        encode_sample(tok, "hello", PROMPT, num_image_tokens=4, max_len=prefix_len - 1)
    with pytest.raises(ConfigError, match="<image>"):
        encode_sample(tok, "hello", "Free OCR.", num_image_tokens=4, max_len=100)


def test_collate_pads():
    tok = Bytes()
    samples = [{"key": k, "text": t, "pixel_values": torch.zeros(3, 8, 8),
                **dict(zip(("input_ids", "targets"), encode_sample(tok, t, "<image>", 2, 50)))}
               for k, t in (("a", "x"), ("b", "xyz"))]
    batch = collate(samples, pad_id=tok.pad_id)
    assert batch["input_ids"].shape == batch["targets"].shape == (2, 6)  # bos, 2 image tokens, "xyz"
    assert batch["input_ids"][0, -2:].tolist() == [tok.pad_id] * 2 and batch["targets"][0, -2:].tolist() == [IGNORE] * 2
    assert batch["texts"] == ["x", "xyz"] and batch["keys"] == ["a", "b"]


# ---- synthetic_ocr

def test_synthetic_shards_written_once_and_reused(tmp_path):
    first = small(tmp_path)
    # an interrupted earlier attempt (dead pid) is cleared, not mistaken for the result
    stale = tmp_path / first.cache_key() / "train.partial-4194305"
    stale.mkdir(parents=True)
    (stale / "train-000000.tar").write_bytes(b"junk")
    paths = first.shards("train")
    assert len(paths) == 3 and not stale.exists()
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
    listing = sorted(os.listdir(tmp_path / first.cache_key() / "train"))
    assert small(tmp_path).shards("train") == paths  # a later run: found by the argument hash
    assert {p: os.stat(p).st_mtime_ns for p in paths} == mtimes
    assert sorted(os.listdir(tmp_path / first.cache_key() / "train")) == listing
    assert small(tmp_path, seed=1).cache_key() != first.cache_key()
    with pytest.raises(ConfigError, match="validation"):
        first.shards("validation")


def test_synthetic_eval_words_are_held_out(synth):
    train = {w for s in eval_samples(synth.shards("train")) for w in s["text"].split(" ")}
    held = {w for s in eval_samples(synth.shards("eval")) for w in s["text"].split(" ")}
    assert train <= set(synth.train_words) and held <= set(synth.heldout_words)
    assert not train & held and not set(synth.train_words) & set(synth.heldout_words)
    assert len(eval_samples(synth.shards("train"))) == 40 and len(eval_samples(synth.shards("eval"), limit=5)) == 5


def test_synthetic_fixed_samples_train_is_eval(tmp_path):
    ds = small(tmp_path, fixed_samples=5)
    train, held = eval_samples(ds.shards("train")), eval_samples(ds.shards("eval"))
    assert len(train) == 5 and [s["text"] for s in train] == [s["text"] for s in held]


@pytest.mark.parametrize("layout", ["grid", "flow"])
def test_synthetic_text_fits(tmp_path, layout):
    ds = small(tmp_path, layout=layout)
    for text in itertools.islice(ds.texts("train"), 200):
        kept, lines = ds.wrap(text.split(" "))
        assert " ".join(lines) == text and len(lines) <= ds.max_lines
        assert all(ds._place(line)[1] <= ds.image_size for line in lines)
        if layout == "grid":
            assert all(len(line) <= ds.chars_per_line for line in lines)
            # ink exactly in the cells of the non-space characters: one char per vision token
            ink = preprocess(ds.render(text), 64)[0].view(8, 8, 8, 8).amin(dim=(1, 3)) < 0.5
            grid = [line.ljust(8) for line in lines] + [" " * 8] * (8 - len(lines))
            assert ink.tolist() == [[c != " " for c in row] for row in grid]


def test_synthetic_draws_fewer_words_rather_than_overflow(tmp_path):
    ds = small(tmp_path, image_size=32, words=(10, 10), word_length=(4, 4))  # one word per line, 4 lines
    assert all(len(t.split(" ")) == 4 for t in itertools.islice(ds.texts("train"), 20))
    with pytest.raises(ValueError):
        ds.render("abcd abcd abcd abcd abcd")


def test_synthetic_bad_arguments_name_the_key():
    registry = Registry()
    synthetic_ocr.vlmkit_register(registry)
    shards_plugin.vlmkit_register(registry)
    assert registry.names("dataset") == ["shards", "synthetic_ocr"]
    with pytest.raises(ConfigError, match=r"^data\.dataset: .*layout"):
        registry.build("dataset", "synthetic_ocr", where="data.dataset", layout="spiral")
    with pytest.raises(ConfigError, match="word_length"):
        registry.build("dataset", "synthetic_ocr", where="data.dataset", word_length=(2, 12))


def test_round_trip_render_shard_preprocess(synth):
    for s in eval_samples(synth.shards("eval")):
        assert torch.equal(preprocess(s["image"], 64), preprocess(synth.render(s["text"]), 64))


# ---- streaming

def test_train_batches_shapes(synth):
    tok = Bytes()
    for batch in batches(synth):
        B, T = batch["input_ids"].shape
        assert B == 4 and batch["pixel_values"].shape == (4, 3, 64, 64) and batch["targets"].shape == (B, T)
        assert len(batch["texts"]) == len(batch["keys"]) == 4
        for i, text in enumerate(batch["texts"]):
            answer = batch["targets"][i][batch["targets"][i] != IGNORE].tolist()
            assert answer == tok.encode(text) + [tok.eos_id]


def test_train_batches_deterministic_and_endless(synth):
    a, b, c = batches(synth, n=25), batches(synth, n=25), batches(synth, seed=1, n=25)  # 100 samples: 2.5 epochs
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    first_epoch = [k for x in a[:10] for k in x["keys"]]
    assert len(set(first_epoch)) == 40  # an epoch visits every sample once
    assert first_epoch != [k for x in a[10:20] for k in x["keys"]]  # and the next one reshuffles


def test_train_batches_workers_split_shards(tmp_path):
    ds = small(tmp_path, train_samples=32)  # two shards of 16: one per worker
    a, b = batches(ds, n=8, num_workers=2), batches(ds, n=8, num_workers=2)
    assert len({k for x in a for k in x["keys"]}) == 32 and [x["keys"] for x in a] == [x["keys"] for x in b]


# ---- shards plugin and missing paths

def test_shards_plugin(tmp_path):
    for i in range(2):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    ds = Shards(train=str(tmp_path / "train-{000000..000001}.tar"), eval=str(tmp_path / "eval-000000.tar"))
    assert ds.shards("train") == [str(tmp_path / f"train-{i:06d}.tar") for i in range(2)]
    assert Shards(train=str(tmp_path / "train-*.tar")).shards("train") == ds.shards("train")
    missing = str(tmp_path / "eval-000000.tar")
    with pytest.raises(ConfigError, match=rf"^data\.dataset\.eval: shard '{re.escape(missing)}' does not exist$"):
        ds.shards("eval")
    with pytest.raises(ConfigError, match="data.dataset.train: shard .*train-000002.tar"):
        Shards(train=str(tmp_path / "train-{000000..000002}.tar")).shards("train")
    with pytest.raises(ConfigError, match="data.dataset.eval"):
        Shards(train="x.tar").shards("eval")
    with pytest.raises(ConfigError, match="nope.tar"):
        train_batches([str(tmp_path / "nope.tar")], Bytes(), 64, PROMPT, 8, 64, batch_size=2)
    with pytest.raises(ConfigError, match="nope.tar"):
        eval_samples([str(tmp_path / "nope.tar")])
