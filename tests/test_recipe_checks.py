"""What a recipe is checked for before anything trains: YAML 1.2 numbers, every weight path in --dry-run, steps: 0
and values out of range, the real-scale dry run without its files, and the README's examples doing what they say."""
import os
import re

import pytest
import torch

from core.errors import ConfigError
from core.evaluate import format_samples
from core.recipe import load_recipe
from core.run import main
from core.yamlfile import parse_options
from tests.helpers import DEFAULT_RECIPE, ROOT
from tests.tiny_recipe import log_events, run, write_recipe

D20 = os.path.join(ROOT, "recipes", "deepseek_ocr_d20.yaml")
NO_TOKENIZER = "model.tokenizer.path=/nonexistent/tokenizer_bpe.json"  # a dry run must not need the file


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---- numbers as people write them

def test_exponent_floats_without_a_dot_are_numbers_in_component_args_overrides_and_options(tmp_path, cache):
    recipe = write_recipe(tmp_path, cache)
    recipe.write_text(recipe.read_text().replace("sequence_len: 128}", "sequence_len: 128, norm_eps: 1e-6}"))
    loaded = load_recipe(str(recipe), ["stages.0.lr=3e-3",
                                       "stages.0.regularisers=[{name: cell_reading, weight: 1E-1}]"])
    assert loaded.model.decoder.args["norm_eps"] == 1e-6 and loaded.stages[0].lr == 3e-3
    assert loaded.stages[0].regularisers[0].args["weight"] == 0.1
    assert parse_options(["threshold=5e-1", "name=1e5x", "n=3"]) == {"threshold": 0.5, "name": "1e5x", "n": 3}
    assert run(recipe) == 0  # used to fail in torch at the first forward: eps must be float, not str


def test_a_string_where_a_component_takes_a_number_is_one_line_at_load(tmp_path, cache, capsys):
    recipe = write_recipe(tmp_path, cache)
    assert run(recipe, "--dry-run", "stages.0.regularisers=[{name: cell_reading, weight: '0.5'}]") == 2
    assert one_line_error(capsys).endswith("stages.0.regularisers.0.weight: expected a number, got the string '0.5'")


# ---- every weight path is checked by a dry run

@pytest.mark.parametrize("override", ["model.encoder.sam.weights=/nonexistent/sam.safetensors",
                                      "model.encoder.clip.weights=/nonexistent/clip",
                                      "model.encoder.weights=/nonexistent/DeepSeek-OCR/"])
def test_a_missing_encoder_weight_file_fails_the_dry_run(capsys, override):
    args = [override] if "sam." in override or "clip." in override else [override, "model.encoder.sam={}",
                                                                          "model.encoder.clip={}"]
    assert main([D20, "--dry-run", NO_TOKENIZER, *args]) == 2
    assert "weight file does not exist" in one_line_error(capsys)


def test_a_missing_init_from_file_fails_the_dry_run(capsys):
    assert main([D20, "--dry-run", NO_TOKENIZER, "stages.0.init_from={path: /nonexistent/model.safetensors}"]) == 2
    assert "init_from: checkpoint '/nonexistent/model.safetensors' does not exist" in one_line_error(capsys)


# ---- steps 0, and values out of range

