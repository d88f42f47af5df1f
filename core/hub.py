"""Weights by hub name: a recipe's weight path or model folder may name a Hugging Face hub repository.

    owner/name                      the repository's folder (its main branch), e.g. Qwen/Qwen3-0.6B
    owner/name@revision             a branch, tag or commit
    owner/name[@revision]/path      one file of the repository, e.g. owner/sam/sam_vit_b_01ec64.pth

A path that exists on disk, or starts with /, . or ~, is a local path and stays as it is. A name goes through
huggingface_hub's download cache (``snapshot_download`` / ``hf_hub_download``): downloaded once,
then read from the cache; with ``HF_HUB_OFFLINE=1`` only the cache is read. Where the cache is
follows huggingface_hub's variables (``HF_HUB_CACHE``, else ``HF_HOME``/hub), read at each call:
huggingface_hub reads them once, when it is imported, so a variable set later would be missed.
An unknown name, a revision or file the repository lacks, or a name missing from the cache while
offline is one ConfigError naming the recipe key. Needs huggingface_hub (``pip install 'vlmkit[hf]'``).
"""
import os
import re

from core.errors import ConfigError

# owner/name, an optional @revision (no slash: a branch, tag or commit), an optional /path inside the repository
NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?(?:/(?P<file>.+))?$")
_TRUE = ("1", "on", "yes", "true")


def parse(spec):
    """(repo, revision or None, file in the repository or None) for a hub name; None for anything else."""
    text = os.fspath(spec)
    if text.startswith(("/", ".", "~")):
        return None
    match = NAME.match(text)
    return (match["repo"], match["revision"], match["file"]) if match else None


def cache_dir():
    """The hub cache folder as huggingface_hub finds it, from the environment as it is now."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(folder))


def offline():
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve(spec, where, allow_patterns=None):
    """A local folder or file for ``spec``: a local path as it is, a hub name through the download cache.

    A path that exists, or that cannot be a hub name (absolute, ``./``, ``~``), is returned expanded and
    unchecked: the caller says what is missing in it, as it would without hub names.
    ``where`` is the recipe key that named it (for the error line); ``allow_patterns`` (globs) limits
    which files of a whole repository are downloaded (e.g. ``["*.json"]`` for a dry run, which reads
    configs only; ``[]`` checks the name and downloads nothing).
    """
    path = os.path.expanduser(os.fspath(spec))
    parsed = parse(spec)
    if parsed is None or os.path.exists(path):  # the caller's own checks say what is wrong with a local path
        return path
    repo, revision, filename = parsed
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError(f"{where}: {spec!r} is not a local path, and hub names need huggingface_hub: "
                          f"pip install 'vlmkit[hf]'") from None
    kwargs = dict(revision=revision, cache_dir=cache_dir(), local_files_only=offline())
    try:
        if filename is not None:
            found = huggingface_hub.hf_hub_download(repo, filename, **kwargs)
        else:
            found = huggingface_hub.snapshot_download(repo, allow_patterns=allow_patterns, **kwargs)
    except Exception as e:  # huggingface_hub's errors, a lost connection, a full disk: each one line
        what = repo + (f"@{revision}" if revision else "")
        what = f"{filename} of {what}" if filename is not None else what
        raise ConfigError(f"{where}: {spec!r} is not a local path, and on the hub: {_reason(e, what, kwargs)}") from e
    return found


def _reason(error, what, kwargs):
    from huggingface_hub import errors
    cache = kwargs["cache_dir"]
    if isinstance(error, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the hub and log in (hf auth login)"
    if isinstance(error, errors.RepositoryNotFoundError):
        return "no such repository on the hub (a private one needs hf auth login)"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"the repository has no revision {kwargs['revision']!r}"
    if isinstance(error, errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if kwargs["local_files_only"] else "the hub could not be reached"
        return f"{what} is not in the hub cache {cache}, and {why}"
    if isinstance(error, errors.EntryNotFoundError):
        return f"{what}: the repository has no such file"
    if isinstance(error, errors.HFValidationError):
        return "not a valid repository name"
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"
