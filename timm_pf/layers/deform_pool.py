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

Sampling is vectorised: the bilinear neighbours and weights of all points are computed at once (the mask
folded into the weights) and the features, as channel vectors, are gathered with one sparse x dense matrix
product (one matrix row per sample, or per output location for the mean). There are no Python loops over
positions or channels. Under tracing, ``torch.compile`` and ONNX export the same product runs as a dense
gather, which exports with standard ops (``Gather``, ``Mul``, ``ReduceSum``, ``ReduceMax``).
"""
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ['deform_pool2d', 'DeformPool2d', 'DeformMaxPool2d', 'DeformAvgPool2d', 'LearnedDeformPool2d']

_IntOrPair = Union[int, Tuple[int, int]]
_REDUCTIONS = ('max', 'avg')


def _pair(value: _IntOrPair, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
    return pair


def _sampling_points(
        offset: torch.Tensor,
        out_size: Tuple[int, int],
        kernel_size: Tuple[int, int],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions in pixels, ``ys`` and ``xs`` of shape ``(B, G, K, Ho, Wo)``."""
    out_height, out_width = out_size
    kh, kw = kernel_size
    opts = dict(device=offset.device, dtype=offset.dtype)
    ki = torch.arange(kh, **opts).repeat_interleave(kw) * dilation[0]  # row of each kernel point
    kj = torch.arange(kw, **opts).repeat(kh) * dilation[1]  # column of each kernel point
    oy = torch.arange(out_height, **opts) * stride[0] - padding[0]
    ox = torch.arange(out_width, **opts) * stride[1] - padding[1]
    offset = offset.reshape(offset.shape[0], -1, kh * kw, 2, out_height, out_width)
    ys = (ki[:, None, None] + oy[:, None]) + offset[:, :, :, 0]
    xs = (kj[:, None, None] + ox) + offset[:, :, :, 1]
    return ys, xs


def _bilinear_corners(
        ys: torch.Tensor,
        xs: torch.Tensor,
        height: int,
        width: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 4 bilinear neighbours of every point: their rows in the feature matrix and their weights, both
    ``(2, 2, *ys.shape)`` (above/below, left/right). Neighbours outside the image get weight 0 (zero padding).

    ``ys``/``xs`` are ``(B, G, K, Ho, Wo)``. The feature matrix ``(B * H * W * G, C / G)`` is the input in
    channels-last order with the ``G`` deformable groups as extra rows: row ``((b * H + y) * W + x) * G + g``.
    """
    batch, groups = ys.shape[:2]
    y0, x0 = ys.detach().floor(), xs.detach().floor()
    frac_y, frac_x = ys - y0, xs - x0
    y = torch.stack((y0, y0 + 1)).long()
    x = torch.stack((x0, x0 + 1)).long()
    # Per-axis weights (1 - t, t), zeroed where that neighbour lies outside the image.
    weight_y = torch.stack((1 - frac_y, frac_y)) * ((y >= 0) & (y < height))
    weight_x = torch.stack((1 - frac_x, frac_x)) * ((x >= 0) & (x < width))
    first_row = (torch.arange(batch, device=ys.device) * height).view(-1, 1, 1, 1, 1)
    image_row = (y.clamp_(0, height - 1) + first_row) * (width * groups) + torch.arange(
        groups, device=ys.device).view(-1, 1, 1, 1)
    rows = image_row.unsqueeze(1) + x.clamp_(0, width - 1).unsqueeze(0) * groups
    return rows, weight_y.unsqueeze(1) * weight_x.unsqueeze(0)


def _sparse_rows(rows: torch.Tensor, weights: torch.Tensor, num_cols: int) -> torch.Tensor:
    """CSR matrix with ``rows.shape[1]`` entries per row: ``(rows.shape[0], num_cols)``."""
    num_rows, per_row = rows.shape
    crow = torch.arange(0, num_rows * per_row + 1, per_row, device=rows.device)
    with warnings.catch_warnings():  # the matrix lives inside one product: its beta-status notice is noise
        warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta state')
        return torch.sparse_csr_tensor(
            crow, rows.reshape(-1), weights.reshape(-1), (num_rows, num_cols), check_invariants=False)


class _SparseGather(torch.autograd.Function):
    """``out[r] = sum_j weights[r, j] * features[rows[r, j]]`` as a sparse x dense product.

    The rows of ``features`` are contiguous channel vectors, so this gathers whole vectors instead of
    one value per channel (several times faster on CPU than ``grid_sample`` on NCHW features).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        matrix = _sparse_rows(rows, weights, features.shape[0])
        ctx.save_for_backward(features, rows, weights)
        return matrix @ features

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, rows, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            num_rows, per_row = rows.shape
            sample_ids = torch.arange(num_rows, device=rows.device).repeat_interleave(per_row)
            transposed = torch.sparse_coo_tensor(
                torch.stack((rows.reshape(-1), sample_ids)), weights.reshape(-1), (features.shape[0], num_rows),
                check_invariants=False)
            grad_features = torch.sparse.mm(transposed, grad_out)
        if ctx.needs_input_grad[2]:
            grad_weights = torch.bmm(features[rows], grad_out.unsqueeze(-1)).squeeze(-1)
        return grad_features, None, grad_weights


def _use_sparse_gather(*tensors: torch.Tensor) -> bool:
    """Sparse product in eager mode for float32/float64 on CPU or CUDA; a dense gather (same result) for other
    dtypes (no sparse kernels), when tracing, exporting or compiling, and under dispatch modes such as
    ``FlopCounterMode`` (which would count the sparse product as dense)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    floats = [t for t in tensors if t.is_floating_point()]
    return (all(t.device.type in ('cpu', 'cuda') for t in tensors)
            and all(t.dtype in (torch.float32, torch.float64) for t in floats))


def _gather(features: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_j weights[r, j] * features[rows[r, j]]``: ``(R, C)`` from ``(N, C)``, ``(R, n)``."""
    if _use_sparse_gather(features, rows, weights):
        return _SparseGather.apply(features, rows, weights)
    return (features[rows] * weights.unsqueeze(-1)).sum(dim=1)


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

    ys, xs = _sampling_points(offset.to(input.dtype), (out_height, out_width), kernel_size, stride, padding, dilation)
    rows, weights = _bilinear_corners(ys, xs, height, width)  # (2, 2, B, G, K, Ho, Wo)
    if mask is not None:  # modulation scales all channels of a sample: fold it into the bilinear weights
        weights = weights * mask.to(input.dtype).reshape(batch, groups, num_points, out_height, out_width)
    # One matrix row per (b, ho, wo, g, k) sample (max) or per (b, ho, wo, g) output (mean over k).
    rows, weights = (t.permute(2, 5, 6, 3, 4, 0, 1) for t in (rows, weights))
    features = input.permute(0, 2, 3, 1).reshape(batch * height * width * groups, channels // groups)
    if reduction == 'max':
        sampled = _gather(features, rows.reshape(-1, 4), weights.reshape(-1, 4))
        out = sampled.view(batch, out_height, out_width, groups, num_points, -1).amax(dim=4)
    else:
        sampled = _gather(features, rows.reshape(-1, 4 * num_points), weights.reshape(-1, 4 * num_points) / num_points)
        out = sampled.view(batch, out_height, out_width, groups, -1)
    return out.reshape(batch, out_height, out_width, channels).permute(0, 3, 1, 2)


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
