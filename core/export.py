"""python -m core.export CHECKPOINT OUT_DIR: a trained model as a folder transformers' from_pretrained loads.

    python -m core.export runs/two_stage/vis_mid exported/        # then AutoModelForCausalLM.from_pretrained

CHECKPOINT is what ``python -m core.generate`` reads (a ``model_XXXXXX.safetensors`` file or a stage
folder); the model is rebuilt from its meta json. What to write is the components' business, asked
through the optional ``export_hf`` members of core/contracts.py, never decided here:

- the encoder's ``export_hf(out_dir, model, tokenizer)``, when it has one, writes the whole
  vision-language model (an architecture transformers has, e.g. DeepSeek-OCR 2);
- otherwise the decoder's ``export_hf(out_dir, tokenizer)`` writes the language model and the
  tokenizer's ``export_hf(out_dir)`` its files; the vision side then has no transformers form and
  the command says it was left out. ``--part decoder`` asks for this even when the encoder could
  write the whole model.

OUT_DIR must be new or empty. A component without ``export_hf`` is one ``error:`` line, exit code 2.
"""
import argparse
import os
import sys

from core.errors import ConfigError, cli_main
from core.generate import load_checkpoint

PARTS = ("model", "decoder")


def export(model, tokenizer, out_dir, part="model", names=None):
    """Write ``model`` (and ``tokenizer``) into ``out_dir``; return the lines saying what was written.

    ``names``: the components' recipe names, by kind, for the messages.
    """
    names = names or {}

    def name(kind, obj):
        return names.get(kind) or type(obj).__name__

    whole = getattr(model.encoder, "export_hf", None) if part == "model" else None
    if whole is not None:
        return [f"wrote {whole(out_dir, model, tokenizer)}"]
    write = getattr(model.decoder, "export_hf", None)
    if write is None:
        raise ConfigError(f"neither the encoder {name('encoder', model.encoder)!r} nor the decoder "
                          f"{name('decoder', model.decoder)!r} has a transformers form (no export_hf)")
    lines = [f"wrote {write(out_dir, tokenizer)}"]
    write_tokenizer = getattr(tokenizer, "export_hf", None)
    lines.append(f"wrote {write_tokenizer(out_dir)}" if write_tokenizer is not None else
                 f"left out: tokenizer {name('tokenizer', tokenizer)!r} has no transformers form")
    if part == "model":
        lines.append(f"left out: encoder {name('encoder', model.encoder)!r}, projector and layout tokens have no "
                     f"transformers form (the folder is the language model alone)")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m core.export",
                                     description="Write a checkpoint as a folder transformers' from_pretrained loads.")
    parser.add_argument("checkpoint", help="model_XXXXXX.safetensors file or a stage folder (takes the latest)")
    parser.add_argument("out_dir", help="the folder to write (new or empty)")
    parser.add_argument("--part", choices=PARTS, default="model",
                        help="model (default): the whole model where the encoder can write it, else the language "
                             "model; decoder: the language model and tokenizer alone")
    return parser.parse_args(argv)


def command(argv=None):
    args = parse_args(argv)
    out_dir = os.path.expanduser(args.out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"{out_dir}: exists and is not an empty folder; export writes into a new one")
    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    names = {kind: part.get("name") for kind, part in meta["model"].items() if isinstance(part, dict)}
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot create it ({e})") from e
    for line in export(model, tokenizer, out_dir, args.part, names):
        print(line)
    print(f"exported to {out_dir}")
    return 0


def main(argv=None):
    """The command line: ``command`` with errors as one line and an exit code."""
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
