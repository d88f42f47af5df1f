"""MLP projector: Linear, then (GELU, Linear) x (depth - 1), as DeepSeek-OCR's "mlp_gelu" type
(docs/architecture.md §2.3).

`layers` is an nn.Sequential, so keys are `layers.0.*`, `layers.2.*`, ... The
hidden width defaults to out_dim, as in DeepSeek-OCR. in_dim / out_dim come from the model builder.
"""
import torch.nn as nn

from core import ConfigError, hookimpl


class MLPProjector(nn.Module):
    def __init__(self, in_dim, out_dim, depth=2, hidden_dim=None):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"mlp projector: depth must be >= 1, got {depth}")
        hidden_dim = hidden_dim or out_dim
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        mods = []
        for i in range(depth):
            if i > 0:
                mods.append(nn.GELU())
            mods.append(nn.Linear(dims[i], dims[i + 1]))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


@hookimpl
def vlmkit_register(registry):
    registry.add("projector", "mlp", MLPProjector)
