"""The OmniDocBench pipeline's parts against the official functions' outputs.

Each expected value below is what the official function returned on the same input (OmniDocBench
commit 7bd6c2e, pylatexenc 3.0a30, beautifulsoup4 4.11.1): ``utils/extract.py`` ``md_tex_filter`` /
``extract_html_table``, ``utils/table_utils.py`` ``convert_markdown_to_html``,
``utils/data_preprocess.py`` ``normalized_table`` / ``normalized_formula`` / ``textblock2unicode`` /
``clean_string``, the cell strings of ``utils/match.py:244-245`` and ``utils/match_quick.py``
``match_gt2pred_quick`` (the last two tests).
"""
import pytest

from plugins.metrics.omnidocbench_extract import _HTML_TABLE, nested_spans, pipe_tables_to_html, split_page
from plugins.metrics.omnidocbench_html import cell_strings, normalise_table
from plugins.metrics.omnidocbench_match import quick_match
from plugins.metrics.omnidocbench_normalise import normalise_formula, normalise_text, textblock2unicode


def _pieces(markdown):
    return [(kind, [(p["start"], p["content"], p["fine"]) for p in group])
            for kind, group in split_page(markdown).items()]


def test_split_page_typed_pieces():
    page = ("![fig](a.png)\n```markdown\n# Title\n\nSome text with $x^2$ inline.\n\n$$\na+b\n$$\n\n"
            "<table><tr><td>1</td></tr></table>\n\nLast \\[ y \\] line.\n```")
    # Image and fences gone; the table and both display formulas cut out (blanks left in the text);
    # the inline $x^2$ stays in its paragraph and is also a piece of its own. Paragraph positions
    # drift (0, 8, 79): blank lines between paragraphs are not counted.
    assert _pieces(page) == [
        ("text_all", [(0, "# Title", "text_block"), (8, "Some text with $x^2$ inline.", "text_block"),
                      (79, "Last         line.", "text_block")]),
        ("equation_isolated", [(25, "\\[x^2\\]", "equation_inline"), (40, "\\[ a+b \\]", None),
                               (92, "\\[ y \\]", None)]),
        ("html_table", [(51, "<table><tr><td>1</td></tr></table>", None)])]


def test_pipe_tables():
    md = "Intro line\n| a | b: c |\n|---|---|\n| 1 | 2 |\nAfter"
    # The converter loses the line before the table and every row line holding ':' (the cell "b: c").
    table = ('<table border="1" >\n    <tr>\n      <td colspan="1" rowspan="1">a</td>\n    </tr>\n    <tr>\n'
             '      <td colspan="1" rowspan="1">1</td>\n      <td colspan="1" rowspan="1">2</td>\n    </tr>\n</table>')
    assert pipe_tables_to_html(md) == "\n\n\n" + table + "\n\n\nAfter"
    assert _pieces(md) == [("html_table", [(3, table, "md2html_table")]), ("text_all", [(190, "After", "text_block")])]


def test_nested_html_tables():
    # Outermost table only; an unclosed "<table>" is no table.
    text = "x<table><tr><td><table><tr><td>in</td></tr></table></td></tr></table>y<table>open"
    assert nested_spans(text, _HTML_TABLE) == [(1, 69)]


TABLE = ('<table class="x  y"><thead><tr><th rowspan="2" colspan="1" style="a">A &amp; B</th></tr></thead><tbody>'
         '<tr><td><span>x</span><sup>2</sup></td><td>\n  \n</td><td><math alttext="\\alpha"><mi>a</mi></math></td>'
         '</tr></tbody></table>')


def test_normalise_table():
    # th as td, attributes sorted, style/class dropped, thead/tbody/span/sup gone, math as $alttext$,
    # entities decoded, whitespace-only text collapsed.
    assert normalise_table(TABLE) == ('<html><body><table border="1" ><tr><td colspan="1" rowspan="2">A & B</td></tr>'
                                      '<tr><td>x2</td><td></td><td>$\\alpha$</td></tr></table></body></html>')
    assert normalise_table("no table here") == ""


def test_cell_strings():
    more = '<table><tr><td> $\\cdot$5 </td><td>a<br>b</td><td><b>bold</b></td></tr></table>'
    # Only single-string <td> cells (a lone child tag counts through its own string); th cells never.
    assert cell_strings(TABLE + more) == ["", "a", "5", "bold"]


@pytest.mark.parametrize("latex, expected", [
    ("\\[ E = m c^{2} \\tag{3} \\]", "e=mc^{2}"),
    ("$$\\mathbf{x}\\mathbfcal{A} \\quad \\text{if}\\ x$$", "{x}cal{a}{if}\\x"),
    ("\\begin{array}{l} a \\\\ b \\end{array}.", "{l}a\\\\b"),
    ("\\hspace{1cm}\\left( x \\right)", "(x)"),
])
def test_normalise_formula(latex, expected):
    assert normalise_formula(latex) == expected


@pytest.mark.parametrize("text, rendered, normalised", [
    ("see $\\alpha^2$ and \\(x_{1}\\), costs $5", "see \u03b1^2 and x_1, costs $5", "see\u03b12andx_1costs5"),
    # pylatexenc 3.0a30 on broken LaTeX (2.x gives other strings here)
    ("broken $\\frac{1}{2$ and $\\ge\u4e2d 0$", "broken 1/ and \u2265\u4e2d 0", "broken1and\u4e2d0"),
    ("$\\\\_ok$ $a\\_b$", "_ok $a\\_b$", "_oka_b"),
])
def test_inline_maths(text, rendered, normalised):
    assert textblock2unicode(text) == rendered
    assert normalise_text(text) == normalised


def _gt(order, text, category="text_block"):
    return {"category_type": category, "order": order, "text": text}


def _text(start, content):
    return {"kind": "text_all", "start": start, "content": content, "fine": "text_block"}


def test_undo_above_0_7_then_leftover_pair():
    # The Hungarian pair (B, X) costs > 0.7: undone; with nothing else left, the leftover pass pairs it again.
    entries = quick_match([_gt(1, "alpha beta gamma"), _gt(2, "delta epsilon")],
                          [_text(0, "alpha beta gamma"), _text(20, "zzzz qqqq wwww")])
    assert [(e["norm_gt"], e["norm_pred"]) for e in entries] == [("alphabetagamma", "alphabetagamma"),
                                                                ("deltaepsilon", "zzzzqqqqwwww")]


def test_fuzzy_attach():
    # Two GT blocks written as one predicted paragraph: the unmatched block is a substring of it and is attached.
    entries = quick_match([_gt(1, "first block of text here"), _gt(2, "second block")],
                          [_text(0, "first block of text here second block")])
    assert [(e["norm_gt"], e["norm_pred"]) for e in entries] == [("firstblockoftexthere" "secondblock",
                                                                 "firstblockoftexthere" "secondblock")]