def test_a_stage_with_steps_0_is_skipped_and_said(tmp_path, cache, capsys):
    recipe = write_recipe(tmp_path, cache)
    assert run(recipe, "stages.1.steps=0") == 0  # used to crash after training: KeyError 'loss'
    out = capsys.readouterr().out
    assert "stage b: steps 0, skipped" in out and not (tmp_path / "run" / "b").exists()
    assert [e["stage"] for e in log_events(tmp_path / "run", "stage_end")] == ["a"]
    assert run(recipe, "--dry-run", "stages.1.steps=0") == 0
    assert "stage 2/2 'b': steps 0, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("override, key, words", [
    ("stages.0.steps=-1", "stages.0.steps", "must be at least 0"),
    ("run.log_every=0", "run.log_every", "must be at least 1"),  # divided by zero at step 0
    ("stages.0.checkpoint_keep=-1", "stages.0.checkpoint_keep", "must be at least 1"),  # deleted the new checkpoint
    ("data.batch_size=0", "data.batch_size", "must be at least 1"),
    ("stages.0.lr=.nan", "stages.0.lr", "must be a finite number"),
    ("stages.0.schedule=step", "stages.0.decay_every", "schedule: step needs decay_every"),
    ("stages.0.betas=[0.9, 1.5]", "stages.0.betas", "must be two numbers in [0, 1)"),
    ("stages=[{name: a, steps: 0}]", "stages", "every stage has steps: 0"),
    # the second's head replaced the first's in the optimizer and the checkpoint, silently
    ("stages.0.regularisers=[cell_reading, {name: cell_reading, weight: 2}]", "stages.0.regularisers",
     "'cell_reading' is listed twice"),
])
def test_values_out_of_range_are_one_line_at_load_naming_the_key(tmp_path, cache, override, key, words):
    recipe = write_recipe(tmp_path, cache)
    with pytest.raises(ConfigError) as e:
        load_recipe(str(recipe), [override])
    by_override = override.partition("=")[0] == key  # the value came from the override, not from a line of the file
    where = re.escape(f"override {override!r}") if by_override else rf"{re.escape(str(recipe))}(:\d+)?"
    assert re.match(rf"{where}: {re.escape(key)}: ", str(e.value)), str(e.value)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---- the real-scale dry run shows the real d20

def test_the_real_scale_dry_run_shows_the_d20_vocabulary_without_the_tokenizer_file(tmp_path, capsys):
    from PIL import Image

    from core.shards import write_shards
    (tmp_path / "page.txt").write_text("a page")
    Image.new("RGB", (64, 80), "white").save(tmp_path / "page.png")
    shard = write_shards("folder", str(tmp_path), str(tmp_path / "data"), progress=False).pattern
    assert main([D20, "--dry-run", NO_TOKENIZER]) == 2  # the model is described, then: no shards at data/
    assert "error: data.dataset.train: shard 'data/train-000000.tar' does not exist" in capsys.readouterr().err
    assert main([D20, "--dry-run", NO_TOKENIZER, f"data.dataset.train={shard}", f"data.dataset.eval={shard}"]) == 0
    out = capsys.readouterr().out
    # 560,988,160 (docs/architecture.md §1.3) + the <|image|> row of wte and of lm_head: 2 x 1,280
    assert re.search(r"^decoder +560,990,720 +0$", out, re.MULTILINE), out
    assert "vocabulary 65537 (<|image|> = 65536)" in out
    assert "/nonexistent/tokenizer_bpe.json does not exist; the dry run takes the vocabulary from vocab_size" in out


def test_without_the_file_text_cannot_be_encoded_and_training_needs_it(capsys):
    pytest.importorskip("tiktoken")  # the nanochat extra; without it the tokenizer says so first
    from plugins.tokenizers.nanochat_bpe import NanochatBPETokenizer
    with torch.device("meta"):
        tok = NanochatBPETokenizer("/nonexistent/tokenizer_bpe.json", vocab_size=65536)
    assert (tok.vocab_size, tok.image_id, tok.bos_id) == (65537, 65536, 65527)
    with pytest.raises(ConfigError, match="does not exist .the dry run sized the vocabulary"):
        tok.encode("text")
    with pytest.raises(ConfigError, match="does not exist"):
        NanochatBPETokenizer("/nonexistent/tokenizer_bpe.json", vocab_size=65536)  # not a dry run


# ---- the README's examples and previews

def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_the_readmes_quick_try_shortens_every_stage():
    line = next(x for x in _readme().splitlines() if x.startswith("python -m core.run") and "steps=" in x)
    stages = len(load_recipe(DEFAULT_RECIPE).stages)
    assert all(f"stages.{i}.steps=" in line for i in range(stages)), line
    with open(DEFAULT_RECIPE, encoding="utf-8") as f:
        example = next(x for x in f if "steps=" in x)
    assert all(f"stages.{i}.steps=" in example for i in range(stages)), example


