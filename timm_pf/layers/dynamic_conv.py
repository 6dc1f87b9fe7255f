"""Dynamic convolution: a per-sample mixture of expert kernels (ParameterNet, arXiv:2306.14525, §4.2).

``DynamicConv2d`` keeps timm's :class:`~timm.layers.CondConv2d` parameter layout (``weight`` holds the
``E`` expert kernels flattened to ``(E, C_out * C_in / groups * k * k)``) and adds the routing that
produces the mixing coefficients from the globally pooled input:

* ``routing='sigmoid'`` (default, the authors' code): ``sigmoid(Linear(pool(x)))``, one linear layer.
* ``routing='softmax'`` (the paper's Eq. 4): ``softmax(MLP(pool(x)))`` with a two-layer ReLU MLP.

The per-sample convolution (:func:`per_sample_conv2d`) never builds a convolution whose group count
depends on the batch size when the model is exported, so ONNX / TensorRT graphs keep a dynamic batch
axis: the mixed kernels (a ``MatMul`` of the routing weights and the experts, Eq. 3) feed ordinary ``Conv``
nodes, one per sample (an ``If`` between one ``Conv`` for a batch of at most one and a ``Scan`` of ``Conv``
over the batch), and 1x1 kernels a batched ``MatMul``; in eager mode it picks the fastest exact kernel for
the layer's shape. In training, the mixed
per-sample kernels are not kept for backward but mixed again there (a read of the experts instead of
batch x kernel-size floats per layer), which keeps ParameterNet's training memory near the plain GhostNet's.
Batch-1 float32 CPU inference with sigmoid routing goes through the compiled kernel of ``cpu_kernels`` when it
is built (pool, routing and mixing in one call). The layer is an FX leaf (timm's ``register_notrace_module``),
and TorchScript compiles only the plain mixing and the batch-folded grouped convolution.
"""
import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from timm.layers import CondConv2d, Mlp, is_exporting, pad_same, register_notrace_module, to_2tuple

from .._private import scan
from .cpu_kernels import cpu_kernels
from .graph_capture import is_capturing_graph, is_static_size

__all__ = ['DynamicConv2d', 'per_sample_conv2d', 'check_num_experts', 'ROUTING_TYPES']

ROUTING_TYPES = ('sigmoid', 'softmax')

_Pair = Tuple[int, int]

# Mixed kernels of at most this many elements are materialised at once in eager mode.
MIX_CHUNK_NUMEL = 1 << 20
# At batch 1, experts of at least this many elements each are mixed as a batch of column blocks.
BLOCKED_MIX_NUMEL = 1 << 15


def _is_exporting() -> bool:
    """Exporting with ``torch.export`` (which ``torch.onnx.export`` runs), when only batch-independent shapes may
    be used. ``torch.jit.trace`` records the eager path, for the batch size it traces (as timm's ``CondConv2d``)."""
    return is_exporting()


