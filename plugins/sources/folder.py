"""The ``folder`` source of ``python -m core.shards``.

``folder``: a folder of images (png, jpg, jpeg, webp), searched recursively (hidden files and
folders skipped), each with a text file of the same stem: ``page1.png`` + ``page1.txt`` (or
``page1.md``; ``.txt`` wins if both exist). Key = the relative path without extension. PDFs in the
folder are read by the ``pdf`` source's rules (plugins/sources/pdf.py: ``doc.pdf`` + ``doc.txt`` for
a one-page PDF, ``doc.page-N.txt`` per page). A ``.md`` text's YAML front matter goes into the
json member, not into ``txt`` (core.sources.split_front_matter).
"""
import os
from pathlib import Path

from core import hookimpl
from core.data import IMAGE_EXTS
from core.errors import ConfigError
from core.sources import (
    OTHER_IMAGE_EXTS,
    TEXT_EXTS,
    Item,
    Skip,
    folder_groups,
    function_source,
)
from plugins.sources.pdf import pdf_items


def read_folder(source, images_root=None):
    if images_root is not None:
        raise ConfigError("--images-root: not used with the folder format (images sit beside their texts)")
    if not os.path.isdir(source):
        raise ConfigError(f"{source}: the folder format needs a folder")
    groups = folder_groups(source)  # relative path without extension -> {ext: path}
    items = pdf_items(groups)  # takes the PDFs and their texts out of groups
    for rel, files in groups.items():
        images = [files[e] for e in IMAGE_EXTS if e in files]
        text = next((files[e] for e in TEXT_EXTS if e in files), None)
        if not images:
            other = next((files[e] for e in OTHER_IMAGE_EXTS if e in files), None)
            if other:
                items.append(Skip("unsupported_image_type", other))
            elif text:
                items.append(Skip("missing_image", text))
            continue
        for image in images:  # page.png + page.jpg: the second is a duplicate_key
            items.append(Item(rel, image, image=image, text=Path(text) if text else None))
    return items


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "folder", function_source(read_folder, needs="folder"))
