"""Docs that cannot drift: blocks of README.md and docs/*.md written from the code; ``python -m core.docs``.

    python -m core.docs [--check] [--root FOLDER]

A block is the text between a line ``<!-- BEGIN GENERATED NAME: python -m core.docs -->`` and a line
``<!-- END GENERATED NAME -->``. The command rewrites every block of the Markdown files in place and says
which changed; ``--check`` changes nothing and exits 1 naming each stale file and block (tests/test_docs.py
runs the check in-process). The blocks:

* ``plugin-contracts``: per component kind, the members its contract requires (the Protocols and the
  behaviour hooks of core/contracts.py, with their docstrings) and what the core hands its factory by
  parameter name (``contracts.CONTEXT``);
* ``hooks``: every hook of core/hookspecs.py, its signature, the first line of its docstring and who
  implements it;
* ``recipe-keys``: every section and key of the recipe schema (core/recipe.py): type, default, and the
  comment beside it in the source.
"""
import argparse
import glob
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import typing

import attrs

from core import contracts, hookspecs, recipe
from core.errors import ConfigError, cli_main
from core.hooks import HOOKS
from core.registry import KINDS

BEGIN = re.compile(r"<!-- BEGIN GENERATED ([\w-]+): python -m core\.docs -->")
END = "<!-- END GENERATED {} -->"


# ---- text for the blocks

def _md(text):
    """A docstring as Markdown: rst's ``x`` as `x`, its lines joined."""
    return " ".join(inspect.cleandoc(text or "").replace("``", "`").split())


def _cell(text):
    return text.replace("|", "\\|")


def _plain_types(text):
    return re.sub(r"\b(?:collections\.abc|typing|torch)\.", "", text)


def _member(protocol, name):
    value = vars(protocol).get(name)
    if not callable(value):
        return f"{name}: {_plain_types(inspect.formatannotation(protocol.__annotations__[name]))}"
    sig = inspect.signature(value)
    params = ", ".join(str(p) for p in list(sig.parameters.values())[1:])  # without self
    returns = "" if sig.return_annotation is sig.empty else f" -> {inspect.formatannotation(sig.return_annotation)}"
    return _plain_types(f"{name}({params}){returns}")


def _hook(name):
    return f"{name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"


def plugin_contracts():
    rows, notes = [], []
    for kind in KINDS:
        if kind in contracts.PROTOCOLS:
            protocol = contracts.PROTOCOLS[kind]
            members = [_member(protocol, n) for n in contracts.required_members(protocol)]
            notes.append(f"- `{kind}` (`{protocol.__name__}`): {_md(protocol.__doc__)}")
        else:
            members = [f"@hookimpl {_hook(h)}" for h in contracts.BEHAVIOUR_HOOKS[kind]]
        handed = ", ".join(f"`{n}`" for n in contracts.CONTEXT.get(kind, ()))
        rows.append(f"| `{kind}` | {', '.join(f'`{_cell(m)}`' for m in members)} | {handed} |")
    return "\n".join(["| kind | must provide | handed by name |", "|---|---|---|", *rows, "",
                      "What the members mean, and the optional ones (each Protocol's docstring):", "", *notes])


def hook_list():
    implementers = {h: f"{'an' if kind[0] in 'aeiou' else 'a'} `{kind}` component"
                    for kind, hooks in contracts.BEHAVIOUR_HOOKS.items() for h in hooks}
    rows = [f"| `{_hook(h)}` | {_cell(_md(getattr(hookspecs, h).__doc__.strip().splitlines()[0]))} | "
            f"{implementers.get(h, 'a plugin module')} |" for h in vars(hookspecs) if h in HOOKS]
    return "\n".join(["| hook | what it does | implemented by |", "|---|---|---|", *rows])


def _field_comments(cls):
    """{field name: the comment on its line} of an attrs class, read from its source."""
    source = textwrap.dedent(inspect.getsource(cls))
    names, comments = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row, column = token.start
        if token.type == tokenize.NAME and column == 4 and row not in names:
            names[row] = token.string
        elif token.type == tokenize.COMMENT and row in names:
            comments[names[row]] = token.string.lstrip("#").strip()
    return comments


