"""A weight path or model folder as a recipe names it -> a local path.

``resolve(spec, where)``: a path that exists (``~`` expanded) is returned as it is; otherwise ``spec`` is
read as a Hugging Face hub name, ``owner/name`` with an optional ``@revision``, and fetched through
huggingface_hub's download cache (``HF_HUB_OFFLINE=1``: the cache alone). ``allow_patterns`` limits what
is downloaded (e.g. ``["*.json"]`` for a dry run's config). Anything that cannot be found is one
ConfigError naming the recipe key ``where`` and the name.
"""
import os
import re

from core.errors import ConfigError

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve(spec, where, allow_patterns=None):
    path = os.path.expanduser(os.fspath(spec))
    if os.path.exists(path) or not HUB_NAME.match(str(spec)):
        if not os.path.exists(path):
            raise ConfigError(f"{where}: {spec} does not exist")
        return path
    repo, _, revision = str(spec).partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{where}: {spec} is neither a local path nor fetchable: hub names need "
                          f"huggingface_hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=allow_patterns)
    except Exception as e:  # offline and not cached, unknown repo, bad revision: all one line
        raise ConfigError(f"{where}: {spec} is not a local path and the hub gave no copy "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
