"""Generation (core/generate.py) and python -m core.generate: reading images, PDFs and prompts with a tiny_checkpoint
checkpoint (no training; a tiny random model); it never emits <|image|>, whatever the head favours."""
import json

import pytest
import torch
from PIL import Image

from core.generate import generate, image_prompt_ids
from core.generate import DEFAULT_MAX_NEW_TOKENS, main, new_tokens, tsv_line

PROMPT = "<image>\nFree OCR."
NEW_TOKENS = "12"


def test_out_jsonl_equals_generate_in_process(cli, tiny_checkpoint):
    root, _, images, texts = tiny_checkpoint
    out = root / "preds.jsonl"
    result = cli("core.generate", str(root / "stage"), *images, "--out", str(out), "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"id": p, "text": t} for p, t in zip(images, texts)]


def test_stdout_one_line_per_image_without_cache_in_batches(cli, tiny_checkpoint):
    _, path, images, texts = tiny_checkpoint
    result = cli("core.generate", path, *images, "--no-cache", "--batch-size", "2", "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [tsv_line(p, t) for p, t in zip(images, texts)]  # greedy: same as cached
    assert "2/2" in result.stderr  # the progress bar over batches


def test_missing_image_is_one_error_line_naming_it(cli, tiny_checkpoint):
    root, path, images, _ = tiny_checkpoint
    missing = str(root / "nope.png")
    result = cli("core.generate", path, images[0], missing)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0], result.stderr


def test_unreadable_image_and_checkpoint_without_meta(tiny_checkpoint, tmp_path, capsys):
    _, path, images, _ = tiny_checkpoint
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


def test_pdf_pages_are_read_as_their_rendered_images(cli, tiny_checkpoint, tmp_path):
    """doc.pdf#page=N, a one-page doc.pdf and a longer doc.pdf (every page) read as the PNG core.shards stores."""
    from benchmarks.inputs import box, pdf_bytes
    from core.pdf import PdfPage, Render, render_png
    _, path, _, _ = tiny_checkpoint
    book, single = tmp_path / "book.pdf", tmp_path / "single.pdf"
    book.write_bytes(pdf_bytes([box(72, 500, 300, 200), box(300, 100, 200, 500)]))
    single.write_bytes(pdf_bytes([box(72, 600, 100, 100)]))
    pngs = []
    for i, (pdf, page) in enumerate([(book, 1), (book, 2), (single, 1)]):
        pngs.append(tmp_path / f"rendered{i}.png")
        pngs[-1].write_bytes(render_png(PdfPage(str(pdf), page), Render()))
    want = cli("core.generate", path, *pngs, "--max-new-tokens", NEW_TOKENS)
    assert want.returncode == 0, want.stderr
    texts = [line.split("\t", 1)[1] for line in want.stdout.splitlines()]
    got = cli("core.generate", path, f"{book}#page=2", single, book, "--max-new-tokens", NEW_TOKENS)
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == [tsv_line(f"{book}#page=2", texts[1]), tsv_line(str(single), texts[2]),
                                       tsv_line(f"{book}#page=1", texts[0]), tsv_line(f"{book}#page=2", texts[1])]
    out = tmp_path / "md"  # a PDF's pages get .md files of their own
    assert cli("core.generate", path, book, "--out-dir", out, "--max-new-tokens", NEW_TOKENS).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["book_p1.md", "book_p2.md"]
    missing = cli("core.generate", path, f"{tmp_path / 'nope.pdf'}#page=1")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    past = cli("core.generate", path, f"{single}#page=3")
    assert past.returncode == 2 and "pdf_page_out_of_range: page 3 of 1" in past.stderr


@pytest.mark.parametrize("recorded, tokens, source", [
    ({"max_new_tokens": int(NEW_TOKENS), "max_len": 100}, int(NEW_TOKENS), "the checkpoint's eval.max_new_tokens"),
    ({"max_len": 64}, 64 - 32, "the checkpoint's data.max_len 64 less the 32-token prompt"),  # bos, 21 + 10
], ids=["eval-length", "max-len"])
def test_default_length_is_what_the_checkpoint_trained_with(cli, tiny_checkpoint, tmp_path, recorded, tokens, source):
    root, path, images, texts = tiny_checkpoint
    stage = tmp_path / "stage"
    stage.mkdir()
    for name in ("model_000005.safetensors", "meta_000005.json"):
        data = (root / "stage" / name).read_bytes()
        if name.startswith("meta"):
            data = json.dumps({**json.loads(data), **recorded}).encode()
        (stage / name).write_bytes(data)
    result = cli("core.generate", stage, images[0])
    assert result.returncode == 0, result.stderr
    assert f"max new tokens: {tokens} ({source})" in result.stderr.splitlines()
    want = cli("core.generate", stage, images[0], "--max-new-tokens", tokens)
    assert result.stdout == want.stdout
    if tokens == int(NEW_TOKENS):
        assert result.stdout.splitlines() == [tsv_line(images[0], texts[0])]


def test_a_checkpoint_without_training_lengths_gets_the_stated_default():
    assert new_tokens({"max_new_tokens": None, "max_len": None}, 32) == (
        DEFAULT_MAX_NEW_TOKENS, "the default: the checkpoint's meta json records no training length")


def test_an_image_far_from_the_model_view_is_warned_once(cli, tiny_checkpoint, tmp_path):
    _, path, images, _ = tiny_checkpoint
    strips = []
    for i in range(3):
        strips.append(str(tmp_path / f"strip{i}.png"))
        Image.new("RGB", (300, 20), "white").save(strips[-1])
    result = cli("core.generate", path, images[0], *strips, "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {strips[0]} is 15:1 (width:height) but the model's view is 1:1: it is padded to "
                        f"the view, so its text shrinks (2 more image(s) like it)"]
    quiet = cli("core.generate", path, *images, "--max-new-tokens", "2")  # 60 x 24 is 2.5:1, but 20 x 40 is 1:2
    assert [line for line in quiet.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {images[1]} is 2.5:1 (width:height) but the model's view is 1:1: it is padded to the view, so "
        f"its text shrinks"]

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
