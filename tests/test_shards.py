"""core.shards: every input format written to shards and read back, skip reasons, limits, atomic output."""
import base64
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
from braceexpand import braceexpand
from PIL import Image

from core.data import eval_samples
from core.errors import ConfigError
from core.shards import format_summary, main, parse_size, write_shards
from core.sources import clean_key
from plugins.metrics.omnidocbench_files import omnidocbench_page_text
from plugins.sources.fox import fox_prompt


def image(path, color=(200, 30, 30), size=(12, 8), fmt=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    im.putpixel((1, 2), (0, 255, 0))
    im.save(path, format=fmt)
    return path


def png_bytes(color=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), color).save(buf, format="PNG")
    return buf.getvalue()


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def jsonl(path, records):
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def shards(summary):
    return list(braceexpand(summary.pattern))


def members(summary):
    """{key: {ext: bytes}} over all shards, in order."""
    out = {}
    for path in shards(summary):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def run(fmt, source, out, **kw):
    return write_shards(fmt, str(source), str(out), progress=False, **kw)


def test_folder_round_trip_through_core_data(tmp_path):
    src = tmp_path / "src"
    texts = {"a": "hello world\n", "sub_b": "# Title\n\nline two \r\n\n", "c": "jpeg page", "d_e": "  dotted stem ü"}
    files = {"a": image(src / "a.png"), "sub_b": image(src / "sub" / "b.png", (10, 20, 30), (7, 9)),
             "c": image(src / "c.jpg", (90, 90, 250)), "d_e": image(src / "d.e.png", (5, 5, 5))}
    write(src / "a.txt", texts["a"])
    write(src / "sub" / "b.md", texts["sub_b"])
    write(src / "c.txt", texts["c"])
    write(src / "d.e.txt", texts["d_e"])
    summary = run("folder", src, tmp_path / "out", max_count=3)
    assert summary.samples == 4 and len(summary.shards) == 2 and not summary.skipped
    assert summary.pattern == str(tmp_path / "out" / "train-{000000..000001}.tar")
    assert summary.bytes == sum(os.path.getsize(p) for p in shards(summary))
    samples = eval_samples(shards(summary))
    # a text file's trailing newline and spaces are not part of the target (the model would learn to emit them)
    assert {s["key"]: s["text"] for s in samples} == {key: text.rstrip() for key, text in texts.items()}
    for s in samples:
        if s["key"] != "c":  # PNG: pixel-equal
            original = Image.open(files[s["key"]])
            assert s["image"].size == original.size and s["image"].tobytes() == original.tobytes()
    raw = members(summary)
    assert raw["c"]["jpg"] == files["c"].read_bytes()  # bytes copied as they are
    assert raw["a"]["png"] == files["a"].read_bytes()
    assert raw["a"]["txt"] == b"hello world" and raw["d_e"]["txt"] == "  dotted stem ü".encode()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no partial folder left


def test_folder_skip_reasons(tmp_path):
    src = tmp_path / "src"
    image(src / "ok.png"), write(src / "ok.txt", "fine")
    write(src / "orphan.txt", "no image")                                    # missing_image
    write(src / "broken.png", b"\x89PNG\r\n\x1a\nnot really"), write(src / "broken.txt", "x")  # bad_image
    image(src / "notext.png")                                               # missing_text
    image(src / "blank.png"), write(src / "blank.txt", " \n\t")             # empty_text
    image(src / "latin.png"), write(src / "latin.txt", b"caf\xe9")          # non_utf8_text
    image(src / "scan.bmp", fmt="BMP"), write(src / "scan.txt", "bmp")      # unsupported_image_type
    image(src / "dup.png"), image(src / "dup.jpg"), write(src / "dup.txt", "d")  # second one: duplicate_key
    summary = run("folder", src, tmp_path / "out")
    assert summary.samples == 2  # ok, dup.png
    assert dict(summary.skipped) == {"missing_image": 1, "bad_image": 1, "missing_text": 1, "empty_text": 1,
                                     "non_utf8_text": 1, "unsupported_image_type": 1, "duplicate_key": 1}
    assert summary.examples["non_utf8_text"] == [str(src / "latin.txt")]
    assert "dup.jpg" in summary.examples["duplicate_key"][0]
    text = format_summary(summary)
    assert "skipped 7 sample(s):" in text and "bad_image: 1" in text
    assert text.splitlines()[-1] == summary.pattern == str(tmp_path / "out" / "train-000000.tar")


