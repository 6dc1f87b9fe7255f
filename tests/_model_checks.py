"""Checks of timm's model contract shared by the model-family tests."""
from typing import Dict

import timm
import torch
import torch.nn.functional as F
from torch import nn

from _official import unfused_attention
from timm_pf.methods.stats import count_params
from timm_pf.tools.cards import _create


def count_params_fast(name_tag: str) -> int:
    """Parameter count of ``name_tag``, built on the meta device (no memory, no init) when the model allows."""
    return count_params(_create(name_tag, meta=True))


def assert_grad_checkpointing_keeps_gradients(model: nn.Module, x: torch.Tensor) -> None:
    """``set_grad_checkpointing(True)`` must leave every parameter's gradient unchanged (no dropout in ``model``)."""
    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def assert_fine_tunes_at(name: str, converted: Dict[str, torch.Tensor], official: nn.Module, x: torch.Tensor,
                         img_size: int) -> None:
    """``name`` built at ``img_size`` with the position embedding resampled by the checkpoint filter
    (``converted``) gives the outputs of the ``dynamic_img_size`` model holding the original weights."""
    model = timm.create_model(name, img_size=img_size)
    model.load_state_dict(converted)
    unfused_attention(model.eval())
    x_resized = F.interpolate(x[:1], size=(img_size, img_size), mode='bilinear', align_corners=False)
    with torch.no_grad():
        out = model(x_resized)
        # the same weights, resampling on the fly
        dynamic = unfused_attention(timm.create_model(name, dynamic_img_size=True).eval())
        dynamic.load_state_dict(official.state_dict())
        torch.testing.assert_close(dynamic(x_resized), out, rtol=1e-4, atol=1e-4)
    assert out.shape == (1, 1000)


def assert_reset_classifier_works(model: nn.Module, x: torch.Tensor) -> None:
    """A new class count changes the logits' width; 0 classes with max pooling gives the pooled features."""
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 7)
        model.reset_classifier(0, global_pool='max')
        torch.testing.assert_close(model(x), model.forward_features(x).amax(1))
