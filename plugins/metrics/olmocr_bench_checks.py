"""olmOCR-Bench's unit tests on one page of markdown (docs/metrics-olmocr-bench.md, "Test kinds").

``load_test(record, where)`` checks a test line of the benchmark's JSONL and normalises its
strings once, as the benchmark does when it loads them; ``run_test(test, markdown)`` returns
True or False, or None for a ``math`` test (it needs KaTeX in a headless browser, which vlmkit
does not drive: reported as not run). Fuzzy matching is rapidfuzz's, as in the benchmark; the
``order`` test's approximate search is the ``fuzzysearch`` package's (the ``olmocr_bench`` extra).
"""
import re
import unicodedata

from rapidfuzz import fuzz

from core.errors import ConfigError

try:
    from fuzzysearch import find_near_matches
except ImportError:  # the olmocr_bench extra is not installed: order tests cannot run
    find_near_matches = None
from core.repetition import tail_repeats
from plugins.metrics.olmocr_bench_tables import html_tables, markdown_tables

KINDS = ("baseline", "present", "absent", "order", "table", "math", "format", "footnote")
COMMON = {"pdf": str, "page": int, "id": str, "type": str, "max_diffs": int, "checked": (str, type(None)),
          "url": (str, type(None))}
FIELDS = {  # per kind: its own keys, their types and defaults (None: required)
    "present": {"text": (str, None), "case_sensitive": (bool, True), "first_n": (int, 0), "last_n": (int, 0)},
    "order": {"before": (str, None), "after": (str, None)},
    "table": {"cell": (str, None), **{k: (str, "") for k in ("up", "down", "left", "right", "top_heading",
                                                             "left_heading")}, "ignore_markdown_tables": (bool, False)},
    "math": {"math": (str, None), "ignore_dollar_delimited": (bool, False)},
    "baseline": {"max_length": (int, None), "max_length_skips_image_alt_tags": (bool, False),
                 "max_repeats": (int, 30), "check_disallowed_characters": (bool, True)},
    "format": {"text": (str, None), "format": (str, None), "case_sensitive": (bool, True)},
    "footnote": {"marker": (str, None), "appears_before_marker": (str, ""), "appears_after_marker": (str, "")},
}
FIELDS["absent"] = FIELDS["present"]
OPTIONAL_NONE = {("baseline", "max_length"), ("present", "first_n"), ("present", "last_n")}
FOLD = str.maketrans({"‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"', "＿": "_", "–": "-", "—": "-",
                      "‑": "-", "‒": "-", "−": "-", "\u00b5": "\u03bc"})
DISALLOWED = re.compile("[\u4e00-\u9fff\u3040-\u309f\u30a0-\u30ff\U0001f600-\U0001f64f\U0001f300-\U0001f5ff"
                        "\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff]")
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def normalise(text):
    """The benchmark's text normalisation: markup and whitespace out, quotes and dashes folded, NFC."""
    text = re.sub(r"<br/?>", " ", text)
    text = re.sub(r"\*\*(.*?)\*\*", r"\1", text)
    text = re.sub(r"__(.*?)__", r"\1", text)
    text = re.sub(r"</?b>", "", text)  # two passes: removing one tag can make another
    text = re.sub(r"</?i>", "", text)
    text = re.sub(r"(\*\*|__)(.*?)\1", r"\2", text)
    text = re.sub(r"(\*|_)(.*?)\1", r"\2", text)
    text = unicodedata.normalize("NFC", re.sub(r"\s+", " ", text))
    return text.translate(FOLD)


