"""PDF pages into shards (core/pdf.py, plugins/sources/pdf.py): rendered at the size asked for, with the page's
marks where the PDF put them; broken, encrypted and empty PDFs counted; pages wherever an image path goes."""
import io
import json

import pytest
import torch
from PIL import Image

from core.data import decode
from core.errors import ConfigError
from core.pdf import PageRange, PdfPage, Render, render_png
from core.shardreader import read_shard
from core.shards import main, write_shards
from benchmarks.inputs import box, pdf_bytes, text

BOX = (72, 600, 200, 100)  # x, y (from the bottom), width, height in points, on a 612 x 792 page
WORDS = (72, 400, "HELLO")  # Helvetica 48 pt, baseline at y = 400


def page():
    return box(*BOX) + " " + text(*WORDS)


def dark_box(image, region=None):
    """(x0, y0, x1, y1) of the pixels darker than mid-grey (inclusive), within ``region`` if given."""
    grey = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8).view(image.height, image.width)
    mask = grey < 128
    if region is not None:
        x0, y0, x1, y1 = region
        outside = torch.ones_like(mask)
        outside[y0:y1, x0:x1] = False
        mask[outside] = False
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.mark.parametrize("render, scale", [(Render(longest_side=396), 0.5), (Render(dpi=144, longest_side=None), 2)])
def test_a_page_is_drawn_at_the_size_asked_with_its_marks_in_place(tmp_path, render, scale):
    path = tmp_path / "doc.pdf"
    path.write_bytes(pdf_bytes([page()]))
    image = Image.open(io.BytesIO(render_png(PdfPage(str(path), 1), render)))
    assert image.size == (round(612 * scale), round(792 * scale)) and image.mode == "RGB"
    x, y, w, h = BOX  # PDF y counts up from the bottom; the image's from the top
    got = dark_box(image, (0, 0, image.width, round((792 - 500) * scale)))
    want = (x * scale, (792 - y - h) * scale, (x + w) * scale - 1, (792 - y) * scale - 1)
    assert all(abs(a - b) <= 1 for a, b in zip(got, want)), (got, want)
    x0, y0, x1, y1 = dark_box(image, (0, round((792 - 500) * scale), image.width, image.height))
    baseline, cap = (792 - WORDS[1]) * scale, 0.72 * 48 * scale  # Helvetica's capitals: ~0.72 em above the baseline
    bearing = 0.1 * 48 * scale  # a glyph starts a little right of its origin (H: 0.079 em in Helvetica)
    assert WORDS[0] * scale <= x0 <= WORDS[0] * scale + bearing + 1 and x1 < (WORDS[0] + 0.75 * 48 * 5) * scale
    assert abs(y1 + 1 - baseline) <= scale + 1 and abs(baseline - y0 - cap) <= 2 * scale + 1
    assert image.getpixel((image.width - 2, image.height - 2)) == (255, 255, 255)  # drawn on white


def test_page_range_and_render_settings():
    assert [n for n in range(1, 13) if n in PageRange("1-3, 7,10-")] == [1, 2, 3, 7, 10, 11, 12]
    for bad in ("0", "3-1", "a", "1,,2"):
        with pytest.raises(ConfigError, match="--pages"):
            PageRange(bad)
    with pytest.raises(ConfigError, match="not both"):
        Render(dpi=100, longest_side=100)


def folder_of_pdfs(root):
    """Every case of the pdf source's naming, plus the PDFs no reader can use."""
    root.mkdir()
    (root / "book.pdf").write_bytes(pdf_bytes([text(72, 700, "one"), text(72, 700, "two"), text(72, 700, "three")]))
    (root / "book.page-1.txt").write_text("one")
    (root / "book.page-003.md").write_text("---\nprimary_language: en\n---\nthree\n")
    (root / "book.page-9.txt").write_text("nine")  # past the last page
    (root / "single.pdf").write_bytes(pdf_bytes([page()]))
    (root / "single.txt").write_text("HELLO")
    (root / "long.pdf").write_bytes(pdf_bytes([page(), page()]))
    (root / "long.txt").write_text("whose page?")
    (root / "locked.pdf").write_bytes(pdf_bytes([page()], encrypted=True))
    (root / "locked.txt").write_text("x")
    (root / "broken.pdf").write_bytes(pdf_bytes([page()])[:300])
    (root / "broken.txt").write_text("x")
    (root / "empty.pdf").write_bytes(b"")
    (root / "empty.txt").write_text("x")
    return root


def samples(summary):
    return {r["__key__"]: r for p in summary.shards for r in read_shard(p)}


