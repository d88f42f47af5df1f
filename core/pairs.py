"""Prediction/ground-truth pairs as the scorers read them: the ground-truth string that carries its page,
vlmkit's JSONL files (``{"id": ..., "text": ...}`` per line), pairing by id, and the stderr note about ids
without a partner. ``python -m core.metrics`` and the ``metric_input`` plugins share them."""
import sys

from core.errors import ConfigError
from core.jsonfiles import jsonl_records
from core.sources import sample_id

SHOW_IDS = 5


class GroundTruth(str):
    """A sample's ground-truth text that also carries its metadata (``meta``: the sample's ``json`` member,
    or what a metric_input reader attaches), for metrics that score more than the text: plain-text
    metrics see the string, a structured one (OmniDocBench's block matching) reads ``meta``."""

    def __new__(cls, text, meta=None):
        obj = super().__new__(cls, text)
        obj.meta = meta
        return obj


def read_jsonl(path, allow_page=False):
    """Return ``{str(id): (id, text, page)}`` in file order (page None unless ``allow_page`` and given)."""
    out = {}
    for n, item in jsonl_records(path):
        where = f"{path}:{n}"
        if "id" not in item or not isinstance(item.get("text"), str):
            raise ConfigError(f'{where}: expected an object {{"id": ..., "text": "..."}}')
        sid = item["id"]
        sample_id(sid, where)
        if str(sid) in out:
            raise ConfigError(f"{where}: duplicate id {sid!r}")
        page = item.get("page") if allow_page else None
        if page is not None and (isinstance(page, bool) or not isinstance(page, (str, int))):
            raise ConfigError(f"{where}: page must be a string or an integer, not {page!r}")
        out[str(sid)] = (sid, item["text"], page)
    return out


def report(ids, message):
    """One stderr line: how many ``ids`` and the first few."""
    if ids:
        shown = ", ".join(ids[:SHOW_IDS]) + (", ..." if len(ids) > SHOW_IDS else "")
        print(f"warning: {len(ids)} {message}: {shown}", file=sys.stderr)


def pair_up(gt, pred):
    """``gt`` {key: (id, text, page)} and ``pred`` {key: (id, text, page)} -> [(id, pred, gt, page)] in gt
    order; a missing prediction is "" and reported, a prediction without ground truth is reported and ignored.
    No prediction matching any ground-truth id is an error: the ids are surely written differently."""
    if gt and not any(key in gt for key in pred):
        shown = next(iter(pred), None)
        raise ConfigError(f"no prediction id matches a ground-truth id (ground truth ids look like "
                          f"{next(iter(gt))!r}, predictions {'like ' + repr(shown) if shown else 'are none'})")
    report([k for k in gt if k not in pred], 'ground-truth ids have no prediction (scored as empty string "")')
    report([k for k in pred if k not in gt], "prediction ids are not in the ground truth (ignored)")
    return [(sid, pred[key][1] if key in pred else "", text, page) for key, (sid, text, page) in gt.items()]