def _typed(record, key, types, where):
    value = record[key]
    if isinstance(value, bool) and types in (int, float):
        raise ConfigError(f"{where}: {key} must be {types.__name__}, not {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    return value


def load_test(record, where):
    """A test dict with its fields checked and its strings normalised; ConfigError where the benchmark refuses it."""
    if not isinstance(record, dict) or record.get("type") not in KINDS:
        raise ConfigError(f"{where}: expected a test object with type one of {', '.join(KINDS)}")
    kind = record["type"]
    fields = FIELDS[kind]
    unknown = set(record) - set(COMMON) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} for a {kind} test")
    test = {"max_diffs": 0}
    for key, types in COMMON.items():
        if key in record:
            test[key] = _typed(record, key, types, where)
    for key in ("pdf", "id", "page"):
        if not test.get(key) and test.get(key) != 0:
            raise ConfigError(f"{where}: {key} is required and may not be empty")
    if test["max_diffs"] < 0:
        raise ConfigError(f"{where}: max_diffs must be 0 or more")
    for key, (types, default) in fields.items():
        if key in record and not (record[key] is None and (kind, key) in OPTIONAL_NONE):
            test[key] = _typed(record, key, types, where)
        elif default is None and (kind, key) not in OPTIONAL_NONE:
            raise ConfigError(f"{where}: {key} is required for a {kind} test")
        else:
            test[key] = default
    return _normalised(test, where)


def _normalised(test, where):
    kind = test["type"]
    names = {"present": ("text",), "absent": ("text",), "format": ("text",), "order": ("before", "after"),
             "table": tuple(FIELDS["table"])[:-1], "footnote": ("appears_before_marker", "appears_after_marker")}
    for key in names.get(kind, ()):
        given = test[key]
        test[key] = normalise(given)
        if (key in ("text", "before", "after") or given) and not test[key].strip() and kind != "table":
            raise ConfigError(f"{where}: {key} is empty after normalisation")
    if kind == "order" and find_near_matches is None:
        raise ConfigError(f"{where}: an order test needs the fuzzysearch package: pip install 'vlmkit[olmocr-bench]'")
    if kind == "order" and test["max_diffs"] > min(len(test["before"]), len(test["after"])) // 2:
        raise ConfigError(f"{where}: max_diffs is more than half of before or after")
    if kind == "format" and test["format"] not in ("heading", "bold", "italic"):
        raise ConfigError(f"{where}: format must be heading, bold or italic")
    if kind == "footnote" and (not test["marker"] or " " in test["marker"]):
        raise ConfigError(f"{where}: marker must be non-empty, without spaces")
    if kind == "math" and not test["math"].strip():
        raise ConfigError(f"{where}: math is empty")
    return test


def _threshold(test, text):
    return 1.0 - test["max_diffs"] / (len(text) or 1)


def _presence(test, page):
    query, page = test["text"], normalise(page)
    if not test["case_sensitive"]:
        query, page = query.lower(), page.lower()
    first, last = test["first_n"], test["last_n"]
    if first and last:
        page = page[:first] + page[-last:]
    elif first:
        page = page[:first]
    elif last:
        page = page[-last:]
    found = fuzz.partial_ratio(query, page) / 100.0 >= _threshold(test, query)
    return found if test["type"] == "present" else not found


def _order(test, page):
    page = normalise(page)
    before = find_near_matches(test["before"], page, max_l_dist=test["max_diffs"])
    after = find_near_matches(test["after"], page, max_l_dist=test["max_diffs"])
    return any(b.start < a.start for b in before for a in after)


def _close(wanted, texts, max_diffs):
    """Whether a cell text matches ``wanted``: rapidfuzz ratio at least max(0.5, 1 - max_diffs / len)."""
    bar = max(0.5, 1.0 - max_diffs / (len(wanted) or 1))
    return any(fuzz.ratio(wanted, normalise(t)) / 100.0 >= bar for t in texts)


def _table(test, page):
    tables = ([] if test["ignore_markdown_tables"] else markdown_tables(page)) + html_tables(page)
    relations = [(key, test[key]) for key in ("up", "down", "left", "right", "left_heading", "top_heading")
                 if test[key]]
    for table in tables:
        for cell, text in table.text.items():
            if not _close(test["cell"], [text], test["max_diffs"]):
                continue
            if all(_close(wanted, [table.text[c] for c in table.related(cell, key)], test["max_diffs"])
                   for key, wanted in relations):
                return True
    return False