def test_pdf_folder_to_shards_counts_what_it_cannot_use(tmp_path):
    source = folder_of_pdfs(tmp_path / "pdfs")
    summary = write_shards("pdf", str(source), str(tmp_path / "out"), progress=False, render=Render(longest_side=200))
    got = samples(summary)
    assert sorted(got) == ["book_page-003", "book_page-1", "single"]
    assert got["book_page-1"]["txt"] == b"one" and got["book_page-003"]["txt"] == b"three"
    assert json.loads(got["book_page-003"]["json"]) == {"pdf": "book.pdf", "page": 3,
                                                        "front_matter": {"primary_language": "en"}}
    image, words = decode(got["single"])  # what training reads: a PNG page, 200 px on its longer side
    assert image.size == (155, 200) and words == "HELLO"
    assert dict(summary.skipped) == {"missing_text": 1, "pdf_page_out_of_range": 1, "pdf_needs_page": 1,
                                     "encrypted_pdf": 1, "bad_pdf": 1, "empty_pdf": 1}
    assert summary.examples["missing_text"] == [f"{source}/book.pdf#page=2"]
    left = write_shards("pdf", str(source), str(tmp_path / "odd"), progress=False,
                        render=Render(longest_side=200, pages=PageRange("1,3-")))
    assert sorted(samples(left)) == ["book_page-003", "book_page-1", "single"] and left.left_out == 1
    assert "missing_text" not in left.skipped  # book's page 2 was left out, not skipped


def test_pdf_pages_wherever_an_image_path_goes(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(pdf_bytes([text(72, 700, "first"), page()]))
    lines = [{"image": "doc.pdf", "page": 2, "text": "HELLO"}, {"image": "doc.pdf#page=1", "text": "first"},
             {"image": "doc.pdf", "text": "which page?"}, {"image": "doc.pdf#page=5", "text": "none"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = write_shards("jsonl", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), progress=False,
                           render=Render(dpi=36, longest_side=None))
    got = samples(summary)
    assert sorted(got) == ["doc_p1", "doc_p2"] and decode(got["doc_p2"])[0].size == (306, 396)
    assert dict(summary.skipped) == {"pdf_needs_page": 1, "pdf_page_out_of_range": 1}
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "scan.png").write_bytes(_png())
    (folder / "scan.txt").write_text("a scan")
    (folder / "print.pdf").write_bytes(pdf_bytes([page()]))
    (folder / "print.md").write_text("HELLO")
    mixed = samples(write_shards("folder", str(folder), str(tmp_path / "mixed_out"), progress=False))
    assert sorted(mixed) == ["print", "scan"] and decode(mixed["print"])[0].size == (996, 1288)  # the default
    with pytest.raises(ConfigError, match="page must be a page number from 1"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "doc.pdf", "page": 0, "text": "x"}) + "\n")
        write_shards("jsonl", str(tmp_path / "bad.jsonl"), str(tmp_path / "bad"), progress=False)


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_one_command_with_the_render_flags(tmp_path, capsys):
    source = folder_of_pdfs(tmp_path / "pdfs")
    code = main(["pdf", str(source), "--out", str(tmp_path / "out"), "--longest-side", "100", "--pages", "2-",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 1 samples" in out and "2 PDF page(s) left out by --pages" in out
    assert out.splitlines()[-1] == str(tmp_path / "out" / "train-000000.tar")
    assert main(["pdf", str(source), "--out", str(tmp_path / "x"), "--dpi", "50", "--longest-side", "9"]) == 2
    assert "error: --dpi and --longest-side: give one of them, not both" in capsys.readouterr().err


def test_a_long_thin_page_keeps_a_usable_short_side(tmp_path):
    """A 234 x 14,295 pt page at the default longest side would be 21 px wide: it is drawn MIN_SHORT_SIDE wide."""
    from core.pdf import MIN_SHORT_SIDE
    path = tmp_path / "receipt.pdf"
    path.write_bytes(pdf_bytes([box(20, 14000, 100, 200)], size=(234, 14295)))
    image = Image.open(io.BytesIO(render_png(PdfPage(str(path), 1), Render())))
    assert image.width == MIN_SHORT_SIDE and abs(image.height - 14295 * MIN_SHORT_SIDE / 234) <= 1
    x0, y0, x1, y1 = dark_box(image)  # the box is still where the page put it, at the larger scale
    scale = MIN_SHORT_SIDE / 234
    assert abs(x0 - 20 * scale) <= 1 and abs(x1 + 1 - 120 * scale) <= 1 and abs(y0 - 95 * scale) <= 1
    by_dpi = Image.open(io.BytesIO(render_png(PdfPage(str(path), 1), Render(dpi=18, longest_side=None))))
    assert abs(by_dpi.width - 234 / 4) <= 1 and abs(by_dpi.height - 14295 / 4) <= 1  # a resolution asked is kept
