"""The ``llava`` source of ``python -m core.shards``.

``llava``: LLaVA-Instruct JSON (a list, or JSONL) of ``{"id", "image", "conversations"}``.
Key = ``id``, else the image path without extension, else the item index.
"""
from core import hookimpl
from core.sources import (
    Item,
    Skip,
    check_turns,
    function_source,
    image_base,
    json_items,
    path_key,
    resolve,
    sample_id,
    string,
)


def read_llava(source, images_root=None):
    base = image_base(source, images_root)
    items = []
    for where, i, item in json_items(source):
        image = item.get("image")
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if isinstance(image, list):
            items.append(Skip("multiple_images", where))
            continue
        image = string(image, where, "image")
        conversations = check_turns(item.get("conversations"), where)
        key = sample_id(item.get("id"), where) or (path_key(image) if image else f"item_{i}")
        items.append(Item(key, where, image=resolve(image, base) if image else None,
                          meta={"conversations": conversations}, needs_image=image is not None,
                          needs_text=False))
    return items


@hookimpl
def vlmkit_register(registry):
    registry.add("source", "llava", function_source(read_llava, needs="file"))
