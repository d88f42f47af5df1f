"""TEDS and TEDS-S of one table pair, as OmniDocBench's evaluator computes them (docs/metrics-omnidocbench.md, "TEDS").

Tree-edit-distance similarity (PubTabNet): both tables are parsed with lxml's HTML parser (comments
dropped), each ``<td>`` becomes a leaf labelled by its colspan, rowspan and content tokens (every
character of its text, tags written ``<b>`` / ``</b>``), and APTED's tree edit distance with unit
insert/delete and a rename cost (1 across tag or span differences; between two cells, the
normalised Levenshtein distance of their tokens) is turned into ``1 - distance / nodes``, ``nodes``
being the larger count of elements under either ``<table>``. TEDS-S gives every cell empty content,
so only the structure counts. A side that is empty, holds no ``body/table``, or cannot be scored
(a non-numeric span, a table with no element inside) scores 0, as the evaluator's ``try`` does.

lxml and apted (the package the evaluator uses) are the ``tables`` extra; ``available()`` says
whether they are installed, and the metric reports TEDS as not computed otherwise.
"""
from rapidfuzz.distance import Levenshtein

try:
    from apted import APTED, Config
    from lxml import html as lxml_html
    from lxml.etree import LxmlError
except ImportError:  # the tables extra is not installed
    APTED = Config = lxml_html = None
    LxmlError = ValueError


def available():
    return APTED is not None


class _Node:
    __slots__ = ("tag", "colspan", "rowspan", "content", "children")

    def __init__(self, tag, colspan=None, rowspan=None, content=None):
        self.tag, self.colspan, self.rowspan, self.content, self.children = tag, colspan, rowspan, content, []


def _tokens(element, out):
    """A cell's tokens: tags as ``<x>``/``</x>``, text character by character, a nested tag's tail after it."""
    out.append(f"<{element.tag}>")
    if element.text is not None:
        out.extend(element.text)
    for child in element:
        _tokens(child, out)
    if element.tag != "unk":
        out.append(f"</{element.tag}>")
    if element.tag != "td" and element.tail is not None:
        out.extend(element.tail)


def _tree(element, structure_only):
    """The APTED tree of ``element``: a cell is a leaf (its inner tags are content), the rest keep their children."""
    if element.tag == "td":
        content = []
        if not structure_only:
            _tokens(element, content)
            content = content[1:-1]  # the cell's own <td> and </td>
        return _Node("td", int(element.attrib.get("colspan", "1")), int(element.attrib.get("rowspan", "1")),
                     content)
    node = _Node(element.tag)
    node.children = [_tree(child, structure_only) for child in element]
    return node


def _rename(a, b):
    if a.tag != b.tag or a.colspan != b.colspan or a.rowspan != b.rowspan:
        return 1.0
    if a.tag == "td" and (a.content or b.content):
        return Levenshtein.distance(a.content, b.content) / max(len(a.content), len(b.content))
    return 0.0


def _table(markup):
    parser = lxml_html.HTMLParser(remove_comments=True, encoding="utf-8")
    tables = lxml_html.fromstring(markup, parser=parser).xpath("body/table")
    return tables[0] if tables else None


def teds(pred, gt, structure_only=False):
    """Similarity in [0, 1] of two table strings (normally ``normalise_table``'s output)."""
    if not pred or not gt:
        return 0.0
    try:
        pred_table, gt_table = _table(pred), _table(gt)
        if pred_table is None or gt_table is None:
            return 0.0
        nodes = max(len(pred_table.xpath(".//*")), len(gt_table.xpath(".//*")))
        config = Config()
        config.rename = _rename
        distance = APTED(_tree(pred_table, structure_only), _tree(gt_table, structure_only),
                         config).compute_edit_distance()
        return 1.0 - float(distance) / nodes
    except (ValueError, ZeroDivisionError, RecursionError, LxmlError):  # the evaluator scores any failure 0
        return 0.0