def _type_name(tp):
    if tp is recipe.Component:
        return "component"
    if attrs.has(tp):
        return "mapping"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    args = typing.get_args(tp)
    if args and type(None) in args:
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + " | None"
    return getattr(tp, "__name__", str(tp))


def _yaml(value):
    if isinstance(value, recipe.Component):
        return value.name if not value.args else f"{{name: {value.name}, ...}}"
    if attrs.has(type(value)):  # a section's default: the section with its keys' defaults
        return "{}"
    if isinstance(value, str):
        return value if re.fullmatch(r"[\w./:-]*", value) else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _default(field):
    if field.default is attrs.NOTHING:
        return "required"
    value = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    return f"`{_cell(_yaml(value))}`"


def _key_rows(cls, path):
    rows, comments = [], _field_comments(cls)
    for field in attrs.fields(cls):
        if field.metadata.get("internal"):
            continue
        key = f"{path}.{field.name}" if path else field.name
        nested = next((a for a in (field.type, *typing.get_args(field.type))
                       if attrs.has(a) and a is not recipe.Component), None)
        note = comments.get(field.name, "")
        if "component" in _type_name(field.type):
            note = note or "{name: NAME, ...}: a registered component and its constructor's arguments"
        elif not note and nested is not None:  # a section of its own: its class's first docstring line
            note = (nested.__doc__ or "").strip().split("\n")[0]
        rows.append(f"| `{key}` | `{_cell(_type_name(field.type))}` | {_default(field)} | {_cell(note)} |")
        if nested is not None:
            rows += _key_rows(nested, f"{key}.N" if typing.get_origin(field.type) is list else key)
    return rows


def recipe_keys():
    return "\n".join(["| key | type | default | note |", "|---|---|---|---|", *_key_rows(recipe.Recipe, "")])


BLOCKS = {"plugin-contracts": plugin_contracts, "hooks": hook_list, "recipe-keys": recipe_keys}


# ---- finding and rewriting the blocks

def doc_files(root):
    """README.md and docs/*.md under ``root`` (those that exist)."""
    files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return [f for f in files if os.path.isfile(f)]


def rewrite(text, where, texts=None):
    """``text`` with every generated block replaced by its text now; returns (new text, [(name, was current)]).
    ``texts`` caches each block's text over several files."""
    texts = texts if texts is not None else {}
    lines, out, found, i = text.split("\n"), [], [], 0
    while i < len(lines):
        out.append(lines[i])
        match = BEGIN.fullmatch(lines[i].strip())
        i += 1
        if match is None:
            continue
        name = match.group(1)
        if name not in BLOCKS:
            raise ConfigError(f"{where}:{i}: no generated block is called {name!r}; blocks: {', '.join(BLOCKS)}")
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == END.format(name)), None)
        if end is None:
            raise ConfigError(f"{where}:{i}: block {name!r} has no line {END.format(name)}")
        if name not in texts:
            texts[name] = BLOCKS[name]()
        block = ["", texts[name], ""]
        found.append((name, "\n".join(lines[i:end]) == "\n".join(block)))
        out += [*block, lines[end]]
        i = end + 1
    return "\n".join(out), found


def blocks(root):
    """[(file relative to root, block name, current?)] of every generated block in the docs."""
    found, texts = [], {}
    for path in doc_files(root):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found += [(os.path.relpath(path, root), name, current) for name, current in rewrite(text, path, texts)[1]]
    return found


def stale(root):
    """["FILE: block NAME"] of every block whose text is not what the code gives now."""
    return [f"{path}: block {name}" for path, name, current in blocks(root) if not current]


def update(root):
    """Rewrite every block in place; returns the files that changed."""
    changed, texts = [], {}
    for path in doc_files(root):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = rewrite(old, path, texts)[0]
        if new != old:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed.append(os.path.relpath(path, root))
    return changed


def command(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.docs", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("--root", default=".", help="the repository: README.md and docs/*.md (default: here)")
    args = parser.parse_args(argv)
    if args.check:
        old = stale(args.root)
        for line in old:
            print(f"stale: {line} (python -m core.docs rewrites it)", file=sys.stderr)
        return 1 if old else 0
    for path in update(args.root):
        print(f"rewrote {path}")
    return 0


def main(argv=None):
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
