"""The errors a command line turns into one line, and the helpers every command shares.

Two kinds of failure, as pytest separates UsageError from INTERNALERROR:

* ``ConfigError``: bad user input (recipe, override, plugin name, data path). The message is the
  whole story: the command prints ``error: <message>`` and exits with code 2, no traceback.
* ``PluginError``: a fault inside a plugin's own code (its constructor raised, its registration
  hook failed). The command names the plugin, prints the traceback that the plugin's author
  needs, and exits with code 3.
"""
import difflib
import os
import sys
import traceback


class ConfigError(Exception):
    """Bad user input (recipe, override, plugin name, data path): the message is the whole story."""


class PluginError(Exception):
    """A plugin's own code failed; ``__cause__`` holds the original exception and its traceback."""


def plugin_call(where, function, *args, _name=None, **kwargs):
    """``function(*args, **kwargs)`` of a plugin (a dataset's ``shards``, a hook): an exception from its code
    becomes a PluginError naming ``where`` and the function (``_name``, else its own), with the traceback;
    a ConfigError (a recipe mistake the plugin reports) passes."""
    try:
        return function(*args, **kwargs)
    except (ConfigError, PluginError):
        raise
    except Exception as e:
        name = _name or getattr(function, "__qualname__", repr(function))
        raise PluginError(f"{where}: {name} failed: {type(e).__name__}: {e}") from e


def closest(word, candidates):
    """' (did you mean 'x'?)' for the nearest candidate, or '' when none is near."""
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def cli_main(main, argv=None, handled=()):
    """Run a command's ``main(argv)`` and turn errors into exit codes: 0 (or main's own code) on success,
    2 and one ``error:`` line for a ConfigError, 3 and the plugin's traceback for a PluginError.
    ``handled``: (exception type, exit code) pairs of the command's own, printed as one line too.
    A reader that closed the pipe early (``vlmkit --list-plugins | head``) ends the command quietly, exit 1."""
    try:
        code = main(argv)
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is caught below
    except BrokenPipeError:
        # Python's documented recipe (signal module, "Note on SIGPIPE"): point stdout at devnull so the
        # flush at exit does not fail again, and exit without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PluginError as e:
        cause = e.__cause__
        if cause is not None:
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 3
    except tuple(t for t, _ in handled) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for t, code in handled if isinstance(e, t))
    return 0 if code is None else code
