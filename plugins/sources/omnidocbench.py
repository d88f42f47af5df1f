"""The ``omnidocbench`` source of ``python -m core.shards``.

``omnidocbench``: OmniDocBench.json: image ``page_info.image_path``, ``txt`` = the page text as
the evaluator assembles it (``plugins.metrics.omnidocbench_files.omnidocbench_page_text``), json
the whole page (``page_info``, ``layout_dets``, ``extra``: what the ``omnidocbench`` metric matches
block by block when a training run evaluates on these shards). Key = the image stem.
``corrected`` (``--option corrected=true``) reads truncated chains without the evaluator's repeated
blocks; the default, as the evaluator, is the text that ``python -m core.metrics --format
omnidocbench`` scores against (plugins/metrics/omnidocbench_files.py). The json does not record the
reading: a run that evaluates on corrected shards gives its ``omnidocbench`` metric ``corrected: true`` too.
"""
from core import hookimpl
from core.sources import Item, function_source, image_base, resolve
from plugins.metrics.omnidocbench_files import omnidocbench_pages


def read_omnidocbench(source, images_root=None, corrected=False):
    base = image_base(source, images_root)
    return [Item(stem, f"{source} page {i}", image=resolve(image, base), text=text, meta=page, empty_ok=True)
            for i, image, stem, text, page in omnidocbench_pages(source, corrected)]


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "omnidocbench", function_source(read_omnidocbench, needs="file"))
