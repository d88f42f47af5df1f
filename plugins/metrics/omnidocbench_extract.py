"""Cut a predicted markdown page into typed pieces, as OmniDocBench's ``md_tex_filter`` does.

docs/metrics-omnidocbench.md, "Step 1", lists each step with the official file:line
(``utils/extract.py:111-392``, ``utils/data_preprocess.py:11-22``, ``utils/table_utils.py:76-240``).

A piece is a dict: ``kind`` (``text_all``, ``equation_isolated``, ``html_table``, ``latex_table``),
``start`` (its position: what the evaluator sorts on and reports as reading order), ``content``
and ``fine`` (the finer type, or None). Positions are reproduced with the evaluator's own drift:
a paragraph's start counts the paragraphs before it but not the blank lines between them, and a
page whose pipe tables are converted to HTML gets later positions in the converted text. Both
decide the order of the pieces and so which are merged as consecutive and the reading order.
"""
import re

_IMAGE = re.compile(r"!\[.*?\]\(.*?\)")
_FENCES = tuple(re.compile(p, re.MULTILINE) for p in (r"^```markdown\n?", r"^```html\n?", r"^```latex\n?",
                                                       r"```\n?$"))
_LATEX_TABLE = re.compile(r"\\begin{table}(.*?)\\end{table}", re.DOTALL)
_TABULAR = (re.compile(r"\\begin{tabular}"), re.compile(r"\\end{tabular}"))
_HTML_TABLE = (re.compile(r"<table(?:[^>]*)>"), re.compile(r"</table>"))
# The evaluator's begin/end patterns as written in its source; their lengths (16/13 and 16/8) set
# how far its scan jumps, so they are kept as numbers here.
_JUMPS = {_TABULAR: (16, 13), _HTML_TABLE: (16, 8)}
_MATHS = re.compile(r"\$\$(.*?)\$\$|\\\[(.*?)\\\]|\$(.*?)\$|\\\((.*?)\\\)", re.DOTALL)
_DOLLARS = re.compile(r"\$\$(.*?)\$\$|\$(.*?)\$|\\\((.*?)\\\)", re.DOTALL)
_PIPE_ROW = re.compile(r"\|\s*.*?\s*\|\n", re.DOTALL)
_ANY_HTML_TABLE = re.compile(r"(<table.*?</table>)", re.DOTALL)
_CODE = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
_UNWRAP = ((re.compile(r"\\title\{(.*?)\}"), r"\1"),
           (re.compile(r"\\title\s*\{\s*(.*?)\s*\}", re.DOTALL), r"\1"),
           (re.compile(r"\\text\s*\{\s*(.*?)\s*\}", re.DOTALL), r"\1"),
           (re.compile(r"\\section\*?\{(.*?)\}"), r"\1"),
           (re.compile(r"\\section\*?\{\s*(.*?)\s*\}", re.DOTALL), r"\1"))


def _piece(kind, start, content, fine=None):
    return {"kind": kind, "start": start, "content": content, "fine": fine}


def _blank(text, start, end):
    """Replace a cut-out span by spaces, so every later position still points at the same place."""
    return text[:start] + " " * (end - start) + text[end:]


def nested_spans(text, patterns):
    """Outermost begin/end spans, as the evaluator's stack scan finds them (``extract.py:18-56``, ``:483-521``).

    After a begin it jumps ahead by the *end* pattern's source length, and an unclosed begin makes it
    rescan from that begin plus the begin pattern's source length; both are kept, since they decide
    which nested or broken tables are found.
    """
    begin, end = patterns
    begin_jump, end_jump = _JUMPS[patterns]
    spans, stack, pos = [], [], 0
    while pos < len(text):
        b, e = begin.search(text, pos), end.search(text, pos)
        if not b and not e:
            break
        if b and (not e or b.start() < e.start()):
            stack.append(b.start())
            pos = b.start() + end_jump
        else:
            if stack:
                start = stack.pop()
                if not stack:
                    spans.append((start, e.start() + end_jump))
            pos = e.start() + end_jump
    if stack:
        offset = stack[0] + begin_jump
        spans += [(s + offset, t + offset) for s, t in nested_spans(text[offset:], patterns)]
    return spans


def _latex_tables(text):
    spans = [(m.start(), m.end()) for m in _LATEX_TABLE.finditer(text)]
    for s, t in spans:
        text = _blank(text, s, t)
    return sorted(spans + nested_spans(text, _TABULAR), key=lambda span: span[0])


def _row_table(row):
    """One pipe-table match as the evaluator's converter writes it (``table_utils.py:76-95``).

    Its pattern matches one row at a time, so each row becomes a table of its own whose header is
    that row; only a multi-line match has body rows, and its second line is skipped as a separator.
    """
    lines = [line.strip() for line in row.strip().split("\n")]
    out = "<table>\n  <thead>\n    <tr>\n"
    out += "".join(f"      <th>{cell.strip()}</th>\n" for cell in lines[0].split("|")[1:-1])
    out += "    </tr>\n  </thead>\n  <tbody>\n"
    for line in lines[2:]:
        out += "    <tr>\n" + "".join(f"      <td>{cell.strip()}</td>\n" for cell in line.split("|")[1:-1])
        out += "    </tr>\n"
    return out + "  </tbody>\n</table>\n"


