"""OmniDocBench's string normalisations, rewritten for vlmkit (docs/metrics-omnidocbench.md, "Normalisation").

* ``normalise_text``: text on both sides, ``clean_string(textblock2unicode(t))``
  (official ``utils/data_preprocess.py:76-100``, ``:447-452``).
* ``normalise_formula``: display formulas on both sides (``data_preprocess.py:102-137``).
* ``latex_to_text``: pylatexenc's LaTeX -> text rendering, used for inline maths and for display formulas
  that end up in the text score (``dataset/end2end_dataset.py:197-215``).

The table normaliser lives in ``omnidocbench_html`` (it needs an HTML tree).
"""
import importlib.metadata
import re
import warnings

# Inline maths as the evaluator finds it: $...$ or \(...\), shortest match, no newline inside (no DOTALL).
_INLINE = re.compile(r"\$(.*?)\$|\\\((.*?)\\\)")
# Escapes deleted before the "does this look like LaTeX?" test.
_ESCAPE = re.compile(r"\\[\\_&%^]")
# clean_string's final filter: keep Unicode word characters and U+4E00-U+9FFF only.
_NOT_KEPT = re.compile(r"[^\w\u4e00-\u9fff]")
# clean_string's deletions, in its order (so "and/not" loses "/n").
_DELETED = ("\\t", "\\n", "\t", "\n", "/t", "/n")

# normalise_formula's literal deletions, in the evaluator's order: the order matters, "\mathbf" is
# deleted before "\mathbfcal" could be, and "\text" after "\textbf".
_FORMULA_DELETED = (
    "\\mathbf", "\\mathrm", "\\mathnormal", "\\mathit", "\\mathbb", "\\mathcal", "\\mathscr", "\\mathfrak",
    "\\mathsf", "\\mathtt", "\\textbf", "\\text", "\\boldmath", "\\boldsymbol", "\\operatorname", "\\bm",
    "\\symbfit", "\\mathbfcal", "\\symbf", "\\scriptscriptstyle", "\\notag", "\\setlength", "\\coloneqq",
    "\\space", "\\thickspace", "\\thinspace", "\\medspace", "\\nobreakspace", "\\negmedspace", "\\quad",
    "\\qquad", "\\enspace", "\\substackw", " ", "$$", "\\left", "\\right", "\\displaystyle", "\\text",
)
_DISPLAY_BODY = re.compile(r"\\\[(.+?)(?<!\\)\\\]")  # first \[...\] on one line, non-greedy
_FORMULA_PATTERNS = tuple(re.compile(p) for p in (
    r"\\tag\{.*?\}", r"\\hspace\{.*?\}", r"\\begin\{.*?\}", r"\\end\{.*?\}", r"\\arraycolsep.*?\}"))

EVALUATOR_PYLATEXENC = "3.0a30"  # the version OmniDocBench's requirements.txt pins
_RENDERER = []  # one pylatexenc LatexNodes2Text, made on first use


def latex_to_text(latex):
    """pylatexenc's ``LatexNodes2Text().latex_to_text`` (a vlmkit dependency since issue 11)."""
    if not _RENDERER:
        try:
            from pylatexenc.latex2text import LatexNodes2Text
        except ImportError as e:  # a dependency in pyproject.toml; say how to get it rather than a bare trace
            raise ImportError(f"the omnidocbench metric needs pylatexenc "
                              f"(pip install pylatexenc=={EVALUATOR_PYLATEXENC})") from e
        version = importlib.metadata.version("pylatexenc")
        if version != EVALUATOR_PYLATEXENC:  # 2.x parses malformed LaTeX differently: say so once, keep going
            warnings.warn(f"omnidocbench: pylatexenc {version} is installed, the official evaluator uses "
                          f"{EVALUATOR_PYLATEXENC}; inline maths with broken LaTeX may score differently", stacklevel=2)
        _RENDERER.append(LatexNodes2Text())
    return _RENDERER[0].latex_to_text(latex)


def textblock2unicode(text, render=None):
    """Replace each inline maths segment that looks like LaTeX by its text rendering.

    A segment "looks like LaTeX" when its content, with the escapes ``\\\\ \\_ \\& \\% \\^``
    deleted, still holds a backslash, ``^`` or ``_``. The rendering is of that cleaned content,
    stripped; a segment the renderer rejects is left as it is (the evaluator swallows the error).
    Other segments keep their ``$``, which ``clean_string`` drops later.
    """
    render = render or latex_to_text
    replacements = []
    for match in _INLINE.finditer(text):
        content = match.group(1) if match.group(1) is not None else match.group(2)
        cleaned = _ESCAPE.sub("", content)
        if not any(c in cleaned for c in "\\^_"):
            continue
        if cleaned.endswith("\\"):
            cleaned += " "  # a trailing backslash would otherwise escape the end of input
        try:
            rendered = render(cleaned)
        except Exception:  # the evaluator skips what pylatexenc cannot parse, whatever the error
            continue
        replacements.append((match.start(), match.end(), rendered.strip()))
    for start, end, rendered in reversed(replacements):
        text = text[:start] + rendered + text[end:]
    return text


def clean_string(text):
    """Drop the whitespace escapes, then every character but ``\\w`` and U+4E00-U+9FFF."""
    for seq in _DELETED:
        text = text.replace(seq, "")
    return _NOT_KEPT.sub("", text)


def normalise_text(text):
    """Text blocks, prediction and ground truth alike: ``clean_string(textblock2unicode(text))``."""
    return clean_string(textblock2unicode(text))


def normalise_formula(text):
    """Display formulas: strip delimiters and layout commands and spaces, lower-case.

    Punctuation and backslashes stay, so two formulas that render alike can still differ.
    """
    text = text.strip().strip("$").strip("\n")
    body = _DISPLAY_BODY.search(text)
    if body:
        text = body.group(1).strip()
    for pattern in _FORMULA_PATTERNS:
        text = pattern.sub("", text)
    text = text.strip(".")
    for literal in _FORMULA_DELETED:
        text = text.replace(literal, "")
    return text.lower()
