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
import torch.nn.functional as F
from torch import nn

from timm.layers import GELU, Attention, get_act_layer, register_notrace_module

from .cpu_layout import check_zero_padding
from .graph_capture import is_capturing_graph
from .pf_pool import running_max

__all__ = ['max_filter_nhwc', 'MaxPool2dNhwc', 'Conv2dNhwc', 'GridAttention', 'EfficientTokenMixer', 'SPATIAL_OPS',
           'InPlaceActivation', 'activate', 'resolve_activation']


def max_filter_nhwc(x: torch.Tensor, kernel_size: int = 3, inplace: bool = False) -> torch.Tensor:
    """Stride-1, size-preserving k x k max-pool of a ``(B, H, W, C)`` grid, as running maxima of shifted views.

    Separable (rows, then columns) and index-free: the same values as ``F.max_pool2d`` with -inf padding,
    without the argmax indices the CPU pooling kernel always writes (3x its output in memory traffic).
    With ``inplace`` the result is written into ``x``'s memory, so only one buffer is allocated.
    """
    radius = kernel_size // 2
    rows = running_max(x, 2, radius, torch.empty_like(x))
    return running_max(rows, 1, radius, x if inplace else torch.empty_like(x))


@torch.jit.unused
def _eager_in_place_ok(x: torch.Tensor) -> bool:
    """True when the modules here may run their index-free / in-place eager kernels: no gradient flows
    through ``x`` and no graph is being traced, compiled or exported (scripted code never calls this)."""
    return not (is_capturing_graph() or (torch.is_grad_enabled() and x.requires_grad))


