"""python -m core.export: vlmkit checkpoints as folders transformers' from_pretrained loads, with the same logits."""
from types import SimpleNamespace

import attrs
import pytest
import torch

from core import checkpoint
from core.errors import ConfigError
from core.export import export
from core.model import build_model
from core.recipe import Component
from tests import hf_tiny
from tests.helpers import TINY

pytest.importorskip("transformers")  # the hf extra


def save(model, config, folder):
    meta = {"stage": "s", "model": attrs.asdict(config), "prompt": "<image>\nFree OCR.", "plugins": []}
    return checkpoint.save_checkpoint(str(folder), 2, model, meta)


@torch.no_grad()
def test_nanochat_decoder_exports_as_transformers_nanochat(cli, tmp_path, registry):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model, tok = build_model(TINY, registry)
    for p in model.decoder.parameters():  # nanochat zeroes lm_head and the output projections
        p.normal_(0.0, 0.3)
    path = save(model, TINY, tmp_path / "stage")
    out = tmp_path / "exported"
    result = cli("core.export", path, out)
    assert result.returncode == 0, result.stderr
    assert "wrote language model NanoChatForCausalLM" in result.stdout
    assert "left out: encoder 'deepencoder', projector and layout tokens" in result.stdout
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    ids = torch.randint(0, tok.vocab_size, (2, 13))
    ours = model.decoder(model.decoder.embed(ids))
    assert (hf(input_ids=ids).logits - ours).abs().max().item() < 1e-4
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    hf_tok = AutoTokenizer.from_pretrained(out)  # the bytes tokenizer as byte-level BPE without merges
    text = "Ünïcode, digits 0123 and <|image|> text"
    assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)
    assert hf_tok.convert_tokens_to_ids("<|image|>") == tok.image_id
    assert hf_tok.decode(tok.encode(text) + [tok.eos_id], skip_special_tokens=True) == text

    again = cli("core.export", path, out)  # never into a folder with files
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "not an empty folder" in again.stderr


@torch.no_grad()
def test_hf_causal_lm_export_round_trips(cli, tmp_path, registry):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tmp_path / "qwen3"
    hf_tiny.tokenizer_folder(folder, bos=False)
    hf_tiny.lm_folder(folder, "qwen3", len(AutoTokenizer.from_pretrained(folder)))  # grows for <|image|>
    config = attrs.evolve(TINY, decoder=Component("hf_causal_lm", {"model": str(folder)}),
                          tokenizer=Component("hf", {"model": str(folder)}))
    torch.manual_seed(0)
    model, tok = build_model(config, registry)
    with torch.no_grad():  # as if trained: every weight differs from the folder it started from
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "exported"
    result = cli("core.export", save(model, config, tmp_path / "stage"), out, "--part", "decoder")
    assert result.returncode == 0, result.stderr
    assert "wrote language model Qwen3ForCausalLM" in result.stdout and "left out" not in result.stdout
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # still tied
    assert hf.config.vocab_size == tok.vocab_size and hf.config.eos_token_id == tok.eos_id
    ids = torch.tensor([tok.encode("the quick brown fox") + [tok.image_id]])
    ours = model.decoder(model.decoder.embed(ids))
    assert (hf(input_ids=ids).logits - ours).abs().max().item() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids("<|image|>") == tok.image_id and len(hf_tok) == tok.vocab_size
    # and back in: the exported folder is a model vlmkit's recipe can name
    back = registry.build("decoder", "hf_causal_lm", vocab_size=tok.vocab_size, model=str(out))
    assert torch.equal(back(back.embed(ids)), ours)


def test_export_asks_the_components():
    written = []

    def component(kind, can):
        obj = SimpleNamespace()
        if can:
            obj.export_hf = lambda out_dir, *rest: written.append(kind) or f"the {kind}"
        return obj
    model = SimpleNamespace(encoder=component("whole model", True), decoder=component("decoder", True))
    tokenizer = component("tokenizer", True)
    assert export(model, tokenizer, "out") == ["wrote the whole model"]  # the encoder's, when it has one
    assert export(model, tokenizer, "out", part="decoder") == ["wrote the decoder", "wrote the tokenizer"]
    model.encoder = component("encoder", False)
    lines = export(model, component("tokenizer", False), "out", names={"tokenizer": "bytes2"})
    assert lines[0] == "wrote the decoder" and lines[1] == "left out: tokenizer 'bytes2' has no transformers form"
    assert lines[2].startswith("left out: encoder 'SimpleNamespace'")
    model.decoder = component("decoder", False)
    with pytest.raises(ConfigError, match=r"^neither the encoder 'sam' nor the decoder 'gpt' has a transformers form"):
        export(model, tokenizer, "out", names={"encoder": "sam", "decoder": "gpt"})
    assert written == ["whole model", "decoder", "tokenizer", "decoder"]