def _merge_tables(block):
    """Join the one-row tables of a block into one table (``table_utils.py:139-160``)."""
    block = re.sub(r"<!--[\s\S]*?-->", "", block)
    rows = []
    for table in re.findall(r"<table>[\s\S]*?</table>", block):
        lines = [line.replace("<th>", "<td>").replace("</th>", "</td>") if "<th>" in line else line
                 for line in table.split("\n")]
        kept = [line for line in lines if not re.search(r"</?t(able|head|body)>", line)]
        if len(kept) > 2:  # a row with at least one cell line
            rows.extend(kept)
    return "\n\n" + "<table>\n{}\n</table>".format("\n".join(rows)) + "\n\n"


def _is_rule(line):
    """The converter's separator test: any ':' or '---' (so cells holding ':' are lost too)."""
    return ":" in line or "---" in line


def _join_table_lines(text):
    """Group the lines of consecutive one-row tables into blocks (``table_utils.py:162-215``).

    The scan looks one line behind: the line just before a table goes into the block (and so is
    lost from the page), separator-like and ``</thead>`` lines are dropped, and the page gains a
    leading newline and loses its final one.
    """
    out, block, in_block, last = [], "", False, ""
    for line in text.split("\n"):
        if "<table>" in line:
            in_block = True
            block += last
        elif in_block:
            if not _is_rule(last) and "</thead>" not in last:
                block += "\n" + last
            if "</table>" in last:
                in_block = False
                out.append(_merge_tables(block))
                block = ""
        else:
            out.append(last)
        last = line
    if last:
        if in_block or "</table>" in last:
            out.append(_merge_tables(block + "\n" + last))
        else:
            out.append(last)
    return "\n".join(out)


def pipe_tables_to_html(text):
    """The evaluator's markdown-table converter over a whole page (``table_utils.py:226-240``)."""
    text = text.replace("\r", "") + "\n"
    for row in _PIPE_ROW.findall(text):
        text = text.replace(row, _row_table(row), 1)
    text = _join_table_lines(text)
    return text.replace("<table>", '<table border="1" >').replace("<td>", '<td colspan="1" rowspan="1">')


def _maths(text, pieces):
    """Display and inline maths (``extract.py:201-255``); returns the text with display maths blanked."""
    out = text
    for match in _MATHS.finditer(text):
        found = match.group(0)
        if not found:
            continue
        line = " ".join(found.strip().split("\n"))
        inner = _DOLLARS.search(line)
        if inner is None:  # \[...\] without dollars inside
            out = _blank(out, match.start(), match.end())
            pieces.append(_piece("equation_isolated", match.start(), line))
        elif inner.group(1):  # $$...$$: every dollar pair rewritten as \[...\]
            out = _blank(out, match.start(), match.end())
            pieces.append(_piece("equation_isolated", match.start(), _DOLLARS.sub(r"\\[\1\\]", line)))
        else:  # $...$ or \(...\): stays in the text AND becomes an inline-maths piece
            pieces.append(_piece("equation_isolated", match.start(), _DOLLARS.sub(r"\\[\2\3\\]", line),
                                 "equation_inline"))
    return out


def _paragraphs(text, pieces):
    """Split what is left into paragraphs (``extract.py:335-382``)."""
    parts = text.split("\n\n")
    if len(parts) == 1:
        parts = text.split("\n")
    start = 0
    for part in parts:
        here = start
        start += len(part)  # the separators are not counted: positions drift, as in the evaluator
        para = "\n".join(line.strip() for line in part.strip().strip("\n").split("\n") if line.strip())
        if not para:
            continue
        if para.startswith("<table") and para.endswith("</table>"):
            pieces.append(_piece("html_table", here, para))
        elif para.startswith("$") and para.endswith("$"):
            if para.replace("$", "").strip():
                pieces.append(_piece("equation_isolated", here, para.strip()))
        else:
            pieces.append(_piece("text_all", here, para, "text_block"))


def split_page(markdown):
    """The typed pieces of one predicted page, grouped by kind in order of first appearance."""
    text = _IMAGE.sub("", markdown)
    for fence in _FENCES:
        text = fence.sub("", text)
    text = re.sub(r"_{4,}", "____", text)
    text = re.sub(r" {4,}", "    ", text)
    for tag in ("<html>", "</html>", "<body>", "</body>"):
        text = text.replace(tag, "")
    pieces = []
    for kind, spans in (("latex_table", _latex_tables), ("html_table", lambda t: nested_spans(t, _HTML_TABLE))):
        for start, end in spans(text):
            pieces.append(_piece(kind, start, text[start:end]))
            text = _blank(text, start, end)
    text = _maths(text, pieces)
    if len(_PIPE_ROW.findall(text + "\n")) >= 2:
        text = pipe_tables_to_html(text)
        converted = text
        for match in _ANY_HTML_TABLE.finditer(converted):
            text = _blank(text, match.start(), match.end())
            pieces.append(_piece("html_table", match.start(), match.group(0).strip(), "md2html_table"))
    code_source = text
    for match in _CODE.finditer(code_source):
        text = _blank(text, match.start(), match.end())
        pieces.append(_piece("text_all", match.start(), match.group(2).strip(), "code"))
    for pattern, repl in _UNWRAP:
        text = pattern.sub(repl, text)
    _paragraphs(text, pieces)
    pieces.sort(key=lambda p: p["start"])  # stable, as the evaluator's sort
    grouped = {}
    for piece in pieces:
        grouped.setdefault(piece["kind"], []).append(piece)
    return grouped
