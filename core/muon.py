"""nanochat's Muon for the matrices of the parts a stage names, AdamW for everything else, as one optimizer.

Muon (docs/architecture.md §1.7, NC-OCT): SGD momentum 0.95 with Nesterov, then the
update is orthogonalised by 5 Newton-Schulz iterations (quintic coefficients
3.4445, -4.7750, 2.0315, in bf16 where the device computes bf16 natively, else fp32: see
``newton_schulz_dtype``) and scaled by max(1, rows/cols)^0.5. nanochat gives it the 2-D weight
matrices inside the transformer blocks; embeddings, the head, norms and biases stay with AdamW.
``stages.N.muon_parts`` can add the encoder: its blocks' matrices and its convolution filters, each
filter bank orthogonalised as one out x (in * kh * kw) matrix, as Keller Jordan's CIFAR-10 speedruns do
(on the tiny default stage 1's CTC plateau then ends at ~250 steps instead of ~800: docs/results.md).
One optimizer object keeps one state_dict, one lr schedule (LambdaLR scales every group) and one resume path.
"""
import functools
import pathlib

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # docs/architecture.md §1.7
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX, arm64's BF16 extension


@functools.cache
def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bf16 in hardware (its flags in /proc/cpuinfo). Without it torch emulates
    bf16 matmuls, ~44x slower than fp32 on an AVX2 CPU (BENCHMARKS.md); no cpuinfo (macOS, Windows): False."""
    try:
        text = pathlib.Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith(("flags", "Features"))
             for word in line.split(":", 1)[-1].split()}
    return bool(flags & BF16_CPU_FLAGS)


def newton_schulz_dtype(device, cpu_bf16=None):
    """bf16 on CUDA (as nanochat) and on a CPU with native bf16 (``cpu_bf16``, detected when None), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def orthogonalise(update, steps=5, dtype=torch.bfloat16):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix (singular values near 1), in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``kind: "muon"`` get Muon (lr, momentum), the others AdamW (lr, betas, eps, weight_decay).
    ``cpu_bf16``: whether the CPU has native bf16 (None: detect; see ``newton_schulz_dtype``)."""

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95, ns_steps=5,
                 cpu_bf16=None):
        self.cpu_bf16 = cpu_bf16
        for group in groups:
            if group.get("kind") == "muon" and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon takes weight matrices and convolution filters only")
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
        update = p.grad.lerp(buffer, group["momentum"]).flatten(1)  # Nesterov; a filter bank as out x in*kh*kw
        update = orthogonalise(update, group["ns_steps"], newton_schulz_dtype(p.device, self.cpu_bf16))
        p.add_(update.view_as(p), alpha=-group["lr"] * max(1.0, update.size(-2) / update.size(-1)) ** 0.5)

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


def muon_matrices(part):
    """Names (relative to ``part``) of the weights Muon takes: the part's own ``muon_matrices()``
    (core/contracts.py, optional for encoders and decoders), else every 2-D ``weight`` inside its
    ``nn.ModuleList`` blocks (for nanochat the attention and MLP matrices, not the embedding or the head:
    docs/architecture.md §1.7; for SAM not its relative-position tables) and every convolution filter
    (for the DeepEncoder SAM's patch embedding, neck and downsampling convolutions)."""
    if hasattr(part, "muon_matrices"):
        return set(part.muon_matrices())
    lists = [path for path, m in part.named_modules() if isinstance(m, torch.nn.ModuleList)]
    convs = {f"{path}.weight" for path, m in part.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
    return {name for name, p in part.named_parameters()
            if name in convs or (p.ndim == 2 and name.endswith("weight")
                                 and any(name.startswith(path + ".") for path in lists))}