def _baseline(test, page):
    alnum = len("".join(c for c in page if c.isalnum()).strip())
    if test["max_length"] is not None:  # a blank page: at most this many letters and digits
        if test["max_length_skips_image_alt_tags"]:
            alnum = len("".join(c for c in re.sub(r"!\[.*?\]\(.*?\)", "", page) if c.isalnum()).strip())
        return alnum <= test["max_length"]
    if alnum == 0 or any(n > test["max_repeats"] for n in tail_repeats(page)):
        return False
    return not (test["check_disallowed_characters"] and DISALLOWED.search(page))


TAG = re.IGNORECASE | re.DOTALL
FORMATS = {  # where the text of each format is, in the page as written (before normalisation)
    "heading": [(r"^#{1,6}\s+(.+?)$", re.MULTILINE), (r"<h[1-6][^>]*>(.*?)</h[1-6]>", TAG)],
    "bold": [(r"\*\*(.*?)\*\*", re.DOTALL), (r"__(.*?)__", re.DOTALL), (r"<b[^>]*>(.*?)</b>", TAG),
             (r"<strong[^>]*>(.*?)</strong>", TAG)],
    "italic": [(r"(?<!\*)\*(?!\*)(.*?)(?<!\*)\*(?!\*)", re.DOTALL), (r"(?<!_)_(?!_)(.*?)(?<!_)_(?!_)", re.DOTALL),
               (r"<i[^>]*>(.*?)</i>", TAG), (r"<em[^>]*>(.*?)</em>", TAG)],
}


def _format(test, page):
    found = [normalise(t) for pattern, flags in FORMATS[test["format"]] for t in re.findall(pattern, page, flags)]
    text = test["text"]
    if not test["case_sensitive"]:
        text, found = text.lower(), [t.lower() for t in found]
    return any(fuzz.partial_ratio(text, t) / 100.0 >= _threshold(test, text) for t in found)


def _letters(text):
    return "".join(c for c in normalise(text) if c.isalnum()).lower()


def _near_marker(test, page, spans, key):
    """Whether ``test[key]`` (letters and digits only) is next to one of the marker ``spans``: within the 200
    characters before (appears_before_marker) or after it, compared with twice its length at that end."""
    wanted, bar = _letters(test[key]), _threshold(test, test[key])
    for start, end in spans:
        near = _letters(page[max(0, start - 200):start] if key == "appears_before_marker" else page[end:end + 200])
        if not near:
            continue
        keep = min(len(near), 2 * len(wanted))
        if keep:
            near = near[-keep:] if key == "appears_before_marker" else near[:keep]
        if fuzz.partial_ratio(wanted, near) / 100.0 >= bar:
            return True
    return False


def _footnote(test, page):
    marker = re.escape(test["marker"])
    spans = [m.span() for m in re.finditer(rf"\[\^{marker}\](?!:)", page)]
    spans += [m.span() for m in re.finditer(rf"<sup[^>]*>{marker}</sup>", page, re.IGNORECASE)]
    if test["marker"].isdigit() and test["marker"].isascii():
        spans += [m.span() for m in re.finditer(re.escape(test["marker"].translate(SUPERSCRIPT)), page)]
    if not spans:
        return False
    return all(_near_marker(test, page, spans, key) for key in ("appears_before_marker", "appears_after_marker")
               if test[key])


def run_test(test, page):
    """True (pass), False (fail) or None (not run: math) for ``test`` on one reading of the page."""
    kind = test["type"]
    if kind == "math":
        return None
    run = {"present": _presence, "absent": _presence, "order": _order, "table": _table, "baseline": _baseline,
           "format": _format, "footnote": _footnote}[kind]
    return bool(run(test, page))
