"""Damaged tars are counted, never a silent end of the shard (core/shardreader.py; docs/data.md §2)."""
import gzip
import io
import tarfile
import zlib

import pytest
import webdataset as wds
from PIL import Image

from core.data import eval_samples
from core.errors import ConfigError
from core.shardreader import read_shard
from core.stream import train_batches
from plugins.tokenizers.bytes import ByteTokenizer

KEYS = [f"d{i}" for i in range(6)]


def png(shade):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(keys=KEYS):
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "png": png(30 * i), "txt": key.encode()})
    return buf.getvalue()


def header_offset(data, name):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return next(m.offset for m in tar.getmembers() if m.name == name)


def keys_and_bad(path):
    raws = list(read_shard(str(path)))
    return [r["__key__"] for r in raws if "__bad__" not in r], [(r["__bad__"], r["__key__"]) for r in raws
                                                               if "__bad__" in r]


def stream(paths, **kw):
    return train_batches([str(p) for p in paths], ByteTokenizer(), 8, "<image>\nOCR", 4, 40, 2, shuffle_buffer=1,
                         epochs=1, **kw)


def test_a_wrong_header_checksum_mid_tar_is_counted_and_stops_error_mode(tmp_path):
    data = bytearray(tar_bytes())
    at = header_offset(data, "d2.png")  # the third sample's first header
    data[at + 148:at + 156] = b"0000000\0"  # a checksum that does not match the header
    path = tmp_path / "badsum.tar"
    path.write_bytes(bytes(data))
    keys, bad = keys_and_bad(path)
    assert keys == ["d0"] and bad == [("truncated_shard", "d1")]  # d1 may lack members: dropped, and named
    it = stream([path])
    assert [k for b in it for k in b["keys"]] == ["d0"]
    assert it.report() == {"truncated_shard": {str(path): 1}}
    with pytest.raises(ConfigError) as e:
        list(stream([path], on_bad_sample="error"))
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
