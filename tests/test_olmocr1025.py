"""olmOCR-mix-1025 as olmocr's prepare_olmocrmix.py lays it out (docs/data.md §4): <id>.md with a YAML front
matter beside a symlink to its one-page <id>.pdf; the page rendered and turned by rotation_correction."""
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from core.data import decode
from core.errors import ConfigError
from core.pdf import Render
from core.shardreader import read_shard
from core.shards import main, write_shards
from benchmarks.inputs import box, pdf_bytes, text

FIELDS = ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")


def md(response, natural_text):
    """A page's .md exactly as prepare_olmocrmix writes it: f"{k}: {v}" lines, Python's True/None spelled so."""
    head = "---\n" + "".join(f"{k}: {response[k]}\n" for k in FIELDS)
    return head + ("---\n" + natural_text if natural_text else "---")


def prepared(root):
    """processed_00_documents_train/ with pages whose PDFs live in hugging_face/pdf_tarballs/extracted/."""
    extracted = root / "hugging_face" / "pdf_tarballs" / "extracted"
    extracted.mkdir(parents=True)
    pages = root / "processed_00_documents_train"
    upright = box(36, 700, 120, 60) + " " + text(72, 400, "Upright", 36)  # a box near the top left corner
    pdfs = {"0001234567": pdf_bytes([upright]),
            "0001234568": pdf_bytes([upright], rotate=90),  # shown turned 90 degrees clockwise, as scanned
            "0009999999": pdf_bytes([text(72, 700, "blank")])}
    responses = {"0001234567": (dict(zip(FIELDS, ("en", True, 0, False, False))), "Upright\n\nA page."),
                 "0001234568": (dict(zip(FIELDS, ("en", False, 90, True, False))), "Upright"),
                 "0009999999": (dict(zip(FIELDS, (None, True, 0, False, False))), None)}
    for doc_id, data in pdfs.items():
        (extracted / f"{doc_id}.pdf").write_bytes(data)
        folder = pages / doc_id[:4]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{doc_id[4:]}.md").write_text(md(*responses[doc_id]), encoding="utf-8")
        os.symlink(extracted / f"{doc_id}.pdf", folder / f"{doc_id[4:]}.pdf")
    (pages / "0001" / "000000.md").write_text(md(responses["0001234567"][0], "no pdf"))  # its PDF is missing
    return pages


