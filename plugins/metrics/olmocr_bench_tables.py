"""Tables of a page as olmOCR-Bench's ``table`` test reads them (docs/metrics-olmocr-bench.md, "table").

Each table becomes a grid: a cell sits at the (row, column) where it starts, spans cover the grid
squares to their right and below, and a cell's neighbours up, down, left and right are the first
other cells met walking that way from each square of its span. ``left_heading`` and
``top_heading`` walk left or up as far as the table goes and answer the heading cells met (a
``<th>``, a cell inside ``<thead>``, or, in a markdown table, the first row and column), or the
cells where the walk ends when it meets none. Markdown tables are runs of lines holding ``|``;
HTML tables are read through the same tree BeautifulSoup's ``html.parser`` builds
(``omnidocbench_html.parse``), nested tables and all.
"""
from plugins.metrics.omnidocbench_html import Comment, Node, parse

STEPS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


class Table:
    """``text``: {(row, col): cell text}; ``related(cell, key)``: the cells up/down/left/right or the headings."""

    def __init__(self, text, spans, headings, grid):
        self.text, self.spans, self.headings, self.grid = text, spans, headings, grid
        self.neighbours = {key: {cell: self._walk(cell, *step) for cell in text} for key, step in STEPS.items()}

    def _walk(self, cell, d_row, d_col):
        """The first other cell met from each grid square of ``cell``'s span, stepping (d_row, d_col)."""
        (row, col), (rows, cols) = cell, self.spans[cell]
        height, width = len(self.grid), len(self.grid[0])
        if d_row:
            starts = [(row + rows - 1 if d_row > 0 else row, c) for c in range(col, col + cols)]
        else:
            starts = [(r, col + cols - 1 if d_col > 0 else col) for r in range(row, row + rows)]
        found = set()
        for r, c in starts:
            r, c = r + d_row, c + d_col
            while 0 <= r < height and 0 <= c < width:
                other = self.grid[r][c]
                if other is not None and other != cell:
                    found.add(other)
                    break
                r, c = r + d_row, c + d_col
        return found

    def related(self, cell, key):
        if key in STEPS:
            return self.neighbours[key][cell]
        direction = self.neighbours["left" if key == "left_heading" else "up"]
        headings, ends, seen, todo = set(), set(), set(), {cell}
        while todo:
            current = todo.pop()
            seen.add(current)
            if current in self.headings:
                headings.add(current)
            if direction.get(current):
                todo |= direction[current]
            else:
                ends.add(current)
        return (headings - {cell}) or (ends - {cell})


def build(rows):
    """A Table from rows of (text, rowspan, colspan, heading), placed as HTML places them; None if it has no cell."""
    text, spans, headings, grid, pending = {}, {}, set(), [], []  # pending[col]: (cell, rows still to cover)
    for r, cells in enumerate(rows):
        line, col, queue = [], 0, list(cells)
        while queue or col < len(pending):
            if col < len(pending) and pending[col] is not None:  # covered by a rowspan from above
                cell, left = pending[col]
                line.append(cell)
                pending[col] = (cell, left - 1) if left > 1 else None
                col += 1
            elif not queue:
                line.append(None)
                col += 1
            else:
                value, rowspan, colspan, heading = queue.pop(0)
                cell = (r, col)
                text[cell], spans[cell] = value, (rowspan, colspan)
                if heading:
                    headings.add(cell)
                pending += [None] * (col + colspan - len(pending))
                for c in range(col, col + colspan):
                    line.append(cell)
                    pending[c] = (cell, rowspan - 1) if rowspan > 1 else None
                col += colspan
        grid.append(line)
    while any(p is not None for p in pending):  # rowspans running past the last row add rows
        grid.append([p[0] if p is not None else None for p in pending])
        pending = [(p[0], p[1] - 1) if p is not None and p[1] > 1 else None for p in pending]
    filled = [c for line in grid for c, v in enumerate(line) if v is not None]
    if not text or not filled:
        return None
    width = max(filled) + 1
    grid = [(line + [None] * width)[:width] for line in grid]
    return Table(text, spans, headings, grid)


def _markdown_rows(lines):
    """A run of ``|`` lines -> rows of cell texts: the first separator line and formatting-only lines dropped."""
    separator = next((i for i, line in enumerate(lines) if line.replace("|", "").strip()
                      and all(c in "- :" for c in line.replace("|", "").strip())), None)
    rows = []
    for i, line in enumerate(lines):
        if i == separator or (line.strip() and all(c in "- :|" for c in line)):
            continue
        cells = [c.strip() for c in line.split("|")]
        if cells and cells[0] == "":
            cells = cells[1:]
        if cells and cells[-1] == "":
            cells = cells[:-1]
        if cells:
            rows.append(cells)
    return rows


def markdown_tables(page):
    """The markdown tables of ``page``: runs of two or more lines holding ``|``; first row and column are headings."""
    runs, run = [], []
    for line in page.strip().split("\n") + [""]:  # the empty line ends a run at the end of the page
        if "|" in line:
            run.append(line)
        else:
            if len(run) >= 2:
                runs.append(run)
            run = []
    tables = []
    for lines in runs:
        rows = _markdown_rows(lines)
        table = build([[(t, 1, 1, r == 0 or c == 0) for c, t in enumerate(row)] for r, row in enumerate(rows)])
        if table:
            tables.append(table)
    return tables


def _span(value):
    """A rowspan/colspan attribute as a positive integer; anything else is 1."""
    try:
        span = int(value)
    except (TypeError, ValueError):
        return 1
    return span if span > 0 else 1


def _descendants(node, name):
    for child in node.children:
        if isinstance(child, Node):
            if child.name in name:
                yield child
            yield from _descendants(child, name)


def _text(node):
    """``get_text("")`` with each ``<br>`` read as a newline; comments and script/style/template text are not text."""
    out = []
    for child in node.children:
        if isinstance(child, Comment) or getattr(child, "name", None) in ("script", "style", "template"):
            continue
        if isinstance(child, str):
            out.append(child)
        else:
            out.append("\n" if child.name == "br" else _text(child))
    return "".join(out)


def _in_thead(node):
    parent = node.parent
    while parent is not None:
        if parent.name == "thead":
            return True
        parent = parent.parent
    return False


def html_tables(page):
    """The HTML tables of ``page``, nested ones too, each with every ``<tr>`` inside it (nested ones included)."""
    tables = []
    for table in _descendants(parse(page), ("table",)):
        rows = list(_descendants(table, ("tr",)))
        specs = []
        for r, tr in enumerate(rows):
            heading = _in_thead(tr)
            cells = [c for c in tr.children if isinstance(c, Node) and c.name in ("td", "th")]
            specs.append([(_text(c).strip(), len(rows) - r if c.attrs.get("rowspan", "").strip() == "0"
                           else _span(c.attrs.get("rowspan")), _span(c.attrs.get("colspan")),
                           c.name == "th" or heading) for c in cells])
        table = build(specs) if rows else None
        if table:
            tables.append(table)
    return tables
