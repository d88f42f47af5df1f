"""What the tests share: paths, the tiny model config, small builders, tiny shards, and a subprocess runner.

Fixtures live in conftest.py; plain helpers live here and are imported (``from tests.helpers import ...``).
"""
import io
import os
import subprocess
import sys

import torch
import webdataset as wds
from PIL import Image

from core.model import build_model
from core.recipe import Component, ModelConfig
from core.stream import train_batches
from plugins.tokenizers.bytes import ByteTokenizer as Bytes  # bos 256, eos 257, image 258, pad 259

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPE = os.path.join(ROOT, "recipes", "two_stage.yaml")
# the grid task (the default before the realistic one): square 32 px images, cell_reading; plumbing tests use
# it because it is the smallest recipe that trains end to end and has a square view (crops need one)
GRID_RECIPE = os.path.join(ROOT, "recipes", "grid.yaml")

TINY = ModelConfig(
    encoder=Component("deepencoder", {"image_size": 32, "sam": dict(patch_size=8, dim=32, depth=2, heads=2,
                                                                   window_size=2, global_attn_indexes=[1],
                                                                   out_chans=32, downsample_channels=[32, 48],
                                                                   downsample_strides=[1, 1]),
                                      "clip": dict(dim=48, depth=1, heads=2, mlp_dim=96)}),
    projector=Component("linear"),
    decoder=Component("nanochat", {"n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "sequence_len": 128}),
    tokenizer=Component("bytes"),
)

REAL = ModelConfig(  # recipes/deepseek_ocr_d20.yaml's sizes: DeepSeek-OCR's DeepEncoder + nanochat d20
    encoder=Component("deepencoder", {"image_size": 1024}),
    projector=Component("linear"),
    decoder=Component("nanochat", {"n_layer": 20, "n_head": 10, "n_kv_head": 10, "n_embd": 1280,
                                   "sequence_len": 2048}),
    tokenizer=Component("bytes"),
)


def tiny(registry, seed=0):
    torch.manual_seed(seed)
    return build_model(TINY, registry)


def run_cli(*args, env_extra=None, cwd=None, timeout=600):
    """Run ``python -m <args>`` from the repo root in a new process (for kills, torchrun and real exit
    codes); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, (env_extra or {}).pop("PYTHONPATH", None),
                                                   env.get("PYTHONPATH")] if p)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


def random_gpt(sizes, seed=0, **kw):
    """A nanochat GPT of ``sizes`` (+ ``kw``) with every weight N(0, 0.3), in eval mode: the real init zeroes
    lm_head, so every logit would tie."""
    from plugins.decoders.nanochat import GPT
    torch.manual_seed(seed)
    model = GPT(**{**sizes, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def png(size=8, shade=0):
    """The bytes of a size x size PNG of one colour (``shade`` tells samples apart)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 0)).save(buf, format="PNG")
    return buf.getvalue()


def good_sample(key, shade=0):
    """A shard sample whose text is its key (so a batch names the samples it holds)."""
    return {"__key__": key, "png": png(shade=shade), "txt": key.encode()}


def write_shard(path, samples):
    """A WebDataset tar of ``samples`` (dicts of member bytes) in this order; returns its path as a string."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


# A training stream of tiny samples: 8 px images, 4 image tokens, answers of up to 12 bytes
# (test_streaming.py, test_bad_samples.py).
PROMPT = "<image>\nFree OCR."
PREFIX = 1 + 4 + len("\nFree OCR.")  # bos, 4 image tokens, the prompt's tail
MAX_LEN = PREFIX + 12  # room for 12 answer bytes


def stream(paths, **kw):
    args = dict(tokenizer=Bytes(), image_size=8, prompt=PROMPT, num_image_tokens=4, max_len=MAX_LEN,
                batch_size=3, shuffle_buffer=4)
    return train_batches(paths, **{**args, **kw})


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]
