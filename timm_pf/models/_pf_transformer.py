"""Pieces the ViT and PiT families share: block pattern, block factory, input checks, checkpoint key conversion,
pretrained cfgs and model creation.

"Learning Features with Parameter-Free Layers", Han et al., ICLR 2022 (arXiv:2202.02777), §4.2 and Appendix A:
the efficient transformer block replaces self-attention by the max-pool token mixer.
"""
from typing import Any, Callable, Dict, Mapping, Optional, Type

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, to_2tuple
from timm.models.vision_transformer import Block

from ..layers.token_mixers import SPATIAL_OPS, EfficientTokenMixer, GridAttention, InPlaceActivation, resolve_activation
from ._cfg import PF_LAYERS_PAPER, generate_pf_cfgs
from ._pretrained import build_pf_model

__all__ = [
    'pf_transformer_cfgs', 'create_pf_transformer', 'EFFICIENT_BLOCK_PATTERNS', 'check_mixer_args', 'pf_block',
    'check_image_batch', 'check_covers_patch',
    'reject_masks',
    'convert_block_keys',
]

# Pretrained-cfg entries of the DeiT-style evaluation the authors' ViT and PiT training code uses.
_DEIT_EVAL_CFG = dict(
    num_classes=1000, input_size=(3, 224, 224), pool_size=None, fixed_input_size=True,
    crop_pct=0.875, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    classifier='head', **PF_LAYERS_PAPER,
)
# The note of the tags of architectures without released weights: they name where weights trained with
# train_configs/<model>.yaml will be published.
_TO_TRAIN_NOTE = 'Weights to be trained with the timm-pf DeiT recipe.'


def pf_transformer_cfgs(prefix: str, label: str, first_conv: str, released_url: str):
    """The pretrained cfgs of the ViT (``prefix='vit'``, ``label='ViT'``) or the PiT family, which have the same
    variants: the authors' released S-max checkpoint (``released_url``), converted, and tags where weights that
    timm-pf trains for the other variants of Table 6 and Appendix A will be published."""
    def cfg(*notes: str) -> Dict[str, Any]:
        return {**_DEIT_EVAL_CFG, 'first_conv': first_conv, 'notes': notes}

    return generate_pf_cfgs({
        f'{prefix}_s_maxpool.pf_in1k': cfg(
            f"The authors' released {label}-S-max checkpoint ({prefix}_pf.py '{prefix}_s_max'), converted: "
            f'{released_url}',
            'ImageNet-1k top-1 reported in Table 6 and the PfLayer README for the Vanilla, +CutMix and +DeiT '
            'recipes; the README does not say which recipe the released file was trained with.'),
        **{f'{prefix}_{size}_maxpool.in1k': cfg(
            f'{label}-{size.capitalize()} with alternating max-pool blocks ({prefix}_pf.py {prefix}_{size}_max); '
            f'no released weights.', _TO_TRAIN_NOTE) for size in ('ti', 'b')},
        f'{prefix}_s_dwconv.in1k': cfg(
            f'{label}-S (dw-conv), the competitor of Table 6; no released weights.', _TO_TRAIN_NOTE),
        f'{prefix}_s_maxpool_all.in1k': cfg(
            f'{label}-S with every block efficient (Appendix A); no released weights.', _TO_TRAIN_NOTE),
    })


def create_pf_transformer(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Callable[[Mapping[str, Any], nn.Module], Dict[str, torch.Tensor]],
        default_out_indices: Any,
        **kwargs: Any,
) -> nn.Module:
    """``build_pf_model`` for a ViT / PiT variant: pretrained weights through the family's ``filter_fn``,
    feature extraction through ``forward_intermediates`` (``default_out_indices`` unless ``out_indices`` is given)."""
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', default_out_indices), feature_cls='getter')
    return build_pf_model(
        model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs)

# Which blocks (index within the stack; within each stage for PiT) get the efficient token mixer.
EFFICIENT_BLOCK_PATTERNS: Dict[str, Callable[[int], bool]] = {
    'alternate': lambda index: index % 2 == 1,  # attention, efficient, attention, ... (authors' code, Appendix A)
    'all': lambda index: True,  # "fully equipped with the efficient transformer" (Appendix A)
}


