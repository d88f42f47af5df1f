"""Readers that turn other systems' files into ``(id, pred, gt, page)`` pairs for ``python -m core.metrics``.

Formats (``--format``):

* ``jsonl``: ``--gt`` and ``--pred`` hold one ``{"id": ..., "text": ...}`` per
  line; a ground-truth line may add ``"page"`` (string or integer) to group
  samples for page averages (``omnidocbench``'s ``odb_ALL_page_avg``).
* ``fox``: ``--pred`` is Fox's result JSON (metrics.md §1.1): a list of
  ``{"image", "question", "label", "answer"}`` where ``label`` is the ground
  truth and ``answer`` the model output; no ``--gt``. The id is ``image``, or
  ``image#index`` (index in the list) for an image that occurs more than once.
* ``omnidocbench``: ``--gt`` is OmniDocBench.json (§2.5), one sample per page,
  id and page = the image stem of ``page_info.image_path``. The ground truth is
  a ``PageGroundTruth``: the evaluator's GT text (§2.6, see
  ``omnidocbench_page_text``) that also carries the whole page (``odb_page``),
  which the ``omnidocbench`` metric matches block by block as the official
  evaluator does; plain-text metrics see the text. ``--pred`` is a folder of
  ``<image stem>.md`` files (``.mmd`` and the other names the evaluator tries
  are accepted too) or a JSONL file whose ids are stems. A page without a
  prediction is skipped, as the evaluator skips it, and reported on stderr.

With the other formats every ground-truth id is scored: a missing prediction is
reported on stderr and scored as "". Predictions with an unknown id are
reported and ignored. Bad input raises ConfigError with a one-line message
naming the file (and the line or item).
"""
import os
import sys
from collections import Counter
from pathlib import Path

from core.errors import ConfigError
from core.jsonfiles import jsonl_records, read_json

FORMATS = ("jsonl", "fox", "omnidocbench")
SHOW_IDS = 5
# §2.6: the categories whose text the evaluator scores, in the order it collects them.
TEXT_CATEGORIES = ("text_block", "title", "code_txt", "code_txt_caption", "reference")


class PageGroundTruth(str):
    """An OmniDocBench page's GT text that also carries the page (``odb_page``) and the reading (``corrected``)."""

    def __new__(cls, text, page, corrected=False):
        obj = super().__new__(cls, text)
        obj.odb_page, obj.corrected = page, corrected
        return obj


def load_pairs(fmt, pred_path, gt_path=None, corrected=False):
    """Read the files of format ``fmt`` and return a list of ``(id, pred, gt, page)`` (page may be None).

    ``corrected`` (omnidocbench only): the GT without the evaluator's bugs (docs/metrics-omnidocbench.md).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if corrected and fmt != "omnidocbench":
        raise ConfigError("--corrected only applies to --format omnidocbench")
    if fmt == "fox":
        if gt_path is not None:
            raise ConfigError("--gt is not used with --format fox: the result file holds label (GT) and answer")
        return read_fox_results(pred_path)
    if gt_path is None:
        raise ConfigError(f"--gt is required with --format {fmt}")
    if fmt == "omnidocbench":
        return _omnidocbench_pairs(pred_path, gt_path, corrected)
    gt = read_jsonl(gt_path, allow_page=True)
    pred = read_jsonl(pred_path)
    report([k for k in gt if k not in pred], 'ground-truth ids have no prediction (scored as empty string "")')
    report([k for k in pred if k not in gt], "prediction ids are not in the ground truth (ignored)")
    return [(sid, pred[key][1] if key in pred else "", text, page) for key, (sid, text, page) in gt.items()]


def report(ids, message):
    """One stderr line: how many ``ids`` and the first few."""
    if ids:
        shown = ", ".join(ids[:SHOW_IDS]) + (", ..." if len(ids) > SHOW_IDS else "")
        print(f"warning: {len(ids)} {message}: {shown}", file=sys.stderr)


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def _is_id(value):
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def read_jsonl(path, allow_page=False):
    """Return ``{str(id): (id, text, page)}`` in file order (page None unless ``allow_page`` and given)."""
    out = {}
    for n, item in jsonl_records(path):
        if "id" not in item or not isinstance(item.get("text"), str):
            raise ConfigError(f'{path}:{n}: expected an object {{"id": ..., "text": "..."}}')
        sid = item["id"]
        if not _is_id(sid):
            raise ConfigError(f"{path}:{n}: id must be a string or an integer, not {sid!r}")
        if str(sid) in out:
            raise ConfigError(f"{path}:{n}: duplicate id {sid!r}")
        page = item.get("page") if allow_page else None
        if page is not None and not _is_id(page):
            raise ConfigError(f"{path}:{n}: page must be a string or an integer, not {page!r}")
        out[str(sid)] = (sid, item["text"], page)
    return out


def read_fox_results(path):
    """Fox's result JSON (§1.1) -> ``[(id, answer, label, None)]``: ``answer`` is the model output."""
    items = read_json(path)
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a JSON list of Fox results")
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("image", "label", "answer"))):
            raise ConfigError(f'{path}: item {i}: expected an object with strings "image", '
                              '"label" (ground truth) and "answer" (model output)')
    repeats = Counter(item["image"] for item in items)
    return [(item["image"] if repeats[item["image"]] == 1 else f"{item['image']}#{i}",
             item["answer"], item["label"], None) for i, item in enumerate(items)]


