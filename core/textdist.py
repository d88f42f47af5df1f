"""Character-level edit distances shared by the metric plugins.

The functions work on Python code points with unit costs (insert, delete, substitute; no
transpositions) and apply no normalisation at all, as Fox and OmniDocBench do (docs/metrics.md
§1.3, §2.1, §6.6). The distance is rapidfuzz's C implementation, which has no input-length limit
(docs/metrics.md §6.3, §7).

Two empty strings (0/0) have no normalised edit distance. ``ned`` returns ``both_empty`` then:
None by default, so a score leaves the sample out (Fox as vlmkit defines it, OmniDocBench's
Edit_dist: docs/metrics.md §1.7, §2.1); a matching cost passes 0.0 (two empty strings are equal; the
OmniDocBench matcher drops empty lines before it compares any, so there this only keeps a cost numeric).
"""
from rapidfuzz.distance import Levenshtein


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance between two strings (code points, unit costs)."""
    return Levenshtein.distance(a, b)


def ned(a: str, b: str, both_empty: float | None = None) -> float | None:
    """Normalised edit distance ``levenshtein(a, b) / max(len(a), len(b))``; ``both_empty`` when
    both strings are empty (see the module doc). One empty side gives 1.0."""
    upper = max(len(a), len(b))
    if upper == 0:
        return both_empty
    return Levenshtein.distance(a, b) / upper


def window_ned(text: str, part: str) -> float | None:
    """How closely ``part`` occurs inside ``text``: the smallest NED of ``part`` against a window of
    ``text`` as long as ``part``. None when ``part`` is empty or longer than ``text``."""
    if not 0 < len(part) <= len(text):
        return None
    best = float("inf")
    for i in range(len(text) - len(part) + 1):
        best = min(best, Levenshtein.distance(text[i:i + len(part)], part) / len(part))
        if best == 0:
            break
    return best
