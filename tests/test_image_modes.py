"""Images as they come (core/images.py, docs/data.md §5): transparency on white, 16-bit and float greys scaled to
8 bits, EXIF kept, and one decompression-bomb guard for training and python -m core.generate alike."""
import io
import struct
import zlib

import pytest
import torch
from PIL import Image, ImageDraw

from core.data import SampleEncoding
from core.generate import open_image_file
from core.images import image_views, rgb
from plugins.tokenizers.bytes import ByteTokenizer

SIZE = 32
BAR = (4, 12, 28, 20)  # x0, y0, x1, y1: an opaque black bar, the "text"


def encoded(data):
    buf = io.BytesIO()
    data.save(buf, format="PNG")
    return buf.getvalue()


def training_pixels(png_bytes):
    """The global view the training stream makes of an image member (SampleEncoding.prepare)."""
    encoding = SampleEncoding(ByteTokenizer(), "<image>\nOCR", SIZE, 4, 40)
    sample, _ = encoding.prepare({"__key__": "k", "__url__": "u", "png": png_bytes, "txt": b"t"})
    return sample["pixel_values"]


def transparent_pages():
    """A black bar on a fully transparent background, as RGBA, LA and a palette image with a transparent colour.
    The transparent pixels' colour is black, as in many exported PNGs: dropping alpha hid the text."""
    rgba = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle(BAR, fill=(0, 0, 0, 255))
    la = Image.new("LA", (SIZE, SIZE), (0, 0))
    ImageDraw.Draw(la).rectangle(BAR, fill=(0, 255))
    palette = Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([0, 0, 0] * 256)
    ImageDraw.Draw(palette).rectangle(BAR, fill=1)
    palette.info["transparency"] = 0
    return {"RGBA": rgba, "LA": la, "P": palette}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_text_on_a_transparent_background_survives_preprocessing(mode, tmp_path):
    png = encoded(transparent_pages()[mode])
    assert Image.open(io.BytesIO(png)).mode == mode
    pixels = training_pixels(png)
    x0, y0, x1, y1 = BAR
    inside = pixels[:, y0 + 1:y1, x0 + 1:x1]
    outside = torch.cat([pixels[:, :y0 - 1].flatten(1), pixels[:, y1 + 2:].flatten(1)], dim=1)
    assert inside.max() < -0.99 and outside.min() > 0.99  # black text on white paper: [-1, 1]
    path = tmp_path / "page.png"
    path.write_bytes(png)
    generated, _, _ = image_views(open_image_file(str(path)), SIZE)  # what python -m core.generate feeds the model
    assert torch.equal(generated, pixels)


def test_sixteen_bit_and_float_greys_keep_their_shade():
    mid = Image.new("I;16", (SIZE, SIZE), 32768)  # half of 65535: mid-grey, not white
    png = encoded(mid)
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    assert training_pixels(png).abs().max() < 0.01
    ppm = io.BytesIO()
    Image.new("I;16", (4, 4), 65535 // 4).save(ppm, format="PPM")  # Pillow opens 16-bit PPM as mode I
    opened = Image.open(io.BytesIO(ppm.getvalue()))
    assert opened.mode == "I" and rgb(opened).getpixel((0, 0)) == (63, 63, 63)
    assert rgb(Image.new("F", (2, 2), 0.25)).getpixel((0, 0)) == (63, 63, 63)
    wide = Image.new("I", (2, 1))
    wide.putpixel((0, 0), -1000)
    wide.putpixel((1, 0), 300000)  # beyond 16 bits: stretched from its minimum to its maximum
    assert [rgb(wide).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    assert rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_kept_with_transparency():
    page = Image.new("RGBA", (SIZE, SIZE // 2), (0, 0, 0, 0))
    ImageDraw.Draw(page).rectangle((0, 0, 3, SIZE // 2), fill=(0, 0, 0, 255))  # a bar at the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    page.save(buf, format="PNG", exif=exif.tobytes())
    pixels = training_pixels(buf.getvalue())  # upright: 16 x 32, padded grey left and right, the bar on top
    assert pixels[:, 0:3, 8:24].max() < -0.99 and pixels[:, 6:, 8:24].min() > 0.99


def bomb_png(side=10000):
    """A 1-bit side x side PNG of a few kB whose pixels take ~side^2 bytes once decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (side + 7) // 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b""))


def test_generate_refuses_a_decompression_bomb_in_one_line(cli, tiny_checkpoint, tmp_path):
    _, path, images, _ = tiny_checkpoint
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    assert bomb.stat().st_size < 20000
    result = cli("core.generate", path, images[0], str(bomb))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: image {str(bomb)!r}: image_too_large: 10000x10000 = "
                                          f"100,000,000 pixels > --max-image-pixels 89,478,485"]
    small = cli("core.generate", path, images[0], "--max-image-pixels", "100", "--max-new-tokens", "2")
    assert small.returncode == 2 and "32x32 = 1,024 pixels > --max-image-pixels 100" in small.stderr
