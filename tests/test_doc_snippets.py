"""The docs say what the code does: every ```yaml block in README.md and docs/*.md is a recipe (or a fragment
of one) that loads and builds, and every relative link and #anchor in the Markdown files resolves.

A fragment (a ``model:`` or ``stages:`` block, say) is merged onto a base recipe: recipes/two_stage.yaml, or
the recipe its first line names (``# in a recipe like recipes/deepseek_ocr_d20.yaml``). Sections merge key
by key, a component (a mapping with a ``name``) replaces the base's whole, and a stage merges onto the base
stage of the same name. The result goes through the recipe loader and is built on the meta device as a dry
run builds it (core.stagecheck.check_stages): validation only, no weights, no training. A block that names files
the reader brings (weights, shards) may fail only on such a file, and only one the block itself names.
A block that is deliberately not a recipe is fenced with another language tag.
"""
import contextlib
import glob
import io
import os
import re

import pytest
import yaml

from core import yamlfile
from core.errors import ConfigError
from core.recipe import load_recipe
from core.registry import load_plugins
from core.stagecheck import check_stages
from tests.helpers import DEFAULT_RECIPE, ROOT

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKDOWN = DOCS + [os.path.join(ROOT, name) for name in ("BENCHMARKS.md", "DESIGN.md")]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
BASE = re.compile(r"^#.*?\b(recipes/[\w.-]+\.yaml)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path):
    return os.path.relpath(path, ROOT)


def yaml_blocks():
    """(file, line, text) of every ```yaml block of README.md and docs/*.md."""
    blocks = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for m in FENCE.finditer(text):
            if m.group(1) in ("yaml", "yml"):
                blocks.append((_rel(path), text.count("\n", 0, m.start()) + 1, m.group(2)))
    return blocks


SNIPPETS = yaml_blocks()


def merge(base, fragment):
    """``fragment`` onto ``base`` in place: sections key by key, components whole, stages by name."""
    for key, value in fragment.items():
        here = base.get(key)
        if key == "stages" and isinstance(value, list) and isinstance(here, list):
            by_name = {s.get("name"): s for s in here if isinstance(s, dict)}
            for stage in value:
                if isinstance(stage, dict) and stage.get("name") in by_name:
                    merge(by_name[stage["name"]], {k: v for k, v in stage.items() if k != "name"})
                else:
                    here.append(stage)
        elif isinstance(value, dict) and "name" not in value and isinstance(here, dict):
            merge(here, value)
        else:
            base[key] = value
    return base


def as_recipe(snippet, tmp_path):
    """The snippet as a recipe file: whole if it has every required section, else merged onto its base."""
    fragment = yamlfile.load(snippet)
    assert isinstance(fragment, dict), "a yaml block must be a recipe mapping (fence other text as ```text)"
    named = BASE.match(snippet.lstrip())
    base_path = os.path.join(ROOT, named.group(1)) if named else DEFAULT_RECIPE
    if {"model", "data", "stages"} <= set(fragment):
        raw = fragment
    else:
        with open(base_path, encoding="utf-8") as f:
            raw = merge(yamlfile.load(f.read()), fragment)
    raw.setdefault("run", {})["dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, fragment


def build(path, fragment):
    """Load and build as a dry run does, and the data section's datasets when the snippet sets them."""
    recipe = load_recipe(str(path))
    pm, registry = load_plugins(recipe.plugins)
    with contextlib.redirect_stdout(io.StringIO()):
        check_stages(recipe, pm, registry)
    if "data" in fragment:
        for key in ("dataset", "text_dataset"):
            component = getattr(recipe.data, key)
            if component is not None:
                registry.build("dataset", component.name, where=f"data.{key}", **component.args)


def check(snippet, tmp_path):
    path, fragment = as_recipe(snippet, tmp_path)
    try:
        build(path, fragment)
    except ConfigError as e:
        if "pip install" in str(e):  # an optional extra this install lacks (README: `.[dev]` alone)
            pytest.skip(str(e))
        # only a file the reader brings may be missing: one the snippet names, reported as not existing
        named = [p for p in re.findall(r"[\w~./-]+/[\w./-]*", snippet)
                 if os.path.expanduser(p).rstrip("/") in str(e)]
        # or a model the snippet names by hub name, which this offline test cannot have in its cache
        hub_names = [n for n in re.findall(r"\b[\w.-]+/[\w.-]+\b", snippet) if f"'{n}' is not a local path" in str(e)]
        assert ("does not exist" in str(e) and named) or hub_names, str(e)


@pytest.mark.parametrize("where, line, snippet", SNIPPETS, ids=[f"{w}:{n}" for w, n, _ in SNIPPETS])
def test_every_yaml_block_in_the_docs_is_a_recipe_that_builds(where, line, snippet, tmp_path):
    check(snippet, tmp_path)


def test_the_docs_have_recipe_snippets_to_check():
    assert {w for w, _, _ in SNIPPETS} >= {"docs/recipes.md", "docs/data.md", "docs/pretrained.md"}


@pytest.mark.parametrize("stale", [
    "model:\n  crops: {tile_size: 640, max_tile: 9}\n",                               # a key that is not there
    "model:\n  encoder: {name: deepencoder, image_size: [32, 256], pach_size: 8}\n",  # an argument it does not take
    "stages:\n  - name: vis_mid\n    regularisers: [{name: cell_readin}]\n",        # a plugin that is gone
    "stages:\n  - name: vis_mid\n    init_from: {path: 'stage:nowhere'}\n",         # a missing file it does not name
    "Free OCR. then the text\n",                                                     # not a recipe at all
])
def test_a_stale_snippet_fails(stale, tmp_path):
    with pytest.raises((ConfigError, AssertionError)):
        check(stale, tmp_path)


# ---- links

def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.MULTILINE):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(path):
    """Relative link targets outside code: fenced blocks and `code spans` are not Markdown links."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", f.read()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z+.-]*:", t)]


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        goal = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(goal):
            broken.append(f"{target}: no file {_rel(goal)}")
        elif anchor and (not goal.endswith(".md") or anchor not in anchors(goal)):
            broken.append(f"{target}: no heading #{anchor} in {_rel(goal)}")
    assert not broken, broken


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading, too\n\n[ok](#a-code-heading-too) [bad](#nowhere) "
                    "[gone](missing.md) `[not](a-link.md)`\n```text\n[not](either.md)\n```\n")
    assert links(page) == ["#a-code-heading-too", "#nowhere", "missing.md"]
    assert anchors(page) == {"title", "a-code-heading-too"}


def test_generated_blocks_are_paired_where_core_docs_fills_them():
    """python -m core.docs fills these blocks from the code; each BEGIN has its END, in the page that owns it."""
    expected = {"docs/plugins.md": {"plugin-contracts", "hooks"}, "docs/recipes.md": {"recipe-keys"}}
    for page, names in expected.items():
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        begins = re.findall(r"^<!-- BEGIN GENERATED ([\w-]+): python -m core\.docs -->$", text, re.MULTILINE)
        ends = re.findall(r"^<!-- END GENERATED ([\w-]+) -->$", text, re.MULTILINE)
        assert set(begins) == set(ends) == names and len(begins) == len(names), page
        for name in names:
            assert text.index(f"BEGIN GENERATED {name}:") < text.index(f"END GENERATED {name} -->"), name
