"""hf_causal_lm + the hf tokenizer: transformers language models as vlmkit's decoder, at tiny random sizes.

Two families (Qwen3 with tied embeddings and a matrix padded past the tokenizer, Llama untied and grown by
one row for <|image|>) are saved with save_pretrained and compared with transformers itself: logits on
text, logits with image embeddings merged, and greedy generation through vlmkit's KV-cached loop.
"""
import json
from types import SimpleNamespace

import attrs
import pytest
import torch

from core import checkpoint
from core.errors import ConfigError
from core.generate import generate, image_prompt_ids, load_checkpoint
from core.model import build_model, checkpoint_activations
from core.muon import MuonAdamW, muon_matrices
from core.recipe import Component
from core.train import parameter_groups
from plugins.freeze.glob import GlobFreeze, PresetFreeze
from tests import hf_tiny
from tests.helpers import DEFAULT_RECIPE, TINY, run_cli

pytest.importorskip("transformers")  # the hf extra

PROMPT = "<image>\nFree OCR."
PAD_ROWS = {"qwen3": 16, "llama": 0}  # Qwen3's matrix is padded past its tokenizer; Llama's grows by one row


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def family(request, tmp_path_factory, registry):
    """(name, folder, transformers' model, vlmkit's model, vlmkit's tokenizer, transformers' vocab size)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    hf_tiny.tokenizer_folder(folder, bos=name == "llama")
    from transformers import AutoTokenizer
    base = len(AutoTokenizer.from_pretrained(folder))
    ref = hf_tiny.lm_folder(folder, name, base + PAD_ROWS[name])
    config = attrs.evolve(TINY, decoder=Component("hf_causal_lm", {"model": str(folder)}),
                          tokenizer=Component("hf", {"model": str(folder)}))
    torch.manual_seed(0)
    model, tok = build_model(config, registry)
    return SimpleNamespace(name=name, folder=folder, ref=ref, model=model.eval(), tok=tok,
                           vocab=ref.config.vocab_size, config=config)


def reference_embeds(f, ids, vision):
    """transformers' own embeddings of ``ids`` with the <|image|> rows replaced by ``vision`` (B, n, C)."""
    embeds = f.ref.get_input_embeddings()(ids.clamp(max=f.vocab - 1))  # <|image|> may be the grown row
    is_image = (ids == f.tok.image_id).unsqueeze(-1)
    return embeds.masked_scatter(is_image, vision.to(embeds.dtype))


@torch.no_grad()
def test_text_logits_and_loss_equal_transformers(family):
    f = family
    torch.manual_seed(1)
    ids = torch.randint(0, f.vocab - PAD_ROWS[f.name], (2, 11))
    decoder = f.model.decoder
    ours = decoder(decoder.embed(ids))
    ref = f.ref(input_ids=ids).logits
    assert ours.dtype == torch.float32 and ours.shape[-1] >= f.vocab
    assert (ours[..., :f.vocab] - ref).abs().max().item() < 1e-4
    targets = ids.roll(-1, dims=1)
    targets[:, :4] = -1  # prompt positions
    targets[1, 8:] = -1  # a padded row
    expected = torch.nn.functional.cross_entropy(ours.transpose(1, 2), targets, ignore_index=-1)
    assert abs(decoder(decoder.embed(ids), targets=targets).item() - expected.item()) < 1e-5


@torch.no_grad()
def test_image_embeddings_merged_equal_transformers_with_inputs_embeds(family):
    f = family
    torch.manual_seed(2)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    prompt = image_prompt_ids(f.model, f.tok, PROMPT)
    answer = f.tok.encode("the quick fox")
    ids = torch.tensor([prompt + answer] * 2)
    ours = f.model(pixels, ids)["logits"]
    vision = f.model.encode_images(pixels)[1]
    ref = f.ref(inputs_embeds=reference_embeds(f, ids, vision)).logits
    assert (ours[..., :f.vocab] - ref).abs().max().item() < 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two images reach the logits


@torch.no_grad()
def test_greedy_generation_with_cache_equals_transformers_generate(family):
    f = family
    torch.manual_seed(3)
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    prompt = image_prompt_ids(f.model, f.tok, PROMPT)
    ours = generate(f.model, f.tok, pixels, prompt, 12)
    assert ours == generate(f.model, f.tok, pixels, prompt, 12, use_cache=False)
    ids = torch.tensor([prompt] * 3)
    embeds = reference_embeds(f, ids, f.model.encode_images(pixels)[1])
    stops = [f.tok.eos_id, f.tok.bos_id]
    suppress = [f.tok.image_id] if f.tok.image_id < f.vocab else None  # vlmkit never picks <|image|>
    out = f.ref.generate(inputs_embeds=embeds, max_new_tokens=12, do_sample=False, eos_token_id=stops,
                         pad_token_id=f.tok.pad_id, suppress_tokens=suppress)
    theirs = [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in out.tolist()]
    assert ours == theirs
    assert sum(map(len, ours)) > 0


