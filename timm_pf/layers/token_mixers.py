"""Token mixers of the efficient transformer block (Han et al., ICLR 2022, §4.2 and Appendix A, Fig. A.1d).

The efficient block replaces multi-head self-attention by a parameter-free spatial operation on the 2-D
token grid: ``Linear(d, 3d) -> act -> 3x3 max-pool -> act -> Linear(3d, d)``; the paper's competitor uses
a 5x5 depthwise convolution in place of the max-pool (§5.3, Table 6).

All modules here work on tokens laid out as a ``(B, H, W, C)`` grid. Permuting such a (contiguous)
tensor to ``(B, C, H, W)`` gives a channels_last view, the layout in which CPU pooling and convolution
kernels are fast, so the spatial operations need no copies and no NCHW round trips.
"""
from typing import Optional, Type, Union

import torch
from torch import nn

from timm.layers import GELU, Attention, get_act_layer, is_exporting

from .pf_pool import running_max

__all__ = ['max_filter_nhwc', 'MaxPool2dNhwc', 'Conv2dNhwc', 'GridAttention', 'EfficientTokenMixer', 'SPATIAL_OPS']


def max_filter_nhwc(x: torch.Tensor, kernel_size: int = 3, inplace: bool = False) -> torch.Tensor:
    """Stride-1, size-preserving k x k max-pool of a ``(B, H, W, C)`` grid, as running maxima of shifted views.

    Separable (rows, then columns) and index-free: the same values as ``F.max_pool2d`` with -inf padding,
    without the argmax indices the CPU pooling kernel always writes (3x its output in memory traffic).
    With ``inplace`` the result is written into ``x``'s memory, so only one buffer is allocated.
    """
    radius = kernel_size // 2
    rows = running_max(x, 2, radius, torch.empty_like(x))
    return running_max(rows, 1, radius, x if inplace else torch.empty_like(x))


def _needs_autograd_or_graph(x: torch.Tensor) -> bool:
    """True when gradients flow through ``x`` or a graph is being traced / scripted / exported: the cases in
    which the modules here run plain, out-of-place PyTorch ops."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or is_exporting()
            or (torch.is_grad_enabled() and x.requires_grad))


class MaxPool2dNhwc(nn.MaxPool2d):
    """Stride-1, size-preserving max-pool of a ``(B, H, W, C)`` grid (padding acts as -inf).

    Without autograd it runs :func:`max_filter_nhwc` (overwriting its input when ``inplace``); when
    gradients are needed (and when tracing or exporting, for a single pooling op in the graph) it runs
    PyTorch's pooling kernel on the channels_last view, whose backward routes each gradient to one argmax
    as ``nn.MaxPool2d`` does.
    """

    def __init__(self, kernel_size: int = 3, inplace: bool = False) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f'max-pool kernel_size must be odd to keep the grid size, got {kernel_size}')
        super().__init__(kernel_size, stride=1, padding=kernel_size // 2)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_autograd_or_graph(x):
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return max_filter_nhwc(x, self.kernel_size, self.inplace)


class Conv2dNhwc(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) applied to a ``(B, H, W, C)`` grid, returning ``(B, H', W', C')``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GridAttention(Attention):
    """timm's multi-head self-attention (same parameters and keys) on a ``(B, H, W, C)`` token grid."""

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, H, W, C = x.shape
        x = super().forward(x.reshape(B, H * W, C), attn_mask=attn_mask, is_causal=is_causal)
        return x.reshape(B, H, W, -1)


def _max_pool(channels: int, kernel_size: int, **dd) -> MaxPool2dNhwc:
    return MaxPool2dNhwc(kernel_size, inplace=True)  # its input is the mixer's own activation


def _depthwise_conv(channels: int, kernel_size: int, **dd) -> Conv2dNhwc:
    if kernel_size % 2 != 1:
        raise ValueError(f'depthwise conv kernel_size must be odd to keep the grid size, got {kernel_size}')
    return Conv2dNhwc(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, **dd)


# activations of the mixer that have an in-place kernel (timm's GELU is exact GELU, like nn.GELU())
_INPLACE_ACTS = {GELU: torch.ops.aten.gelu_, nn.ReLU: torch.relu_}

# spatial operation name -> (builder(channels, kernel_size, device=, dtype=), default kernel size, Appendix A)
SPATIAL_OPS = {
    'max': (_max_pool, 3),
    'dwconv': (_depthwise_conv, 5),
}


class EfficientTokenMixer(nn.Module):
    """The eff-layer that takes the place of self-attention in the efficient transformer block.

    ``expand``: Linear(d, r*d) (r=3 matches the qkv projection it replaces, §4.2) -> ``act`` ->
    ``spatial`` (3x3 max-pool, or 5x5 depthwise conv) over the token grid -> ``act`` ->
    ``proj``: Linear(r*d, d) -> dropout.

    The activation defaults to GELU as in the authors' code; the paper's text (Appendix A) says ReLU,
    available with ``act_layer='relu'``.
    """

    def __init__(
            self,
            dim: int,
            spatial: str = 'max',
            kernel_size: Optional[int] = None,
            expand_ratio: int = 3,
            act_layer: Union[str, Type[nn.Module]] = 'gelu',
            bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if spatial not in SPATIAL_OPS:
            raise ValueError(f'unknown spatial operation {spatial!r}, choose one of {sorted(SPATIAL_OPS)}')
        act = get_act_layer(act_layer)
        if act is None:
            raise ValueError(f'unknown activation {act_layer!r}')
        build_spatial, default_kernel = SPATIAL_OPS[spatial]
        dd = {'device': device, 'dtype': dtype}
        hidden = dim * expand_ratio

        self.expand = nn.Linear(dim, hidden, bias=bias, **dd)
        self.act = act()
        self.spatial = build_spatial(hidden, kernel_size or default_kernel, **dd)
        self.proj = nn.Linear(hidden, dim, bias=bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` token grid; attention masks have no meaning for a spatial operation."""
        if attn_mask is not None or is_causal:
            raise ValueError('the efficient token mixer works on the full token grid: attn_mask / is_causal '
                             'are not supported')
        if x.ndim != 4:
            raise ValueError(f'the efficient token mixer expects a (B, H, W, C) token grid, got shape {tuple(x.shape)}')
        x = self._activate(self.expand(x))
        x = self._activate(self.spatial(x))
        return self.proj_drop(self.proj(x))

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        """``self.act(x)``, in place on the mixer's own intermediate where autograd does not need it: in
        inference the block then allocates one hidden-width buffer besides the expansion's output."""
        inplace_op = _INPLACE_ACTS.get(type(self.act))
        if inplace_op is None or _needs_autograd_or_graph(x):
            return self.act(x)
        return inplace_op(x)
