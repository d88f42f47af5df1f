"""Batched generation, and ``python -m core.generate``: read images with a saved checkpoint.

Generation: the vision embeddings are computed once per image per call (not per token), then a
KV-cached decode loop; ``<|image|>`` is masked out of the logits (DESIGN.md lessons).
``use_cache=False`` is the naive reference that re-runs the decoder over the whole sequence.

    python -m core.generate CHECKPOINT IMAGE [IMAGE ...] [--out OUT.jsonl] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--seed S] [--batch-size B] [--prompt P] [--no-cache]
        [--max-image-pixels N|none] [--no-repeat-ngram N [--no-repeat-window W] [--no-repeat-exempt IDS]]
        [--stop-loops]

CHECKPOINT is a ``model_XXXXXX.safetensors`` file or a stage folder (its latest); the model is rebuilt
from the meta json beside it. An IMAGE is any image Pillow reads or a PDF page, rendered as ``python -m
core.shards`` renders it (core/pdf.py, at its default longest side): ``doc.pdf#page=N``, a one-page
``doc.pdf``, or a longer ``doc.pdf``, which stands for all its pages (``doc.pdf#page=1`` ...). An image
much wider or taller than the model's view gets one warning line on stderr (core.images.far_aspect): it
is padded to the view, so its text shrinks. ``--max-new-tokens`` defaults to the checkpoint's training
length (its ``eval.max_new_tokens``, else ``data.max_len`` less the prompt, else 256 for a checkpoint
whose meta has neither); the number used is printed on stderr.

Prints ``path<TAB>text`` per image, newlines and tabs
in the text written as ``\\n`` and ``\\t``; with ``--out`` writes JSONL ``{"id": path,
"text": ...}`` instead, exactly what ``python -m core.metrics --pred`` reads; with ``--out-dir`` one
``<image stem>.md`` per image, the folder OmniDocBench's evaluator reads. The prompt is
the one the checkpoint was trained with unless ``--prompt``; so are its crops (``model.crops``:
images are then batched by crop grid, and printed in the order given). ``--prompt`` reads the
escapes ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` as a newline, tab, carriage return and backslash, since a
shell passes ``"<image>\\nFree OCR."`` with a literal backslash; the prompt used is printed on stderr.
Bad input (missing or unreadable image, checkpoint without meta) prints one ``error:`` line and exits
with code 2; so does an image with more pixels than ``--max-image-pixels`` (training's
``data.max_image_pixels`` default), checked on its header before it is decoded (core.images.open_header).
"""
import argparse
import io
import json
import os
import re
import sys

import torch
from tqdm import tqdm

from core import adapters, checkpoint, data
from core.badsamples import BadSample
from core.errors import ConfigError, cli_main
from core.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    far_aspect,
    image_views,
    load,
    open_header,
    upright_size,
)
from core.model import build_model, last_only, token_ids
from core.pdf import PdfSkip, Render, as_pdf_page, page_paths, render_png
from core.sources import path_key
from core.recipe import COMPONENTS, model_config_from_meta
from core.registry import load_plugins
from core.repetition import Repetition, exempt_ids


