"""Reading shards: WebDataset tar files -> raw samples ``{__key__, __url__, ext: bytes}``.

A shard is a local path or anything WebDataset's own opener (``webdataset.gopen``) opens:
``http(s)://...`` (through curl), ``pipe:COMMAND`` (the command's standard output), ``file:``,
and the other schemes in ``webdataset.gopen.gopen_schemes`` (docs/data.md §1).

Three steps, each its own function:

* ``open_shard``: the URL opened by gopen; a command's standard error is kept so a failure can be
  named in one line (docs/data.md §1.2).
* ``tar_members``: (name, bytes) of the regular members in order. Python's tarfile ends a stream
  silently at a header it cannot read after the first one (a wrong checksum, a cut-off block), and
  does not check a gzip stream's CRC; both are noticed here (docs/data.md §2).
* ``group_samples``: consecutive members sharing a key (WebDataset's ``base_plus_ext``: the name up
  to the first dot of its base name) form one sample. This is where samples are put together, so
  a check on how members make samples belongs there.

A shard that breaks off, is corrupt or cannot be read does not end the stream silently: one
``{__bad__: "truncated_shard" | "unreadable_shard"}`` item follows the samples before the break.
"""
import gzip
import os
import sys
import tarfile
import tempfile
import threading
import zlib
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen, gopen_schemes, set_options
from webdataset.tariterators import base_plus_ext

from core.errors import ConfigError

GZIP_MAGIC = b"\x1f\x8b"
WAIT_S = 2.0  # how long a failed command may take to exit on its own before it is killed (docs/data.md §1.2)
CURL_EXIT = {  # curl(1) EXIT CODES: gopen runs curl with -s, so its status is all it says (docs/data.md §1.2)
    6: "could not resolve the host", 7: "could not connect to the host",
    22: "the server answered with an HTTP error (status 400 or more)", 28: "the transfer timed out",
    35: "the TLS handshake failed", 52: "the server sent nothing", 56: "the connection broke while receiving",
}
_SPAWN = threading.Lock()  # one process at a time borrows this process's standard error (open_shard)


# ---- shard names

def is_url(path):
    """True for a shard that gopen opens as a URL (``pipe:``, ``http:``, ...), False for a local path."""
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive, not a scheme


def local_path(path):
    """The file a local shard names (``file:`` URLs included)."""
    return url2pathname(urlparse(path).path) if path.startswith("file:") else path


def check_shards(shard_paths):
    """The dataset's shard list; a ConfigError names the first local file that does not exist or URL that
    WebDataset cannot open. URLs are not fetched here: one that fails is counted when it is read."""
    paths = [shard_paths] if isinstance(shard_paths, str) else list(shard_paths)
    if not paths:
        raise ConfigError("data: the dataset gave no shards")
    for path in paths:
        if not isinstance(path, str):
            raise ConfigError(f"data: a shard must be a path or URL string, not {type(path).__name__} {path!r}")
        if is_url(path):
            scheme = urlparse(path).scheme
            if scheme not in gopen_schemes:
                known = ", ".join(sorted(s for s in gopen_schemes if not s.startswith("_")))
                raise ConfigError(f"data: shard {path!r}: WebDataset opens no {scheme}: URL (it opens {known}); "
                                  f"for other stores write pipe:COMMAND, e.g. 'pipe:aws s3 cp s3://bucket/x.tar -'")
        elif not os.path.isfile(local_path(path)):
            raise ConfigError(f"data: shard {path!r} does not exist")
    return paths


# ---- opening

class _Prefixed:
    """A read-only stream with the bytes already read from its start given back."""

    def __init__(self, head, stream):
        self.head, self.stream = head, stream

    def read(self, size=-1):
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.stream.read(size - len(data)) if len(data) < size else b"")


def open_shard(url):
    """-> (stream, standard-error file or None). gopen opens ``url``; a command (a gopen Pipe: ``pipe:``, curl
    for http) gets a temporary file as its standard error, so its message can name a failure."""
    if not is_url(url):
        return gopen(url, "rb"), None
    err = tempfile.TemporaryFile()
    with _SPAWN:  # gopen starts the command with this process's fd 2: lend it the file for that moment
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(err.fileno(), 2)
            stream = gopen(url, "rb")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    set_options(stream, ignore_errors=True)  # the exit status is read in finish_shard, not mid-read
    return stream, err


def _command_name(proc):
    """curl for gopen's http(s) handler; "the command" for a pipe: URL, which the shard's name already shows."""
    args = proc.args
    return os.path.basename(args[0]) if isinstance(args, (list, tuple)) else "the command"


def finish_shard(stream, err, how="done"):
    """Close what open_shard opened; -> one line describing a command that failed, else None.

    ``how``: "done" (the stream was read to its end), "broken" (a read error: the command gets WAIT_S to
    exit on its own, as a failed download does at once, else it is killed and the read error stands), or
    "abandon" (the reader stopped early: the command is killed and its status means nothing)."""
    proc = getattr(stream, "proc", None)  # webdataset.gopen.Pipe
    if proc is None:
        stream.close()
        return None
    try:
        if how != "done" and proc.poll() is None:
            try:
                proc.wait(timeout=WAIT_S if how == "broken" else 0)
            except Exception:  # subprocess.TimeoutExpired: still running
                proc.kill()
        stream.close()  # closes the pipe and reaps the process
        status = proc.returncode
        if how == "abandon" or status is None or status < 0 or status in stream.ignore_status:
            return None  # 0, curl's 23 / the shell's 141 (we closed the pipe), or a signal we caused
        err.seek(0)
        said = err.read()[-4000:].decode("utf-8", "replace").split("\n")
        said = "; ".join(line.strip() for line in said if line.strip())[-150:]  # the end says most
        if not said and _command_name(proc) == "curl":
            said = CURL_EXIT.get(status, "see curl(1), EXIT CODES")
        return f"{_command_name(proc)} exited with status {status}" + (f": {said}" if said else "")
    finally:
        if err is not None:
            if how == "done":
                _forward(err)
            err.close()