def test_jsonl_manifest_and_images_root(tmp_path):
    image(tmp_path / "m" / "img" / "p1.png")
    image(tmp_path / "m" / "img" / "p2.jpg")
    manifest = jsonl(tmp_path / "m" / "manifest.jsonl", [
        {"image": "img/p1.png", "text": "one", "id": "doc.1/p"},
        {"image": "img/p2.jpg", "text": "two", "meta": {"lang": "en"}},
        "",
        {"image": "img/none.png", "text": "x"},
        {"image": "img/p1.png", "id": "no-text"},
    ])
    summary = run("jsonl", manifest, tmp_path / "out")
    assert dict(summary.skipped) == {"missing_image": 1, "missing_text": 1}
    assert summary.examples["missing_image"] == [f"{manifest}:4: {tmp_path / 'm' / 'img' / 'none.png'}"]
    got = members(summary)
    assert list(got) == ["doc_1_p", "img_p2"]
    assert got["doc_1_p"]["txt"] == b"one" and set(got["doc_1_p"]) == {"png", "txt"}
    assert json.loads(got["img_p2"]["json"]) == {"lang": "en"} and "jpg" in got["img_p2"]
    # the same manifest elsewhere, images found under --images-root
    moved = jsonl(tmp_path / "elsewhere.jsonl", [{"image": "img/p1.png", "text": "one"}])
    summary = run("jsonl", moved, tmp_path / "out2", images_root=str(tmp_path / "m"))
    assert summary.samples == 1 and list(members(summary)) == ["img_p1"]


def test_malformed_jsonl_line_is_one_error_line(tmp_path, cli):
    image(tmp_path / "p.png")
    manifest = jsonl(tmp_path / "m.jsonl", [{"image": "p.png", "text": "ok"}, '{"image": "p.png", "text": '])
    out = tmp_path / "out"
    proc = cli("core.shards", "jsonl", str(manifest), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{manifest}:2:" in errors[0] and "not valid JSON" in errors[0]
    assert list(out.iterdir()) == []  # nothing written, no partial folder left
    bad_type = jsonl(tmp_path / "t.jsonl", [{"image": "p.png", "text": 5}])
    with pytest.raises(ConfigError, match=r"t\.jsonl:1: text must be a string"):
        run("jsonl", bad_type, out)


def test_olmocr_records(tmp_path):
    image(tmp_path / "pages" / "p.png")
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    jsonl(tmp_path / "mix" / "part1.jsonl", [
        {"id": "a", "image_path": "../pages/p.png", "natural_text": "alpha", "primary_language": "en"},
        {"id": "b", "png_base64": base64.b64encode(png_bytes((9, 9, 9))).decode(),
         "response": json.dumps({"natural_text": "beta", "is_table": False})},
        {"id": "c", "pdf": "x.pdf", "page_number": 3, "text": "pdf only"},
        {"id": "d", "image": data_url, "markdown": None},
        {"image": data_url, "markdown": "no id"},
    ])
    summary = run("olmocr", tmp_path / "mix", tmp_path / "out")  # a folder of JSONL
    assert dict(summary.skipped) == {"missing_image": 1, "empty_text": 1}
    got = members(summary)
    assert list(got) == ["a", "b", "part1_5"]
    assert got["a"]["txt"] == b"alpha" and json.loads(got["a"]["json"]) == {"primary_language": "en"}
    assert got["b"]["png"] == png_bytes((9, 9, 9)) and got["b"]["txt"] == b"beta"
    assert json.loads(got["b"]["json"]) == {"response": {"is_table": False}}
    assert got["part1_5"]["txt"] == b"no id" and "json" not in got["part1_5"]


def test_llava_conversations_and_text_only(tmp_path):
    image(tmp_path / "coco" / "0001.jpg")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A page."},
             {"from": "human", "value": "Title?"}, {"from": "gpt", "value": "None."}]
    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    source = write(tmp_path / "llava.json", json.dumps([
        {"id": "0001.x", "image": "0001.jpg", "conversations": turns},
        {"id": 7, "conversations": text_only},
        {"id": "gone", "image": "missing.jpg", "conversations": turns},
    ]))
    summary = run("llava", source, tmp_path / "out", images_root=str(tmp_path / "coco"))
    assert summary.samples == 2 and summary.text_only == 1 and dict(summary.skipped) == {"missing_image": 1}
    got = members(summary)
    assert set(got["0001_x"]) == {"jpg", "json"} and json.loads(got["0001_x"]["json"]) == {"conversations": turns}
    assert set(got["7"]) == {"json"} and json.loads(got["7"]["json"]) == {"conversations": text_only}
    bad = write(tmp_path / "bad.json", json.dumps([{"id": 1, "conversations": [{"from": "human", "value": 3}]}]))
    with pytest.raises(ConfigError, match=r"bad\.json item 0: conversations\[0\]\.value must be a string"):
        run("llava", bad, tmp_path / "out3")


