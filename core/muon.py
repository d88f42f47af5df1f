"""nanochat's Muon for the decoder's matrices, AdamW for everything else, as one optimizer.

Muon (docs/architecture.md §1.7, NC-OCT): SGD momentum 0.95 with Nesterov, then the
update is orthogonalised by 5 Newton-Schulz iterations (quintic coefficients
3.4445, -4.7750, 2.0315, in bf16) and scaled by max(1, rows/cols)^0.5. It is
for 2-D weight matrices inside the transformer blocks; embeddings, the head,
norms, convs and biases stay with AdamW. One optimizer object keeps one
state_dict, one lr schedule (LambdaLR scales every group) and one resume path.
"""
import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # docs/architecture.md §1.7


def orthogonalise(update, steps=5):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix (singular values near 1)."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``kind: "muon"`` get Muon (lr, momentum), the others AdamW (lr, betas, eps, weight_decay)."""

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95, ns_steps=5):
        for group in groups:
            if group.get("kind") == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D weight matrices only")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, kind="adamw")
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["kind"] == "muon" else self._adamw)(p, group)

    def _muon(self, p, group):
        state = self.state[p]
        buffer = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buffer.lerp_(p.grad, 1 - group["momentum"])
        update = p.grad.lerp(buffer, group["momentum"])  # Nesterov
        update = orthogonalise(update, group["ns_steps"])
        p.add_(update, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    def _adamw(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))


def muon_matrices(decoder):
    """Names (relative to the decoder) of the matrices Muon takes: the decoder's own ``muon_matrices()``
    (core/contracts.py ``Decoder``, optional), else every 2-D weight inside its ``nn.ModuleList`` blocks:
    for nanochat the attention and MLP matrices, not the embedding or the head (docs/architecture.md §1.7)."""
    if hasattr(decoder, "muon_matrices"):
        return set(decoder.muon_matrices())
    lists = [path for path, m in decoder.named_modules() if isinstance(m, torch.nn.ModuleList)]
    return {name for name, p in decoder.named_parameters()
            if p.ndim == 2 and any(name.startswith(path + ".") for path in lists)}
