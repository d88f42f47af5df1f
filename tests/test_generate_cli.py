"""python -m core.generate: reading images with a saved checkpoint (no training; a tiny random model)."""
import json

import attrs
import pytest
import torch
from PIL import Image, ImageDraw

from core import checkpoint
from core.images import preprocess
from core.generate import generate
from core.generate import image_prompt_ids as prompt_ids
from core.model import build_model
from core.generate import main, tsv_line
from core.registry import load_plugins
from tests.helpers import TINY

PROMPT = "<image>\nFree OCR."
NEW_TOKENS = "12"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A stage folder with a tiny model saved as training saves it, three PNGs, and generate()'s texts in-process."""
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    model, tok = build_model(TINY, load_plugins()[1])
    with torch.no_grad():  # nanochat zeroes lm_head and the blocks' output projections: the image would not matter
        for p in model.decoder.parameters():
            if not p.any():
                p.normal_(std=0.3)
    model.eval()
    meta = {"stage": "s", "model": attrs.asdict(TINY), "prompt": PROMPT, "plugins": []}  # the fields train._save writes
    path = checkpoint.save_checkpoint(str(root / "stage"), 5, model, meta)
    images = []
    for i, (size, color) in enumerate([((32, 32), "white"), ((60, 24), "gray"), ((20, 40), "black")]):
        image = Image.new("RGB", size, color)
        ImageDraw.Draw(image).rectangle([2, 2, 2 + 6 * i, 12], fill="red")
        images.append(str(root / f"page{i}.png"))
        image.save(images[-1])
    pixels = torch.stack([preprocess(Image.open(p), model.image_size) for p in images])
    rows = generate(model, tok, pixels, prompt_ids(model, tok, PROMPT), int(NEW_TOKENS))
    texts = [tok.decode(ids) for ids in rows]
    assert len(set(texts)) > 1  # the images reach the text
    return root, path, images, texts


def test_out_jsonl_equals_generate_in_process(cli, saved):
    root, _, images, texts = saved
    out = root / "preds.jsonl"
    result = cli("core.generate", str(root / "stage"), *images, "--out", str(out), "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"id": p, "text": t} for p, t in zip(images, texts)]


def test_stdout_one_line_per_image_without_cache_in_batches(cli, saved):
    _, path, images, texts = saved
    result = cli("core.generate", path, *images, "--no-cache", "--batch-size", "2", "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [tsv_line(p, t) for p, t in zip(images, texts)]  # greedy: same as cached
    assert "2/2" in result.stderr  # the progress bar over batches


def test_missing_image_is_one_error_line_naming_it(cli, saved):
    root, path, images, _ = saved
    missing = str(root / "nope.png")
    result = cli("core.generate", path, images[0], missing)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0], result.stderr


def test_unreadable_image_and_checkpoint_without_meta(saved, tmp_path, capsys):
    _, path, images, _ = saved
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    assert main([path, str(not_image)]) == 2
    assert capsys.readouterr().err.startswith(f"error: image {str(not_image)!r}: cannot read it")
    bare = tmp_path / "model_000001.safetensors"
    bare.write_bytes(open(path, "rb").read())
    assert main([str(bare), images[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bare}: no meta_XXXXXX.json")
    (tmp_path / "empty_stage").mkdir()
    assert main([str(tmp_path / "empty_stage"), images[0]]) == 2
    assert "no model_XXXXXX.safetensors checkpoint in this folder" in capsys.readouterr().err
