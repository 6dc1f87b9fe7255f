"""Convolutions whose CPU inference reads a channels-last copy of their kernels.

On CPU the ResNet family runs channels-last (see ``PfResNet``). oneDNN then wants the kxk kernels channels-last
too, and an NCHW parameter is reordered inside every call. The parameters themselves must stay contiguous
NCHW: safetensors refuses to save other strides (timm's ``save_for_hf``, our Hub tooling) and timm's
``ModelEma`` updates ``state_dict()`` tensors in place, so a copy made at save time would break it. So the
channels-last kernel is a cached copy used only where nothing can differ: CPU inference (no autograd, no
tracing, compiling or exporting) on channels-last input. It is rebuilt when the parameter changes (another
tensor after ``.to()`` / ``.float()`` / ``load_state_dict(assign=True)``, or a new version after an in-place
write such as ``load_state_dict`` or an optimizer step) and lives outside the module (a weak map), so copies,
pickles and state dicts of the model never see it. A write through ``.data`` counts no version (PyTorch's
``.data`` hides writes from autograd's version counter); it is found by comparing :data:`FINGERPRINT_SAMPLES`
evenly spaced values of the kernel at each call, so only a ``.data`` write that changes none of them (a part
of the kernel) goes unseen: write under ``torch.no_grad()`` instead.
"""
import weakref
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from .._private import tensor_version
from .graph_capture import is_capturing_graph

__all__ = ['ChannelsLastKernelConv2d', 'use_channels_last_kernels']

# Values of a kernel compared at each cached call, to notice writes through ``.data`` (see the module docstring).
FINGERPRINT_SAMPLES = 64

# conv -> (identity of the parameter it was made from, its sampled values, the channels-last kernel)
_KERNELS: 'weakref.WeakKeyDictionary[nn.Conv2d, Tuple[tuple, torch.Tensor, torch.Tensor]]' = \
    weakref.WeakKeyDictionary()


def _parameter_identity(weight: torch.Tensor) -> tuple:
    # with the data pointer, the count of in-place writes tells whether the parameter is still the one the cached
    # kernel was copied from
    return weight.data_ptr(), tensor_version(weight), weight.dtype, weight.shape


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """:data:`FINGERPRINT_SAMPLES` evenly spaced values of the kernel (a strided view of the NCHW parameter)."""
    flat = weight.detach().reshape(-1)
    return flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)]


def _channels_last_kernel(conv: nn.Conv2d) -> torch.Tensor:
    identity, fingerprint = _parameter_identity(conv.weight), _fingerprint(conv.weight)
    cached = _KERNELS.get(conv)
    if cached is None or cached[0] != identity or not torch.equal(cached[1], fingerprint):
        cached = identity, fingerprint.clone(), conv.weight.detach().contiguous(memory_format=torch.channels_last)
        _KERNELS[conv] = cached
    return cached[2]


def _reads_cached_kernel(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """CPU inference on channels-last input with an NCHW kxk kernel, outside any tracer, compiler or exporter
    (and no kernel made in inference mode: such tensors count no versions)."""
    weight = conv.weight
    return (not is_capturing_graph() and x.device.type == 'cpu' and x.dim() == 4 and not torch.is_grad_enabled()
            and not weight.is_inference()
            and weight.shape[-2] * weight.shape[-1] > 1  # a 1x1 kernel is laid out the same in both formats
            and x.is_contiguous(memory_format=torch.channels_last)
            and not weight.is_contiguous(memory_format=torch.channels_last))


def check_zero_padding(conv: nn.Conv2d) -> None:
    """Refuse, naming it, a ``padding_mode`` other than zeros in a conv whose forward calls ``F.conv2d`` with its
    padding (which pads with zeros whatever the mode says)."""
    if conv.padding_mode != 'zeros':
        raise ValueError(f"{type(conv).__name__} pads with zeros only, got padding_mode={conv.padding_mode!r}")


@register_notrace_module  # an FX leaf: the cache lookup stays out of traced graphs
class ChannelsLastKernelConv2d(nn.Conv2d):
    """``nn.Conv2d`` with zero padding (same parameters, keys and gradients) whose CPU inference on channels-last
    input convolves with a cached channels-last copy of the kernel (see the module docstring); every other call is
    the plain convolution with the parameter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_zero_padding(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not torch.jit.is_scripting():
            if _reads_cached_kernel(self, x):
                weight = _channels_last_kernel(self)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def use_channels_last_kernels(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv2d`` with a kxk kernel (k > 1) and zero padding in ``module`` a
    :class:`ChannelsLastKernelConv2d` in place (the subclass adds no state, so parameters, keys and hooks stay as
    they are); returns ``module``."""
    for conv in module.modules():
        if type(conv) is nn.Conv2d and conv.kernel_size != (1, 1) and conv.padding_mode == 'zeros':
            conv.__class__ = ChannelsLastKernelConv2d
    return module
