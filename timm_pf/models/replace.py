"""Replacement Learning variants of timm's ViTs and ResNets.

"Replacement Learning: Training Vision Tasks with Fewer Learnable Parameters" (Zhang et al., 2024,
arXiv:2410.01239): every ``replace_interval``-th layer (default 2) is trained as a learnable mix of its
neighbours (see :mod:`timm_pf.methods.replacement`). Each variant is the plain timm architecture in that training
form; ``timm_pf.methods.replacement.finalize`` turns a trained one back into the plain architecture, whose weights
load into the timm model named in the docstring.

The variants have no weights of their own: ``pretrained=True`` starts from the plain timm model's
pretrained weights (its pretrained cfg, data config included, is kept) and then replaces the layers.
``replace_interval`` is a model kwarg, so timm's ``train.py`` sets it with ``--model-kwargs replace_interval=3``.
"""
import logging

import timm
from timm.models import register_model
from torch import nn

__all__ = ['PLAIN_MODELS']

_logger = logging.getLogger(__name__)

#: Variant -> the plain model it trains, which ``finalize`` gives back (and the benchmark's baseline).
PLAIN_MODELS = {
    'vit_ti_replace': 'vit_tiny_patch16_224',
    'vit_s_replace': 'vit_small_patch16_224',
    'vit_b_replace': 'vit_base_patch16_224',
    'vit_s_maxpool_replace': 'vit_s_maxpool',
    'resnet34_replace': 'resnet34',
    'resnet50_replace': 'resnet50',
    'resnet101_replace': 'resnet101',
    'resnet152_replace': 'resnet152',
}


def _create_replaced(variant: str, pretrained: bool = False, replace_interval: int = 2, **kwargs) -> nn.Module:
    """Build the variant's plain model with timm (``kwargs`` go to it unchanged), then replace every k-th layer."""
    # the Replacement Learning tooling is imported when a model is built: ``import timm_pf`` registers models only
    from ..methods.replacement import replace_layers
    model = timm.create_model(PLAIN_MODELS[variant], pretrained=pretrained, **kwargs)
    report = replace_layers(model, interval=replace_interval)
    _logger.info(str(report))
    return model


@register_model
def vit_ti_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-Ti/16 (timm ``vit_tiny_patch16_224``), every 2nd attention layer replaced."""
    return _create_replaced('vit_ti_replace', pretrained, **kwargs)


@register_model
def vit_s_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-S/16 (timm ``vit_small_patch16_224``), every 2nd attention layer replaced."""
    return _create_replaced('vit_s_replace', pretrained, **kwargs)


@register_model
def vit_b_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-B/16 (timm ``vit_base_patch16_224``), every 2nd attention layer replaced (paper: ViT-B)."""
    return _create_replaced('vit_b_replace', pretrained, **kwargs)


@register_model
def vit_s_maxpool_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-S with max-pool token mixers (timm_pf ``vit_s_maxpool``): its layers are the attention blocks,
    every 2nd of them replaced; the max-pool blocks train normally."""
    return _create_replaced('vit_s_maxpool_replace', pretrained, **kwargs)


@register_model
def resnet34_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-34 (timm ``resnet34``), every 2nd block with same-shaped neighbours replaced (paper: ResNet-34)."""
    return _create_replaced('resnet34_replace', pretrained, **kwargs)


@register_model
def resnet50_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50 (timm ``resnet50``), every 2nd block with same-shaped neighbours replaced."""
    return _create_replaced('resnet50_replace', pretrained, **kwargs)


@register_model
def resnet101_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-101 (timm ``resnet101``), every 2nd block with same-shaped neighbours replaced (paper: ResNet-101)."""
    return _create_replaced('resnet101_replace', pretrained, **kwargs)


@register_model
def resnet152_replace(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-152 (timm ``resnet152``), every 2nd block with same-shaped neighbours replaced (paper: ResNet-152)."""
    return _create_replaced('resnet152_replace', pretrained, **kwargs)
