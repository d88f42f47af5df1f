"""Reading the text, JSON and JSONL files users bring: every failure is one ConfigError naming file (and line)."""
import gzip
import json

from core.errors import ConfigError


def read_text(path):
    """A UTF-8 text file's contents; a file that cannot be read or decoded is one ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def read_json(path):
    """The parsed contents of a JSON file (UTF-8, a byte-order mark allowed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return json.loads(data.decode("utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    except RecursionError as e:  # json's parser recurses once per level of nesting
        raise ConfigError(f"{path}: JSON nested deeper than the parser goes ({e})") from e


def jsonl_records(path):
    """Yield (line number, object) of a JSONL file (or .jsonl.gz); blank lines are skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not UTF-8 ({e.reason})") from e
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                except RecursionError as e:
                    raise ConfigError(f"{path}:{n}: JSON nested deeper than the parser goes ({e})") from e
                if not isinstance(record, dict):
                    raise ConfigError(f"{path}:{n}: expected a JSON object, not {type(record).__name__}")
                yield n, record
    except (OSError, EOFError) as e:
        raise ConfigError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