def test_the_readme_states_no_test_count_that_drifts():
    assert not re.search(r"about \d+ tests", _readme())


def test_the_dry_run_table_lists_regulariser_heads_as_training_does(tmp_path, cache, capsys):
    recipe = write_recipe(tmp_path, cache)
    assert run(recipe, "--dry-run", "stages.0.regularisers=[cell_reading]") == 0
    dry = capsys.readouterr().out
    assert run(recipe, "stages.0.regularisers=[cell_reading]", "stages.1.steps=0") == 0
    trained = capsys.readouterr().out

    def table(text):
        start = text.index("component")
        return [line for line in text[start:start + 2000].splitlines()[1:] if line.strip()][:8]
    assert re.search(r"^regulariser\.cell_reading +[\d,]+ +0$", dry, re.MULTILINE)
    assert table(dry) == table(trained)


def test_previews_of_long_pages_stay_short():
    page = "word " * 2000
    rows = [{"id": "p1", "loss": 1.0, "gt": page, "pred": page[::-1], "ned": 0.5}]
    assert all(len(line) < 400 for line in format_samples(rows).splitlines())


def test_every_command_and_file_the_readme_and_design_notes_name_exists():
    import glob
    import importlib.util
    missing = []
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    for name in ["README.md", "DESIGN.md", "BENCHMARKS.md", *pages]:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = re.sub(r"<!--.*?-->", "", f.read(), flags=re.DOTALL)  # markers for tools, not for readers
        modules = set(re.findall(r"python -m ((?:core|plugins|benchmarks)[\w.]*)", text))
        missing += [f"{name}: python -m {m}" for m in modules if importlib.util.find_spec(m) is None]
        missing += [f"{name}: {p}" for p in set(re.findall(r"\b((?:core|plugins|recipes|benchmarks|docs)/[\w/]+\.\w+)",
                                                           text)) if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, missing


@pytest.mark.parametrize("override, words", [
    ("eval.max_new_tokens=5000", "eval.max_new_tokens: sequences of 5032 tokens (the prompt with 21 vision tokens"),
    ("data.max_len=3000", "data.max_len: sequences of 3000 tokens do not fit the decoder"),
    ("stages.1.init_from={path: 'stage:zzz'}", "stages.1.init_from.path: 'stage:zzz' names no earlier stage"),
    ("stages.1.init_from.parts=[decodr]", "stages.1.init_from.parts: unknown part 'decodr'"),
    ("stages.1.activation_checkpointing=[encodr]", "stages.1.activation_checkpointing.0: the model has no"),
    ("run.device=tpu9", "run.device: 'tpu9' is not a torch device"),
])
def test_what_would_fail_after_training_fails_before_it(tmp_path, cache, capsys, override, words):
    """The decoder's positions (nanochat's rotary table: 10 x sequence_len), a later stage's init_from and
    activation checkpointing, the device: found before stage a trains, not after it (or after all stages)."""
    recipe = write_recipe(tmp_path, cache)
    recipe.write_text(recipe.read_text().replace("eval: null", "eval: {samples: 2, max_new_tokens: 4}"))
    assert run(recipe, override) == 2
    assert words in one_line_error(capsys)
    assert not (tmp_path / "run" / "a").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, cache, capsys):
    assert run(write_recipe(tmp_path, cache), "run.device=cuda") == 2
    assert "run.device: cuda is not available to this torch" in one_line_error(capsys)


def test_a_run_dir_or_cache_dir_that_cannot_be_written_is_one_line(tmp_path, cache, capsys):
    recipe = write_recipe(tmp_path, cache)
    (tmp_path / "a_file").write_text("")
    assert run(recipe, f"run.dir={tmp_path / 'a_file'}") == 2  # was FileExistsError from os.makedirs
    assert f"run.dir: cannot create {tmp_path / 'a_file'}" in one_line_error(capsys)
    assert run(recipe, f"data.dataset.cache_dir={tmp_path / 'a_file' / 'cache'}") == 2  # was exit 3, a traceback
    assert "data.dataset.cache_dir: cannot write" in one_line_error(capsys)
