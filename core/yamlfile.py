"""YAML as people write numbers: PyYAML's safe loader with YAML 1.2's float rule.

PyYAML implements YAML 1.1, where a float needs a dot: ``1e-5`` is the *string* "1e-5" while
``1.0e-5`` is a number. A recipe is written by people who type ``lr: 1e-5`` or
``{name: clip, eps: 1e-6}``; a string there passes every check that does not know the type (a
component's keyword arguments) and fails much later inside torch. YAML 1.2's core schema reads
``1e-5``, ``1E5``, ``.5``, ``+2.`` and ``.inf`` as floats, and so does this loader. Everything else
(ints, bools, nulls, strings) is PyYAML's safe loader unchanged. Every YAML the user writes (recipe
files, ``key=value`` overrides, ``--option KEY=VALUE``) goes through ``load``.
"""
import re

import yaml

from core.errors import ConfigError

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 core schema floats (https://yaml.org/spec/1.2.2/#1024-core-schema), plus 1.1's "_" separators
FLOAT_12 = re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?   # 1.5  .5  5.  1.5e-3  .5E3
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                                    # 1e-5  2E10
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN)
)$""", re.VERBOSE)


class Loader(yaml.SafeLoader):
    """SafeLoader whose implicit float rule is YAML 1.2's."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+0123456789."))


def load(text):
    """Parse one YAML document (a str) with YAML 1.2 floats; raises yaml.YAMLError like yaml.safe_load."""
    return yaml.load(text, Loader=Loader)


def line_numbers(text):
    """{dotted key path: 1-based line} of every key and list item in a YAML document."""
    return _line_numbers(yaml.compose(text, Loader=Loader))


def _line_numbers(node, prefix="", out=None):
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = key_node.start_mark.line + 1
            _line_numbers(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}" if prefix else str(i)
            out[path] = item.start_mark.line + 1
            _line_numbers(item, path, out)
    return out


def apply_override(raw, item):
    """Set ``dotted.path=value`` in the raw recipe dict; the value is parsed as YAML (numbers, lists, ...)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        parsed = load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {item!r}: {here}: no list item {part!r} (the list has {len(node)})")
            index = int(part)
            if last:
                node[index] = parsed
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = parsed
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
    return raw


def parse_options(items):
    """``["key=value", "flag", ...]`` -> {key: YAML value, flag: True}; a malformed item is a ConfigError naming it."""
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, or KEY alone for true")
        if not sep:
            options[key.strip()] = True
            continue
        try:
            options[key.strip()] = load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--option {item!r}: the value is not valid YAML ({e})") from e
    return options