def _pick(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        values, _ = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
        logits = logits.masked_fill(logits < values[:, -1:], float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def image_prompt_ids(model, tokenizer, prompt, grid=None):
    """bos + ``prompt`` with the placeholders of an image with crop grid ``grid`` (None: global view only)."""
    return data.prompt_prefix(tokenizer, prompt, model.num_image_tokens(grid))


def image_grid(model, image):
    """The crop grid the model's tiling gives ``image`` (read from its header), or None."""
    return size_grid(model, upright_size(image))


def size_grid(model, size):
    """The crop grid the model's tiling gives an upright image of ``size`` (width, height), or None."""
    return model.tiling.grid(*size) if model.tiling is not None else None


def grid_batches(grids, batch_size):
    """Lists of at most ``batch_size`` indices whose images share a crop grid, so one generate call has
    one prompt length; groups in the order their grid first appears, indices in order within each."""
    groups = {}
    for i, grid in enumerate(grids):
        groups.setdefault(None if grid is None else tuple(grid), []).append(i)
    return [ids[k:k + batch_size] for ids in groups.values() for k in range(0, len(ids), batch_size)]


def view_batch(model, images, grid, device):
    """PIL images that share crop ``grid`` -> generate's (pixel_values, tiles, grids) on ``device``."""
    views = [image_views(image, model.image_size, model.tiling) for image in images]
    if any(v[2] != grid for v in views):
        raise ValueError(f"images of one batch must share the crop grid {grid}; got {[v[2] for v in views]}")
    tiles = torch.cat([v[1] for v in views]).to(device) if grid is not None else None
    return torch.stack([v[0] for v in views]).to(device), tiles, [grid] * len(views)


@torch.no_grad()
def generate(model, tokenizer, pixel_values, prompt_ids, max_new_tokens, use_cache=True,
             temperature=0.0, top_k=None, seed=None, tiles=None, grids=None, repetition=None):
    """Decode up to ``max_new_tokens`` per image; returns a list of token-id lists (stop token excluded).

    ``prompt_ids`` is one prompt (with its <|image|> placeholders) shared by the batch, so with crops
    every image of the batch has the same grid (``grid_batches``); ``tiles``/``grids`` as in
    VisionLanguageModel.forward. ``repetition`` (core.repetition.Repetition) bans repeated n-grams
    and stops samples caught in a loop.
    """
    decoder = model.decoder
    batch = pixel_values.shape[0]
    generator = torch.Generator(device=pixel_values.device).manual_seed(seed) if seed is not None else None
    _, _, vision_tokens = model.encode_views(pixel_values, tiles, grids)
    ids = torch.tensor(prompt_ids, device=pixel_values.device).unsqueeze(0).expand(batch, -1)
    embeds = model.merge(ids, vision_tokens)
    stop = torch.tensor([tokenizer.eos_id, tokenizer.bos_id], device=ids.device)
    cache = decoder.make_kv_cache(batch, embeds.shape[1] + max_new_tokens) if use_cache else None
    logits = decoder(embeds, kv_cache=cache, **token_ids(decoder, ids), **last_only(decoder))[:, -1]
    picked = []
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    histories = [[] for _ in range(batch)] if repetition else None  # each row's generated ids
    for _ in range(max_new_tokens):
        logits[:, model.image_token_id] = float("-inf")
        if histories is not None:
            repetition.ban(logits, histories)
        token = _pick(logits, temperature, top_k, generator).masked_fill(done, tokenizer.eos_id)
        picked.append(token)
        done |= torch.isin(token, stop)
        if histories is not None:
            done |= torch.tensor(repetition.record(token.tolist(), histories, tokenizer), device=done.device)
        if bool(done.all()):
            break
        step = decoder.embed(token[:, None])
        if use_cache:
            logits = decoder(step, kv_cache=cache, **token_ids(decoder, token[:, None]))[:, -1]
        else:
            embeds, ids = torch.cat([embeds, step], dim=1), torch.cat([ids, token[:, None]], dim=1)
            logits = decoder(embeds, **token_ids(decoder, ids), **last_only(decoder))[:, -1]
    results = []
    for row in torch.stack(picked, dim=1).tolist() if picked else [[]] * batch:
        cut = next((i for i, t in enumerate(row) if t in (tokenizer.eos_id, tokenizer.bos_id)), len(row))
        results.append(row[:cut])
    return results


# ---- python -m core.generate

def load_checkpoint(path):
    """A ``model_XXXXXX.safetensors`` file or a stage folder (its latest) -> (model, tokenizer, meta). An adapter
    checkpoint is its base model with the adapters attached (core/adapters.py)."""
    path, meta = checkpoint_meta(path)
    pm, registry = load_plugins(meta.get("plugins") or [])
    if "adapter" in meta:
        model, tokenizer, _ = adapters.rebuild(path, meta, registry, pm)
        return model.eval(), tokenizer, meta
    config = model_config_from_meta(meta["model"], path)
    # built on the meta device, so pretrained files named in the config (which the checkpoint
    # supersedes, and which may have moved) are not read; then every tensor comes from the checkpoint
    with torch.device("meta"):
        model, tokenizer = build_model(config, registry)
    model.to_empty(device="cpu")
    checkpoint.load_parts(model, path, list(checkpoint.PARTS))
    return model.eval(), tokenizer, meta


def checkpoint_meta(path):
    """A checkpoint file or stage folder -> (the model file, its meta json), or a ConfigError saying what is
    missing: the file, the meta json, or the model config in it."""
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
    return path, meta


def open_image_file(path, load_pixels=True, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """A Pillow image (fully decoded when ``load_pixels``), through training's guard (core.images.open_header):
    a missing, unreadable or too large file (``--max-image-pixels``, checked before decoding) is a ConfigError.
    A PDF page (core.pdf.as_pdf_page) is rendered as core.shards renders it."""
    page = as_pdf_page(path)
    file = page.path if page is not None else path
    if not os.path.isfile(file):
        raise ConfigError(f"image {path!r} {'is not a file' if os.path.exists(file) else 'does not exist'}")
    try:
        source = io.BytesIO(render_png(page, Render(), max_pixels)) if page is not None else path
        image = open_header(source, max_pixels, setting="--max-image-pixels")
        return load(image) if load_pixels else image
    except PdfSkip as skip:
        raise ConfigError(f"image {path!r}: {skip.reason}: {skip.detail}") from None
    except BadSample as bad:
        what = f"cannot read it ({bad.detail})" if bad.reason == "bad_image" else f"{bad.reason}: {bad.detail}"
        raise ConfigError(f"image {path!r}: {what}") from None


_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def tsv_line(path, text):
    """One stdout line: path, a tab, the text with its newlines and tabs written as \\n, \\r, \\t."""
    return f"{path}\t{text.translate(_ESCAPES)}"


_PROMPT_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_prompt(text):
    """``--prompt``'s backslash escapes (\\n, \\t, \\r, \\\\) as the characters they name; any other backslash stays."""
    return re.sub(r"\\([ntr\\])", lambda m: _PROMPT_ESCAPES[m.group(1)], text)


DEFAULT_MAX_NEW_TOKENS = 256  # for a checkpoint whose meta json records no training length


def new_tokens(meta, prompt_length):
    """``--max-new-tokens``' default, (number, where it comes from): what the checkpoint was trained to write."""
    if meta.get("max_new_tokens"):
        return meta["max_new_tokens"], "the checkpoint's eval.max_new_tokens"
    if meta.get("max_len"):
        return (max(1, meta["max_len"] - prompt_length),
                f"the checkpoint's data.max_len {meta['max_len']} less the {prompt_length}-token prompt")
    return DEFAULT_MAX_NEW_TOKENS, "the default: the checkpoint's meta json records no training length"


def warn_aspect(model, paths, sizes):
    """One stderr line for the images much wider or taller than the model's view (core.images.far_aspect)."""
    far = [(path, aspects) for path, size in zip(paths, sizes)
           if (aspects := far_aspect(*size, model.image_size, model.tiling))]
    if far:
        (path, (aspect, view)), more = far[0], len(far) - 1
        print(f"warning: {path} is {aspect} (width:height) but the model's view is {view}: it is padded to the "
              f"view, so its text shrinks{f' ({more} more image(s) like it)' if more else ''}", file=sys.stderr)


def prepare(args):
    """Check every image opens, rebuild the model -> (model, tokenizer, prompt, upright image sizes); say on
    stderr which prompt and length are used, and warn about aspects far from the model's view.

    The model's crops (``model.crops``) come from the checkpoint's meta json like the rest of its config.
    """
    sizes = []
    for path in args.images:  # a missing or non-image file fails before the model is built
        with open_image_file(path, False, args.max_image_pixels) as image:
            sizes.append(upright_size(image))
    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    if args.prompt is not None:
        prompt, source = unescape_prompt(args.prompt), "--prompt"
    else:
        prompt, source = meta.get("prompt", "<image>\nFree OCR."), "the checkpoint's training prompt"
    prompt_length = len(image_prompt_ids(model, tokenizer, prompt))  # a prompt without <image> fails here
    print(f"prompt ({source}): {prompt!r}", file=sys.stderr)  # what the model reads, escapes shown
    length = "--max-new-tokens"
    if args.max_new_tokens is None:
        args.max_new_tokens, length = new_tokens(meta, prompt_length)
    print(f"max new tokens: {args.max_new_tokens} ({length})", file=sys.stderr)
    warn_aspect(model, args.images, sizes)
    return model, tokenizer, prompt, sizes


def read_images(model, tokenizer, prompt, args, sizes):
    """Yield (path, text) for args.images (upright ``sizes``) in order; batches share a crop grid (one prompt
    length each)."""
    if args.seed is not None:
        torch.manual_seed(args.seed)
    grids = [size_grid(model, size) for size in sizes]
    batches = grid_batches(grids, args.batch_size)
    repetition = Repetition(args.no_repeat_ngram, args.no_repeat_window, stop_loops=args.stop_loops,
                            exempt=exempt_ids([t for t in args.no_repeat_exempt.split(",") if t], tokenizer))
    done, next_out = {}, 0
    for batch in tqdm(batches, desc="generating", unit="batch", file=sys.stderr, disable=len(batches) <= 1):
        grid = grids[batch[0]]
        pixels, tiles, batch_grids = view_batch(model, [open_image_file(args.images[i], True, args.max_image_pixels)
                                                     for i in batch], grid, "cpu")
        try:
            rows = generate(model, tokenizer, pixels, image_prompt_ids(model, tokenizer, prompt, grid),
                            args.max_new_tokens, use_cache=not args.no_cache, temperature=args.temperature,
                            top_k=args.top_k, tiles=tiles, grids=batch_grids, repetition=repetition)
        except ValueError as e:  # e.g. prompt + --max-new-tokens run past the decoder's positions
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: {e}") from e
        done.update((i, tokenizer.decode(ids)) for i, ids in zip(batch, rows))
        while next_out in done:  # in the order given, as soon as the images before are read
            yield args.images[next_out], done.pop(next_out)
            next_out += 1


def _pixels(text):
    if text.lower() in ("none", "null"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of pixels (at least 1) or none")
    return int(text)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m core.generate", description="Read images with a checkpoint.")
    parser.add_argument("checkpoint", help="model_XXXXXX.safetensors file or a stage folder (takes the latest)")
    parser.add_argument("images", nargs="+", help="image files (anything Pillow reads) or PDF pages: doc.pdf#page=N, "
                                                  "doc.pdf (all its pages)")
    parser.add_argument("--out", help="write JSONL {id, text} here instead of path<TAB>text lines on stdout")
    parser.add_argument("--out-dir", help="write one <image stem>.md per image here (what OmniDocBench's evaluator "
                                          "and core.metrics --format omnidocbench read)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the checkpoint's eval.max_new_tokens (else data.max_len less the prompt, "
                             f"else {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=None, help="with --temperature > 0")
    parser.add_argument("--seed", type=int, default=None, help="with --temperature > 0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt", default=None, help="with <image> once; \\n \\t \\r \\\\ are read as escapes; "
                                                       "default: the one it was trained with")
    parser.add_argument("--no-cache", action="store_true", help="the naive decode loop without the KV cache")
    parser.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                        help="ban a token that would repeat an N-gram of the last --no-repeat-window generated tokens "
                             "(DeepSeek-OCR's rule; 0, the default: off)")
    parser.add_argument("--no-repeat-window", type=int, default=90, metavar="W", help="default 90")
    parser.add_argument("--no-repeat-exempt", default="", metavar="IDS",
                        help="comma-separated token ids (or single-token strings) never banned, e.g. <td>,</td>")
    parser.add_argument("--stop-loops", action="store_true",
                        help="stop an image's text once it ends in a loop (a 1-5 character pattern repeated >30 times)")
    parser.add_argument("--max-image-pixels", type=_pixels, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse larger images before decoding them (default: training's data.max_image_pixels "
                             f"default, {DEFAULT_MAX_IMAGE_PIXELS:,}; none: no limit)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.temperature < 0:
        parser.error("--batch-size and --max-new-tokens must be at least 1, --temperature at least 0")
    if args.no_repeat_ngram < 0 or args.no_repeat_window < 1:
        parser.error("--no-repeat-ngram must be at least 0 and --no-repeat-window at least 1")
    if args.out and args.out_dir:
        parser.error("--out and --out-dir: choose one")
    return args


def _stems(paths):
    """{path: file name stem} (a PDF page's: ``doc_p3``); two images with one stem would overwrite each other's
    .md: a ConfigError."""
    stems = {}
    for path in paths:
        stem = path_key(os.path.basename(path))
        if stem in stems.values():
            raise ConfigError(f"--out-dir: two images have the stem {stem!r} ({path}); their .md files would clash")
        stems[path] = stem
    return stems


def command(argv=None):
    args = parse_args(argv)
    args.images = [page for path in args.images for page in page_paths(path)]  # a PDF's pages, in order
    out = None
    try:
        stems = _stems(args.images) if args.out_dir else None
        model, tokenizer, prompt, sizes = prepare(args)
        try:
            out = open(args.out, "w", encoding="utf-8") if args.out else None
            if args.out_dir:
                os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {args.out or args.out_dir!r}: {e}") from e
        n = 0
        for path, text in read_images(model, tokenizer, prompt, args, sizes):
            n += 1
            if out:
                out.write(json.dumps({"id": path, "text": text}, ensure_ascii=False) + "\n")
            elif stems:
                with open(os.path.join(args.out_dir, stems[path] + ".md"), "w", encoding="utf-8") as f:
                    f.write(text)
            else:
                print(tsv_line(path, text), flush=True)
    finally:
        if out:
            out.close()
    if out or stems:
        print(f"wrote {n} {'rows to ' + args.out if out else '.md files to ' + args.out_dir}", file=sys.stderr)
    return 0


def main(argv=None):
    """The command line: ``command`` with errors as one line and an exit code."""
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
