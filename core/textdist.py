"""Character-level edit distances shared by the metric plugins.

Both functions work on Python code points with unit costs (insert, delete,
substitute; no transpositions) and apply no normalisation at all, as Fox and
OmniDocBench do (docs/metrics.md §1.3, §2.1, §6.6). The distance is rapidfuzz's
C implementation, which has no input-length limit (docs/metrics.md §6.3, §7).
"""
from rapidfuzz.distance import Levenshtein


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance between two strings (code points, unit costs)."""
    return Levenshtein.distance(a, b)


def ned(a: str, b: str) -> float | None:
    """Normalised edit distance ``levenshtein(a, b) / max(len(a), len(b))``.

    Returns None when both strings are empty (0/0: undefined; callers exclude
    such samples, docs/metrics.md §1.7, §2.1). One empty side gives 1.0.
    """
    upper = max(len(a), len(b))
    if upper == 0:
        return None
    return Levenshtein.distance(a, b) / upper
