"""vlmkit core: the engine. It knows no concrete model, dataset or metric."""
from core.errors import ConfigError
from core.hookspecs import hookimpl, hookspec

__all__ = ["ConfigError", "hookimpl", "hookspec"]
