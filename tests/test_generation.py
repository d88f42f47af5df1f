"""Issue 15: promises that had no test able to fail (18): generation never emits <|image|>, and run.precision
bf16 really runs the matmuls in bfloat16; and core.generate's --prompt with a shell's literal backslash-n (11)."""
import sys

import attrs
import pytest
import torch
from PIL import Image

from core import checkpoint
from core.generate import generate, image_prompt_ids, main
from core.model import build_model
from tests.helpers import TINY
from tests.tiny_recipe import run, write_recipe

PROMPT = "<image>\nFree OCR."


@pytest.fixture(scope="module")
def model_and_tokenizer(registry):
    torch.manual_seed(0)
    model, tok = build_model(TINY, registry)
    with torch.no_grad():  # nanochat zero-inits lm_head and the output projections: give every logit a value
        for p in model.decoder.parameters():
            if not p.any():
                p.normal_(std=0.3)
    return model.eval(), tok


def favour_image_token(model, image_id, boost=1e4):
    """A forward hook on lm_head that makes <|image|> the largest logit by far, at every position."""
    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., image_id] += boost
        return logits
    return model.decoder.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_never_emits_the_image_token_even_when_the_head_favours_it(model_and_tokenizer, use_cache,
                                                                              temperature):
    """The token that crashed the original project's generation: placeholders need pixels to merge."""
    model, tok = model_and_tokenizer
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = image_prompt_ids(model, tok, PROMPT)
    handle = favour_image_token(model, tok.image_id)
    try:
        with torch.no_grad():  # the hook really makes it the favourite: unmasked, greedy would pick it
            logits = model.decoder(model.merge(torch.tensor([ids] * 3), model.encode_views(pixels)[2]))[:, -1]
        assert (logits.argmax(-1) == tok.image_id).all()
        rows = generate(model, tok, pixels, ids, max_new_tokens=6, use_cache=use_cache, temperature=temperature,
                        seed=3)
    finally:
        handle.remove()
    assert all(len(row) > 0 for row in rows)  # something was generated (not an immediate stop)
    assert all(tok.image_id not in row for row in rows), rows


DTYPE_PROBE = '''
import torch
from core import hookimpl

SEEN = set()  # the dtypes every nn.Linear of the model produced while training


class DtypeProbe:
    """Records the output dtype of every nn.Linear of the stage's model; adds no loss."""

    def __init__(self, model):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _m, _i, out: SEEN.add(out.dtype))

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        return None


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "dtype_probe", DtypeProbe)
'''


@pytest.mark.parametrize("precision, expected", [("bf16", {torch.bfloat16}), ("fp32", {torch.float32})])
def test_the_precision_setting_is_the_dtype_the_matmuls_see_in_training(tmp_path_factory, precision, expected):
    """test_bf16_autocast_trains checks only that the losses are finite; this fails if autocast is off."""
    folder = tmp_path_factory.mktemp(precision)
    (folder / "dtype_probe.py").write_text(DTYPE_PROBE)
    recipe = write_recipe(folder, tmp_path_factory.getbasetemp() / "synthetic", extra="plugins: [dtype_probe.py]\n")
    assert run(recipe, f"run.precision={precision}", "stages.0.regularisers=[dtype_probe]") == 0
    seen = sys.modules["vlmkit_recipe_plugin_dtype_probe"].SEEN
    assert seen == expected


@pytest.fixture(scope="module")
def stage_folder(tmp_path_factory, model_and_tokenizer):
    root = tmp_path_factory.mktemp("prompt")
    model, _ = model_and_tokenizer
    meta = {"stage": "s", "model": attrs.asdict(TINY), "prompt": PROMPT, "plugins": []}
    checkpoint.save_checkpoint(str(root / "stage"), 1, model, meta)
    image = root / "page.png"
    Image.new("RGB", (32, 32), "white").save(image)
    return root, str(image)


def test_a_shells_literal_backslash_n_in_prompt_is_a_newline_and_the_prompt_is_printed(stage_folder, capsys):
    root, image = stage_folder
    args = [str(root / "stage"), image, "--max-new-tokens", "4"]
    assert main(args) == 0
    trained = capsys.readouterr()
    assert "prompt (the checkpoint's training prompt): '<image>\\nFree OCR.'" in trained.err
    assert main([*args, "--prompt", "<image>\\nFree OCR."]) == 0  # what `--prompt "<image>\nFree OCR."` passes
    typed = capsys.readouterr()
    assert "prompt (--prompt): '<image>\\nFree OCR.'" in typed.err
    assert typed.out == trained.out  # the same prompt, so the same greedy text
    assert main([*args, "--prompt", "<image> a\\\\nb"]) == 0  # an escaped backslash stays one backslash
    assert "prompt (--prompt): '<image> a\\\\nb'" in capsys.readouterr().err
