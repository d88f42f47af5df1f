"""OmniDocBench's files: the ground-truth JSON, a folder of ``.md`` predictions, and the page text.

Registers the metric input ``omnidocbench`` (``python -m core.metrics ... --format omnidocbench``):
``--gt`` is OmniDocBench.json (docs/metrics.md §2.5), one sample per page, id and page = the image
stem of ``page_info.image_path``. Each ground truth is a ``PageGroundTruth``: the evaluator's GT
text (§2.6, ``omnidocbench_page_text``) that also carries the whole page (``meta``), which the
``omnidocbench`` metric matches block by block as the official evaluator does; plain-text metrics
see the text. ``--pred`` is a folder of ``<image stem>.md`` files (``.mmd`` and the other names the
evaluator tries are accepted too) or a JSONL file whose ids are the image stems or the image paths
(``python -m core.generate --out`` writes paths). A page without a prediction is skipped, as the
evaluator skips it, and reported on stderr. The ``omnidocbench`` shard source
(plugins/sources/omnidocbench.py) writes the same page text as each page's ``txt`` and the page as
its ``json``, so a training run's evaluation scores the same way. Both read truncated chains with
``truncated_chains`` and take one switch, ``corrected`` (default False: as the official evaluator).
"""
import os
from pathlib import Path

from core import hookimpl
from core.errors import ConfigError
from core.jsonfiles import read_json, read_text
from core.pairs import GroundTruth, read_jsonl, report

# §2.6: the categories whose text the evaluator scores, in the order it collects them.
TEXT_CATEGORIES = ("text_block", "title", "code_txt", "code_txt_caption", "reference")


class PageGroundTruth(GroundTruth):
    """An OmniDocBench page's GT text that also carries the page (``meta``) and the reading (``corrected``)."""

    def __new__(cls, text, page, corrected=False):
        obj = super().__new__(cls, text, page)
        obj.corrected = corrected
        return obj


def omnidocbench_pages(path, corrected=False):
    """Yield (index, image path, image stem, page text, page) of every page of OmniDocBench.json (§2.5);
    a malformed page or a repeated image stem is a ConfigError naming the page."""
    pages = read_json(path)
    if not isinstance(pages, list):
        raise ConfigError(f"{path}: expected a JSON list of pages")
    seen = set()
    for i, page in enumerate(pages):
        info = page.get("page_info") if isinstance(page, dict) else None
        image = info.get("image_path") if isinstance(info, dict) else None
        if not isinstance(image, str) or not image:
            raise ConfigError(f"{path}: page {i}: expected an object with page_info.image_path")
        stem = Path(image.replace("\\", "/")).stem
        if stem in seen:
            raise ConfigError(f"{path}: page {i}: duplicate image stem {stem!r}")
        seen.add(stem)
        try:
            text = omnidocbench_page_text(page, corrected)
        except ValueError as e:
            raise ConfigError(f"{path}: page {i} ({image}): {e}") from e
        yield i, image, stem, text, page


def read_omnidocbench_gt(path, corrected=False):
    """OmniDocBench.json (§2.5) -> ``{stem: (page text, page, image file name)}``, one entry per page."""
    return {stem: (text, page, os.path.basename(image.replace("\\", "/")))
            for _, image, stem, text, page in omnidocbench_pages(path, corrected)}


def read_predictions(pred_path, gt):
    """{stem: markdown} of the pages in ``gt`` that have a prediction, and the names of predictions no page
    has. A folder: the file names the evaluator tries, in its order (end2end_dataset.py:165-171); a JSONL
    file: ids that are stems, or image paths (``python -m core.generate --out``) matched by their stem."""
    pred = {}
    if os.path.isdir(pred_path):
        used = set()
        for stem, (_, _, image_name) in gt.items():
            base = stem.replace(".pdf", "")
            for name in (f"{stem}.md", f"{base}.mmd", f"{base}.md", f"{image_name}.md"):
                if os.path.isfile(os.path.join(pred_path, name)):
                    pred[stem] = read_text(os.path.join(pred_path, name))
                    used.add(name)
                    break
        unknown = sorted(f.name for f in Path(pred_path).glob("*.md") if f.is_file() and f.name not in used)
        return pred, unknown
    unknown = []
    for key, (_, text, _) in read_jsonl(pred_path).items():
        stem = key if key in gt else Path(key.replace("\\", "/")).stem
        if stem in gt:
            pred[stem] = text
        else:
            unknown.append(key)
    return pred, unknown


