"""The ``omnidocbench`` source of ``python -m core.shards``.

``omnidocbench``: OmniDocBench.json: image ``page_info.image_path``, ``txt`` = the page text as
the evaluator assembles it (``plugins.metrics.omnidocbench_files.omnidocbench_page_text``), json
``{"page_info"}``. Key = the image stem.
"""
from pathlib import Path

from core import hookimpl
from core.errors import ConfigError
from core.sources import Item, image_base, json_items, resolve
from plugins.metrics.omnidocbench_files import omnidocbench_page_text


def read_omnidocbench(source, images_root=None, evaluator_quirks=False):
    base = image_base(source, images_root)
    out = []
    for where, i, page in json_items(source):
        where = f"{source} page {i}"
        info = page.get("page_info")
        image = info.get("image_path") if isinstance(info, dict) else None
        if not isinstance(image, str) or not image:
            raise ConfigError(f"{where}: page_info.image_path must be a non-empty string")
        try:
            text = omnidocbench_page_text(page, evaluator_quirks)
        except ValueError as e:
            raise ConfigError(f"{where} ({image}): {e}") from e
        out.append(Item(Path(image.replace("\\", "/")).stem, where, image=resolve(image, base), text=text,
                        meta={"page_info": info}, empty_ok=True))
    return out


class OmniDocBenchSource:
    needs = "file"

    def __init__(self, evaluator_quirks=False):
        self.evaluator_quirks = evaluator_quirks

    def read(self, source, images_root=None):
        return read_omnidocbench(source, images_root, self.evaluator_quirks)


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "omnidocbench", OmniDocBenchSource)