def test_fox_gt(tmp_path):
    image(tmp_path / "en_pdf_png" / "en_1.png")
    image(tmp_path / "en_pdf_png" / "en_2.png")
    def conv(prompt, gt):
        return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": gt}]
    source = write(tmp_path / "en_box_ocr.json", json.dumps([
        {"image": "en_1.png", "conversations": conv("OCR the box [1, 2, 3, 4]:", "first box")},
        {"image": "en_1.png", "conversations": conv("OCR the box [5, 6, 7, 8]:", "second box")},
        {"image": "en_2.png", "conversations": conv("Please output the text content.", "page two\nlines")},
    ]))
    summary = run("fox", source, tmp_path / "out", name="eval", images_root=str(tmp_path / "en_pdf_png"))
    assert summary.pattern.endswith("eval-000000.tar")
    got = members(summary)
    assert list(got) == ["en_1_0", "en_1_1", "en_2"]
    assert got["en_1_1"]["txt"] == b"second box" and got["en_2"]["txt"] == b"page two\nlines"
    assert json.loads(got["en_1_0"]["json"]) == {"prompt": "OCR the box [1, 2, 3, 4]:", "image": "en_1.png",
                                                 "index": 0}
    assert fox_prompt("<image>\nRead it.") == "Read it."
    assert [s["text"] for s in eval_samples(shards(summary))] == ["first box", "second box", "page two\nlines"]


def test_omnidocbench_gt(tmp_path):
    image(tmp_path / "images" / "page_a.jpg")
    image(tmp_path / "images" / "page_b.png")
    page_a = {
        "layout_dets": [
            {"category_type": "text_block", "order": 2, "anno_id": 1, "text": "second para starts"},
            {"category_type": "title", "order": 1, "anno_id": 0, "text": "Title"},
            {"category_type": "figure", "order": 3, "anno_id": 2},
            {"category_type": "text_block", "order": 4, "anno_id": 3, "text": " and ends"},
        ],
        "page_info": {"page_no": 0, "height": 8, "width": 12, "image_path": "page_a.jpg"},
        "extra": {"relation": [{"source_anno_id": 1, "target_anno_id": 3, "relation_type": "truncated"}]},
    }
    page_b = {"layout_dets": [{"category_type": "figure", "order": 1, "anno_id": 0}],
              "page_info": {"page_no": 1, "image_path": "page_b.png"}}
    source = write(tmp_path / "OmniDocBench.json", json.dumps([page_a, page_b]))
    summary = run("omnidocbench", source, tmp_path / "out", name="eval", images_root=str(tmp_path / "images"))
    assert summary.samples == 2 and summary.empty_kept == 1  # an eval page without text still counts
    got = members(summary)
    assert got["page_a"]["txt"].decode() == omnidocbench_page_text(page_a) == "Title\n\nsecond para starts and ends"
    assert json.loads(got["page_a"]["json"]) == page_a  # the whole page: what the omnidocbench metric matches
    assert got["page_b"]["txt"] == b""


def test_shard_size_and_count_limits(tmp_path):
    src, rng = tmp_path / "src", random.Random(0)
    for i in range(12):  # incompressible ~1.2 kB PNGs
        im = Image.frombytes("RGB", (20, 20), bytes(rng.randrange(256) for _ in range(1200)))
        im.save(write(src / f"p{i:02d}.png", b""))
        write(src / f"p{i:02d}.txt", f"text {i}")
    summary = run("folder", src, tmp_path / "out", max_size=parse_size("15kB"))
    sizes = [os.path.getsize(p) for p in shards(summary)]
    assert len(sizes) >= 2 and max(sizes) <= 15000 and summary.samples == 12 and not summary.oversize
    assert len(eval_samples(shards(summary))) == 12
    summary = run("folder", src, tmp_path / "out", max_count=5, limit=11)
    assert [len(m) for m in _per_shard_keys(summary)] == [5, 5, 1]
    # a second, smaller run under the same name replaces the first: no stale shard is left to mix in
    stale = tmp_path / "out" / ".train.partial-999999999"
    stale.mkdir()
    summary = run("folder", src, tmp_path / "out", limit=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train-000000.tar"]
    assert summary.replaced == 3


def _per_shard_keys(summary):
    out = []
    for path in shards(summary):
        with tarfile.open(path) as tar:
            out.append({m.name.split(".")[0] for m in tar})
    return out


def test_small_helpers():
    assert parse_size("1GB") == 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("500") == 500
    with pytest.raises(ConfigError, match="--max-size"):
        parse_size("lots")
    assert clean_key("a/b.c d") == "a_b_c_d" and clean_key("__x") == "k__x"


@pytest.mark.parametrize("flags, named", [
    (["--name", "a/b"], "--name 'a/b'"), (["--max-count", "0"], "--max-count 0"), (["--limit", "0"], "--limit 0"),
    (["--images-root", "nowhere"], "--images-root"), (["--max-size", "lots"], "--max-size 'lots'")])
def test_the_command_names_the_flag_of_a_bad_value(tmp_path, capsys, flags, named):
    source = tmp_path / "src"
    source.mkdir()
    rc = main(["folder", str(source), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {named}")
    assert not (tmp_path / "out").exists()  # checked before anything is read or written
