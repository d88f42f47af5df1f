"""python -m benchmarks' plumbing (never its speed): rows of a chosen length, and one-line errors."""

import torch

from core.memory import full_length_tokens
from core.registry import load_plugins


def test_full_length_rows_hold_the_prompt_the_image_and_targets_on_the_answer_only():
    tokenizer = load_plugins()[1].build("tokenizer", "bytes")
    batch = full_length_tokens(tokenizer, "<image>\nFree OCR.", num_image_tokens=21, max_len=96, batch_size=3)
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (3, 96)
    assert ((ids == tokenizer.image_id).sum(dim=1) == 21).all()  # only the placeholders, no answer id among them
    prefix = 1 + 21 + len(tokenizer.encode("\nFree OCR."))
    assert (targets[:, :prefix - 1] == -1).all() and (targets[:, prefix - 1:] >= 0).all()
    assert torch.equal(targets[:, prefix - 1:-1], ids[:, prefix:])  # next-token pairs


def test_bad_recipe_or_override_stops_at_once_with_one_line(cli):
    for args in (["--recipe", "no/such.yaml"], ["stages.0.stepz=3"]):
        out = cli("benchmarks", *args)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "stepz" in lines[0] and "did you mean 'steps'" in lines[0]