def box_corner(image):
    """The top-left corner of the dark pixels in the image's top half (where the upright page has its box)."""
    grey = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
    grey = grey.view(image.height, image.width)[: image.height // 2]
    ys, xs = torch.nonzero(grey < 128, as_tuple=True)
    return int(xs.min()), int(ys.min())


def test_prepared_pages_to_shards(tmp_path):
    pages = prepared(tmp_path)
    summary = write_shards("olmocr", str(pages), str(tmp_path / "out"), progress=False,
                           render=Render(longest_side=396))
    got = {r["__key__"]: r for p in summary.shards for r in read_shard(p)}
    assert sorted(got) == ["0001_234567", "0001_234568"]
    assert dict(summary.skipped) == {"missing_image": 1, "empty_text": 1}  # no PDF; a page olmOCR found no text on
    plain, turned = got["0001_234567"], got["0001_234568"]
    assert plain["txt"] == b"Upright\n\nA page." and turned["txt"] == b"Upright"  # the front matter is not text
    assert json.loads(turned["json"]) == {"front_matter": {"primary_language": "en", "is_rotation_valid": False,
                                                           "rotation_correction": 90, "is_table": True,
                                                           "is_diagram": False}, "pdf": "0001/234568.pdf"}
    a, b = decode(plain)[0], decode(turned)[0]
    assert a.size == b.size == (306, 396)  # the sideways page is upright again: portrait, not landscape
    assert box_corner(a) == box_corner(b) == (18, 16)  # the box corner (36, 760) pt: 792 - 760 = 32 pt from the top, at half scale


def test_one_command_and_bad_front_matter(tmp_path, capsys):
    pages = prepared(tmp_path)
    assert main(["olmocr", str(pages), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote 2 samples") and out.splitlines()[-1].endswith("train-000000.tar")
    image = Image.open(io.BytesIO(next(read_shard(out.splitlines()[-1]))["png"]))
    assert max(image.size) == 1288  # olmOCR's own rendering size by default
    bad = pages / "0001" / "234567.md"
    bad.write_text(bad.read_text().replace("rotation_correction: 0", "rotation_correction: 45"))
    with pytest.raises(ConfigError, match=f"{bad}: rotation_correction must be 0, 90, 180 or 270, not 45"):
        write_shards("olmocr", str(pages), str(tmp_path / "x"), progress=False)
    bad.write_text("Upright, with no front matter")
    with pytest.raises(ConfigError, match="no YAML front matter"):
        write_shards("olmocr", str(pages), str(tmp_path / "x"), progress=False)
    with pytest.raises(ConfigError, match=r"no \*\.md page \(with its \.pdf\), \*\.parquet"):
        write_shards("olmocr", str(tmp_path / "hugging_face"), str(tmp_path / "y"), progress=False)


def test_the_folder_source_strips_a_front_matter_the_same_way(tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    for name in ("a", "b"):
        (folder / f"{name}.png").write_bytes(buf.getvalue())
    (folder / "a.md").write_text(md(dict(zip(FIELDS, ("de", True, 0, False, True))), "Seite eins"))
    (folder / "b.md").write_text("---\n\nA page that opens with a rule.\n\n---\nand goes on")  # not YAML: kept
    got = {r["__key__"]: r for p in write_shards("folder", str(folder), str(tmp_path / "out"), progress=False).shards
           for r in read_shard(p)}
    assert got["a"]["txt"] == b"Seite eins"
    assert json.loads(got["a"]["json"])["front_matter"]["is_diagram"] is True
    assert got["b"]["txt"] == b"---\n\nA page that opens with a rule.\n\n---\nand goes on" and "json" not in got["b"]


def test_the_release_as_distributed_parquet_and_pdf_tarballs(tmp_path):
    """allenai/olmOCR-mix-1025's own files: {subset}_{split}.parquet (columns as repackage_olmocrmix.py writes
    them) and pdf_tarballs/{subset}_{split}_NNNNN.tar.gz holding {id}.pdf."""
    pa = pytest.importorskip("pyarrow")  # the olmocr extra; .ci/run installs it
    import pyarrow.parquet as pq

    root = tmp_path / "olmOCR-mix-1025"
    (root / "pdf_tarballs").mkdir(parents=True)
    upright = box(36, 700, 120, 60) + " " + text(72, 400, "Upright", 36)
    pdfs = {"doc/0001": pdf_bytes([upright]), "doc/0002": pdf_bytes([upright], rotate=90),
            "doc/0003": pdf_bytes([text(72, 700, "blank")])}
    chunk = "pdf_tarballs/00_documents_eval_00000.tar.gz"
    with tarfile.open(root / chunk, "w:gz") as tar:
        for doc_id, data in pdfs.items():
            info = tarfile.TarInfo(f"{doc_id}.pdf")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = [("doc/0001", "en", True, 0, False, False, "Upright\n\nA page."),
            ("doc/0002", "en", False, 90, True, False, "Upright"),
            ("doc/0003", None, True, 0, False, False, None),  # no text on the page
            ("doc/0004", "en", True, 0, False, False, "its PDF is not in the tarball")]
    columns = ["id", *FIELDS, "natural_text"]
    table = {name: [row[i] for row in rows] for i, name in enumerate(columns)}
    table.update(url=[f"https://example.org/{r[0]}.pdf" for r in rows], page_number=[1] * len(rows),
                 pdf_relpath=[f"{chunk}:{r[0]}.pdf" for r in rows], extras=[None] * len(rows))
    pq.write_table(pa.table(table), root / "00_documents_eval.parquet")
    summary = write_shards("olmocr", str(root), str(tmp_path / "out"), progress=False, render=Render(longest_side=396))
    got = {r["__key__"]: r for p in summary.shards for r in read_shard(p)}
    assert sorted(got) == ["doc_0001", "doc_0002"] and dict(summary.skipped) == {"missing_image": 1, "empty_text": 1}
    assert got["doc_0002"]["txt"] == b"Upright"
    assert json.loads(got["doc_0002"]["json"]) == {
        "front_matter": {"primary_language": "en", "is_rotation_valid": False, "rotation_correction": 90,
                         "is_table": True, "is_diagram": False},
        "pdf": f"{chunk}:doc/0002.pdf", "url": "https://example.org/doc/0002.pdf"}
    a, b = decode(got["doc_0001"])[0], decode(got["doc_0002"])[0]
    assert a.size == b.size == (306, 396) and box_corner(a) == box_corner(b) == (18, 16)
