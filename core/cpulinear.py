"""``linear(x, weight)`` and ``Linear``: F.linear, through oneDNN for fp32 inference on the CPU.

Decoding multiplies a few rows by a large matrix (batch x n_embd by the 65,536-row head): there torch's
default fp32 CPU GEMM (MKL) reaches a fifth of what the same product gets from oneDNN, which torch also
ships (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits for a linear).
Measured on a 2-core AVX-512 EPYC, 8 x 512 by 65,536 x 512: 25 ms with F.linear, 10.5 ms with oneDNN;
one row: 13.8 ms against 5.1 (BENCHMARKS.md, decoding). The results agree to float rounding (summation
order), not bit for bit. Only where no gradient is wanted: the op has no backward.
"""
import torch
import torch.nn.functional as F

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``; oneDNN's when no gradient is recorded and everything is fp32 on the CPU
    outside autocast (under autocast F.linear computes in the autocast dtype, which this keeps)."""
    if (ONEDNN and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``nn.Linear`` whose forward is ``linear``: the same parameters, state_dict keys and hooks, and an
    adapter that wraps an ``nn.Linear`` (peft's LoRA) wraps it too."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
