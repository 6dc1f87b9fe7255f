"""Deformable max-pool and avg-pool ("Learning Features with Parameter-Free Layers", ICLR 2022).

§5.1 "Deformable Max-pool Operation" and Appendix B "Deformable Avg-pool Operation": a pooling window
whose sampling points are moved by offsets that a small convolution predicts from the features, as in
deformable convolution v2 (DCNv2, Zhu et al., 2019). The pooling itself has no weights; only the offset
predictor does. The paper builds it on DCNv2 and released no code; this is our implementation:

* :func:`deform_pool2d` / :class:`DeformMaxPool2d` / :class:`DeformAvgPool2d` take the input, the
  offsets and the modulation masks, with the layouts of ``torchvision.ops.deform_conv2d``: offsets
  ``(B, 2 * G * kh * kw, Ho, Wo)`` as ``(dy, dx)`` pairs per kernel point (row-major), masks
  ``(B, G * kh * kw, Ho, Wo)``; ``G`` deformable groups split the channels into ``G`` equal groups that
  share offsets.
* Each kernel point is bilinearly sampled at ``(ho * stride - padding + i * dilation + dy,
  wo * stride - padding + j * dilation + dx)``, multiplied by its mask and the ``kh * kw`` values are
  reduced by max or mean.
* Samples outside the image read zeros, like zero padding (bilinear weights of corners outside the image
  are applied to zeros, as in DCN and ``torchvision.ops.deform_conv2d``). Hence with zero offsets and unit
  masks the avg variant equals ``avg_pool2d(count_include_pad=True)`` and the max variant equals
  ``max_pool2d`` on non-negative inputs (such as the post-ReLU features it sees in the network);
  ``max_pool2d`` pads with ``-inf`` and differs only in border windows whose in-image values are all negative.
* :class:`LearnedDeformPool2d` is the module used in the network: a 3x3 convolution (stride of the block)
  predicts ``3 * G * k * k`` channels per output location, ``2 * G * k * k`` offsets and ``G * k * k``
  sigmoid masks, zero-initialised like DCNv2, so training starts from the regular pooling grid (with
  masks 0.5, a uniform scale that the following conv + BN absorbs).

Sampling is vectorised: the bilinear corners and weights of all points are computed at once (the mask
folded into the weights), on the input zero-padded by one pixel so that every corner is a row of the
channels-last feature matrix and outside corners read zeros. In eager mode (float32/float64) the only loop
is over the ``kh * kw`` kernel taps, none over positions or channels: each tap is one fused weighted
gather of channel vectors (``embedding_bag``) into a running maximum that also records the winning tap
per output element (``uint8``); the mean is one gather of all taps. Backward
(:class:`_DeformPoolFunction`) keeps only the input, offsets, masks and winning taps, and recomputes each
tap's corners. Under tracing, ``torch.compile`` and ONNX export, and for other dtypes, the same math runs
as a dense gather of all samples with standard ops (``Gather``, ``Mul``, ``ReduceSum``, ``ReduceMax``).
"""
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ['deform_pool2d', 'DeformPool2d', 'DeformMaxPool2d', 'DeformAvgPool2d', 'LearnedDeformPool2d']

_IntOrPair = Union[int, Tuple[int, int]]
_REDUCTIONS = ('max', 'avg')


