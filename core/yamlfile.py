"""YAML as people write numbers: PyYAML's safe loader with YAML 1.2's float rule.

PyYAML implements YAML 1.1, where a float needs a dot: ``1e-5`` is the *string* "1e-5" while
``1.0e-5`` is a number. A recipe is written by people who type ``lr: 1e-5`` or
``{name: clip, eps: 1e-6}``; a string there passes every check that does not know the type (a
component's keyword arguments) and fails much later inside torch. YAML 1.2's core schema reads
``1e-5``, ``1E5``, ``.5``, ``+2.`` and ``.inf`` as floats, and so does this loader. Everything else
(ints, bools, nulls, strings) is PyYAML's safe loader unchanged. Every YAML the user writes (recipe
files, ``key=value`` overrides, ``--option KEY=VALUE``) goes through ``load``.

A command-line value (``value``) that is not valid YAML but does not start a flow collection or a
quoted string (``[``, ``{``, ``"``, ``'``) is taken as the plain string it was typed as: ``@home``,
``a: b: c``. A key given again later overrides the earlier value, as a later override always does;
but a key given in several words in a row gets the list of their values (``overrides``): an unquoted
``train=x/train-{000000..000003}.tar`` reaches the command as four ``train=x/train-00000N.tar``
words in a row, because the shell expands the braces, and the list names all four shards (the
``shards`` dataset takes a list of patterns) instead of the last one alone.
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


def value(text, what):
    """A command-line value as YAML (``what`` names it in the error), or the plain string where YAML fails
    and the text does not start a flow collection or a quoted string (the module doc)."""
    try:
        return load(text)
    except yaml.YAMLError as e:
        if not text.lstrip().startswith(("[", "{", '"', "'")):
            return text
        mark = getattr(e, "problem_mark", None)
        problem = f"{getattr(e, 'problem', e)}" + (f" at column {mark.column + 1}" if mark else "")
        raise ConfigError(f"{what}: the value is not valid YAML ({problem}); inside [...] or {{...}}, quote a "
                          f"string holding , : [ ] {{ }} (e.g. train: 'x-{{000000..000003}}.tar')") from e


def overrides(items):
    """``["a.b=1", ...]`` -> [(key, first item, label, value)], values parsed, a later word for a key replacing
    an earlier one; a key given in several words in a row gets the list of their values (a shell-expanded
    brace pattern, the module doc). ``label`` names the override(s) in an error: ``override 'a.b=1'``."""
    grouped, previous = {}, None
    for item in items:
        key, text = _key_value(item)
        if key != previous:
            grouped.pop(key, None)  # given again after other keys: the later value wins
            grouped[key] = ([], [])
        grouped[key][0].append(item)
        grouped[key][1].append(value(text, f"override {item!r}"))
        previous = key
    return [(key, given[0], f"override {given[0]!r}" if len(given) == 1 else f"override {key} given {len(given)} "
             f"times in a row", values[0] if len(values) == 1 else values) for key, (given, values) in grouped.items()]


def _key_value(item):
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.path=value")
    return key.strip(), text


_PARSE = object()


def apply_override(raw, item, parsed=_PARSE):
    """Set ``dotted.path=value`` in the raw recipe dict; the value is parsed as YAML (numbers, lists, ...)
    unless ``parsed`` gives it (``overrides``)."""
    key, text = _key_value(item)
    if parsed is _PARSE:
        parsed = value(text, f"override {item!r}")
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
        key, sep, text = item.partition("=")
        if not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, or KEY alone for true")
        if not sep:
            options[key.strip()] = True
            continue
        options[key.strip()] = value(text, f"--option {item!r}")
    return options
