"""Linear projector: DeepSeek-OCR's MlpProjector with projector_type "linear" (docs/architecture.md §2.3).

A single nn.Linear named `layers`, so the keys are `layers.weight` / `layers.bias`
as in DeepSeek-OCR's checkpoint. in_dim / out_dim are filled in by the model builder.
"""
import torch.nn as nn

from core import hookimpl


class LinearProjector(nn.Module):
    def __init__(self, in_dim, out_dim, bias=True):
        super().__init__()
        self.layers = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x):
        return self.layers(x)


@hookimpl
def vlmkit_register(registry):
    registry.add("projector", "linear", LinearProjector)
