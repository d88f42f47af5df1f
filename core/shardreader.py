"""Reading shards: WebDataset tar files -> raw samples ``{__key__, __url__, ext: bytes}``.

Samples are grouped as WebDataset groups them: consecutive members that share a key (the member
name up to the first dot of its base name) form one sample. A tar that breaks off or is corrupt
does not end the stream silently: one ``{__bad__: "truncated_shard"}`` item says where it broke.
"""
import os
import tarfile
import zlib

from core.errors import ConfigError


def check_shards(shard_paths):
    """The dataset's shard list, each one checked to exist; a ConfigError names the first that does not."""
    paths = [shard_paths] if isinstance(shard_paths, str) else list(shard_paths)
    if not paths:
        raise ConfigError("data: the dataset gave no shards")
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"data: shard {path!r} does not exist")
    return paths


class _TarInfo(tarfile.TarInfo):
    """tarfile ends a stream silently where a header is cut off or missing; this notes that it happened."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.vlmkit_cut = True  # a complete tar ends with zero blocks (EOFHeaderError), not with nothing
            raise


def _duplicate(sample, detail):
    """Mark a sample whose members repeat a name (or whose key repeats) bad: neither copy is the sample."""
    if "__bad__" not in sample:
        for ext in [k for k in sample if not k.startswith("__")]:
            del sample[ext]
        sample.update(__bad__="duplicate_key", __detail__=detail)


def read_shard(path):
    """Yield the raw samples {__key__, __url__, ext: bytes} of one tar, grouped as WebDataset does.

    Where the tar breaks off or is corrupt, the sample being read is dropped (it may lack members) and
    one {__key__, __url__, __bad__: "truncated_shard", __detail__} item follows the samples before it.
    A sample whose member names repeat (``d1.png d1.txt d1.png``), or whose key comes back after other
    samples, is one {__key__, __url__, __bad__: "duplicate_key", __detail__} item, its members not kept.
    """
    sample, seen = None, set()
    try:
        with tarfile.open(path, "r|*", tarinfo=_TarInfo) as tar:  # streaming mode: one pass, no index
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot
                if not member.isreg() or not dot or stem.startswith("__") or ext.startswith("__"):
                    continue  # "__" names are WebDataset's (and this reader's) own keys: no member may set them
                key = f"{folder}/{stem}" if folder else stem
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": path}
                    if key in seen:  # WebDataset would yield a second sample under the same key
                        _duplicate(sample, f"key {key!r} appears again after other samples")
                    seen.add(key)
                if ext.lower() in sample:  # d1.png d1.txt d1.png d1.txt: the second would overwrite the first
                    _duplicate(sample, f"member {base!r} appears twice in the sample")
                if "__bad__" not in sample:
                    sample[ext.lower()] = tar.extractfile(member).read()
            if getattr(tar, "vlmkit_cut", False):
                raise tarfile.ReadError("the tar ends without its end-of-archive blocks")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        where = "in this sample" if sample else "before the first sample"
        yield {"__key__": sample["__key__"] if sample else "", "__url__": path, "__bad__": "truncated_shard",
               "__detail__": f"the tar breaks off {where}: {type(e).__name__}: {e}"}
        return
    if sample is not None:
        yield sample