def test_hf_tokenizer_adds_image_and_keeps_special_text_ordinary(tmp_path, registry):
    folder = hf_tiny.tokenizer_folder(tmp_path / "with_bos")
    tok = registry.build("tokenizer", "hf", model=folder)
    from transformers import AutoTokenizer
    base = AutoTokenizer.from_pretrained(folder)
    assert tok.vocab_size == len(base) + 1 and tok.image_id == len(base)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base.bos_token_id, base.eos_token_id, base.pad_token_id)
    ids = tok.encode("read </s> and <|image|> as text")
    assert tok.eos_id not in ids and tok.image_id not in ids
    assert tok.decode(ids) == "read </s> and <|image|> as text"
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.image_id, tok.eos_id, tok.vocab_size + 3]) == "hi"
    out = tmp_path / "exported"
    tok.export_hf(str(out))
    again = AutoTokenizer.from_pretrained(out)
    assert again.convert_tokens_to_ids("<|image|>") == tok.image_id and len(again) == tok.vocab_size

    no_bos = registry.build("tokenizer", "hf", model=hf_tiny.tokenizer_folder(tmp_path / "no_bos", bos=False))
    assert no_bos.bos_id == no_bos.eos_id == no_bos.pad_id  # Qwen-style: sequences start with eos
    chosen = registry.build("tokenizer", "hf", model=folder, bos_token="<pad>")
    assert chosen.bos_id == base.pad_token_id
    with pytest.raises(ConfigError, match=r"model.tokenizer: tokenizer 'hf': eos_token: '<nope>' is not a token"):
        registry.build("tokenizer", "hf", where="model.tokenizer", model=folder, eos_token="<nope>")


def test_bad_decoder_settings_are_one_line(tmp_path, registry):
    qwen = hf_tiny.FAMILIES["qwen3"]

    def build(**kwargs):
        with pytest.raises(ConfigError) as e:
            registry.build("decoder", "hf_causal_lm", where="model.decoder", vocab_size=300, **kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "config: hiden_size is not a key of Qwen3Config" in build(config={**qwen, "hiden_size": 3})
    unknown_type = build(config={**qwen, "model_type": "qwen9"})
    assert "config.model_type: 'qwen9' is not a model type transformers" in unknown_type
    assert "needs model (a hub name or a folder) or config" in build()
    assert f"model: {tmp_path / 'absent'} is not a folder" in build(model=str(tmp_path / "absent"))
    assert "dtype: 'float64' is not one of" in build(config=qwen, dtype="float64")
    decoder = registry.build("decoder", "hf_causal_lm", vocab_size=300, config=qwen, dtype="bfloat16")
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        decoder(torch.zeros(1, 513, 64, dtype=torch.bfloat16))


def test_muon_checkpointing_freeze_and_bf16_take_the_decoder_layers(registry):
    config = attrs.evolve(TINY, decoder=Component("hf_causal_lm", {"config": hf_tiny.FAMILIES["llama"]}))
    torch.manual_seed(0)
    model, tok = build_model(config, registry)
    layers = model.decoder.lm.model.layers
    matrices = muon_matrices(model.decoder)  # the contract's default: 2-D weights in the ModuleList blocks
    assert matrices == {f"lm.model.layers.{n}" for n, p in layers.named_parameters() if p.ndim == 2}
    assert any(".self_attn.q_proj." in n for n in matrices) and any(".mlp.down_proj." in n for n in matrices)

    ids = torch.randint(0, 256, (2, 40))
    targets = ids.roll(-1, 1)
    pixels = torch.rand(2, 3, 32, 32)
    ids[:, :model.num_image_tokens()] = tok.image_id

    def grads():
        model.zero_grad()
        model(pixels, ids, targets=targets)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.decoder.named_parameters()}
    model.train()
    plain = grads()
    calls, mlp = [], layers[0].mlp
    inner = mlp.forward
    mlp.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)  # inside the block, so recomputed too
    checkpoint_activations(model, ["decoder"])
    recomputed = grads()
    assert len(calls) == 2  # layer 0 ran again in the backward pass
    assert all(torch.allclose(plain[n], recomputed[n], atol=1e-6) for n in plain)

    GlobFreeze(frozen=["decoder.lm.model.embed_tokens.*"]).vlmkit_freeze(model, SimpleNamespace(name="s"))
    PresetFreeze("sam_frozen").vlmkit_freeze(model, SimpleNamespace(name="s"))
    assert not model.decoder.lm.model.embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for p in model.encoder.sam.parameters())
    groups = parameter_groups(model, {}, {}, lr=1e-3, muon_lr=1e-2)
    muon = [g for g in groups if g["kind"] == "muon"]
    assert sum(len(g["params"]) for g in muon) == len(matrices)
    optimizer = MuonAdamW(groups, lr=1e-3)
    before = model(pixels, ids, targets=targets)["loss"].item()
    for _ in range(5):
        optimizer.zero_grad()
        model(pixels, ids, targets=targets)["loss"].backward()
        optimizer.step()
    assert model(pixels, ids, targets=targets)["loss"].item() < before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(pixels, ids, targets=targets)["loss"])


