"""vlmkit's SAM, CLIP and nanochat against transformers' SamVisionModel, CLIPVisionModel and
NanoChatForCausalLM with the same weights: forward + backward time. A benchmark, not a test.

    python -m benchmarks.versus_transformers [--scale default|wide] [--repeats N]

Each transformers model is built from a config of the same size with random weights, saved with
save_pretrained and loaded into vlmkit's component through its recipe arguments (``weights=`` /
``checkpoint=``), as a user would; the forward outputs must agree (the ``max |diff|`` column) before
anything is timed. Scales:
- ``default``: the sizes of recipes/two_stage.yaml (32 px, 4x4 grid, batch 32, 64 tokens);
- ``wide``: the real widths (SAM ViT-B 768, CLIP-L 1024, nanochat d20 1280 with a 65,536 vocabulary),
  2 layers each, a 256 px image and 256 tokens, batch 4: matmul-bound, where the default is overhead-bound.
The timed step: zero grads, forward, loss (mean square of the output; cross-entropy for the decoders),
backward. Ours and theirs alternate, and each keeps its fastest of ``repeats`` rounds.
"""
import argparse
import contextlib
import io
import os
import tempfile
import time

import torch

from benchmarks.common import RECIPE
from core.recipe import load_recipe
from core.registry import load_plugins

def scale_sizes(scale):
    """{sam, clip, decoder, image_size, batch, seq}: vlmkit argument names, from the recipe or the wide set."""
    if scale == "default":
        recipe = load_recipe(RECIPE)
        enc, dec = recipe.model.encoder.args, recipe.model.decoder.args
        sam, image_size = _square(dict(enc["sam"]), enc["image_size"])
        return dict(sam=sam, clip=dict(enc["clip"]), image_size=image_size,
                    decoder={k: dec[k] for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "sequence_len")},
                    vocab_size=260, batch=recipe.data.batch_size, seq=recipe.data.max_len)
    # docs/architecture.md §2.1 (SAM ViT-B: 768, 12 heads, window 14), §2.2 (CLIP-L: 1024, 16 heads, 4096),
    # §1.3 (d20: 1280, 10 heads of 128, vocab 65536); 2 layers each to fit a CPU
    return dict(sam=dict(patch_size=16, dim=768, depth=2, heads=12, window_size=14, global_attn_indexes=[1],
                         out_chans=256, downsample_channels=[512, 1024], downsample_strides=[2, 2]),
                clip=dict(dim=1024, depth=2, heads=16, mlp_dim=4096),
                decoder=dict(n_layer=2, n_head=10, n_kv_head=10, n_embd=1280, sequence_len=256),
                image_size=256, vocab_size=65536, batch=4, seq=256)