def block_order(block, missing=0):
    """A block's ``order``; ``missing`` when it is None, 0 or absent (the evaluator sorts those as 0, §2.4)."""
    return block.get("order") or missing


def truncated_chains(relations, corrected=False):
    """Lists of anno_ids joined by ``truncated`` relations (§2.5 ``extra.relation``), in relation order.

    As the evaluator groups them (``corrected=False``, §2.4): each relation is appended to every
    chain already holding one of its ids, so a->b, b->c gives [a, b, b, c] (b's text twice) and two
    chains bridged by a relation both grow. Corrected: each connected group once, each block once.
    """
    chains = []
    for rel in relations:
        if not isinstance(rel, dict) or rel.get("relation_type") != "truncated":
            continue
        pair = [rel.get("source_anno_id"), rel.get("target_anno_id")]
        hits = [chain for chain in chains if pair[0] in chain or pair[1] in chain]
        if corrected:
            merged = [anno for chain in hits for anno in chain]
            merged += [anno for anno in dict.fromkeys(pair) if anno not in merged]
            chains = [chain for chain in chains if not any(chain is hit for hit in hits)] + [merged]
        else:
            for chain in hits:
                chain.extend(pair)
            if not hits:
                chains.append(pair)
    return chains


def omnidocbench_page_text(page, corrected=False):
    """The evaluator's plain GT text of one page (§2.6); raises ValueError on a malformed page.

    Blocks of TEXT_CATEGORIES; ``truncated`` chains (``truncated_chains``, with ``corrected``) are
    concatenated without separator in ``order`` into their first block (which gives the category
    and order); blocks are sorted by ``order`` (stable, None = 0); non-empty texts are joined with
    "\\n\\n". ``ignore`` is not looked at (the evaluator does not).
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
    groups = truncated_chains(_relations(page, by_id), corrected)
    in_chain = {anno for group in groups for anno in group}
    per_category = {c: [] for c in TEXT_CATEGORIES}
    for block in blocks:
        if block.get("anno_id") not in in_chain and block.get("category_type") in per_category:
            per_category[block["category_type"]].append((block_order(block), block.get("text") or ""))
    for group in groups:
        members = sorted((by_id[anno] for anno in group), key=block_order)
        if members[0].get("category_type") in per_category:
            text = "".join(b.get("text") or "" for b in members)
            per_category[members[0]["category_type"]].append((block_order(members[0]), text))
    items = sorted((item for c in TEXT_CATEGORIES for item in per_category[c]), key=lambda item: item[0])
    return "\n\n".join(text for _, text in items if text)


def _relations(page, by_id):
    """``extra.relation``, checked: a list whose truncated relations name blocks of the page."""
    extra = page.get("extra") or {}
    relations = (extra.get("relation") or []) if isinstance(extra, dict) else None
    if not isinstance(relations, list):
        raise ValueError("extra.relation must be a list")
    for k, rel in enumerate(relations):
        if isinstance(rel, dict) and rel.get("relation_type") == "truncated":
            for anno in (rel.get("source_anno_id"), rel.get("target_anno_id")):
                if anno not in by_id:
                    raise ValueError(f"extra.relation[{k}] names anno_id {anno!r}, which is not in layout_dets")
    return relations


class OmniDocBenchInput:
    """``--gt OmniDocBench.json --pred DIR|preds.jsonl``: the pages with a prediction, as ``(stem, markdown,
    PageGroundTruth, stem)``. ``corrected``: the reading without the official evaluator's bugs
    (docs/metrics-omnidocbench.md); the default reproduces its numbers, quirks included."""
    needs_gt = True

    def __init__(self, corrected=False):
        self.corrected = bool(corrected)

    def read(self, pred_path, gt_path=None):
        gt = read_omnidocbench_gt(gt_path, self.corrected)
        pred, unknown = read_predictions(pred_path, gt)
        report([k for k in gt if k not in pred],
               "ground-truth pages have no prediction (skipped, as OmniDocBench's evaluator skips them)")
        report(unknown, "predictions are not in the ground truth (ignored)")
        if not pred:
            raise ConfigError(f"{pred_path}: no prediction matches a page of {gt_path} (predictions are named by "
                              f"the image stem, e.g. {next(iter(gt), '?')!r}.md or JSONL id)")
        return [(stem, pred[stem], PageGroundTruth(text, page, self.corrected), stem)
                for stem, (text, page, _) in gt.items() if stem in pred]


@hookimpl
def vlmkit_register(registry):
    registry.add("metric_input", "omnidocbench", OmniDocBenchInput)
