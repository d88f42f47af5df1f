"""Where a recipe's (or a command line's) plugins come from: ``.py`` files and modules found and imported.

A ``plugins:`` entry is a ``.py`` file (a path relative to the recipe), a module beside the recipe, or an
importable module name. ``resolve_plugin_paths`` makes files absolute, so a checkpoint's meta json leads
``python -m core.generate`` to the same plugin from anywhere; ``import_plugin`` imports one, telling a
plugin that cannot be found (the user's setting: ConfigError) from one whose code fails (PluginError).
"""
import importlib
import importlib.util
import os
import sys

from core.errors import ConfigError, PluginError


def resolve_plugin_paths(entries, base_dir, where=None):
    """``plugins:`` entries with files made absolute: ``x.py`` (or ``dir/x.py``) relative to ``base_dir`` (the
    recipe's folder), and a module name that is not importable but is a file beside it (``x`` -> ``x.py``).
    Absolute paths go into checkpoints, so ``python -m core.generate`` finds the same plugin anywhere.
    With ``where`` (a recipe), a file or module that cannot be found is an error naming the recipe line."""
    out = []
    for i, entry in enumerate(entries):
        beside = os.path.join(base_dir, *entry.split(".")) + ".py"
        if entry.endswith(".py"):
            entry = os.path.normpath(os.path.join(base_dir, os.path.expanduser(entry)))
            if not os.path.isfile(entry):
                message = f"plugin file {entry} does not exist"
                raise where.error(f"plugins.{i}", message) if where else ConfigError(f"--plugin: {message}")
        else:
            found = _importable(entry)
            if not found and os.path.isfile(beside):
                entry = beside
            elif found is False and where is not None:
                raise where.error(f"plugins.{i}", f"cannot import plugin module {entry!r}: it is not installed, not "
                                  f"on PYTHONPATH and not a file {os.path.relpath(beside, base_dir)} beside the "
                                  f"recipe; name a .py file (a path relative to the recipe), or install the module "
                                  f"or put its folder on PYTHONPATH")
        out.append(entry)
    return out


def _importable(module):
    """True: importable; False: not found; None: looking raised (import_plugin then reports the fault)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):
        return False
    except Exception:
        return None


def import_plugin(entry, where):
    """A recipe's ``plugins:`` entry -> its module: a ``.py`` file path, or an importable module name."""
    if entry.endswith(".py"):
        if not os.path.isfile(entry):
            raise ConfigError(f"{where}: plugin file {entry!r} does not exist")
        name = "vlmkit_recipe_plugin_" + os.path.splitext(os.path.basename(entry))[0]
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == entry:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, entry)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # DataLoader workers and pickles find it by name
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise PluginError(f"{where}: plugin file {entry} failed to import: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(entry)
    except ModuleNotFoundError as e:
        if e.name and entry.startswith(e.name):
            raise ConfigError(f"{where}: cannot import plugin module {entry!r} ({e}); name a .py file (a path "
                              f"relative to the recipe), or install the module or put its folder on PYTHONPATH") from e
        raise PluginError(f"{where}: plugin module {entry} failed to import: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise PluginError(f"{where}: plugin module {entry} failed to import: {type(e).__name__}: {e}") from e
