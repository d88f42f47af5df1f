"""core.cpulinear: oneDNN's linear for fp32 CPU inference, F.linear everywhere else."""
import pytest
import torch
import torch.nn.functional as F

from core import cpulinear
from core.cpulinear import Linear, linear


def operands(rows=8, width=64, out=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g), torch.randn(out, width, generator=g), torch.randn(out, generator=g)


def ops(run):
    """The names of the aten/mkldnn ops ``run()`` calls."""
    with torch.profiler.profile() as prof:
        run()
    return {event.key for event in prof.key_averages()}


@pytest.mark.skipif(not cpulinear.ONEDNN, reason="this torch build has no oneDNN")
def test_inference_goes_through_onednn_and_equals_f_linear():
    x, w, b = operands()
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x[None], w), F.linear(x[None], w), atol=1e-5, rtol=1e-5)  # (B, T, C)
        assert "mkldnn::_linear_pointwise" in ops(lambda: linear(x, w, b))
    assert "mkldnn::_linear_pointwise" not in ops(lambda: linear(x, w.requires_grad_(True), b))


def test_with_gradients_or_autocast_or_bf16_it_is_f_linear():
    x, w, b = operands()
    w.requires_grad_(True)
    out = linear(x, w, b)  # training: autograd must see the product
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(300, 1) * x.sum(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w, b).dtype == torch.bfloat16  # autocast's dtype, as F.linear gives
    with torch.no_grad():
        assert linear(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


def test_the_module_keeps_nn_linear_state_dict_and_hooks():
    x, w, b = operands(out=5)
    layer = Linear(64, 5)
    layer.load_state_dict({"weight": w, "bias": b})
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    seen = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert seen == [torch.Size([8, 5])]