def _square(sam, image_size):
    """transformers' SAM is square only: a strip recipe (an [h, w] image, rectangular patches, windows or
    strides) is compared at the same widths and depths on a square of as many patches (4 px patches)."""
    if isinstance(image_size, int) and all(isinstance(sam.get(k, 0), int) for k in ("patch_size", "window_size")) \
            and all(isinstance(x, int) for x in sam.get("downsample_strides", [])):
        return sam, image_size
    from core.images import pair
    (h, w), (ph, pw) = pair(image_size), pair(sam["patch_size"])
    side = max(1, round(((h // ph) * (w // pw)) ** 0.5))
    window = pair(sam.get("window_size", 0))
    return dict(sam, patch_size=4, window_size=max(window) if min(window) > 0 else 0,
                downsample_strides=[max(pair(x)) for x in sam.get("downsample_strides", [])]), side * 4


def randomize(module, seed):
    """Every parameter random: transformers zero-inits SAM's positions, which must be exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.02
            p.copy_(1.0 + noise if name.endswith("weight") and p.ndim == 1 else noise)
    return module


def _quiet_build(registry, kind, name, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # the loaders print what they loaded
        return registry.build(kind, name, **kwargs)


def sam_pair(registry, sizes, folder):
    from transformers import SamVisionConfig, SamVisionModel
    s, size = sizes["sam"], sizes["image_size"]
    config = SamVisionConfig(image_size=size, patch_size=s["patch_size"], hidden_size=s["dim"],
                             num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
                             window_size=s["window_size"], global_attn_indexes=s["global_attn_indexes"],
                             output_channels=s["out_chans"], mlp_dim=int(s["dim"] * s.get("mlp_ratio", 4.0)))
    theirs = randomize(SamVisionModel(config), 1)
    theirs.save_pretrained(folder)
    ours = _quiet_build(registry, "encoder", "sam", image_size=size, weights=folder, weights_format="hf", **s)
    pixels = torch.randn(sizes["batch"], 3, size, size)
    # SamVisionModel ends at the neck; vlmkit's compressor (net_2, net_3) is not part of the comparison
    return (lambda: ours.forward_neck(pixels)), (lambda: theirs(pixel_values=pixels).last_hidden_state), ours, theirs


def clip_pair(registry, sizes, folder):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    c = dict(sizes["clip"])
    patch = c.pop("patch_size", 14)
    # as many tokens as the DeepEncoder gives CLIP: SAM's output grid, here from pixels through CLIP's own patches
    probe = _quiet_build(registry, "encoder", "sam", image_size=sizes["image_size"], **sizes["sam"])
    grid = probe.grid_size(sizes["image_size"], sizes["image_size"])[0]
    size = grid * patch
    config = CLIPVisionConfig(image_size=size, patch_size=patch, hidden_size=c["dim"], num_hidden_layers=c["depth"],
                              num_attention_heads=c["heads"], intermediate_size=c["mlp_dim"], layer_norm_eps=1e-5)
    theirs = randomize(CLIPVisionModel(config), 2)
    theirs.save_pretrained(folder)
    ours = _quiet_build(registry, "encoder", "clip", image_size=size, patch_size=patch, weights=folder,
                        weights_format="hf", **c)
    pixels = torch.randn(sizes["batch"], 3, size, size)
    return (lambda: ours.sequence(pixels)), (lambda: theirs(pixel_values=pixels).last_hidden_state), ours, theirs


def decoder_pair(registry, sizes, folder):
    from transformers import NanoChatConfig, NanoChatForCausalLM
    d = sizes["decoder"]
    config = NanoChatConfig(vocab_size=sizes["vocab_size"], hidden_size=d["n_embd"], intermediate_size=4 * d["n_embd"],
                            num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"],
                            num_key_value_heads=d["n_kv_head"], max_position_embeddings=d["sequence_len"])
    theirs = randomize(NanoChatForCausalLM(config), 3)
    theirs.save_pretrained(folder)
    ours = _quiet_build(registry, "decoder", "nanochat", vocab_size=sizes["vocab_size"], checkpoint=folder)
    ids = torch.randint(0, sizes["vocab_size"], (sizes["batch"], sizes["seq"]))
    # the same loss on the same rows: transformers shifts labels inside, vlmkit takes shifted targets
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    ours_loss = lambda: ours(ours.embed(ids), targets=targets)  # noqa: E731
    theirs_loss = lambda: theirs(input_ids=ids, labels=ids).loss  # noqa: E731
    return ours_loss, theirs_loss, ours, theirs


PAIRS = {"SAM (SamVisionModel)": sam_pair, "CLIP (CLIPVisionModel)": clip_pair,
         "nanochat (NanoChatForCausalLM)": decoder_pair}


def _step(run, module):
    module.zero_grad(set_to_none=True)
    out = run()
    loss = out if out.ndim == 0 else out.float().square().mean()
    loss.backward()


def time_pair(ours_run, theirs_run, ours, theirs, repeats, iterations):
    """(ours ms, theirs ms) per forward + backward: alternating rounds, the fastest round of each."""
    best = {"ours": float("inf"), "theirs": float("inf")}
    runs = {"ours": (ours_run, ours), "theirs": (theirs_run, theirs)}
    for run, module in runs.values():
        _step(run, module)  # warm-up: allocator, kernels
    for _ in range(repeats):
        for name, (run, module) in runs.items():
            start = time.perf_counter()
            for _ in range(iterations):
                _step(run, module)
            best[name] = min(best[name], (time.perf_counter() - start) / iterations * 1000)
    return best["ours"], best["theirs"]


def compare(scale="default", repeats=5, registry=None, log=print):
    """Rows (component, ours ms, theirs ms, ours/theirs, max |diff| of the forward outputs), plus a total row."""
    registry = registry or load_plugins()[1]
    sizes = scale_sizes(scale)
    iterations = 3 if scale == "default" else 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-hf-") as tmp:
        for i, (name, make) in enumerate(PAIRS.items()):
            ours_run, theirs_run, ours, theirs = make(registry, sizes, os.path.join(tmp, str(i)))
            ours.train(), theirs.train()
            with torch.no_grad():
                diff = (ours_run().float() - theirs_run().float()).abs().max().item()
            ms_ours, ms_theirs = time_pair(ours_run, theirs_run, ours, theirs, repeats, iterations)
            rows.append((name, ms_ours, ms_theirs, ms_ours / ms_theirs, diff))
            log(f"  measured {name} ({scale})")
    total_ours, total_theirs = sum(r[1] for r in rows), sum(r[2] for r in rows)
    rows.append(("all three", total_ours, total_theirs, total_ours / total_theirs, max(r[4] for r in rows)))
    return sizes, rows


def format_rows(scale, sizes, rows):
    lines = [f"| {scale}: component | vlmkit ms | transformers ms | vlmkit / transformers | max abs diff |",
             "|---|---:|---:|---:|---:|"]
    for name, ours, theirs, ratio, diff in rows:
        lines.append(f"| {name} | {ours:.1f} | {theirs:.1f} | **{ratio:.2f}** | {diff:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus_transformers",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["default", "wide", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for scale in (["default", "wide"] if args.scale == "both" else [args.scale]):
        sizes, rows = compare(scale, args.repeats)
        print(format_rows(scale, sizes, rows) + "\n")


if __name__ == "__main__":
    main()
