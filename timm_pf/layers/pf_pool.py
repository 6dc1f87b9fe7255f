"""Fast parameter-free pooling, the spatial operation of the efficient bottleneck.

"Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022, arXiv:2202.02777), §3.2 / §4.1:
the 3x3 conv + BN + ReLU triplet of a bottleneck is replaced by a 3x3 max-pool (stride 1, or 2 where
the block downsamples).

PyTorch's CPU max-pool kernel for NCHW tensors walks every window of every channel plane and is about
10x slower than its channels-last kernel, which vectorises over channels. :func:`pf_max_pool2d`
therefore pools NCHW CPU inputs in channels-last layout and hands the result back in the caller's
layout. Outputs and gradients are those of :func:`torch.nn.functional.max_pool2d` exactly (same kernel,
same tie-breaking); only the memory layout it runs in differs.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['pf_max_pool2d', 'PfMaxPool2d']


def pf_max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 1) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding=kernel_size // 2)``, fast on CPU for any layout."""
    padding = kernel_size // 2
    if x.device.type == 'cpu' and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        out = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding)
        return out.contiguous()
    return F.max_pool2d(x, kernel_size, stride, padding)


class PfMaxPool2d(nn.Module):
    """Parameter-free k x k max-pool with 'same' padding (the paper's eff-layer, Fig. A.1c)."""

    def __init__(self, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'PfMaxPool2d needs an odd kernel_size for same padding, got {kernel_size}')
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pf_max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f'kernel_size={self.kernel_size}, stride={self.stride}'
