"""Model statistics measured by running the model: parameters, MACs and activations.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), which counts
convolutions and matrix products, the convention the papers' tables follow (pooling and element-wise
ops are free). Activations follow "Fast and Accurate Model Scaling" (Dollar et al., 2021): the number of
elements written by convolutions and matrix products.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from .._private import TorchDispatchMode

__all__ = ['ModelStats', 'count_params', 'count_macs', 'count_activations', 'built_input_size', 'model_stats']

_ACTIVATION_OPS = {
    torch.ops.aten.convolution.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA attention kernels only; the CPU kernel has the same cost.
    return sdpa_flop(query_shape, key_shape, value_shape)


# Ops that FlopCounterMode does not count by itself.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
}


@dataclass
class ModelStats:
    params: int
    macs: int
    activations: int
    input_size: Sequence[int]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _dummy_input(model: nn.Module, input_size: Sequence[int], batch_size: int) -> torch.Tensor:
    ref = next(model.parameters(), None)
    kw = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
    return torch.randn(batch_size, *input_size, **kw)


@contextmanager
def _frozen(model: nn.Module):
    """The model in eval mode with parameters not requiring grad, both restored afterwards (also when the
    forward fails). Under ``no_grad`` a view of a parameter (e.g. PiT's expanded class token) still requires
    grad without a grad_fn, which FlopCounterMode's module tracker rejects when such a view is passed to a
    submodule."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image (FLOPs / 2 from ``FlopCounterMode``)."""
    x = _dummy_input(model, input_size, batch_size)
    with _frozen(model), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        model(x)
    return counter.get_total_flops() // 2 // batch_size


class _ActivationCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ACTIVATION_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.total += first.numel()
        return out


@torch.no_grad()
def count_activations(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Elements written by convolutions and matrix products in one forward pass, per image."""
    x = _dummy_input(model, input_size, batch_size)
    counter = _ActivationCounter()
    with _frozen(model), counter:
        model(x)
    return counter.total // batch_size


def built_input_size(model: nn.Module) -> Tuple[int, ...]:
    """``(C, H, W)`` the model takes: the size a ViT/PiT was built for with ``img_size=`` (its patch embedding's),
    else its pretrained cfg input size (which ``img_size=`` does not update)."""
    input_size = tuple((getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224)))
    built_for = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if isinstance(built_for, tuple) and len(built_for) == 2:
        return (input_size[0], *built_for)
    return input_size


def model_stats(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ModelStats:
    """Params, MACs and activations at ``input_size`` (default: :func:`built_input_size`)."""
    input_size = built_input_size(model) if input_size is None else tuple(input_size)
    return ModelStats(
        params=count_params(model),
        macs=count_macs(model, input_size),
        activations=count_activations(model, input_size),
        input_size=input_size,
    )
