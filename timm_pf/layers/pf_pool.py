"""Fast parameter-free max-pooling, the spatial operation of the efficient bottleneck.

"Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022, arXiv:2202.02777), §3.2 / §4.1:
the 3x3 conv + BN + ReLU triplet of a bottleneck is replaced by a 3x3 max-pool (stride 1, or 2 where the
block downsamples).

PyTorch's CPU max-pool kernel for NCHW tensors walks every window of every channel plane and is about
10x slower than its channels-last kernel, which vectorises over channels. :func:`pf_max_pool2d` picks
the fastest exact way per input:

* channels-last input, or any non-CPU device: PyTorch's own kernel (already fast there);
* NCHW, 3x3, stride 1 (every efficient block): separable shifted maxima (a max over the row window,
  then over the column window, each two in-place ``torch.maximum`` calls), faster than either kernel.
  Its backward runs PyTorch's channels-last kernels on a channels-last copy, so gradients, ties
  included, are bit-identical to ``max_pool2d``'s; only the input is saved (no int64 indices);
* NCHW, other strides / kernels: PyTorch's kernel on a channels-last copy.

Outputs keep the input's memory format and equal :func:`torch.nn.functional.max_pool2d` exactly.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from .graph_capture import is_capturing_graph

__all__ = ['pf_max_pool2d', 'PfMaxPool2d', 'running_max']


def running_max(src: torch.Tensor, dim: int, radius: int, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = max(src[i - radius : i + radius + 1])`` along ``dim``, the window clipped at the ends
    (edges see fewer elements, like -inf padding). ``out`` has ``src``'s shape and must not overlap it."""
    length = src.shape[dim]
    if length == 1 or radius == 0:
        return out.copy_(src)
    # the first shift writes every element of out: no copy of src to start from
    torch.maximum(src.narrow(dim, 1, length - 1), src.narrow(dim, 0, length - 1), out=out.narrow(dim, 1, length - 1))
    out.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
    for shift in range(1, min(radius, length - 1) + 1):
        if shift > 1:
            tail = out.narrow(dim, shift, length - shift)
            torch.maximum(tail, src.narrow(dim, 0, length - shift), out=tail)
        head = out.narrow(dim, 0, length - shift)
        torch.maximum(head, src.narrow(dim, shift, length - shift), out=head)
    return out


class _SeparableMaxPool3x3(torch.autograd.Function):
    """3x3 / stride 1 / padding 1 max-pool of a contiguous NCHW tensor as two separable 1-d maxima."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        rows = running_max(x, 3, 1, torch.empty_like(x))  # max over each row window,
        return running_max(rows, 2, 1, torch.empty_like(x))  # then over the column window

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor]:
        # PyTorch's channels-last kernel finds the same maxima as the NCHW one (first in row-major
        # window order) and accumulates in the same order, so the gradient is bit-identical.
        x, = ctx.saved_tensors
        x = x.contiguous(memory_format=torch.channels_last)
        geometry = ([3, 3], [1, 1], [1, 1], [1, 1], False)
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
        grad_in = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out.contiguous(memory_format=torch.channels_last), x, *geometry, indices)
        return grad_in.contiguous()


def _separable_ok(x: torch.Tensor, kernel_size: int, stride: int) -> bool:
    return (
        kernel_size == 3 and stride == 1 and x.dim() == 4 and x.is_contiguous()
        and not is_capturing_graph())


def pf_max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 1) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding=kernel_size // 2)``, fast on CPU in any layout."""
    padding = kernel_size // 2
    if x.device.type != 'cpu' or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, kernel_size, stride, padding)
    if _separable_ok(x, kernel_size, stride):
        return _SeparableMaxPool3x3.apply(x)
    out = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding)
    return out.contiguous()


@register_notrace_module  # an FX leaf: its layout dispatch stays out of traced graphs
class PfMaxPool2d(nn.Module):
    """Parameter-free k x k max-pool with 'same' padding (the paper's eff-layer, Fig. A.1c).

    Eager calls take :func:`pf_max_pool2d`'s fastest exact kernel; TorchScript runs ``F.max_pool2d``.
    ``device`` / ``dtype`` are accepted for timm's constructor convention (there are no parameters).
    """

    def __init__(self, kernel_size: int = 3, stride: int = 1, device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f'PfMaxPool2d needs an odd positive kernel_size for same padding, got {kernel_size}')
        if stride < 1:
            raise ValueError(f'PfMaxPool2d needs a stride >= 1, got {stride}')
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.max_pool2d(x, self.kernel_size, self.stride, self.kernel_size // 2)
        return pf_max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f'kernel_size={self.kernel_size}, stride={self.stride}'