def _forward(err):
    """A command that worked may still have warned: its standard error goes where it would have gone."""
    err.seek(0)
    said = err.read()
    if said:
        sys.stderr.write(said.decode("utf-8", "replace"))


# ---- tar members -> samples

class _TarInfo(tarfile.TarInfo):
    """tarfile ends a stream silently at a header it cannot read after the first; this records why."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.vlmkit_broken = "the tar ends without its end-of-archive blocks"
            raise
        except tarfile.InvalidHeaderError as e:  # e.g. a wrong checksum: the members after it would be lost
            tar.vlmkit_broken = f"an unreadable member header at offset {tar.offset} ({e})"
            raise


def open_tar(stream):
    """A streaming TarFile over ``stream``; gzip is decompressed by Python's gzip module, which checks the
    CRC at the end of the stream (tarfile's own streaming gzip does not, docs/data.md §2)."""
    head = stream.read(2)
    stream = _Prefixed(head, stream)
    if head == GZIP_MAGIC:
        return tarfile.open(fileobj=gzip.GzipFile(fileobj=stream, mode="rb"), mode="r|", tarinfo=_TarInfo)
    return tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)  # plain, bz2 or xz, found by tarfile


def tar_members(tar, state):
    """(name, read) of each regular member in order, ``read()`` giving its bytes (read only when called, so a
    sample is complete before the next one's bytes are read); ``state["last"]``: the last header's name.

    Raises tarfile.ReadError where the tar breaks off, has an unreadable header, or has bytes other than
    zeros after its end-of-archive block (a damaged header that looks like the end, or a second archive).
    """
    for member in tar:
        state["last"] = member.name
        if member.isreg():
            yield member.name, tar.extractfile(member).read
        tar.members = []  # tarfile keeps every TarInfo of a stream otherwise
    broken = getattr(tar, "vlmkit_broken", None)
    if broken:
        raise tarfile.ReadError(broken)
    end = tar.offset
    while chunk := tar.fileobj.read(1 << 16):  # reading to the end also makes gzip check its CRC
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"bytes other than zeros after the end-of-archive block at offset {end} "
                                    "(a damaged member header, or a second archive appended)")


def _duplicate(sample, detail):
    """Mark a sample whose members repeat a name (or whose key repeats) bad: neither copy is the sample."""
    if "__bad__" not in sample:
        for ext in [k for k in sample if not k.startswith("__")]:
            del sample[ext]
        sample.update(__bad__="duplicate_key", __detail__=detail)


def group_samples(members, url):
    """Consecutive members sharing a key -> {__key__, __url__, ext: bytes} (WebDataset's grouping).

    The key is ``webdataset.tariterators.base_plus_ext``'s (the name up to the first dot of its base name;
    extensions lowercased as WebDataset does); names without one, and WebDataset's ``__*__`` members, are
    skipped. A sample whose member names repeat (``d1.png d1.txt d1.png``), or whose key comes back after
    other samples, is one {__key__, __url__, __bad__: "duplicate_key", __detail__} item, its members not kept."""
    sample, seen = None, set()
    for name, read in members:
        key, ext = base_plus_ext(name)
        if key is None or key.rpartition("/")[2].startswith("__") or ext.startswith("__"):
            continue  # "__" names are WebDataset's (and this reader's) own keys: no member may set them
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample  # complete: a break in the next member's bytes does not take it along
            sample = {"__key__": key, "__url__": url}
            if key in seen:  # WebDataset would yield a second sample under the same key
                _duplicate(sample, f"key {key!r} appears again after other samples")
            seen.add(key)
        if ext.lower() in sample:  # d1.png d1.txt d1.png d1.txt: the second would overwrite the first
            _duplicate(sample, f"member {name.rpartition('/')[2]!r} appears twice in the sample")
        if "__bad__" not in sample:
            sample[ext.lower()] = read()
    if sample is not None:
        yield sample


READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def read_shard(url):
    """Yield the raw samples {__key__, __url__, ext: bytes} of one shard (path or URL), grouped as WebDataset does.

    Where the tar breaks off or is corrupt, the sample being read is dropped (it may lack members) and one
    {__key__, __url__, __bad__: "truncated_shard", __detail__} item follows the samples before it; a shard that
    cannot be opened, or whose command fails, gives one "unreadable_shard" item naming the error.
    """
    try:
        stream, err = open_shard(url)
    except Exception as e:  # gopen raises OSError for a missing file, ValueError for a refused URL
        yield _bad(url, "", "unreadable_shard", f"cannot open it: {type(e).__name__}: {e}")
        return
    state, broken = {"last": None}, None
    try:
        yield from group_samples(tar_members(open_tar(stream), state), url)
    except READ_ERRORS as e:
        broken = e
    except BaseException:  # GeneratorExit: the reader stopped early (a closed stream); or a real fault
        finish_shard(stream, err, "abandon")
        raise
    failed = finish_shard(stream, err, "done" if broken is None else "broken")
    last = state["last"]
    key = (base_plus_ext(last)[0] or "") if last else ""
    if failed:
        yield _bad(url, key, "unreadable_shard", failed)
    elif broken is not None:
        where = f"in this sample (at or after member {last!r})" if last else "before the first sample"
        yield _bad(url, key, "truncated_shard", f"the tar breaks off {where}: {type(broken).__name__}: {broken}")


def _bad(url, key, reason, detail):
    return {"__key__": key, "__url__": url, "__bad__": reason, "__detail__": detail}
