"""Generation (core/generate.py): it never emits <|image|>, whatever the head favours; python -m core.generate
reads --prompt with a shell's literal backslash-n as a newline and prints the prompt it used."""
import pytest
import torch

from core.generate import generate, image_prompt_ids, main

PROMPT = "<image>\nFree OCR."


def favour_image_token(model, image_id, boost=1e4):
    """A forward hook on lm_head that makes <|image|> the largest logit by far, at every position."""
    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., image_id] += boost
        return logits
    return model.decoder.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_never_emits_the_image_token_even_when_the_head_favours_it(tiny_model, use_cache, temperature):
    """The token that crashed the original project's generation: placeholders need pixels to merge."""
    model, tok = tiny_model
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


def test_a_shells_literal_backslash_n_in_prompt_is_a_newline_and_the_prompt_is_printed(tiny_checkpoint, capsys):
    root, _, images, _ = tiny_checkpoint
    args = [str(root / "stage"), images[0], "--max-new-tokens", "4"]
    assert main(args) == 0
    trained = capsys.readouterr()
    assert "prompt (the checkpoint's training prompt): '<image>\\nFree OCR.'" in trained.err
    assert main([*args, "--prompt", "<image>\\nFree OCR."]) == 0  # what `--prompt "<image>\nFree OCR."` passes
    typed = capsys.readouterr()
    assert "prompt (--prompt): '<image>\\nFree OCR.'" in typed.err
    assert typed.out == trained.out  # the same prompt, so the same greedy text
    assert main([*args, "--prompt", "<image> a\\\\nb"]) == 0  # an escaped backslash stays one backslash
    assert "prompt (--prompt): '<image> a\\\\nb'" in capsys.readouterr().err
