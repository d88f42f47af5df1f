"""nanochat's Muon: orthogonalised updates for the matrices of the parts a stage names, AdamW for the rest."""
import pytest
import torch

from core.errors import ConfigError
from core.muon import MuonAdamW, orthogonalise
from core.recipe import load_recipe
from core.train import parameter_groups
from tests.helpers import tiny


def test_newton_schulz_flattens_the_singular_values():
    u, _ = torch.linalg.qr(torch.randn(64, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    g = u @ torch.diag(torch.logspace(-1, 1, 32)) @ v.T  # singular values 0.1 .. 10: condition number 100
    s = torch.linalg.svdvals(orthogonalise(g).float())
    assert s.max() < 1.3 and s.min() > 0.5  # the quintic lands them around 1, not exactly on it (by design)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    with torch.no_grad():
        b.copy_(a)
    ours = MuonAdamW([{"params": [a], "kind": "adamw"}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)


def test_muon_takes_the_decoder_block_matrices_and_trains(registry):
    model, tok = tiny(registry)
    groups = parameter_groups(model, {}, {}, lr=1e-3, muon_lr=0.02)
    muon = {id(p) for g in groups if g["kind"] == "muon" for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names and all(n.startswith("decoder.transformer.h.") and n.endswith(".weight") for n in names)
    assert "decoder.lm_head.weight" not in names and "decoder.transformer.wte.weight" not in names
    optimizer = MuonAdamW(groups, lr=1e-3)
    ids = torch.tensor([[tok.bos_id] + [tok.image_id] * 21 + tok.encode("abc")] * 2)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), tok.eos_id)], dim=1)
    pixels = torch.randn(2, 3, 32, 32)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(pixels, ids, targets)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = optimizer.state_dict()
    assert any("momentum_buffer" in s for s in state["state"].values())


def test_muon_parts_adds_the_encoders_block_matrices_and_convolution_filters(registry):
    model, _ = tiny(registry)
    groups = parameter_groups(model, {}, {}, lr=1e-3, muon_lr=0.02, muon_parts=["decoder", "encoder"])
    muon = {id(p) for g in groups if g["kind"] == "muon" for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert {"encoder.sam.patch_embed.proj.weight", "encoder.sam.neck.0.weight", "encoder.sam.net_3.weight",
            "encoder.sam.blocks.0.attn.qkv.weight", "encoder.clip.transformer.layers.0.mlp.fc1.weight",
            "decoder.transformer.h.0.attn.c_q.weight"} <= names
    # position tables, norms, biases and the frozen CLIP patch embedding stay out
    assert not any("rel_pos" in n or "pos_embed" in n or "norm" in n or n.endswith("bias") for n in names)
    assert "encoder.clip.embeddings.patch_embedding.weight" not in names
    plain = parameter_groups(model, {}, {}, lr=1e-3, muon_lr=0.02)
    assert not any(n.startswith("encoder.") for n, p in model.named_parameters()
                   if id(p) in {id(q) for g in plain if g["kind"] == "muon" for q in g["params"]})


def test_muon_orthogonalises_a_filter_bank_as_one_matrix():
    torch.manual_seed(0)
    filters = torch.nn.Parameter(torch.zeros(8, 3, 4, 2))  # out 8 x (3 * 4 * 2 = 24)
    optimizer = MuonAdamW([{"params": [filters], "kind": "muon", "lr": 1.0, "momentum": 0.0}], lr=1.0)
    filters.grad = torch.randn(8, 3, 4, 2)
    optimizer.step()
    step = filters.detach().flatten(1)
    s = torch.linalg.svdvals(step)
    assert s.numel() == 8 and s.max() < 1.3 and s.min() > 0.5  # one 8 x 24 matrix, wide: no extra scale
    with pytest.raises(ValueError, match="matrices and convolution filters"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "kind": "muon"}])


def test_an_unknown_muon_part_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"stages.0.muon_parts: parts are encoder, projector, decoder"):
        load_recipe("recipes/two_stage.yaml", ["stages.0.muon_parts=[encoder, tokenizer]"])


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from core.muon import cpu_has_native_bf16
    old, new = tmp_path / "zen2", tmp_path / "zen4"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    new.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n")
    assert not cpu_has_native_bf16(str(old)) and cpu_has_native_bf16(str(new))
    assert not cpu_has_native_bf16(str(tmp_path / "absent"))


def test_newton_schulz_is_fp32_where_bf16_is_not_native():
    from core.muon import newton_schulz_dtype
    assert newton_schulz_dtype("cpu", cpu_bf16=False) == torch.float32
    assert newton_schulz_dtype("cpu", cpu_bf16=True) == torch.bfloat16
    assert newton_schulz_dtype("cuda", cpu_bf16=False) == torch.bfloat16  # decided per device, not per host


def _matmul_dtypes(step):
    """The dtypes of every matmul the ``step()`` call dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Record():
        step()
    return seen


def test_default_training_step_has_no_bf16_matmul_without_native_bf16(tmp_path, monkeypatch):
    """The default recipe's stage-1 step (Muon included) on a CPU that reports no native bf16: fp32 only;
    the same step reporting native bf16 does use bf16 (so the count can fail)."""
    from benchmarks.common import synthetic_shards
    from benchmarks.train_step import TrainStep
    from core import muon
    step = TrainStep(synthetic_shards(str(tmp_path), 32), overrides=["data.batch_size=4"])
    try:
        monkeypatch.setattr(muon, "cpu_has_native_bf16", lambda: False)
        without = _matmul_dtypes(step.run)
        monkeypatch.setattr(muon, "cpu_has_native_bf16", lambda: True)
        native = _matmul_dtypes(step.run)
    finally:
        step.close()
    assert without and torch.bfloat16 not in without
    assert torch.bfloat16 in native
