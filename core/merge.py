"""python -m core.merge ADAPTER_CHECKPOINT OUT: an adapter checkpoint folded into full weights.

ADAPTER_CHECKPOINT is a ``model_XXXXXX.safetensors`` file or a stage folder (its latest) written by a stage
with ``adapters``. Its base is rebuilt, the adapters attached and loaded, then each adapter folds itself into
the layers it wrapped (``vlmkit_adapter_merge``, core/adapters.py). OUT becomes a stage folder holding a
normal vlmkit checkpoint of the same step (model, encoder, meta json, ``latest.json``), which
``python -m core.generate``, ``init_from`` and any exporter read like a checkpoint of a full stage; its
meta json names the adapter checkpoint under ``merged_from``. Regulariser heads are training state
and are not carried over.
"""
import argparse
import os
import sys

from core import adapters, checkpoint
from core.errors import ConfigError, cli_main
from core.generate import checkpoint_meta
from core.registry import load_plugins


def merge_checkpoint(path, out):
    """Write the merged checkpoint of adapter checkpoint ``path`` into folder ``out``; returns its model file."""
    path, meta = checkpoint_meta(path)
    if "adapter" not in meta:
        raise ConfigError(f"{path}: not an adapter checkpoint (its meta json names no adapter); it is full weights "
                          f"already")
    pm, registry = load_plugins(meta.get("plugins") or [])
    model, _, adapted = adapters.rebuild(path, meta, registry, pm)
    adapters.merge(pm, model, adapted)
    kept = {k: v for k, v in meta.items() if k not in ("adapter", "train_state", "step")}
    try:
        return checkpoint.save_checkpoint(out, meta["step"], model, {**kept, "merged_from": os.path.abspath(path)})
    except OSError as e:
        raise ConfigError(f"OUT {out!r}: cannot write the checkpoint there ({e.strerror or e})") from e


def command(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.merge", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="an adapter stage's model_XXXXXX.safetensors, or its stage folder")
    parser.add_argument("out", help="the folder to write the merged checkpoint into")
    args = parser.parse_args(argv)
    print(f"merged: {merge_checkpoint(args.checkpoint, args.out)}")
    return 0


def main(argv=None):
    return cli_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
