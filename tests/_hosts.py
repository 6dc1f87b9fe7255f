"""Parent modules for single layers under test: FX leaves are leaves only below the traced root, and exporters
want a fixed argument list."""
import torch
from torch import nn


class Host(nn.Module):
    """A network holding one layer called on one input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class HostWithOffsets(Host):
    """A network holding one deformable pool called on its input, offsets and masks."""

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer(x, offset, mask)


def hosted(layer: nn.Module, inputs) -> Host:
    return (Host if len(inputs) == 1 else HostWithOffsets)(layer)
