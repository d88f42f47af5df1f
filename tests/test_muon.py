"""nanochat's Muon: orthogonalised updates for the decoder's matrices, AdamW for the rest."""
import torch

from core.muon import MuonAdamW, orthogonalise
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