def _autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (only CPU and CUDA have autocast; the meta device has none)."""
    return x.device.type in ('cpu', 'cuda') and torch.is_autocast_enabled(x.device.type)


def _runs_as_matmul(x: torch.Tensor, kernel_size: Tuple[int, ...], stride: _Pair, padding: _Pair,
                    exporting: bool) -> bool:
    """Whether :func:`per_sample_conv2d` (and its backward) computes this convolution as a batched matmul: a 1x1
    kernel without padding, strided only when exporting, and at batch 1 on an NCHW-contiguous input in eager mode
    (no copy; a channels-last sample takes the convolution)."""
    if kernel_size != (1, 1) or padding != (0, 0):
        return False
    return exporting or (stride == (1, 1) and (x.shape[0] > 1 or x.is_contiguous()))


def _pointwise_as_matmul(x: torch.Tensor, weight: torch.Tensor, stride: _Pair, groups: int) -> torch.Tensor:
    """Per-sample 1x1 convolution (no padding) as one batched matmul on the NCHW tensor (a strided view when
    strided): ``(B, g, C_out / g, C_in / g) @ (B, g, C_in / g, H' * W')``."""
    if stride != (1, 1):
        x = x[:, :, ::stride[0], ::stride[1]]
    batch, in_chs, out_h, out_w = x.shape
    out_chs = weight.shape[1]
    cols = x.reshape(batch, groups, in_chs // groups, out_h * out_w)
    kernels = weight.reshape(batch, groups, out_chs // groups, in_chs // groups)
    return torch.matmul(kernels, cols).reshape(batch, out_chs, out_h, out_w)


def _scanned_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: _Pair,
        padding: _Pair,
        dilation: _Pair,
        groups: int,
) -> torch.Tensor:
    """Per-sample convolution as ordinary convolutions with the samples' own kernels, in a graph that serves any
    batch size: a scan over the batch (ONNX ``Scan`` with a ``Conv`` body) for two or more samples, else one
    convolution with the kernels summed over the batch (the one sample's kernel, or zeros for an empty batch,
    which ONNX Runtime's ``Scan`` rejects), chosen at run time (ONNX ``If``). No im2col copies: each sample costs
    one convolution's MACs."""

    def at_most_one(features: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        return F.conv2d(features, kernels.sum(0), None, stride, padding, dilation, groups)

    def each(features: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        def step(carry: torch.Tensor, sample: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
            one, kernel = sample
            return carry.clone(), F.conv2d(one[None], kernel, None, stride, padding, dilation, groups)[0]

        return scan(step, features.new_zeros(()), (features, kernels))[1]

    if padding != (0, 0) and not is_static_size(x.shape[2], x.shape[3]):
        # a dynamic height or width: padded outside the scan, whose body's padded convolution fails to export
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        padding = (0, 0)
    return torch.cond(x.shape[0] <= 1, at_most_one, each, (x, weight))


def per_sample_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        dilation: _Pair = (1, 1),
        groups: int = 1,
) -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` (B, C_in, H, W) with its own kernel ``weight[b]``.

    Args:
        weight: (B, C_out, C_in / groups, kh, kw) per-sample kernels.
        bias: optional (B, C_out) per-sample bias.

    Every path computes the same convolution (up to float rounding), with batch-independent shapes when
    exporting (no conv groups that depend on the batch, so the graph keeps a dynamic batch axis):

    * 1x1 kernels without padding (unstrided in eager mode; at batch 1 an NCHW-contiguous input): a batched
      matmul on the NCHW tensor (no copies). At batch 1 this also skips the convolution's per-call reorder of a
      kernel it has not seen before into oneDNN's blocked layout, which cost more than the matmul itself;
    * other kernels when exporting: ordinary convolutions with the samples' kernels, a scan over the batch
      (ONNX ``If`` + ``Scan`` + ``Conv``, see :func:`_scanned_conv2d`);
    * batch 1: an ordinary convolution with the sample's kernel;
    * otherwise: one convolution with ``groups * B`` groups over the batch folded into channels.
    """
    batch, out_chs = x.shape[0], weight.shape[1]
    exporting = _is_exporting()
    if not exporting and weight.shape[0] != batch:
        raise ValueError(f'per_sample_conv2d needs one kernel per sample: {batch} samples, {weight.shape[0]} kernels')
    as_matmul = _runs_as_matmul(x, weight.shape[-2:], stride, padding, exporting)
    if as_matmul or exporting:
        if as_matmul:
            out = _pointwise_as_matmul(x, weight, stride, groups)
        else:
            out = _scanned_conv2d(x, weight, stride, padding, dilation, groups)
        if bias is not None:
            out = out + bias.reshape(batch, out_chs, 1, 1)
        return out
    if batch == 1:
        return F.conv2d(
            x, weight[0], None if bias is None else bias[0],
            stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _batch_folded_conv2d(x, weight, bias, stride, padding, dilation, groups)


def _batch_folded_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: _Pair,
        padding: _Pair,
        dilation: _Pair,
        groups: int,
) -> torch.Tensor:
    """:func:`per_sample_conv2d` as one convolution with ``groups * B`` groups over the batch folded into the
    channels (TorchScript-compatible; an empty batch gives an empty output)."""
    batch, in_chs, height, width = x.shape
    out_chs = weight.shape[1]
    if batch == 0:  # no groups to fold: any kernel of the right shape gives the empty output
        return F.conv2d(x, weight.new_zeros(weight.shape[1:]), None, stride, padding, dilation, groups)
    out = F.conv2d(
        x.reshape(1, batch * in_chs, height, width),
        weight.reshape([batch * out_chs] + list(weight.shape[2:])),
        None if bias is None else bias.reshape(batch * out_chs),
        stride=stride, padding=padding, dilation=dilation, groups=groups * batch)
    return out.reshape(batch, out_chs, out.shape[-2], out.shape[-1])


class _ConvGeometry(NamedTuple):
    weight_shape: Tuple[int, ...]  # (C_out, C_in / groups, kh, kw)
    stride: _Pair
    padding: _Pair
    dilation: _Pair
    groups: int


def _mix_chunks(batch: int, kernel_numel: int, exporting: bool) -> List[slice]:
    """Sample ranges whose mixed kernels (at most :data:`MIX_CHUNK_NUMEL` elements) are built at once, so
    big kernels x big batches stay in cache instead of filling a fresh batch-sized buffer. One range when
    exporting: the graph keeps a batch-independent shape."""
    if exporting:
        return [slice(0, batch)]
    chunk = max(1, MIX_CHUNK_NUMEL // kernel_numel)
    return [slice(start, start + chunk) for start in range(0, max(batch, 1), chunk)]  # an empty batch: one range


def _mix_one_sample(routing_weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``routing_weights (1, E) @ experts (E, K)``. A one-row matmul runs on a single thread; for big
    kernels the same sums are computed as one batched matmul over up to 64 column blocks of the experts
    (a strided view, no copy), which runs on every thread and returns the (1, K) row in place."""
    num_experts, numel = experts.shape
    blocks = math.gcd(numel, 64) if numel >= BLOCKED_MIX_NUMEL and experts.is_contiguous() else 1
    if blocks == 1:
        return torch.mm(routing_weights, experts)
    cols = numel // blocks
    experts_by_block = experts.as_strided((blocks, num_experts, cols), (cols, numel, 1))
    return torch.bmm(routing_weights.expand(blocks, 1, num_experts), experts_by_block).view(1, numel)


def _mixed_conv(x: torch.Tensor, routing_weights: torch.Tensor, experts: torch.Tensor,
                geometry: _ConvGeometry, exporting: bool) -> torch.Tensor:
    """Mix each sample's kernel from the experts (Eq. 3) and convolve, a chunk of samples at a time."""
    if x.shape[0] == 1 and not exporting:
        # one sample: one mixing call, then its convolution (this path's op count sets batch-1 latency)
        return per_sample_conv2d(
            x, _mix_one_sample(routing_weights, experts).view(1, *geometry.weight_shape), None, *geometry[1:])
    chunks = _mix_chunks(x.shape[0], experts.shape[1], exporting)
    if len(chunks) == 1:
        weight = torch.matmul(routing_weights, experts).reshape(-1, *geometry.weight_shape)
        return per_sample_conv2d(x, weight, None, *geometry[1:])
    return torch.cat([
        _mixed_conv(x[part], routing_weights[part], experts, geometry, exporting) for part in chunks])


def _per_sample_conv2d_backward(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        geometry: _ConvGeometry,
        need_grad_x: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`per_sample_conv2d` (no bias) w.r.t. ``x`` (None unless ``need_grad_x``) and the
    per-sample ``weight``, with the forward's kernel choice (batched matmul for unstrided 1x1, else the
    convolution's own backward with the batch folded into the groups)."""
    batch, in_chs, height, width = x.shape
    out_chs, groups = weight.shape[1], geometry.groups
    if batch == 0:
        return torch.empty_like(x) if need_grad_x else None, torch.empty_like(weight)
    if _runs_as_matmul(x, weight.shape[-2:], geometry.stride, geometry.padding, False):
        cols = x.reshape(batch, groups, in_chs // groups, height * width)
        kernels = weight.reshape(batch, groups, out_chs // groups, in_chs // groups)
        grad = grad_out.reshape(batch, groups, out_chs // groups, height * width)
        grad_x = torch.matmul(kernels.transpose(-1, -2), grad).reshape(x.shape) if need_grad_x else None
        grad_weight = torch.matmul(grad, cols.transpose(-1, -2)).reshape(weight.shape)
        return grad_x, grad_weight
    folded_x = x.reshape(1, batch * in_chs, height, width)
    folded_w = weight.reshape(batch * out_chs, *weight.shape[2:])
    folded_grad = grad_out.reshape(1, batch * out_chs, *grad_out.shape[-2:])
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        folded_grad, folded_x, folded_w, None, geometry.stride, geometry.padding, geometry.dilation, False,
        (0, 0), groups * batch, (need_grad_x, True, False))
    return grad_x.reshape(x.shape) if need_grad_x else None, grad_weight.reshape(weight.shape)


class _MixedConvRecomputed(torch.autograd.Function):
    """:func:`_mixed_conv` for training: the mixed per-sample kernels (batch x kernel size, most of a
    dynamic conv's training memory) are not kept for backward but mixed again there, which costs one
    more read of the experts (the mixing is ``E`` MACs per kernel element, no convolution is recomputed)."""

    @staticmethod
    def forward(ctx, x, routing_weights, experts, geometry):
        ctx.geometry = geometry
        ctx.save_for_backward(x, routing_weights, experts)
        return _mixed_conv(x, routing_weights, experts, geometry, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, routing_weights, experts = ctx.saved_tensors
        need_grad_x = ctx.needs_input_grad[0]
        # in the forward's compute dtype (that of the output: lower than the inputs' under autocast)
        dtype = grad_out.dtype
        grad_out, x_c, routing_c, experts_c = (
            t.to(dtype) for t in (grad_out.contiguous(), x, routing_weights, experts))
        grad_x, grad_routing, grad_experts = [], [], torch.zeros_like(experts_c)
        for part in _mix_chunks(x.shape[0], experts.shape[1], False):
            weight = torch.matmul(routing_c[part], experts_c)
            gx, gw = _per_sample_conv2d_backward(
                grad_out[part], x_c[part], weight.reshape(-1, *ctx.geometry.weight_shape), ctx.geometry, need_grad_x)
            gw = gw.reshape(weight.shape)
            grad_x.append(gx)
            grad_routing.append(torch.matmul(gw, experts_c.t()))
            grad_experts.addmm_(routing_c[part].t(), gw)
        return (torch.cat(grad_x).to(x.dtype) if need_grad_x else None,
                torch.cat(grad_routing).to(routing_weights.dtype), grad_experts.to(experts.dtype), None)


def check_num_experts(num_experts: Any) -> None:
    """``num_experts`` must be a whole number >= 1 (a TypeError or ValueError that names it otherwise)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f'num_experts must be a whole number >= 1, got {num_experts!r} ({type(num_experts).__name__})')
    if num_experts < 1:
        raise ValueError(f'num_experts must be >= 1, got {num_experts}')


@register_notrace_module  # an FX leaf: its kernel choice stays out of traced graphs
class DynamicConv2d(CondConv2d):
    """Convolution whose kernel is a per-sample mixture of ``num_experts`` expert kernels.

    ParameterNet (arXiv:2306.14525) Eq. 3: ``W(x) = sum_i alpha_i(x) W_i`` with the coefficients
    ``alpha(x)`` computed from the global average pool of the input. Parameters: ``weight``
    (experts, CondConv2d layout), optional ``bias`` (E, C_out), and ``routing``, a ``nn.Linear``
    (``routing='sigmoid'``) or a timm ``Mlp`` (``routing='softmax'``, hidden width
    ``routing_hidden_ratio * C_in``).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Union[int, _Pair] = 3,
            stride: Union[int, _Pair] = 1,
            padding: Union[int, _Pair, str] = '',
            dilation: Union[int, _Pair] = 1,
            groups: int = 1,
            bias: bool = False,
            num_experts: int = 4,
            routing: str = 'sigmoid',
            routing_hidden_ratio: float = 1.0,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        check_num_experts(num_experts)
        if routing not in ROUTING_TYPES:
            raise ValueError(f'unknown routing {routing!r}, expected one of {ROUTING_TYPES}')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'{in_channels} input and {out_channels} output channels cannot be split into '
                             f'{groups} groups')
        if min(to_2tuple(kernel_size)) < 1:
            raise ValueError(f'kernel_size must be positive, got {kernel_size}')
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts, **dd)
        self.geometry = _ConvGeometry(
            self.weight_shape, self.stride, (0, 0) if self.dynamic_padding else self.padding, self.dilation,
            self.groups)
        self.routing_type = routing
        # the layouts the compiled batch-1 CPU kernel computes (see ``cpu_kernels``)
        self._kernel_layout = routing == 'sigmoid' and not bias and not self.dynamic_padding
        if routing == 'sigmoid':
            self.routing = nn.Linear(in_channels, num_experts, **dd)
        else:
            hidden = max(1, round(in_channels * routing_hidden_ratio))
            self.routing = Mlp(in_channels, hidden, num_experts, act_layer=nn.ReLU, **dd)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Mixing coefficients (B, num_experts) of input ``x`` (B, C_in, H, W)."""
        if not torch.jit.is_scripting():
            if (type(self.routing) is nn.Linear and not torch.jit.is_tracing() and not _is_exporting()
                    and x.dtype in (torch.float32, torch.float64) and not _autocasting(x)):
                # sigmoid routing as one addmm on the spatial sum, the 1 / (H * W) of the mean folded into its
                # scale: this runs once per conv, so its op count matters at batch 1. (Not in TorchScript: its
                # type check of a submodule goes wrong once any module of the class has been traced; not when
                # tracing or exporting, where the scale would be a traced value (symbolic with a dynamic height or
                # width) that the ONNX exporters reject;
                # not in half precision or under autocast, where the sum of a large map overflows float16; not
                # for a routing layer replaced by another module, e.g. quantized.)
                logits = torch.addmm(self.routing.bias, x.sum((2, 3)), self.routing.weight.t(),
                                     alpha=1.0 / (x.shape[2] * x.shape[3]))
                return logits.sigmoid_()
        logits = self.routing(x.mean((2, 3)))
        return logits.sigmoid() if self.routing_type == 'sigmoid' else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if (self._kernel_layout and routing_weights is None and type(self.routing) is nn.Linear
                    and not is_capturing_graph()):
                kernel = cpu_kernels()
                if kernel is not None:
                    # batch-1 float32 CPU inference in one call (None for any other input: eager path below)
                    out = kernel.sigmoid_routed_conv2d(
                        x, self.routing.weight, self.routing.bias, self.weight, *self.geometry)
                    if out is not None:
                        return out
            if x.ndim != 4 or x.shape[1] != self.in_channels:
                raise ValueError(
                    f'{type(self).__name__} expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}')
        if routing_weights is None:
            routing_weights = self.routing_weights(x)
        if self.dynamic_padding:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        if torch.jit.is_scripting():
            weight = torch.matmul(routing_weights, self.weight).reshape([-1] + list(self.weight_shape))
            out = _batch_folded_conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        else:
            out = self._mixed_conv_eager(x, routing_weights)
        if self.bias is not None:
            out = out + torch.matmul(routing_weights, self.bias)[:, :, None, None]
        return out

    @torch.jit.unused
    def _mixed_conv_eager(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """The convolution with the mixed kernels by the fastest exact eager path (see :func:`_mixed_conv`)."""
        experts = self.weight
        exporting = _is_exporting()
        if (not exporting and not torch.jit.is_tracing() and torch.is_grad_enabled()
                and (x.requires_grad or routing_weights.requires_grad or experts.requires_grad)):
            return _MixedConvRecomputed.apply(x, routing_weights, experts, self.geometry)
        return _mixed_conv(x, routing_weights, experts, self.geometry, exporting)

    @torch.no_grad()
    def upcycled_state(
            self,
            weight: torch.Tensor,
            bias: Optional[torch.Tensor] = None,
            expert_noise: float = 0.,
            generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """This layer's state (local keys) that reproduces a static convolution exactly.

        The last routing layer is zeroed, so every input gets the same coefficients ``c``, and the
        experts are ``weight / sum(c)`` plus noise that sums to zero over the experts (``expert_noise``
        times the weight's RMS) so the experts can diverge in training while the mixture stays
        ``weight``.
        """
        if weight.shape != self.weight_shape:
            raise ValueError(f'static weight has shape {tuple(weight.shape)}, this layer expects {self.weight_shape}')
        if (bias is None) != (self.bias is None):
            raise ValueError(f'static conv bias presence ({bias is not None}) does not match this layer')
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        last = 'routing' if self.routing_type == 'sigmoid' else 'routing.fc2'
        state[f'{last}.weight'].zero_()
        state[f'{last}.bias'].zero_()
        constant_logits = torch.zeros(1, self.num_experts, dtype=weight.dtype)
        coeffs = torch.sigmoid(constant_logits) if self.routing_type == 'sigmoid' else constant_logits.softmax(-1)
        scale = 1.0 / coeffs.sum()

        def experts(static: torch.Tensor) -> torch.Tensor:
            flat = static.reshape(1, -1).to(self.weight.dtype) * scale
            out = flat.expand(self.num_experts, -1).clone()
            if expert_noise > 0 and self.num_experts > 1:
                rms = static.float().pow(2).mean().sqrt()
                noise = torch.randn(out.shape, generator=generator, dtype=out.dtype) * (expert_noise * rms)
                out += noise - noise.mean(0, keepdim=True)
            return out

        state['weight'] = experts(weight)
        if bias is not None:
            state['bias'] = experts(bias)
        return state

    def extra_repr(self) -> str:
        return (
            f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
            f'padding={self.padding}, groups={self.groups}, num_experts={self.num_experts}, '
            f'routing={self.routing_type}')
