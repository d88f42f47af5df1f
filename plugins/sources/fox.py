"""The ``fox`` source of ``python -m core.shards``.

``fox``: Fox GT JSON (a list of ``{"image", "conversations": [human, gpt]}``): ``txt`` = the
gpt turn (the GT), json ``prompt`` = the human turn without its ``<image>`` line. Key = the
image name without extension, ``<stem>_<index>`` for an image listed more than once.
"""
import re
from collections import Counter

from core import hookimpl
from core.errors import ConfigError
from core.sources import (
    Item,
    function_source,
    image_base,
    json_items,
    path_key,
    resolve,
    string,
)


def fox_prompt(value):
    """The human turn without its '<image>' line: '<image>\\nOCR this' -> 'OCR this'."""
    return re.sub(r"<image>\n?", "", value).strip()


def read_fox(source, images_root=None):
    base = image_base(source, images_root)
    items = list(json_items(source))
    repeats = Counter(item.get("image") for _, _, item in items if isinstance(item.get("image"), str))
    out = []
    for where, i, item in items:
        image = string(item.get("image"), where, "image", optional=False)
        turns = item.get("conversations")
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2])):
            raise ConfigError(f"{where}: conversations must be a list [human turn, gpt turn]")
        prompt = string(turns[0].get("value"), where, "conversations[0].value", optional=False)
        gt = string(turns[1].get("value"), where, "conversations[1].value", optional=False)
        key = path_key(image) if repeats[image] == 1 else f"{path_key(image)}_{i}"
        out.append(Item(key, where, image=resolve(image, base), text=gt, empty_ok=True,
                        meta={"prompt": fox_prompt(prompt), "image": image, "index": i}))
    return out


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "fox", function_source(read_fox, needs="file"))
