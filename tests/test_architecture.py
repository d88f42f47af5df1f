"""The import graph of core/ and plugins/, read from the source with ast: arrows point one way.

* core imports nothing outside core (no plugins, benchmarks or tests): it discovers plugins;
* no import cycle among the modules of core/ and plugins/;
* no module imports a private name (``_x``) of another module;
* no function or method under core/ or plugins/ is longer than MAX_FUNCTION_LINES: ``end_lineno - lineno + 1``
  of its ``def``, docstring included (decorators are above ``lineno``).
"""
import ast
import os

from tests.helpers import ROOT

PACKAGES = ("core", "plugins")
OURS = ("core", "plugins", "benchmarks", "tests")
MAX_FUNCTION_LINES = 60


def modules():
    """{module name: path} of every .py file under core/ and plugins/."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = path
    return out


def imports(path):
    """[(imported module, name or None, line)] of a file, relative imports resolved."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def graph():
    """{module: {imported module of ours: line}}; ``from pkg import mod`` counts as importing pkg.mod."""
    mods = modules()
    edges = {}
    for name, path in mods.items():
        edges[name] = {}
        for module, item, line in imports(path):
            target = f"{module}.{item}" if item and f"{module}.{item}" in mods else module
            if target.split(".")[0] in OURS:
                edges[name].setdefault(target, line)
    return edges


def test_core_imports_only_core():
    bad = [f"{name} imports {target} (line {line})" for name, targets in graph().items() if name.startswith("core")
           for target, line in targets.items() if target.split(".")[0] != "core"]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = {name: [t for t in targets if t in modules()] for name, targets in graph().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_imported_across_modules():
    bad = []
    for name, path in modules().items():
        for module, item, line in imports(path):
            if item and item.startswith("_") and module.split(".")[0] in OURS and module != name:
                bad.append(f"{name}:{line} imports {item} from {module}")
    assert not bad, "\n".join(bad)


def test_the_graph_is_read():  # the checks above mean nothing if the walk found nothing
    edges = graph()
    assert "core.train" in edges and "core.model" in edges["core.train"]
    assert "plugins.encoders.deepencoder" in edges and "plugins.encoders.sam" in edges["plugins.encoders.deepencoder"]


def function_lengths():
    """{"module:line name": lines} of every function and method under core/ and plugins/."""
    out = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{name}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_no_long_functions():
    lengths = function_lengths()
    assert any(key.endswith(" run_stage") for key in lengths)  # the walk found the functions
    long = [f"{key}: {n} lines" for key, n in lengths.items() if n > MAX_FUNCTION_LINES]
    assert not long, "split these into named functions:\n" + "\n".join(long)
