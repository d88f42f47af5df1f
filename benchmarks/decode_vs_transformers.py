"""``core.generate.generate``'s greedy decoding against transformers' ``generate()`` on the same nanochat weights.

    python -m benchmarks.decode_vs_transformers [--layers 4] [--width 512] [--vocab 65536] [--batch 8]
        [--prompt 300] [--new 256] [--repeats 2] [--threads N]

A ``NanoChatForCausalLM`` of the given size gets random weights and is saved with save_pretrained;
vlmkit's nanochat decoder loads it (``checkpoint=``), as a user would. Both decode the same batch of
random prompts greedily to exactly ``--new`` tokens (no stop token) with a KV cache: transformers
through ``generate(do_sample=False)``, vlmkit through ``generate()`` with the prompt as a text-only
layout (no vision tokens). The tokens must agree before anything is timed; tokens/s = batch x new
tokens / the fastest of ``--repeats`` calls (prefill included). A benchmark, not a test: needs the
``refs`` extra (transformers).
"""
import argparse
import contextlib
import io
import tempfile
import time

import torch

from benchmarks.versus_transformers import randomize
from core.generate import generate
from core.registry import load_plugins


class TextOnly:
    """What ``generate()`` needs of a VisionLanguageModel, for a prompt without image: the decoder and the
    embedding of the prompt ids (the vision tokens are none)."""

    def __init__(self, decoder, image_token_id):
        self.decoder, self.image_token_id = decoder, image_token_id

    def encode_views(self, pixel_values, tiles=None, grids=None):
        return None, None, None

    def merge(self, ids, vision_tokens):
        return self.decoder.embed(ids)


class NoStop:
    """Stop ids no model emits: both sides decode the full length."""
    eos_id = bos_id = -1


def models(layers, width, vocab, prompt, new):
    from transformers import NanoChatConfig, NanoChatForCausalLM
    torch.manual_seed(0)
    config = NanoChatConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=width // 128 or 1,
                            num_key_value_heads=width // 128 or 1, max_position_embeddings=prompt + new)
    theirs = randomize(NanoChatForCausalLM(config), 3)
    with torch.no_grad():
        theirs.lm_head.weight[vocab - 1] = 0.0  # the token vlmkit masks as <|image|>: a logit of 0, never the largest
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-decode-") as folder:
        theirs.save_pretrained(folder)
        with contextlib.redirect_stdout(io.StringIO()):
            ours = load_plugins()[1].build("decoder", "nanochat", vocab_size=vocab, checkpoint=folder)
    return ours.eval(), theirs.eval()


def timed(run, repeats):
    """(fastest seconds of ``repeats`` calls after a warm-up call, the last output)."""
    best, out = float("inf"), run()
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(layers=4, width=512, vocab=65536, batch=8, prompt=300, new=256, repeats=2):
    """(vlmkit tokens/s, transformers tokens/s, share of generated tokens that agree)."""
    ours, theirs = models(layers, width, vocab, prompt, new)
    ids = torch.randint(0, vocab - 1, (batch, prompt), generator=torch.Generator().manual_seed(1))
    model = TextOnly(ours, vocab - 1)

    def run_ours():
        return torch.tensor(generate(model, NoStop(), torch.zeros(batch, 1), ids[0].tolist(), new))

    def run_theirs():
        return theirs.generate(input_ids=ids[:1].expand(batch, -1), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt:]

    with torch.no_grad():
        s_ours, a = timed(run_ours, repeats)
        s_theirs, b = timed(run_theirs, repeats)
    return batch * new / s_ours, batch * new / s_theirs, (a == b).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_vs_transformers",
                                     description=__doc__.split("\n")[0])
    for name, default in (("layers", 4), ("width", 512), ("vocab", 65536), ("batch", 8), ("prompt", 300),
                          ("new", 256), ("repeats", 2), ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs, agree = compare(args.layers, args.width, args.vocab, args.batch, args.prompt, args.new, args.repeats)
    print(f"greedy decoding, nanochat {args.layers} x {args.width}, vocabulary {args.vocab:,}, batch {args.batch}, "
          f"{args.prompt}-token prompt, {args.new} new tokens, {torch.get_num_threads()} thread(s), best of "
          f"{args.repeats}; tokens agree: {agree:.1%}\n")
    print("| decoder | tokens/s | vlmkit / transformers |\n|---|---:|---:|")
    print(f"| vlmkit core.generate | {ours:,.0f} | **{ours / theirs:.2f}** |")
    print(f"| transformers generate() | {theirs:,.0f} | |")


if __name__ == "__main__":
    main()
