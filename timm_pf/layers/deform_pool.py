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
folded into the weights) on the zero-padded input, where every corner is a row of the channels-last
feature matrix and corners outside the image read zeros. In eager mode (float32/float64) the only loop
is over the ``kh * kw`` kernel taps, none over positions or channels: each tap is one fused weighted
gather of channel vectors (``embedding_bag``) into a running maximum that also records the winning tap
per output element (``uint8``); the mean is one gather of all taps. Backward
(:class:`_DeformPoolFunction`) keeps only the input, offsets, masks and winning taps, recomputes each
tap's corners and sends every output's gradient to its first maximal tap (as ``max_pool2d`` does).
Under TorchScript, tracing, ``torch.compile``, for other dtypes and for twice differentiable gradients,
the same math runs as one bilinear ``grid_sample`` of all taps (:func:`sampled_deform_pool2d`). ONNX export
with the default exporter writes ``DeformConv`` (opset 19): the avg-pool as one deformable depthwise
convolution with weights ``1 / K``, the max-pool as one ``DeformConv`` that samples all taps and a
``ReduceMax`` (:func:`_onnx_deform_pool2d`). The TorchScript-based exporter (``dynamo=False``) and max-pools
padded less than "same" write the ``grid_sample`` form (ONNX ``GridSample``, ``Mul``, ``ReduceMax`` /
``ReduceMean``), for runtimes without ``DeformConv`` and opsets before 19.
"""
import functools
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from .._private import current_dispatch_mode
from .graph_capture import is_capturing_graph, is_static_size

__all__ = [
    'deform_pool2d', 'sampled_deform_pool2d', 'DeformPool2d', 'DeformMaxPool2d', 'DeformAvgPool2d',
    'LearnedDeformPool2d']

_IntOrPair = Union[int, Tuple[int, int]]
_REDUCTIONS = ('max', 'avg')
_GATHER_BUDGET = 2 ** 19  # values gathered at once by the max tap loop (2 MiB in float32)


def _pair(value: _IntOrPair, name: str, low: int = 1) -> Tuple[int, int]:
    """``value`` as a pair of ints, each at least ``low`` (0 for padding, 1 for the other sizes)."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair):
        raise ValueError(f'{name} must be an int >= {low} or a pair of them, got {value!r}')
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
    channels = input.shape[1]
    padded = F.pad(input.permute(0, 2, 3, 1), (0, 0, 1, 2, 1, 2))
    return padded.reshape(-1, channels // groups)


class _Constants(NamedTuple):
    """Index and position tensors of one call that depend only on its sizes (see :func:`_constants`)."""
    grid: torch.Tensor  # (2, K, 1, Ho, Wo, 1) regular sampling positions (y; x) in padded coordinates
    lower: torch.Tensor  # (2, 1, 1, 1, 1, 1) 0: the padded image's first row / column
    upper: torch.Tensor  # (2, 1, 1, 1, 1, 1) H + 1 / W + 1: the last positions whose corners are in the matrix
    lower_rows: torch.Tensor  # lower and upper in the row index dtype
    upper_rows: torch.Tensor
    first_row: torch.Tensor  # (1, B, 1, 1, G): row of padded pixel (0, 0) of every image and group
    corner_steps: torch.Tensor  # (4,) row steps from the above-left corner to the 4 corners
    row_stride: int  # rows per padded image row (the column stride is G)
    bag_starts: torch.Tensor  # (K * L,) 0, 4, 8, ...: the first entry of every bag of 4 corners


def _constants(
        geometry: _Geometry,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        index_dtype: torch.dtype,
) -> _Constants:
    """The size-dependent tensors of a call: ``int32`` or ``int64`` rows (``index_dtype``), ``dtype`` positions."""
    (height, width), (out_height, out_width), (kh, kw) = geometry.in_size, geometry.out_size, geometry.kernel_size
    groups, row_stride = geometry.groups, (geometry.in_size[1] + 3) * geometry.groups
    opts, index_opts = dict(device=device, dtype=dtype), dict(device=device, dtype=index_dtype)
    tap_y = torch.arange(kh, **opts).repeat_interleave(kw) * geometry.dilation[0]
    tap_x = torch.arange(kw, **opts).repeat(kh) * geometry.dilation[1]
    out_y = torch.arange(out_height, **opts) * geometry.stride[0] + (1 - geometry.padding[0])
    out_x = torch.arange(out_width, **opts) * geometry.stride[1] + (1 - geometry.padding[1])
    grid = torch.stack(torch.broadcast_tensors(
        (tap_y[:, None] + out_y)[:, :, None], (tap_x[:, None] + out_x)[:, None, :]))
    upper = torch.tensor([height + 1, width + 1], **opts).view(2, 1, 1, 1, 1, 1)
    first_row = (torch.arange(batch, **index_opts) * ((height + 3) * row_stride)).view(1, -1, 1, 1, 1) + torch.arange(
        groups, **index_opts)
    num_samples = geometry.num_points * batch * out_height * out_width * groups
    return _Constants(
        grid=grid[:, :, None, :, :, None], lower=torch.zeros_like(upper), upper=upper,
        lower_rows=torch.zeros_like(upper, dtype=index_dtype), upper_rows=upper.to(index_dtype), first_row=first_row,
        corner_steps=torch.tensor([0, groups, row_stride, row_stride + groups], **index_opts), row_stride=row_stride,
        bag_starts=torch.arange(0, 4 * num_samples, 4, **index_opts))


@functools.lru_cache(maxsize=16)
def _cached_constants(*args) -> _Constants:
    """:func:`_constants` kept between eager calls (plain tensors, also usable under ``inference_mode``)."""
    with torch.inference_mode(False), torch.no_grad():
        return _constants(*args)


def _tap_positions(offset: torch.Tensor, constants: _Constants, groups: int, eager: bool) -> torch.Tensor:
    """Sampling positions of every kernel tap in padded pixel coordinates (image pixel + 1) as a plane of
    ``y`` and one of ``x``: ``(2, K, B, Ho, Wo, G)``, contiguous in the tap loop (``eager``)."""
    batch, _, out_height, out_width = offset.shape
    offset = offset.reshape(batch, groups, -1, 2, out_height, out_width).permute(3, 2, 0, 4, 5, 1)
    if eager:
        return torch.add(offset, constants.grid, out=offset.new_empty(offset.shape))
    return offset + constants.grid


def _masks_by_tap(mask: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Modulation masks ``(B, G * K, Ho, Wo)`` in the layout of the tap positions, ``shape = (K, B, Ho, Wo, G)``."""
    num_points, batch, out_height, out_width, groups = shape
    return mask.reshape(batch, groups, num_points, out_height, out_width).permute(2, 0, 3, 4, 1)


def _tap_corners(
        positions: torch.Tensor,
        mask: Optional[torch.Tensor],
        constants: _Constants,
        scale: float,
        eager: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4 bilinear corners of every tap: rows of :func:`_padded_features` ``(K, L, 4)`` and weights
    ``(K, L, 4)`` (mask and ``scale`` folded in), with ``L = B * Ho * Wo * G`` in that order and corners
    (above-left, above-right, below-left, below-right); also the fractional positions ``(2, K, L)`` from
    which the backward pass takes the per-axis weights.

    Positions are clamped to the padded image (``[0, H + 1] x [0, W + 1]``): beyond it all corners are zeros
    in both the clamped and the exact formulation, so values are unchanged, and so are gradients (the clamp's).
    Per-axis planes keep every elementwise op on long contiguous rows; the tap loop (``eager``) writes the
    interleaved weights in place, the differentiable path stacks them.
    """
    num_points, groups = positions.shape[1], positions.shape[-1]
    positions = positions.clamp(min=constants.lower, max=constants.upper)
    low = positions.to(constants.lower_rows.dtype)  # truncation = floor on non-negative positions
    frac = positions - low
    # NaN positions (from NaN offsets) give NaN weights; this clamp keeps their rows inside the matrix.
    low.clamp_(min=constants.lower_rows, max=constants.upper_rows)
    first = torch.add(constants.first_row, low[0], alpha=constants.row_stride).add_(low[1], alpha=groups)
    rows = (first.unsqueeze(-1) + constants.corner_steps).reshape(num_points, -1, 4)
    frac_y, frac_x = frac
    if mask is not None:
        mask = _masks_by_tap(mask, positions.shape[1:])
        mask = mask if scale == 1 else mask * scale
        below = frac_y * mask
        above = mask - below
    else:
        below = frac_y if scale == 1 else frac_y * scale
        above = scale - below
    left, right = 1 - frac_x, frac_x
    pairs = ((above, left), (above, right), (below, left), (below, right))
    if eager:
        weights = frac.new_empty(first.shape + (4,))
        for corner, (weight_y, weight_x) in enumerate(pairs):
            torch.mul(weight_y, weight_x, out=weights[..., corner])
    else:
        weights = torch.stack([weight_y * weight_x for weight_y, weight_x in pairs], dim=-1)
    return rows, weights.reshape(rows.shape), frac.reshape(2, num_points, -1)


def _weighted_bags(
        features: torch.Tensor,
        rows: torch.Tensor,
        weights: torch.Tensor,
        bag_starts: torch.Tensor,
) -> torch.Tensor:
    """``out[r] = sum_j weights[r, j] * features[rows[r, j]]`` for ``(R, n)`` rows and weights (bags of ``n``
    starting at ``bag_starts``), with one fused gather (``embedding_bag``)."""
    return torch.embedding_bag(features, rows.reshape(-1), bag_starts, False, 0, False, weights.reshape(-1), False)[0]


def _eager_corners(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        geometry: _Geometry,
        scale: float,
) -> Tuple[torch.Tensor, _Constants, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded features, constants, positions and :func:`_tap_corners` of the tap loop (int32 rows if they fit)."""
    features = _padded_features(input, geometry.groups)
    index_dtype = torch.int32 if features.shape[0] < 2 ** 31 else torch.int64
    sizes = (geometry, input.shape[0], input.device, input.dtype, index_dtype)
    # under a dispatch mode (e.g. FakeTensorMode) tensors are the mode's: nothing is shared with the cache
    constants = _cached_constants(*sizes) if current_dispatch_mode() is None else _constants(*sizes)
    positions = _tap_positions(offset, constants, geometry.groups, eager=True)
    return (features, constants, positions) + _tap_corners(positions, mask, constants, scale, eager=True)


def _pool_taps(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        geometry: _Geometry,
        reduction: str,
        record_winner: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eager forward ``(L, C / G)``: weighted gathers of the taps, a block of taps at a time, into a running
    maximum (and, if asked, the first winning tap of every output element as ``uint8``), or one gather of
    all taps for the mean."""
    num_points = geometry.num_points
    scale = 1 / num_points if reduction == 'avg' else 1.0
    features, constants, _, rows, weights, _ = _eager_corners(input, offset, mask, geometry, scale)
    if reduction == 'avg':
        bag_starts = constants.bag_starts[:rows.shape[1]] * num_points
        return _weighted_bags(features, rows.transpose(0, 1), weights.transpose(0, 1), bag_starts), None
    # A few taps per gather (all of them on small maps, one on large ones): fewer calls where their
    # overhead dominates, a scratch of at most _GATHER_BUDGET values where memory traffic does.
    locations, channels = rows.shape[1], features.shape[1]
    block = max(1, min(num_points, _GATHER_BUDGET // (locations * channels)))
    winner_dtype = torch.uint8 if num_points <= 256 else torch.int32
    out = winner = None
    for start in range(0, num_points, block):
        taps = slice(start, start + block)
        samples = _weighted_bags(features, rows[taps], weights[taps], constants.bag_starts[:rows[taps].numel() // 4])
        samples = samples.view(-1, locations, channels)
        best_tap = None
        if samples.shape[0] == 1:
            best = samples[0]
        elif record_winner:
            best, best_tap = samples.max(dim=0)  # the first maximal tap of the block
            best_tap = best_tap.to(winner_dtype).add_(start)
        else:
            best = samples.amax(dim=0)
        if out is None:
            out = best
            if record_winner:
                winner = torch.zeros_like(out, dtype=winner_dtype) if best_tap is None else best_tap
            continue
        if record_winner:
            # later taps have larger indices: the winner becomes max(winner, tap where strictly better, else 0)
            # (elementwise integer ops; masked_fill_ / where with a bool mask are ~10x slower on CPU)
            better = (best > out).to(winner_dtype)
            better = better.mul_(start) if best_tap is None else best_tap.mul_(better)
            torch.maximum(winner, better, out=winner)
        torch.maximum(out, best, out=out)
    return out, winner


class _DeformPoolFunction(torch.autograd.Function):
    """Eager deformable pooling that keeps no per-sample intermediate for backward.

    Saved: the input, offsets, masks and (max) the winning tap per output element; backward recomputes
    the corners per tap and sends the gradient of each output element to the sample of its winning tap.
    With ``create_graph=True`` (gradient penalties, higher-order gradients) it differentiates
    :func:`sampled_deform_pool2d` instead, whose gradients are differentiable again.
    """

    @staticmethod
    def forward(ctx, input, offset, mask, geometry: _Geometry, reduction: str):
        out, winner = _pool_taps(input, offset, mask, geometry, reduction, record_winner=True)
        ctx.geometry, ctx.reduction = geometry, reduction
        ctx.save_for_backward(input, offset, mask, winner)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, offset, mask, winner = ctx.saved_tensors
        geometry, reduction = ctx.geometry, ctx.reduction
        needs_input, needs_offset, needs_mask = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the sampled form, twice differentiable
            wrt = [t for t, needs in zip((input, offset, mask), ctx.needs_input_grad[:3]) if needs]
            out = sampled_deform_pool2d(input, offset, mask, *geometry[2:6], reduction)
            out = out.permute(0, 2, 3, 1).reshape(grad_out.shape)  # the tap loop's (L, C / G) layout
            grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True))
            return tuple(next(grads) if needs else None for needs in ctx.needs_input_grad[:3]) + (None, None)
        num_points, groups = geometry.num_points, geometry.groups
        batch, channels, height, width = input.shape
        (out_height, out_width), scale = geometry.out_size, (1 / num_points if reduction == 'avg' else 1.0)
        features, constants, positions, rows, weights, frac = _eager_corners(input, offset, mask, geometry, scale)
        grad_out = grad_out.contiguous()
        grad_features = torch.zeros_like(features) if needs_input else None
        # Gradient of each corner weight: the dot product of its feature row with the output gradient.
        corner_grads = features.new_empty(rows.shape + (1,)) if needs_offset or needs_mask else None
        for tap in range(num_points):
            tap_rows = rows[tap].reshape(-1)
            grad_tap = grad_out if winner is None else grad_out * (winner == tap)
            if grad_features is not None:  # scatter_add_ runs in parallel on CPU, index_add_ does not
                grad_features.scatter_add_(
                    0, tap_rows.long().unsqueeze(1).expand(-1, grad_features.shape[1]),
                    (weights[tap].unsqueeze(-1) * grad_tap.unsqueeze(1)).flatten(0, 1))
            if corner_grads is not None:
                corners = features.index_select(0, tap_rows).view(rows.shape[1], 4, -1)
                torch.bmm(corners, grad_tap.unsqueeze(-1), out=corner_grads[tap])
        grad_input = grad_offset = grad_mask = None
        if grad_features is not None:
            grad_input = grad_features.view(batch, height + 3, width + 3, channels)[:, 1:height + 1, 1:width + 1]
            grad_input = grad_input.permute(0, 3, 1, 2)
        if corner_grads is None:
            return grad_input, grad_offset, grad_mask, None, None
        # Chain rule through weight = (y weight) * (x weight) * mask * scale, per-axis weights (1 - frac, frac).
        above_left, above_right, below_left, below_right = corner_grads.squeeze(-1).unbind(-1)
        frac_y, frac_x = frac
        grad_above = above_left + frac_x * (above_right - above_left)  # summed over the x corners
        grad_below = below_left + frac_x * (below_right - below_left)
        shape = (num_points, batch, out_height, out_width, groups)
        modulation = scale
        if mask is not None:
            modulation = _masks_by_tap(mask, shape) * scale
        if needs_offset:
            grad_left = above_left + frac_y * (below_left - above_left)  # summed over the y corners
            grad_right = above_right + frac_y * (below_right - above_right)
            grad_positions = torch.stack((grad_below - grad_above, grad_right - grad_left)).view((2,) + shape)
            # the clamp of _tap_corners passes gradients inside the padded image
            grad_positions *= (positions >= constants.lower) & (positions <= constants.upper)
            grad_positions *= modulation
            grad_offset = torch.empty_like(offset)
            grad_offset.unflatten(1, (groups, num_points, 2)).copy_(grad_positions.permute(2, 5, 1, 0, 3, 4))
        if needs_mask:
            grad_modulation = (grad_above + frac_y * (grad_below - grad_above)).view(shape) * scale
            grad_mask = torch.empty_like(mask)
            grad_mask.unflatten(1, (groups, num_points)).copy_(grad_modulation.permute(1, 4, 0, 2, 3))
        return grad_input, grad_offset, grad_mask, None, None


def _use_tap_loop(*tensors: torch.Tensor) -> bool:
    """The eager tap loop (:class:`_DeformPoolFunction`) for float32/float64 on CPU or CUDA; the sampled form
    (:func:`sampled_deform_pool2d`, same result) for other dtypes and when tracing, exporting or compiling."""
    if is_capturing_graph():
        return False
    floats = [t for t in tensors if t is not None and t.is_floating_point()]
    return (all(t.device.type in ('cpu', 'cuda') for t in floats)
            and all(t.dtype in (torch.float32, torch.float64) for t in floats))


def _power_of_two(size: int) -> int:
    """The smallest power of two >= ``size``."""
    power = 1
    while power < size:
        power *= 2
    return power


def _normalized(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel ``positions`` clamped to ``[-1, size]`` and normalised for ``grid_sample`` (``align_corners=False``).
    A symbolic ``size`` (an export with a dynamic height or width) enters the graph as a tensor: Python arithmetic
    on it would fix the traced size."""
    if isinstance(size, int):
        return positions.clamp(-1.0, float(size)) * (2.0 / size) + (1.0 / size - 1.0)
    size = torch.scalar_tensor(size, dtype=positions.dtype, device=positions.device)
    return (positions.clamp(min=-1.0).minimum(size) * 2.0 + 1.0) / size - 1.0


def sampled_deform_pool2d(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        kernel_size: Tuple[int, int],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        reduction: str,
) -> torch.Tensor:
    """:func:`deform_pool2d` (checked arguments, pairs) with one bilinear ``grid_sample`` of all taps.

    ``grid_sample`` with ``padding_mode='zeros'`` reads the 4 bilinear corners of every point and zeros
    outside the image: the operator's definition. Positions ``p`` (pixels) are passed normalised as
    ``(2 * p + 1) / size - 1`` (``align_corners=False``) on the input zero-padded (right, bottom) to
    power-of-two sizes, where this round trip is exact for integer positions: with zero offsets the result
    equals the regular pooling exactly, ties included. TorchScript-compatible and batch-size independent: the
    form used by TorchScript, tracing and ``torch.compile`` (ONNX: one ``GridSample`` node). An export with a
    dynamic height or width samples the unpadded input (exact to float rounding), so that its graph serves
    every size.
    """
    batch, channels = input.shape[0], input.shape[1]
    height, width = input.shape[2], input.shape[3]
    if is_static_size(height, width):
        height, width = _power_of_two(height), _power_of_two(width)
        input = F.pad(input, (0, width - input.shape[3], 0, height - input.shape[2]))
    if input.device.type == 'cpu' and (input.dtype == torch.bfloat16 or input.dtype == torch.float16):
        input = input.contiguous()  # PyTorch's CPU grid_sample writes NaNs for channels-last half-precision input
    (kh, kw), out_height, out_width = kernel_size, offset.shape[2], offset.shape[3]
    num_points = kh * kw
    groups = offset.shape[1] // (2 * num_points)
    dtype, device = input.dtype, input.device
    # regular sampling positions of the taps (row-major), per output row / column
    tap_y = torch.arange(kh, dtype=dtype, device=device).repeat_interleave(kw) * dilation[0] - padding[0]
    tap_x = torch.arange(kw, dtype=dtype, device=device).repeat(kh) * dilation[1] - padding[1]
    grid_y = tap_y[:, None, None] + (torch.arange(out_height, dtype=dtype, device=device) * stride[0])[:, None]
    grid_x = tap_x[:, None, None] + torch.arange(out_width, dtype=dtype, device=device) * stride[1]
    offset = offset.reshape(batch * groups, num_points, 2, out_height, out_width)
    # beyond one pixel outside the (padded) input every corner reads zeros: clamped there, as the tap loop clamps,
    # so that infinite offsets sample zeros instead of reaching grid_sample as NaN
    norm_y = _normalized(offset[:, :, 0] + grid_y, height)
    norm_x = _normalized(offset[:, :, 1] + grid_x, width)
    grid = torch.stack((norm_x, norm_y), dim=-1).reshape(batch * groups, num_points * out_height, out_width, 2)
    samples = F.grid_sample(
        input.reshape(batch * groups, channels // groups, height, width), grid,
        mode='bilinear', padding_mode='zeros', align_corners=False)
    samples = samples.reshape(batch * groups, channels // groups, num_points, out_height, out_width)
    if mask is not None:
        samples = samples * mask.reshape(batch * groups, 1, num_points, out_height, out_width)
    # max(dim) sends the gradient to the first maximal tap, as the tap loop does
    out = samples.max(dim=2).values if reduction == 'max' else samples.mean(dim=2)
    return out.reshape(batch, channels, out_height, out_width)


def _rows_layout_pads(in_size: int, out_size: int, stride: int, center: int) -> Optional[Tuple[int, int]]:
    """Pads ``(before, after)`` that make a 1x1 kernel with ``stride`` give ``out_size`` positions on ``in_size``
    (``before`` at most ``center``), or ``None`` if no non-negative pads do."""
    total = max(0, (out_size - 1) * stride + 1 - in_size)
    if (in_size + total - 1) // stride + 1 != out_size:
        return None
    before = min(center, total)
    return before, total - before


def _deform_conv_node(
        input: torch.Tensor,
        weight: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        out_size: Tuple[int, int],
        stride: Tuple[int, int],
        pads: Tuple[int, int, int, int],
        dilation: Tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """An ONNX ``DeformConv`` node (opset 19) with depthwise ``weight`` ``(C * m, 1, kh, kw)``: under the
    default exporter only. ``DeformConv`` samples bilinearly, zeros outside the image, times the mask."""
    batch, channels = input.shape[0], input.shape[1]
    return torch.onnx.ops.symbolic(
        'DeformConv', (input, weight, offset, None, mask),
        dict(dilations=list(dilation), group=channels, kernel_shape=list(weight.shape[2:]),
             offset_group=offset.shape[1] // (2 * weight.shape[2] * weight.shape[3]), pads=list(pads),
             strides=list(stride)),
        dtype=input.dtype, shape=(batch, weight.shape[0]) + tuple(out_size), version=19)


def _onnx_deform_pool2d(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        geometry: _Geometry,
        reduction: str,
) -> Optional[torch.Tensor]:
    """ONNX export form: ``DeformConv`` nodes (opset 19); ``None`` for what they cannot express (max-pools
    padded less than "same", and max-pools of an export with a dynamic height or width, whose stacked layout's
    pads would depend on the size), which export as :func:`sampled_deform_pool2d`.

    * avg: the mean of the ``K`` modulated samples is the pool's own deformable depthwise convolution with
      weights ``1 / K``: one ``DeformConv`` with the pool's kernel, stride, padding and dilation.
    * max: every tap's samples, then a ``ReduceMax``. One ``DeformConv`` with a 1x1 kernel and unit depthwise
      weights runs on an output grid of the taps stacked along the rows, ``(K * Ho, Wo)`` with row
      ``k * Ho + ho``; each tap's offsets are shifted by the distance from that row's base position to the
      tap's regular position, a constant per tap. The top pad puts the base of the middle tap's block near
      its positions, which keeps the shifts (and the rounding of the shifted offsets) small. A ``K``-channel
      one-hot 3x3 kernel would give the same taps with a 9x larger matrix product in ONNX Runtime.
    """
    (height, width), (out_height, out_width) = geometry.in_size, geometry.out_size
    (kh, kw), (stride_y, stride_x) = geometry.kernel_size, geometry.stride
    num_points, groups, (pad_y, pad_x) = geometry.num_points, geometry.groups, geometry.padding
    batch, channels = input.shape[0], input.shape[1]
    if reduction == 'avg':
        weight = torch.full((channels, 1, kh, kw), 1.0 / num_points, dtype=input.dtype, device=input.device)
        return _deform_conv_node(input, weight, offset, mask, geometry.out_size, geometry.stride,
                                 (pad_y, pad_x, pad_y, pad_x), geometry.dilation)
    if not is_static_size(height, width):
        return None  # symbolic sizes: ONNX attributes (the pads) are constants
    rows = _rows_layout_pads(height, num_points * out_height, stride_y, (num_points // 2) * out_height * stride_y)
    cols = _rows_layout_pads(width, out_width, stride_x, pad_x)
    if rows is None or cols is None:
        return None
    tap_y = torch.arange(kh).repeat_interleave(kw) * geometry.dilation[0] - pad_y
    tap_x = torch.arange(kw).repeat(kh) * geometry.dilation[1] - pad_x
    block_start = torch.arange(num_points) * (out_height * stride_y) - rows[0]
    shift = torch.stack((tap_y - block_start, tap_x + cols[0]), dim=1).to(offset)  # (K, 2), offset's device
    offset = offset.view(batch, groups, num_points, 2, out_height, out_width) + shift[:, :, None, None]
    offset = offset.transpose(2, 3).reshape(batch, 2 * groups, num_points * out_height, out_width)
    if mask is not None:
        mask = mask.reshape(batch, groups, num_points * out_height, out_width)
    weight = torch.ones(channels, 1, 1, 1, dtype=input.dtype, device=input.device)
    samples = _deform_conv_node(input, weight, offset, mask, (num_points * out_height, out_width), geometry.stride,
                                (rows[0], cols[0], rows[1], cols[1]))
    return samples.view(batch, channels, num_points, out_height, out_width).amax(dim=2)


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
        ``(B, C, Ho, Wo)``, channels-last if ``input`` is.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
    if input.dim() != 4:
        raise ValueError(f'input must be (B, C, H, W), got shape {tuple(input.shape)}')
    kernel_size = _pair(kernel_size, 'kernel_size')
    stride = _pair(stride, 'stride')
    padding = _pair(padding, 'padding', low=0)
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
    if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():  # the default (dynamo) exporter
        out = _onnx_deform_pool2d(input, offset, mask, geometry, reduction)
        if out is not None:
            return out
    if batch == 0 or not _use_tap_loop(input, offset, mask):
        out = sampled_deform_pool2d(input, offset, mask, kernel_size, stride, padding, dilation, reduction)
        if input.is_contiguous(memory_format=torch.channels_last) and not is_capturing_graph():
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, offset, mask)):
        out = _DeformPoolFunction.apply(input, offset, mask, geometry, reduction)
    else:
        out = _pool_taps(input, offset, mask, geometry, reduction, record_winner=False)[0]
    out = out.view(batch, out_height, out_width, channels).permute(0, 3, 1, 2)  # computed channels-last
    return out if input.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


@register_notrace_module  # an FX leaf: its checks and kernel choice stay out of traced graphs
class DeformPool2d(nn.Module):
    """Deformable pooling with given offsets and masks: ``forward(input, offset, mask=None)``.

    Out-of-image samples are zeros, like zero padding. See :func:`deform_pool2d`; TorchScript runs
    :func:`sampled_deform_pool2d`. ``device`` / ``dtype`` are accepted for timm's constructor convention
    (there are no parameters).
    """

    def __init__(
            self,
            kernel_size: _IntOrPair = 3,
            stride: _IntOrPair = 1,
            padding: _IntOrPair = 0,
            dilation: _IntOrPair = 1,
            reduction: str = 'max',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
        self.kernel_size = _pair(kernel_size, 'kernel_size')
        self.stride = _pair(stride, 'stride')
        self.padding = _pair(padding, 'padding', low=0)
        self.dilation = _pair(dilation, 'dilation')
        self.reduction = reduction

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return sampled_deform_pool2d(
                input, offset, mask, self.kernel_size, self.stride, self.padding, self.dilation, self.reduction)
        return deform_pool2d(
            input, offset, mask, self.kernel_size, self.stride, self.padding, self.dilation, self.reduction)

    def extra_repr(self) -> str:
        return (f'kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}, reduction={self.reduction!r}')


class DeformMaxPool2d(DeformPool2d):
    """Deformable max-pool (paper §5.1) with given offsets and masks; out-of-image samples are zeros."""

    def __init__(self, kernel_size: _IntOrPair = 3, stride: _IntOrPair = 1, padding: _IntOrPair = 0,
                 dilation: _IntOrPair = 1, device=None, dtype=None):
        super().__init__(kernel_size, stride, padding, dilation, reduction='max')


class DeformAvgPool2d(DeformPool2d):
    """Deformable avg-pool (paper App. B) with given offsets and masks; out-of-image samples are zeros
    and count in the mean (like ``avg_pool2d(count_include_pad=True)``)."""

    def __init__(self, kernel_size: _IntOrPair = 3, stride: _IntOrPair = 1, padding: _IntOrPair = 0,
                 dilation: _IntOrPair = 1, device=None, dtype=None):
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
            device=None,
            dtype=None,
    ):
        super().__init__()
        if deform_groups < 1 or channels % deform_groups:
            raise ValueError(f'{channels} channels cannot be split into {deform_groups} deformable groups')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd and positive so that offsets align with the output, got '
                             f'{kernel_size}')
        self.num_points = deform_groups * kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(channels, 3 * self.num_points, 3, stride=stride, padding=1, device=device,
                                     dtype=dtype)
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
