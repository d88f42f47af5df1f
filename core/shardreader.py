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


def read_shard(path):
    """Yield the raw samples {__key__, __url__, ext: bytes} of one tar, grouped as WebDataset does.

    Where the tar breaks off or is corrupt, the sample being read is dropped (it may lack members) and
    one {__key__, __url__, __bad__: "truncated_shard", __detail__} item follows the samples before it.
    """
    sample = None
    try:
        with tarfile.open(path, "r|*", tarinfo=_TarInfo) as tar:  # streaming mode: one pass, no index
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot
                if not member.isreg() or not dot or stem.startswith("__"):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": path}
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
