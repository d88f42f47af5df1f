"""Fixtures shared by the test modules (plain helpers are in tests/helpers.py)."""
import importlib
import os
import subprocess

import attrs
import pytest
import torch
from PIL import Image, ImageDraw

from core import checkpoint
from core.generate import generate, image_prompt_ids
from core.images import preprocess
from core.model import build_model
from core.registry import load_plugins
from tests.helpers import TINY

# No test may reach a model hub: a hub name resolves from the cache or fails at once (core/hub.py).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def registry():
    """Every built-in component, loaded once."""
    return load_plugins()[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The cache folder of tests/tiny_recipe.py's synthetic data: rendered by the first run, reused after."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def cli(capsys):
    """Run ``python -m MODULE ARGS`` in this process (no interpreter start-up): a CompletedProcess with the
    exit code ``main`` returns and what it printed. A kill, torchrun or a fresh interpreter needs a real
    process: ``tests.helpers.run_cli``."""
    def run(module, *args):
        main = importlib.import_module(module if module != "benchmarks" else "benchmarks.__main__").main
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)
    return run


@pytest.fixture(scope="session")
def tiny_model(registry):
    """(model, tokenizer): the tiny model in eval mode, random (seed 0) but untrained; tests only read it."""
    torch.manual_seed(0)
    model, tok = build_model(TINY, registry)
    with torch.no_grad():  # nanochat zeroes lm_head and the blocks' output projections: the image would not matter
        for p in model.decoder.parameters():
            if not p.any():
                p.normal_(std=0.3)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model):
    """(folder, model file, three PNGs, generate()'s texts of them): ``tiny_model`` saved as training saves it,
    in a stage folder under ``folder``, and what it reads in-process."""
    root = tmp_path_factory.mktemp("generate")
    model, tok = tiny_model
    prompt = "<image>\nFree OCR."
    meta = {"stage": "s", "model": attrs.asdict(TINY), "prompt": prompt, "plugins": []}  # what train._save writes
    path = checkpoint.save_checkpoint(str(root / "stage"), 5, model, meta)
    images = []
    for i, (size, color) in enumerate([((32, 32), "white"), ((60, 24), "gray"), ((20, 40), "black")]):
        image = Image.new("RGB", size, color)
        ImageDraw.Draw(image).rectangle([2, 2, 2 + 6 * i, 12], fill="red")
        images.append(str(root / f"page{i}.png"))
        image.save(images[-1])
    pixels = torch.stack([preprocess(Image.open(p), model.image_size) for p in images])
    rows = generate(model, tok, pixels, image_prompt_ids(model, tok, prompt), 12)
    texts = [tok.decode(ids) for ids in rows]
    assert len(set(texts)) > 1  # the images reach the text
    return root, path, images, texts
