"""Sample schemas beyond OCR: LLaVA conversations, text-only samples, and a stage's text_ratio."""
import io
import json

import pytest
import webdataset as wds
from PIL import Image

from core.badsamples import BadSample
from core.data import encode_raw, prompt_prefix
from plugins.tokenizers.bytes import ByteTokenizer
from tests.helpers import GRID_RECIPE

TOK = ByteTokenizer()


def png(color=(255, 255, 255), size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def conversation(with_image=True):
    first = ("<image>\n" if with_image else "") + "Read it."
    return json.dumps({"conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "ok"}]}).encode()


def test_encode_raw_by_schema():
    prefix = prompt_prefix(TOK, "<image>\nFree OCR.", 5, 64)
    inputs, targets, cut, text, ext = encode_raw({"png": png(), "txt": b"ab"}, TOK, prefix, 5, 64)
    assert ext == "png" and text == "ab" and not cut and inputs[:1 + 5] == [TOK.bos_id] + [TOK.image_id] * 5
    inputs, targets, cut, text, ext = encode_raw({"png": png(), "json": conversation()}, TOK, prefix, 5, 64)
    assert ext == "png" and text == "ok" and inputs.count(TOK.image_id) == 5
    assert [t for t in targets if t != -1] == TOK.encode("ok") + [TOK.eos_id]
    inputs, targets, cut, text, ext = encode_raw({"txt": b"plain"}, TOK, prefix, 5, 64, text_only=True)
    assert ext is None and inputs == [TOK.bos_id] + TOK.encode("plain") and targets == TOK.encode("plain") + [TOK.eos_id]
    for raw, text_only, reason in [({"json": conversation(False)}, False, "text_only"),
                                   ({"png": png(), "txt": b"x"}, True, "image_sample"),
                                   ({"png": png(), "json": b"{not json"}, False, "bad_json"),
                                   ({"png": png(), "json": json.dumps({"conversations": [{"from": "gpt", "value": "x"}]}).encode()},
                                    False, "bad_conversation")]:
        with pytest.raises(BadSample) as info:
            encode_raw(raw, TOK, prefix, 5, 64, text_only=text_only)
        assert info.value.reason == reason


def test_a_stage_mixes_text_only_batches(cli, tmp_path):
    text_shard = str(tmp_path / "text-000000.tar")
    with wds.TarWriter(text_shard) as sink:
        for i in range(40):
            sink.write({"__key__": f"t{i:03d}", "txt": f"some plain text number {i}"})
    run_dir = tmp_path / "run"
    result = cli("core.run", GRID_RECIPE, f"run.dir={run_dir}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                 "data.dataset.train_samples=256", "data.dataset.eval_samples=8", "eval.samples=8",
                 f"data.text_dataset={{name: shards, train: '{text_shard}'}}", "stages.0.text_ratio=0.5",
                 "stages.0.steps=12", "stages.1.steps=2", "stages.0.probe_every=0", "stages.1.probe_every=0",
                 "stages.0.monitor_every=0", "stages.1.monitor_every=0", "data.batch_size=4")
    assert result.returncode == 0, result.stderr[-2000:]
    ends = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    first = next(e for e in ends if e["event"] == "stage_end" and e["stage"] == "vis_tok")
    assert 0 < first["text_steps"] < 12


def test_text_ratio_needs_a_text_dataset(cli, tmp_path):
    result = cli("core.run", GRID_RECIPE, "stages.0.text_ratio=0.1", f"run.dir={tmp_path}")
    assert result.returncode == 2 and "stages.0.text_ratio: text-only steps need data.text_dataset" in result.stderr