@torch.no_grad()
def test_checkpoint_stores_tied_weights_once_and_generate_rebuilds_it(family, tmp_path):
    f = family
    meta = {"stage": "s", "model": attrs.asdict(f.config), "prompt": PROMPT, "plugins": []}
    path = checkpoint.save_checkpoint(str(tmp_path / "stage"), 3, f.model, meta)
    tied = f.ref.config.tie_word_embeddings
    saved = json.loads((tmp_path / "stage" / "latest.json").read_text())
    assert saved["step"] == 3
    from safetensors.torch import load_file
    keys = set(load_file(path))
    assert ("decoder.lm.lm_head.weight" in keys) != tied
    model, tok, _ = load_checkpoint(path)  # built on the meta device, then every tensor from the file
    assert model.decoder.lm.lm_head.weight is model.decoder.lm.model.embed_tokens.weight or not tied
    rotary = model.decoder.lm.model.rotary_emb.inv_freq
    assert torch.equal(rotary, f.model.decoder.lm.model.rotary_emb.inv_freq)
    pixels = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([image_prompt_ids(model, tok, PROMPT) + tok.encode("fox")] * 2)
    assert torch.equal(model(pixels, ids)["logits"], f.model(pixels, ids)["logits"])


def test_recipe_trains_evaluates_and_reads(cli, tmp_path):
    """recipes/hf_decoder.yaml on tiny data: both stages train, the eval split is read, a checkpoint reads an image."""
    recipe = DEFAULT_RECIPE.replace("two_stage.yaml", "hf_decoder.yaml")
    run = tmp_path / "run"
    result = cli("core.run", recipe, f"run.dir={run}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                 "data.dataset.train_samples=64", "data.dataset.samples_per_shard=32", "data.dataset.eval_samples=8",
                 "data.dataset.workers=1", "eval.samples=8", "eval.probe_samples=4", "eval.max_new_tokens=8",
                 "data.batch_size=8", "stages.0.steps=3", "stages.1.steps=3", "stages.0.probe_every=3",
                 "stages.1.probe_every=0", "stages.0.monitor_every=0", "stages.1.monitor_every=0",
                 "stages.0.warmup=1", "stages.1.warmup=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Qwen3ForCausalLM (qwen3, 3 layers, hidden 128, vocab 260)" in result.stdout
    rows = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["pred"], str) and r["gt"] for r in rows)
    aggregate = json.loads((run / "eval.json").read_text())["aggregate"]
    assert aggregate["samples"] == 8 and 0 <= aggregate["ned"] <= 1
    from PIL import Image
    Image.new("RGB", (256, 32), "white").save(tmp_path / "page.png")
    read = cli("core.generate", str(run / "vis_mid"), str(tmp_path / "page.png"), "--max-new-tokens", "4")
    assert read.returncode == 0, read.stderr
    assert read.stdout.startswith(str(tmp_path / "page.png") + "\t")


def test_fsdp_shards_the_decoder_layers_with_tied_embeddings(tmp_path):
    """run.parallel: fsdp over 2 gloo ranks: the HF decoder layers are shard groups and checkpointed; tied weights
    are saved once."""
    recipe = DEFAULT_RECIPE.replace("two_stage.yaml", "hf_decoder.yaml")
    result = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "core.run", recipe,
                     f"run.dir={tmp_path / 'run'}", f"data.dataset.cache_dir={tmp_path / 'cache'}", "run.threads=1",
                     "run.parallel=fsdp", "data.dataset.train_samples=32", "data.dataset.samples_per_shard=16",
                     "data.dataset.eval_samples=4", "data.dataset.workers=1", "eval.samples=4",
                     "eval.max_new_tokens=4", "data.batch_size=4", "stages.0.steps=2", "stages.1.steps=0",
                     "stages.0.optimizer=adamw", "stages.1.optimizer=adamw", "stages.0.probe_every=0",
                     "stages.0.monitor_every=0", "stages.0.warmup=1", "stages.0.activation_checkpointing=[decoder]",
                     "model.decoder.config.tie_word_embeddings=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model sharded (FSDP2)" in result.stdout
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "run" / "vis_tok" / "model_000002.safetensors"))
    assert "decoder.lm.model.embed_tokens.weight" in saved and "decoder.lm.lm_head.weight" not in saved
