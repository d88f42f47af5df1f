"""Read images with a saved checkpoint; the model is rebuilt from the meta json beside it.

    python -m core.generate CHECKPOINT IMAGE [IMAGE ...] [--out OUT.jsonl] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--seed S] [--batch-size B] [--prompt P] [--no-cache]

(``python -m core.ocr`` is the same command.) CHECKPOINT is a ``model_XXXXXX.safetensors``
file or a stage folder (its latest). Prints ``path<TAB>text`` per image, newlines and tabs
in the text written as ``\\n`` and ``\\t``; with ``--out`` writes JSONL ``{"id": path,
"text": ...}`` instead, exactly what ``python -m core.metrics --pred`` reads. The prompt is
the one the checkpoint was trained with unless ``--prompt``; so are its crops (``model.crops``:
images are then batched by crop grid, and printed in the order given). Bad input (missing or
unreadable image, checkpoint without meta) prints one ``error:`` line and exits with code 2.
"""
import argparse
import json
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from core import checkpoint
from core.errors import ConfigError
from core.generate import generate, grid_batches, image_grid, image_prompt_ids, view_batch
from core.model import build_model
from core.recipe import COMPONENTS, model_config_from_meta
from core.registry import load_plugins


def load_checkpoint(path):
    """A ``model_XXXXXX.safetensors`` file or a stage folder (its latest) -> (model, tokenizer, meta)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = checkpoint.latest(path) or path
        if os.path.isdir(path):
            raise ConfigError(f"{path}: no model_XXXXXX.safetensors checkpoint in this folder")
    elif not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    try:
        meta = checkpoint.read_meta(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the meta json beside it ({e})") from e
    if not meta:
        raise ConfigError(f"{path}: no meta_XXXXXX.json beside it; cannot rebuild the model")
    parts = meta.get("model")
    if not isinstance(parts, dict) or not all(isinstance(parts.get(k), dict) and "name" in parts[k]
                                              for k in COMPONENTS):
        raise ConfigError(f"{path}: its meta json has no model config (an older checkpoint?); cannot rebuild the model")
    _, registry = load_plugins(meta.get("plugins") or [])
    config = model_config_from_meta(parts, path)
    # built on the meta device, so pretrained files named in the config (which the checkpoint
    # supersedes, and which may have moved) are not read; then every tensor comes from the checkpoint
    with torch.device("meta"):
        model, tokenizer = build_model(config, registry)
    model.to_empty(device="cpu")
    checkpoint.load_parts(model, path, list(checkpoint.PARTS))
    return model.eval(), tokenizer, meta


def open_image(path, load=True):
    """A Pillow image (fully decoded when ``load``); a missing or unreadable file is a ConfigError naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"image {path!r} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    try:
        image = Image.open(path)
        if load:
            image.load()
        return image
    except Exception as e:  # Pillow raises many types for bad bytes
        raise ConfigError(f"image {path!r}: cannot read it ({e.__class__.__name__}: {e})") from e


_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def tsv_line(path, text):
    """One stdout line: path, a tab, the text with its newlines and tabs written as \\n, \\r, \\t."""
    return f"{path}\t{text.translate(_ESCAPES)}"


def prepare(args):
    """Check every image opens, rebuild the model -> (model, tokenizer, prompt).

    The model's crops (``model.crops``) come from the checkpoint's meta json like the rest of its config.
    """
    for path in args.images:  # a missing or non-image file fails before the model is built
        open_image(path, load=False).close()
    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    prompt = args.prompt if args.prompt is not None else meta.get("prompt", "<image>\nFree OCR.")
    image_prompt_ids(model, tokenizer, prompt)  # a prompt without <image> fails here
    return model, tokenizer, prompt


def read_images(model, tokenizer, prompt, args):
    """Yield (path, text) for args.images in order; batches share a crop grid (one prompt length each)."""
    if args.seed is not None:
        torch.manual_seed(args.seed)
    grids = []
    for path in args.images:  # the grid needs only the header
        with open_image(path, load=False) as image:
            grids.append(image_grid(model, image))
    batches = grid_batches(grids, args.batch_size)
    done, next_out = {}, 0
    for batch in tqdm(batches, desc="generating", unit="batch", file=sys.stderr, disable=len(batches) <= 1):
        grid = grids[batch[0]]
        pixels, tiles, batch_grids = view_batch(model, [open_image(args.images[i]) for i in batch], grid, "cpu")
        try:
            rows = generate(model, tokenizer, pixels, image_prompt_ids(model, tokenizer, prompt, grid),
                            args.max_new_tokens, use_cache=not args.no_cache, temperature=args.temperature,
                            top_k=args.top_k, tiles=tiles, grids=batch_grids)
        except ValueError as e:  # e.g. prompt + --max-new-tokens run past the decoder's positions
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: {e}") from e
        done.update((i, tokenizer.decode(ids)) for i, ids in zip(batch, rows))
        while next_out in done:  # in the order given, as soon as the images before are read
            yield args.images[next_out], done.pop(next_out)
            next_out += 1


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m core.generate", description="Read images with a checkpoint.")
    parser.add_argument("checkpoint", help="model_XXXXXX.safetensors file or a stage folder (takes the latest)")
    parser.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    parser.add_argument("--out", help="write JSONL {id, text} here instead of path<TAB>text lines on stdout")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=None, help="with --temperature > 0")
    parser.add_argument("--seed", type=int, default=None, help="with --temperature > 0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt", default=None, help="with <image> once; default: the one it was trained with")
    parser.add_argument("--no-cache", action="store_true", help="the naive decode loop without the KV cache")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        parser.error("--batch-size and --max-new-tokens must be at least 1, --temperature at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = None
    try:
        model, tokenizer, prompt = prepare(args)
        try:
            out = open(args.out, "w", encoding="utf-8") if args.out else None
        except OSError as e:
            raise ConfigError(f"--out {args.out!r}: {e}") from e
        n = 0
        for n, (path, text) in enumerate(read_images(model, tokenizer, prompt, args), 1):
            if out:
                out.write(json.dumps({"id": path, "text": text}, ensure_ascii=False) + "\n")
            else:
                print(tsv_line(path, text), flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if out:
            out.close()
    if out:
        print(f"wrote {n} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