@register_notrace_module  # an FX leaf: its kernel choice stays out of traced graphs
class MaxPool2dNhwc(nn.MaxPool2d):
    """Stride-1, size-preserving max-pool of a ``(B, H, W, C)`` grid (padding acts as -inf).

    Without autograd it runs :func:`max_filter_nhwc` (overwriting its input when ``inplace`` and no forward hook
    is on it); when gradients are needed, when tracing or exporting (a single pooling op in the graph) and in
    TorchScript it runs PyTorch's pooling kernel on the channels_last view, whose backward routes each gradient
    to one argmax as ``nn.MaxPool2d`` does. ``device`` / ``dtype`` are accepted for timm's constructor convention.
    """

    def __init__(self, kernel_size: int = 3, inplace: bool = False, device=None, dtype=None) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f'max-pool kernel_size must be odd to keep the grid size, got {kernel_size}')
        super().__init__(kernel_size, stride=1, padding=kernel_size // 2)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not _eager_in_place_ok(x):
            return F.max_pool2d(x.permute(0, 3, 1, 2), self.kernel_size, self.stride, self.padding).permute(0, 2, 3, 1)
        return max_filter_nhwc(x, self.kernel_size, self.inplace and not _hooked(self))  # a hook keeps its input


class Conv2dNhwc(nn.Conv2d):
    """``nn.Conv2d`` with zero padding (same parameters and keys) applied to a ``(B, H, W, C)`` grid, returning
    ``(B, H', W', C')``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_zero_padding(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups)
        return out.permute(0, 2, 3, 1)


class GridAttention(Attention):
    """timm's multi-head self-attention (same parameters and keys) on a ``(B, H, W, C)`` token grid.

    Eager calls run timm's ``Attention.forward`` on the flattened grid. TorchScript cannot call a parent's
    forward, so scripted modules compute the same attention from the same submodules with
    ``F.scaled_dot_product_attention`` (:meth:`_scripted_attention`).
    """

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        if torch.jit.is_scripting():
            tokens = self._scripted_attention(tokens, attn_mask, is_causal)
        else:
            tokens = super().forward(tokens, attn_mask=attn_mask, is_causal=is_causal)
        return tokens.reshape(batch, height, width, tokens.shape[-1])

    def _scripted_attention(
            self,
            tokens: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> torch.Tensor:
        """Attention of ``(B, N, C)`` tokens: queries, keys and values of every head from ``qkv`` (normed by
        ``q_norm`` / ``k_norm``), scaled dot-product attention, ``norm``, optional sigmoid ``gate``, ``proj``."""
        batch, num_tokens, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(
            self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0., is_causal=is_causal, scale=self.scale)
        out = self.norm(out.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(tokens).sigmoid()
        return self.proj_drop(self.proj(out))


def _max_pool(channels: int, kernel_size: int, **dd) -> MaxPool2dNhwc:
    return MaxPool2dNhwc(kernel_size, inplace=True, **dd)  # its input is the mixer's own activation


def _depthwise_conv(channels: int, kernel_size: int, **dd) -> Conv2dNhwc:
    if kernel_size % 2 != 1:
        raise ValueError(f'depthwise conv kernel_size must be odd to keep the grid size, got {kernel_size}')
    return Conv2dNhwc(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, **dd)


# activations with an in-place kernel: type -> kernel(module, x) (timm's GELU is exact GELU, like nn.GELU())
_INPLACE_ACTS = {
    GELU: lambda act, x: torch.ops.aten.gelu_(x),
    nn.GELU: lambda act, x: torch.ops.aten.gelu_(x, approximate=act.approximate),
    nn.ReLU: lambda act, x: torch.relu_(x),
}


@torch.jit.unused
def _hooked(module: Optional[nn.Module]) -> bool:
    """Whether a forward hook may hold the input or output of ``module`` (its own hooks, or global ones)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or (
        module is not None and bool(module._forward_hooks or module._forward_pre_hooks))


def activate(act: nn.Module, x: torch.Tensor, producer: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(x)``, computed in place in ``x``'s memory when ``act`` has an in-place kernel and autograd and graph
    capture do not need ``x`` (:func:`_eager_in_place_ok`), and no forward hook may hold ``x`` (``producer``, the
    module that returned it, has none, nor are there global ones: a hook must see what its layer returned).
    Callers pass their own intermediate: an activation buffer is then not allocated, which at the sizes of the
    transformers' hidden features (several MB) also saves the page faults of a fresh allocation."""
    inplace_kernel = _INPLACE_ACTS.get(type(act))
    if inplace_kernel is None or not _eager_in_place_ok(x) or _hooked(producer):
        return act(x)
    return inplace_kernel(act, x)


@register_notrace_module  # an FX leaf: its in-place choice stays out of traced graphs
class InPlaceActivation(nn.Module):
    """Wraps an activation module that a block applies to its own intermediate (the output of ``producer``, the
    MLP's ``fc1``): eager inference computes it in place (:func:`activate`) unless a forward hook is on
    ``producer``; autograd, graph capture and TorchScript run ``act`` itself."""

    def __init__(self, act: nn.Module, producer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.act = act
        self._producer = [producer]  # a plain list: not a submodule, so no second copy of its keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.act(x)
        return activate(self.act, x, self._producer[0])


# spatial operation name -> (builder(channels, kernel_size, device=, dtype=), default kernel size, Appendix A)
SPATIAL_OPS = {
    'max': (_max_pool, 3),
    'dwconv': (_depthwise_conv, 5),
}


def resolve_activation(act_layer: Union[str, Type[nn.Module]], arg_name: str = 'act_layer') -> Type[nn.Module]:
    """``act_layer`` as timm's ``get_act_layer`` resolves it, or a ValueError naming ``arg_name`` and what it takes."""
    try:
        act = get_act_layer(act_layer)
    except (KeyError, TypeError):
        act = None
    if not callable(act):
        raise ValueError(f"{arg_name}={act_layer!r}: expected an activation name timm knows ('gelu', 'relu', "
                         f"'silu', 'hard_swish', ...) or an nn.Module class")
    return act


@register_notrace_module  # an FX leaf: its input checks and in-place choices stay out of traced graphs
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
        act = resolve_activation(act_layer)
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
        if not torch.jit.is_scripting():  # eager checks (TorchScript callers get the shape errors of the ops)
            if attn_mask is not None or is_causal:
                raise ValueError('the efficient token mixer works on the full token grid: attn_mask / is_causal '
                                 'are not supported')
            if x.ndim != 4:
                raise ValueError(
                    f'the efficient token mixer expects a (B, H, W, C) token grid, got shape {tuple(x.shape)}')
        x = self._activate(self.expand(x), 'expand')
        x = self._activate(self.spatial(x), 'spatial')
        return self.proj_drop(self.proj(x))

    def _activate(self, x: torch.Tensor, producer: str) -> torch.Tensor:
        """``self.act(x)``, in place on the mixer's own intermediate where autograd does not need it and no hook
        is on the submodule ``producer`` that returned it: in inference the block then allocates one hidden-width
        buffer besides the expansion's output."""
        if torch.jit.is_scripting():
            return self.act(x)
        return activate(self.act, x, getattr(self, producer))