def check_mixer_args(token_mixer: str, efficient_blocks: str, mixer_act_layer: Any) -> None:
    """Named errors for the mixer kwargs of the ViT / PiT entrypoints, before anything is built."""
    resolve_activation(mixer_act_layer, 'mixer_act_layer')
    if not isinstance(token_mixer, str) or token_mixer not in SPATIAL_OPS:
        raise ValueError(f'unknown token_mixer {token_mixer!r}, choose one of {sorted(SPATIAL_OPS)}')
    if not isinstance(efficient_blocks, str) or efficient_blocks not in EFFICIENT_BLOCK_PATTERNS:
        raise ValueError(
            f'unknown efficient_blocks {efficient_blocks!r}, choose one of {sorted(EFFICIENT_BLOCK_PATTERNS)}')


def pf_block(
        *,
        dim: int,
        depth: int,
        is_efficient: Callable[[int], bool],
        mixer_layer: Callable[..., nn.Module],
        attn_layer: Callable[..., nn.Module] = GridAttention,
        **block_kwargs: Any,
) -> Block:
    """timm's pre-norm ``Block`` on a token grid, with the efficient token mixer if ``is_efficient(depth)``.

    ``depth`` is the block index, as timm's ``VisionTransformer`` passes it to ``block_fn``. The activation of
    timm's ``Mlp`` runs in place on ``fc1``'s output in inference (:class:`InPlaceActivation`; same keys).
    """
    if not is_efficient(depth):
        block = Block(dim=dim, attn_layer=attn_layer, depth=depth, **block_kwargs)
    else:
        # the mixer is configured here, so the block is built without an attention layer and then given it
        block = Block(dim=dim, attn_layer=nn.Identity, depth=depth, **block_kwargs)
        block.attn = mixer_layer(
            dim,
            bias=block_kwargs.get('qkv_bias', True),
            proj_drop=block_kwargs.get('proj_drop', 0.),
            device=block_kwargs.get('device'),
            dtype=block_kwargs.get('dtype'),
        )
    if type(block.mlp) is Mlp:  # its activation's input is fc1's own output (not so in other mlp_layers)
        block.mlp.act = InPlaceActivation(block.mlp.act, block.mlp.fc1)
    return block


# The families' input checks run in eager mode and as leaf calls of FX graphs: each family registers the check
# its forward code calls with ``torch.fx.wrap`` (timm's ``register_notrace_function`` only reaches functions
# named in the module of the traced ``forward``, timm's inherited one here); the check returns its input so
# that FX keeps the call. TorchScript skips it (``torch.jit.is_scripting()`` at the call site) and runs it as
# a Python call in a scripted FX graph (``torch.jit.ignore``).

def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f'expected a batch of {in_chans}-channel images (B, {in_chans}, H, W), '
                         f'got shape {tuple(x.shape)}')


def check_covers_patch(size: Any, patch_size: Any, what: str) -> None:
    """``size`` (an int or ``(H, W)``; None: not fixed) holds at least one patch per side, else a ValueError that
    names ``what``: an input, or ``img_size`` at construction (timm's layers would fail later, on a negative grid)."""
    if size is None:
        return
    (h, w), (ph, pw) = to_2tuple(size), to_2tuple(patch_size)
    if h < ph or w < pw:
        raise ValueError(f'{what} {h}x{w} is smaller than the patch size {ph}x{pw}')


def reject_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError('attn_mask / is_causal are not supported: the efficient blocks mix the full token grid')


def convert_block_keys(
        state_dict: Dict[str, torch.Tensor],
        blocks: Mapping[str, nn.Module],
) -> Dict[str, torch.Tensor]:
    """Rename the authors' ``attn.qkv`` of efficient blocks to ``attn.expand``; check each block's kind.

    ``blocks`` maps key prefixes (``'blocks.3.'``) to the model's blocks. A block of the checkpoint is
    efficient when its output projection is wider than it is tall (``3d -> d``).
    """
    out = dict(state_dict)
    for prefix, block in blocks.items():
        model_efficient = isinstance(block.attn, EfficientTokenMixer)
        proj = state_dict.get(f'{prefix}attn.proj.weight')
        if proj is None or proj.ndim != 2:
            continue  # reported with the other missing keys
        ckpt_efficient = proj.shape[1] != proj.shape[0]
        if ckpt_efficient != model_efficient:
            kinds = ('self-attention', 'an efficient token mixer')
            raise ValueError(
                f'{prefix[:-1]} is {kinds[ckpt_efficient]} in the checkpoint but {kinds[model_efficient]} in the '
                f'model: the checkpoint was trained with another block pattern (efficient_blocks)')
        if model_efficient:
            for suffix in ('weight', 'bias'):
                old = f'{prefix}attn.qkv.{suffix}'
                if old in out:
                    out[f'{prefix}attn.expand.{suffix}'] = out.pop(old)
    return out
