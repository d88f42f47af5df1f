"""HTML tables as OmniDocBench's evaluator reads them (docs/metrics-omnidocbench.md, "Step 3. Tables").

The evaluator parses table HTML with BeautifulSoup's ``html.parser`` builder in two places:
normalising a table before its edit distance (official ``utils/data_preprocess.py:139-207``) and
cutting an unmatched predicted table into cell strings for the text pool (``utils/match.py:239-251``).
vlmkit does not depend on BeautifulSoup: this module builds the same tree with the standard
library's ``html.parser`` and the conventions that change the strings the evaluator sees
(entities, whitespace-only text collapsed to one space or newline, void elements, stray end tags
ignored, unclosed tags closed at the end, serialisation with attributes sorted and double-quoted and ``&<>``
escaped).
"""
import html
import re
import unicodedata
from html.entities import html5
from html.parser import HTMLParser

VOID = frozenset(["area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "menuitem", "meta",
                  "param", "source", "track", "wbr", "basefont", "bgsound", "command", "frame", "image", "isindex",
                  "nextid", "spacer"])
_KEEP_SPACE = frozenset(("pre", "textarea"))  # whitespace inside these is not collapsed
_ASCII_SPACE = frozenset(" \n\t\x0c\r")


class Node:
    __slots__ = ("name", "attrs", "children", "parent")

    def __init__(self, name, attrs, parent):
        self.name, self.attrs, self.children, self.parent = name, attrs, [], parent


class Comment(str):
    """A comment's text: a string child (it counts for ``.string``) written back as ``<!--...-->``."""


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=False)  # entities are decoded here, as BeautifulSoup does
        self.root = Node(None, {}, None)
        self.open = [self.root]
        self.pending = []
        self.closed_void = []  # void elements already closed, whose explicit end tag is to be ignored

    def _flush(self):
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending = []
        if all(c in _ASCII_SPACE for c in text) and not any(n.name in _KEEP_SPACE for n in self.open):
            text = "\n" if "\n" in text else " "
        self.open[-1].children.append(text)

    def handle_starttag(self, tag, attrs, self_closing=False):
        self._flush()
        values = {}
        for key, value in attrs:
            values[key] = "" if value is None else value  # a repeated attribute keeps its last value
        if "class" in values:  # a list-valued attribute: written back with single spaces
            values["class"] = " ".join(values["class"].split())
        node = Node(tag, values, self.open[-1])
        self.open[-1].children.append(node)
        self.open.append(node)
        if tag in VOID and not self_closing:
            self.open.pop()
            self.closed_void.append(tag)

    def handle_startendtag(self, tag, attrs):
        # BeautifulSoup closes <x/> through its ordinary end-tag path, so after an earlier <br> a later
        # <br/> is taken for that one's redundant end tag and stays open; kept for identical trees.
        self.handle_starttag(tag, attrs, self_closing=True)
        self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in self.closed_void:
            self.closed_void.remove(tag)
            return
        self._flush()
        for i in range(len(self.open) - 1, 0, -1):  # close up to the latest open tag of that name, if any
            if self.open[i].name == tag:
                del self.open[i:]
                break

    def handle_data(self, data):
        self.pending.append(data)

    def handle_entityref(self, name):
        char = html5.get(name + ";")
        self.pending.append(char if char is not None else "&" + name)

    def handle_charref(self, name):
        number = int(name[1:], 16) if name[:1] in "xX" else int(name)
        char = None
        if number < 256:  # BeautifulSoup reads low numbers as Windows-1252 bytes first
            try:
                char = bytes([number]).decode("windows-1252")
            except UnicodeDecodeError:
                pass
        if not char:
            try:
                char = chr(number)
            except (ValueError, OverflowError):
                pass
        self.pending.append(char or "\ufffd")

    def handle_comment(self, data):
        self._flush()
        self.open[-1].children.append(Comment(data))


def parse(markup):
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    builder._flush()
    return builder.root


def _escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attribute(key, value):
    value = _escape(value)
    if '"' in value:
        if "'" in value:
            value = value.replace('"', "&quot;")
        else:
            return f"{key}='{value}'"
    return f'{key}="{value}"'


def _write(node, out):
    """Serialise the evaluator's table view: th as td, thead and span unwrapped, math as $alttext$."""
    for child in node.children:
        if isinstance(child, Comment):
            out.append(f"<!--{child}-->")
        elif isinstance(child, str):
            out.append(_escape(child))
        elif child.name in ("thead", "span"):
            _write(child, out)
        elif child.name == "math":
            out.append(_escape("$" + child.attrs.get("alttext", "") + "$"))
        else:
            name = "td" if child.name == "th" else child.name
            attrs = "".join(" " + _attribute(k, v) for k, v in sorted(child.attrs.items()))  # sorted, as written back
            if child.name in VOID and not child.children:
                out.append(f"<{name}{attrs}/>")
            else:
                out.append(f"<{name}{attrs}>")
                _write(child, out)
                out.append(f"</{name}>")


_TABLE_BODY = re.compile(r"<table\b[^>]*>(.*)</table>", re.DOTALL | re.IGNORECASE)
_ATTRIBUTES = tuple(re.compile(f'( {a}=".*?")') for a in ("style", "height", "width", "align", "class"))
_DROPPED_TAGS = ("<sup>", "</sup>", "<sub>", "</sub>", "<span>", "</span>", "<div>", "</div>", "<p>", "</p>",
                 '<spandata-span-identity="">')


def normalise_table(text):
    """A table's string for its edit distance; "" when ``text`` holds no ``<table``."""
    if "<table" not in text.replace(" ", "").replace("'", '"'):
        return ""
    out = []
    _write(parse(text), out)
    body = unicodedata.normalize("NFKC", html.unescape("".join(out)).replace("\n", "")).strip()
    body = "".join(_TABLE_BODY.findall(body))  # greedy: from the first <table> to the last </table>
    for pattern in _ATTRIBUTES:
        body = pattern.sub("", body)
    body = re.sub("</?tbody>", "", body)
    body = re.sub(r"\s+", " ", body)
    table = '<html><body><table border="1" >' + body + "</table></body></html>"
    for tag in _DROPPED_TAGS:
        table = table.replace(tag, "")
    return re.sub("<colgroup>.*?</colgroup>", "", table)


def _single_string(node):
    """BeautifulSoup's ``.string``: the text of a node whose only child is text (or, recursively, one tag)."""
    if len(node.children) != 1:
        return None
    child = node.children[0]
    return child if isinstance(child, str) else _single_string(child)


def cell_strings(table_html):
    """The cell strings an unmatched predicted table adds to the text pool, in document order.

    Only ``<td>`` cells whose content is a single string count (``<th>`` and mixed cells do not);
    ``$\\cdot$`` is deleted and the string stripped, so a blank cell gives "".
    """
    cells = []

    def visit(node):
        for child in node.children:
            if isinstance(child, Node):
                if child.name == "td":
                    value = _single_string(child)
                    if value:
                        cells.append(re.sub(r"\$\\cdot\$", "", value).strip())
                visit(child)

    visit(parse(table_html))
    return cells