def _pair(value: _IntOrPair, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
    return pair


class _Geometry(NamedTuple):
    """Sizes of one deformable pooling call."""
    in_size: Tuple[int, int]
    out_size: Tuple[int, int]
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def num_points(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]


def _padded_features(input: torch.Tensor, groups: int) -> torch.Tensor:
    """The input as a matrix of channel vectors, zero-padded by 1 pixel above/left and 2 below/right:
    ``(B * (H + 3) * (W + 3) * G, C / G)``, row ``((b * (H + 3) + y + 1) * (W + 3) + x + 1) * G + g``.

    With this border every bilinear corner of a position clamped to ``[-1, H] x [-1, W]`` is a row of the
    matrix, and the corners outside the image read zeros: no per-corner validity masks are needed.
    """
    batch, channels = input.shape[:2]
    padded = F.pad(input.permute(0, 2, 3, 1), (0, 0, 1, 2, 1, 2))
    return padded.reshape(-1, channels // groups)


def _tap_positions(offset: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """Sampling positions ``(y, x)`` of every kernel tap in padded pixel coordinates (image pixel + 1),
    ``(K, B, Ho, Wo, G, 2)``, tap-major so that the rows of one tap are contiguous."""
    batch = offset.shape[0]
    (out_height, out_width), (kh, kw) = geometry.out_size, geometry.kernel_size
    opts = dict(device=offset.device, dtype=offset.dtype)
    tap_y = torch.arange(kh, **opts).repeat_interleave(kw) * geometry.dilation[0]
    tap_x = torch.arange(kw, **opts).repeat(kh) * geometry.dilation[1]
    out_y = torch.arange(out_height, **opts) * geometry.stride[0] + (1 - geometry.padding[0])
    out_x = torch.arange(out_width, **opts) * geometry.stride[1] + (1 - geometry.padding[1])
    grid = torch.stack(torch.broadcast_tensors(
        (tap_y[:, None] + out_y)[:, :, None], (tap_x[:, None] + out_x)[:, None, :]), dim=-1)
    offset = offset.reshape(batch, geometry.groups, -1, 2, out_height, out_width).permute(2, 0, 4, 5, 1, 3)
    return (offset + grid[:, None, :, :, None]).contiguous()


def _tap_corners(
        positions: torch.Tensor,
        mask: Optional[torch.Tensor],
        geometry: _Geometry,
        scale: float,
        compact_rows: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4 bilinear corners of every tap: rows of :func:`_padded_features` ``(K, L, 4)`` and weights
    ``(K, L, 4)`` (mask and ``scale`` folded in), with ``L = B * Ho * Wo * G`` in that order and corners
    (above-left, above-right, below-left, below-right); also the unmodulated per-axis weights
    ``(K, L, 2, 2)`` (axis y/x, corner low/high) used by the backward pass.

    Rows are int32 if ``compact_rows`` and they fit (the tap loop's gathers take them), else int64 (ONNX's
    ``GatherND`` takes only those). Positions are clamped to the padded image (``[0, H + 1]``): beyond it all corners are zeros in both the
    clamped and the exact formulation, so values are unchanged, and so are gradients (the clamp's).
    """
    num_points, batch, out_height, out_width, groups = positions.shape[:5]
    height, width = geometry.in_size
    padded_width = width + 3
    upper = positions.new_tensor([height + 1, width + 1])
    positions = positions.clamp(min=torch.zeros_like(upper), max=upper)
    low = positions.floor()
    frac = positions - low
    num_rows = batch * (height + 3) * padded_width * groups
    index_dtype = torch.int32 if compact_rows and num_rows < 2 ** 31 else torch.int64
    # NaN positions (from NaN offsets) give NaN weights; the clamp keeps their rows inside the matrix.
    low = low.to(index_dtype).clamp_(min=torch.zeros_like(upper, dtype=index_dtype), max=upper.to(index_dtype))
    first = low[..., 0] * (padded_width * groups) + low[..., 1] * groups
    first += (torch.arange(batch, device=low.device, dtype=index_dtype) * ((height + 3) * padded_width * groups)).view(
        1, -1, 1, 1, 1) + torch.arange(groups, device=low.device, dtype=index_dtype)
    steps = torch.tensor([0, groups, padded_width * groups, (padded_width + 1) * groups], device=low.device,
                         dtype=index_dtype)
    rows = (first.unsqueeze(-1) + steps).view(num_points, -1, 4)
    axis_weights = torch.stack((1 - frac, frac), dim=-1)  # (..., axis, corner)
    weight_y, weight_x = axis_weights.unbind(-2)
    if mask is not None:
        mask = mask.reshape(batch, groups, num_points, out_height, out_width).permute(2, 0, 3, 4, 1)
        weight_y = weight_y * (mask.unsqueeze(-1) * scale)
    elif scale != 1:
        weight_y = weight_y * scale
    weights = (weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)).view(num_points, -1, 4)
    return rows, weights, axis_weights.view(num_points, -1, 2, 2)


def _weighted_bags(features: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_j weights[r, j] * features[rows[r, j]]`` for ``(R, n)`` rows and weights, with one
    fused gather (``embedding_bag``)."""
    bag_size = rows.shape[1]
    rows = rows.reshape(-1)
    starts = torch.arange(0, rows.numel(), bag_size, device=rows.device, dtype=rows.dtype)
    return torch.embedding_bag(features, rows, starts, False, 0, False, weights.reshape(-1), False)[0]


def _pool_taps(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        geometry: _Geometry,
        reduction: str,
        record_winner: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eager forward ``(L, C / G)``: one weighted gather per tap into a running maximum (and, if asked,
    the first winning tap of every output element as ``uint8``), or one gather of all taps for the mean."""
    num_points = geometry.num_points
    features = _padded_features(input, geometry.groups)
    scale = 1 / num_points if reduction == 'avg' else 1.0
    rows, weights, _ = _tap_corners(_tap_positions(offset, geometry), mask, geometry, scale, compact_rows=True)
    if reduction == 'avg':
        return _weighted_bags(features, rows.transpose(0, 1).flatten(1), weights.transpose(0, 1).flatten(1)), None
    out = _weighted_bags(features, rows[0], weights[0])
    winner = None
    if record_winner:
        winner = torch.zeros_like(out, dtype=torch.uint8 if num_points <= 256 else torch.int32)
    for tap in range(1, num_points):
        sample = _weighted_bags(features, rows[tap], weights[tap])
        if winner is not None:
            winner.masked_fill_(sample > out, tap)
        torch.maximum(out, sample, out=out)
    return out, winner


class _DeformPoolFunction(torch.autograd.Function):
    """Eager deformable pooling that keeps no per-sample intermediate for backward.

    Saved: the input, offsets, masks and (max) the winning tap per output element; backward recomputes
    the corners per tap and sends the gradient of each output element to the sample of its winning tap.
    """

    @staticmethod
    def forward(ctx, input, offset, mask, geometry: _Geometry, reduction: str):
        out, winner = _pool_taps(input, offset, mask, geometry, reduction, record_winner=True)
        ctx.geometry, ctx.reduction = geometry, reduction
        ctx.save_for_backward(input, offset, mask, winner)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, offset, mask, winner = ctx.saved_tensors
        geometry, reduction = ctx.geometry, ctx.reduction
        needs_input, needs_offset, needs_mask = ctx.needs_input_grad[:3]
        num_points, groups = geometry.num_points, geometry.groups
        batch, channels, height, width = input.shape
        (out_height, out_width), scale = geometry.out_size, (1 / num_points if reduction == 'avg' else 1.0)
        features = _padded_features(input, groups)
        positions = _tap_positions(offset, geometry)
        rows, weights, axis_weights = _tap_corners(positions, mask, geometry, scale, compact_rows=True)
        grad_out = grad_out.contiguous()
        grad_features = torch.zeros_like(features) if needs_input else None
        # Gradient of each corner weight: the dot product of its feature row with the output gradient.
        corner_grads = features.new_empty(rows.shape + (1,)) if needs_offset or needs_mask else None
        for tap in range(num_points):
            grad_tap = grad_out if winner is None else grad_out.masked_fill(winner != tap, 0)
            if grad_features is not None:
                grad_features.index_add_(
                    0, rows[tap].reshape(-1), (weights[tap].unsqueeze(-1) * grad_tap.unsqueeze(1)).flatten(0, 1))
            if corner_grads is not None:
                torch.bmm(features[rows[tap]], grad_tap.unsqueeze(-1), out=corner_grads[tap])
        grad_input = grad_offset = grad_mask = None
        if grad_features is not None:
            grad_input = grad_features.view(batch, height + 3, width + 3, channels)[:, 1:height + 1, 1:width + 1]
            grad_input = grad_input.permute(0, 3, 1, 2)
        if corner_grads is None:
            return grad_input, grad_offset, grad_mask, None, None
        corner_grads = corner_grads.view(num_points, -1, 2, 2)  # (tap, location, corner y, corner x)
        weight_y, weight_x = axis_weights.unbind(-2)
        grad_y = (corner_grads * weight_x.unsqueeze(-2)).sum(-1)  # per y corner, summed over x corners
        modulation = scale if mask is None else mask.reshape(
            batch, groups, num_points, out_height, out_width).permute(2, 0, 3, 4, 1).reshape(num_points, -1) * scale
        shape = (num_points, batch, out_height, out_width, groups)
        if needs_offset:
            grad_x = (corner_grads * weight_y.unsqueeze(-1)).sum(-2)
            grad_positions = torch.stack((grad_y[..., 1] - grad_y[..., 0], grad_x[..., 1] - grad_x[..., 0]), dim=-1)
            upper = positions.new_tensor([height + 1, width + 1])
            inside = (positions >= 0) & (positions <= upper)  # the clamp of _tap_corners passes gradients here
            grad_positions = grad_positions.view(shape + (2,)) * inside
            if mask is not None:
                grad_positions *= modulation.view(shape + (1,))
            elif scale != 1:
                grad_positions *= scale
            grad_offset = torch.empty_like(offset)
            grad_offset.unflatten(1, (groups, num_points, 2)).copy_(grad_positions.permute(1, 4, 0, 5, 2, 3))
        if needs_mask:
            grad_modulation = (grad_y * weight_y).sum(-1) * scale
            grad_mask = torch.empty_like(mask)
            grad_mask.unflatten(1, (groups, num_points)).copy_(grad_modulation.view(shape).permute(1, 4, 0, 2, 3))
        return grad_input, grad_offset, grad_mask, None, None


def _use_tap_loop(*tensors: torch.Tensor) -> bool:
    """The eager tap loop (:class:`_DeformPoolFunction`) for float32/float64 on CPU or CUDA; the dense gather
    (same result, exportable) for other dtypes and when tracing, scripting, exporting or compiling."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    floats = [t for t in tensors if t is not None and t.is_floating_point()]
    return (all(t.device.type in ('cpu', 'cuda') for t in floats)
            and all(t.dtype in (torch.float32, torch.float64) for t in floats))


def _dense_pool(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        geometry: _Geometry,
        reduction: str,
) -> torch.Tensor:
    """The same pooling with standard differentiable ops: all ``K`` samples ``(K, L, C / G)`` at once."""
    scale = 1 / geometry.num_points if reduction == 'avg' else 1.0
    features = _padded_features(input, geometry.groups)
    rows, weights, _ = _tap_corners(_tap_positions(offset, geometry), mask, geometry, scale, compact_rows=False)
    samples = (features[rows] * weights.unsqueeze(-1)).sum(dim=2)
    # max(dim) sends the gradient to the first maximal tap, as the tap loop does
    return samples.max(dim=0).values if reduction == 'max' else samples.sum(dim=0)


def deform_pool2d(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        kernel_size: _IntOrPair = 3,
        stride: _IntOrPair = 1,
        padding: _IntOrPair = 0,
        dilation: _IntOrPair = 1,
        reduction: str = 'max',
) -> torch.Tensor:
    """Modulated deformable pooling (paper §5.1 / App. B), see the module docstring for the semantics.

    Args:
        input: features ``(B, C, H, W)``.
        offset: ``(B, 2 * G * kh * kw, Ho, Wo)``, ``(dy, dx)`` per kernel point, torchvision's layout.
        mask: modulation ``(B, G * kh * kw, Ho, Wo)``; ``None`` means all ones.
        kernel_size, stride, padding, dilation: as in ``max_pool2d``. Samples outside the image are zeros.
        reduction: ``'max'`` or ``'avg'`` over the ``kh * kw`` modulated samples.

    Returns:
        ``(B, C, Ho, Wo)``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
    if input.dim() != 4:
        raise ValueError(f'input must be (B, C, H, W), got shape {tuple(input.shape)}')
    kernel_size = _pair(kernel_size, 'kernel_size')
    stride = _pair(stride, 'stride')
    padding = _pair(padding, 'padding')
    dilation = _pair(dilation, 'dilation')
    batch, channels, height, width = input.shape
    num_points = kernel_size[0] * kernel_size[1]
    out_height = (height + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_width = (width + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    if offset.dim() != 4 or offset.shape[1] % (2 * num_points) or offset.shape[1] == 0:
        raise ValueError(
            f'offset must be (B, 2 * groups * {num_points}, Ho, Wo) for kernel_size {kernel_size}, '
            f'got shape {tuple(offset.shape)}')
    groups = offset.shape[1] // (2 * num_points)
    if tuple(offset.shape) != (batch, 2 * groups * num_points, out_height, out_width):
        raise ValueError(
            f'offset shape {tuple(offset.shape)} does not match the output '
            f'{(batch, 2 * groups * num_points, out_height, out_width)} of input {tuple(input.shape)}')
    if channels % groups:
        raise ValueError(f'{channels} input channels cannot be split into {groups} deformable groups')
    if mask is not None and tuple(mask.shape) != (batch, groups * num_points, out_height, out_width):
        raise ValueError(
            f'mask must have shape {(batch, groups * num_points, out_height, out_width)}, got {tuple(mask.shape)}')

    geometry = _Geometry((height, width), (out_height, out_width), kernel_size, stride, padding, dilation, groups)
    offset = offset.to(input.dtype)
    mask = None if mask is None else mask.to(input.dtype)
    if not _use_tap_loop(input, offset, mask):
        out = _dense_pool(input, offset, mask, geometry, reduction)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, offset, mask)):
        out = _DeformPoolFunction.apply(input, offset, mask, geometry, reduction)
    else:
        out = _pool_taps(input, offset, mask, geometry, reduction, record_winner=False)[0]
    return out.view(batch, out_height, out_width, channels).permute(0, 3, 1, 2)


class DeformPool2d(nn.Module):
    """Deformable pooling with given offsets and masks: ``forward(input, offset, mask=None)``.

    Out-of-image samples are zeros, like zero padding. See :func:`deform_pool2d`.
    """

    def __init__(
            self,
            kernel_size: _IntOrPair = 3,
            stride: _IntOrPair = 1,
            padding: _IntOrPair = 0,
            dilation: _IntOrPair = 1,
            reduction: str = 'max',
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
        self.kernel_size = _pair(kernel_size, 'kernel_size')
        self.stride = _pair(stride, 'stride')
        self.padding = _pair(padding, 'padding')
        self.dilation = _pair(dilation, 'dilation')
        self.reduction = reduction

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deform_pool2d(
            input, offset, mask, self.kernel_size, self.stride, self.padding, self.dilation, self.reduction)

    def extra_repr(self) -> str:
        return (f'kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}, reduction={self.reduction!r}')


class DeformMaxPool2d(DeformPool2d):
    """Deformable max-pool (paper §5.1) with given offsets and masks; out-of-image samples are zeros."""

    def __init__(self, kernel_size: _IntOrPair = 3, stride: _IntOrPair = 1, padding: _IntOrPair = 0,
                 dilation: _IntOrPair = 1):
        super().__init__(kernel_size, stride, padding, dilation, reduction='max')


class DeformAvgPool2d(DeformPool2d):
    """Deformable avg-pool (paper App. B) with given offsets and masks; out-of-image samples are zeros
    and count in the mean (like ``avg_pool2d(count_include_pad=True)``)."""

    def __init__(self, kernel_size: _IntOrPair = 3, stride: _IntOrPair = 1, padding: _IntOrPair = 0,
                 dilation: _IntOrPair = 1):
        super().__init__(kernel_size, stride, padding, dilation, reduction='avg')


class LearnedDeformPool2d(nn.Module):
    """Deformable pooling whose offsets and masks are predicted from its input (the paper's block op).

    ``offset_conv`` (3x3, stride of the pooling, with bias) predicts ``2 * G * k * k`` offsets followed by
    ``G * k * k`` mask logits (sigmoid). It is zero-initialised as in DCNv2: at initialisation the samples
    lie on the regular pooling grid with masks 0.5. Padding is ``dilation * (k - 1) // 2`` ("same" for
    stride 1), out-of-image samples are zeros.
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            deform_groups: int = 1,
            reduction: str = 'max',
    ):
        super().__init__()
        if channels % deform_groups:
            raise ValueError(f'{channels} channels cannot be split into {deform_groups} deformable groups')
        if kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd so that offsets align with the output, got {kernel_size}')
        self.num_points = deform_groups * kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(channels, 3 * self.num_points, 3, stride=stride, padding=1)
        self.pool = DeformPool2d(kernel_size, stride, dilation * (kernel_size - 1) // 2, dilation, reduction)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def predict_offsets(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Offsets ``(B, 2 * G * k * k, Ho, Wo)`` in pixels and masks ``(B, G * k * k, Ho, Wo)`` in (0, 1)."""
        offset, mask_logits = self.offset_conv(x).split((2 * self.num_points, self.num_points), dim=1)
        return offset, mask_logits.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.predict_offsets(x)
        return self.pool(x, offset, mask)
