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


def test_real_run_timings_split_steps_from_probes_monitor_checkpoint_and_eval():
    from benchmarks.run_loop import timings
    t, events = 100.0, [{"event": "stage_start", "time": 102.0}]
    for step in range(6):  # 1 s steps; after step 3 (the log's step 4) a 0.5 s monitor then a 2 s probe
        events.append({"event": "train", "step": step, "time": 103.0 + step + (2.5 if step > 3 else 0)})
    events += [{"event": "collapse", "step": 4, "time": 106.5}, {"event": "probe", "step": 4, "time": 108.5},
               {"event": "stage_end", "time": 112.5}, {"event": "eval", "time": 116.5}]
    got = timings(sorted(events, key=lambda e: e["time"]), started=t, finished=117.0)
    assert got["step"] == 1.0 and got["monitor"] == 0.5 and got["probe"] == 2.0
    assert (got["setup"], got["finish"], got["eval"], got["report"]) == (2.0, 2.0, 4.0, 0.5)


def test_real_run_overrides_make_a_short_stage_one_run(tmp_path):
    from benchmarks.common import RECIPE
    from benchmarks.run_loop import run_overrides
    from core.recipe import load_recipe
    short = load_recipe(RECIPE, run_overrides(load_recipe(RECIPE), str(tmp_path), steps=10, eval_samples=8))
    assert short.stages[0].steps == 10 and all(s.steps == 0 for s in short.stages[1:])
    assert short.stages[0].probe_every == short.stages[0].monitor_every == 5 and short.eval.samples == 8