def _omnidocbench_pairs(pred_path, gt_path, corrected):
    """Pages with a prediction, as ``(stem, markdown, PageGroundTruth, stem)``; the others skipped and reported."""
    gt = read_omnidocbench_gt(gt_path, evaluator_quirks=not corrected, keep_page=True)
    if os.path.isdir(pred_path):
        pred, used = {}, set()
        for stem in gt:  # the file names the evaluator tries, in its order (end2end_dataset.py:165-171)
            base = stem.replace(".pdf", "")
            for name in (f"{stem}.md", f"{base}.mmd", f"{base}.md", f"{gt[stem][3]}.md"):
                if os.path.isfile(os.path.join(pred_path, name)):
                    pred[stem] = (stem, _read_text(os.path.join(pred_path, name)), None)
                    used.add(name)
                    break
        unknown = sorted(f.name for f in Path(pred_path).glob("*.md") if f.is_file() and f.name not in used)
    else:
        pred = read_jsonl(pred_path)
        unknown = [k for k in pred if k not in gt]
    report([k for k in gt if k not in pred],
           "ground-truth pages have no prediction (skipped, as OmniDocBench's evaluator skips them)")
    report(unknown, "predictions are not in the ground truth (ignored)")
    return [(sid, pred[key][1], PageGroundTruth(text, page, corrected), sid)
            for key, (sid, text, page, _) in gt.items() if key in pred]


def read_omnidocbench_gt(path, evaluator_quirks=False, keep_page=False):
    """OmniDocBench.json (§2.5) -> ``{stem: (stem, page text, stem)}``, one sample per page.

    ``keep_page``: ``{stem: (stem, page text, page dict, image file name)}`` instead.
    """
    pages = read_json(path)
    if not isinstance(pages, list):
        raise ConfigError(f"{path}: expected a JSON list of pages")
    out = {}
    for i, page in enumerate(pages):
        info = page.get("page_info") if isinstance(page, dict) else None
        image = info.get("image_path") if isinstance(info, dict) else None
        if not isinstance(image, str) or not image:
            raise ConfigError(f"{path}: page {i}: expected an object with page_info.image_path")
        stem = Path(image.replace("\\", "/")).stem
        if stem in out:
            raise ConfigError(f"{path}: page {i}: duplicate image stem {stem!r}")
        try:
            text = omnidocbench_page_text(page, evaluator_quirks)
        except ValueError as e:
            raise ConfigError(f"{path}: page {i} ({image}): {e}") from e
        out[stem] = (stem, text, page, os.path.basename(image.replace("\\", "/"))) if keep_page else (stem, text, stem)
    return out


def _order(block):
    return block.get("order") or 0  # a missing or None order counts as 0 (§2.4)


def omnidocbench_page_text(page, evaluator_quirks=False):
    """The evaluator's plain GT text of one page (§2.6); raises ValueError on a malformed page.

    Blocks of TEXT_CATEGORIES; ``truncated`` chains from ``extra.relation`` are
    concatenated without separator in ``order`` into their first block (which
    gives the category and order); blocks are sorted by ``order`` (stable,
    None = 0); non-empty texts are joined with "\\n\\n". ``ignore`` is not
    looked at (the evaluator does not). ``evaluator_quirks=True`` reproduces
    the evaluator's chain grouping (§2.4): each relation is appended to every
    chain that already holds one of its ids, so a->b, b->c becomes
    [a, b, b, c] and b's text appears twice. Off, each block appears once.
    """
    blocks = page.get("layout_dets")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise ValueError("layout_dets must be a list of objects")
    for j, block in enumerate(blocks):
        if block.get("text") is not None and not isinstance(block["text"], str):
            raise ValueError(f"layout_dets[{j}].text must be a string")
        order = block.get("order")
        if order is not None and (isinstance(order, bool) or not isinstance(order, (int, float))):
            raise ValueError(f"layout_dets[{j}].order must be a number or null")
    by_id = {b.get("anno_id"): b for b in blocks}
    groups = _truncated_chains(page, by_id, evaluator_quirks)
    in_chain = {anno for group in groups for anno in group}
    per_category = {c: [] for c in TEXT_CATEGORIES}
    for block in blocks:
        if block.get("anno_id") not in in_chain and block.get("category_type") in per_category:
            per_category[block["category_type"]].append((_order(block), block.get("text") or ""))
    for group in groups:
        members = sorted((by_id[anno] for anno in group), key=_order)
        if members[0].get("category_type") in per_category:
            text = "".join(b.get("text") or "" for b in members)
            per_category[members[0]["category_type"]].append((_order(members[0]), text))
    items = sorted((item for c in TEXT_CATEGORIES for item in per_category[c]), key=lambda item: item[0])
    return "\n\n".join(text for _, text in items if text)


def _truncated_chains(page, by_id, evaluator_quirks):
    """Lists of anno_ids joined by ``truncated`` relations (§2.5 extra.relation), in relation order."""
    extra = page.get("extra") or {}
    relations = (extra.get("relation") or []) if isinstance(extra, dict) else None
    if not isinstance(relations, list):
        raise ValueError("extra.relation must be a list")
    groups = []
    for k, rel in enumerate(relations):
        if not isinstance(rel, dict) or rel.get("relation_type") != "truncated":
            continue
        pair = [rel.get("source_anno_id"), rel.get("target_anno_id")]
        for anno in pair:
            if anno not in by_id:
                raise ValueError(f"extra.relation[{k}] names anno_id {anno!r}, which is not in layout_dets")
        hits = [g for g in groups if pair[0] in g or pair[1] in g]
        if evaluator_quirks:  # the evaluator's grouping, duplicates and all (§2.4)
            for g in hits:
                g.extend(pair)
            if not hits:
                groups.append(pair)
        else:  # connected components, each block once
            merged = [anno for g in hits for anno in g]
            merged += [anno for anno in dict.fromkeys(pair) if anno not in merged]
            groups = [g for g in groups if not any(g is h for h in hits)] + [merged]
    return groups
