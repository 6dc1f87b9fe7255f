"""Vision Transformers with parameter-free token mixers.

"Learning Features with Parameter-Free Layers", Han et al., ICLR 2022 (arXiv:2202.02777), §4.2, §5.3,
Table 6 and Appendix A "Efficient Transformer". Authors' code: https://github.com/naver-ai/PfLayer
(``vit_pf.py``).

Half of the self-attention layers (every odd-indexed block, as in the authors' code) become the
efficient token mixer ``Linear(d, 3d) -> GELU -> 3x3 max-pool -> GELU -> Linear(3d, d)``; the MLPs are
unchanged. There is no class token: the final norm is applied to every token and the tokens are
averaged (global average pooling) before the classifier.

The trunk keeps the tokens as a ``(B, H, W, C)`` grid: the max-pool works on it directly and the
attention blocks flatten it to a sequence, so no block needs to know the image size.

Built on timm's ``VisionTransformer`` and ``Block``; ``dynamic_img_size``, ``set_input_size``,
``forward_intermediates`` / ``features_only``, gradient checkpointing and ``reset_classifier`` behave as
in timm.
"""
import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

import timm
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import checkpoint_seq, register_model
from timm.models.vision_transformer import VisionTransformer

from ..layers.token_mixers import EfficientTokenMixer, GridAttention
from ._checkpoint import check_matches_model, unwrap_checkpoint
from ._pf_transformer import (
    EFFICIENT_BLOCK_PATTERNS, check_covers_patch, check_image_batch, check_mixer_args, convert_block_keys,
    create_pf_transformer, pf_block, pf_transformer_cfgs, reject_masks,
)

__all__ = ['PfVisionTransformer', 'checkpoint_filter_fn']

# VisionTransformer options that presuppose prefix tokens or a flat token sequence.
_SEQUENCE_ONLY_KWARGS = ('class_token', 'reg_tokens', 'no_embed_class', 'patch_drop_rate', 'embed_layer',
                         'block_fn', 'attn_layer')


@torch.jit.ignore  # and a leaf call of FX graphs, see _pf_transformer
def _check_input(
        x: torch.Tensor,
        in_chans: int,
        img_size: Tuple[int, int],
        patch_size: Tuple[int, int],
        dynamic_img_size: bool,
        dynamic_img_pad: bool,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
) -> torch.Tensor:
    """``x``, after checking it and the (unsupported) attention masks."""
    reject_masks(attn_mask, is_causal)
    check_image_batch(x, in_chans)
    H, W = x.shape[-2:]
    if not dynamic_img_pad:
        check_covers_patch((H, W), patch_size, 'input size')
    if not dynamic_img_size:
        if (H, W) != tuple(img_size):
            raise ValueError(
                f'input size {H}x{W} does not match the model ({img_size[0]}x{img_size[1]}): '
                f'create it with img_size=({H}, {W}) or dynamic_img_size=True')
    elif not dynamic_img_pad:
        ph, pw = patch_size
        if H % ph or W % pw:
            raise ValueError(f'input size {H}x{W} is not divisible by the patch size {ph}x{pw} '
                             f'(or create the model with dynamic_img_pad=True)')
    return x


torch.fx.wrap('_check_input')


class PfVisionTransformer(VisionTransformer):
    """ViT whose blocks alternate self-attention and the efficient max-pool token mixer (§4.2, App. A)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            global_pool: str = 'avg',
            fc_norm: bool = False,
            token_mixer: str = 'max',
            efficient_blocks: str = 'alternate',
            mixer_act_layer: str = 'gelu',
            mixer_kernel_size: Optional[int] = None,
            mixer_expand_ratio: int = 3,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            global_pool: token pooling before the head: 'avg' (the paper's GAP), 'max', 'avgmax' or ''.
            fc_norm: apply the final norm after pooling instead of to every token before it (authors' code:
                before, i.e. False).
            token_mixer: spatial operation of the efficient blocks: 'max' (3x3 max-pool) or 'dwconv'
                (5x5 depthwise conv, the paper's competitor in Table 6).
            efficient_blocks: 'alternate' (odd-indexed blocks, the paper's models) or 'all'.
            mixer_act_layer: activation around the spatial operation; 'gelu' as in the authors' code,
                the paper's text says 'relu'.
            mixer_kernel_size: kernel of the spatial operation (default 3 for 'max', 5 for 'dwconv').
            mixer_expand_ratio: width of the mixer's hidden features relative to the embedding (3).
            **kwargs: other timm ``VisionTransformer`` arguments (embed_dim, depth, num_heads, drop rates,
                dynamic_img_size, ...).
        """
        incompatible = sorted(k for k in _SEQUENCE_ONLY_KWARGS if k in kwargs)
        if incompatible:
            raise ValueError(f'{incompatible} cannot be set: the efficient blocks mix a 2-D grid of patch tokens '
                             f'(no class/register tokens, no token dropout)')
        if global_pool not in ('avg', 'max', 'avgmax', ''):
            raise ValueError(f"global_pool must be 'avg', 'max', 'avgmax' or '' (there is no class token), "
                             f"got {global_pool!r}")
        check_mixer_args(token_mixer, efficient_blocks, mixer_act_layer)
        check_covers_patch(img_size, patch_size, 'img_size')
        mixer_layer = partial(
            EfficientTokenMixer,
            spatial=token_mixer,
            kernel_size=mixer_kernel_size,
            expand_ratio=mixer_expand_ratio,
            act_layer=mixer_act_layer,
        )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            global_pool=global_pool,
            fc_norm=fc_norm,
            class_token=False,
            embed_layer=partial(PatchEmbed, output_fmt='NHWC'),
            block_fn=partial(pf_block, is_efficient=EFFICIENT_BLOCK_PATTERNS[efficient_blocks],
                             mixer_layer=mixer_layer),
            attn_layer=GridAttention,
            **kwargs,
        )

    def _check_input(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():
            reject_masks(attn_mask, is_causal)
        else:
            x = _check_input(x, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size,
                             self.dynamic_img_size, self.patch_embed.dynamic_img_pad, attn_mask, is_causal)
        return x

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add the (resampled if needed) position embedding to the ``(B, H, W, C)`` patch grid.

        Overrides timm's private step: VisionTransformer has no hook for a position embedding on a 2-D grid.
        """
        x = x.contiguous()  # the patch embedding's NHWC output is a permuted NCHW tensor
        if self.pos_embed is not None:
            if self.dynamic_img_size:
                B, H, W, C = x.shape
                pos_embed = resample_abs_pos_embed(
                    self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size, num_prefix_tokens=0)
                x = x + pos_embed.reshape(1, H, W, C)
            else:
                gh, gw = self.patch_embed.grid_size
                x = x + self.pos_embed.reshape(1, gh, gw, -1)
        return self.pos_drop(x)

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """Normalized tokens, ``(B, H*W, C)`` as in timm's ViT (its steps written out: TorchScript has no
        ``super()``)."""
        x = self._check_input(x, attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x).flatten(1, 2)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates``: block outputs as NCHW maps or NLC tokens (no prefix tokens)."""
        x = self._check_input(x, attn_mask, is_causal)
        out = super().forward_intermediates(
            x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, output_dict=output_dict)
        # the blocks return (B, H, W, C) grids: NCHW maps are already reshaped, tokens need flattening
        fix = (lambda t: t.flatten(1, 2)) if output_fmt == 'NLC' else (lambda t: t)
        if output_dict:
            out['image_intermediates'] = [fix(t) for t in out['image_intermediates']]
            if 'image_features' in out:
                out['image_features'] = out['image_features'].flatten(1, 2)
            return out
        if intermediates_only:
            return [fix(t) for t in out]
        final, intermediates = out
        return final.flatten(1, 2), [fix(t) for t in intermediates]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the authors' format and ours


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: PfVisionTransformer) -> Dict[str, torch.Tensor]:
    """Convert an authors' ``vit_pf.py`` checkpoint (or pass ours through) for ``model``.

    Handles ``state_dict`` / ``model`` wrapping and ``module.`` prefixes, renames the efficient blocks'
    ``attn.qkv`` to ``attn.expand``, resamples the position embedding to the model's patch grid, and raises
    a ValueError naming the problem when the checkpoint belongs to another architecture.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if 'cls_token' in state_dict:
        raise ValueError('checkpoint has a class token (a standard ViT?): these models pool tokens by global '
                         'average pooling and have no class token')
    if any(k.startswith('transformers.') for k in state_dict):
        raise ValueError('checkpoint has PiT stages (transformers.*): load it into a pit_*_maxpool model')
    state_dict = convert_block_keys(state_dict, {f'blocks.{i}.': b for i, b in enumerate(model.blocks)})

    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and model.pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        if pos_embed.ndim != 3 or pos_embed.shape[-1] != model.pos_embed.shape[-1]:
            raise ValueError(f'pos_embed of shape {tuple(pos_embed.shape)} does not fit the model '
                             f'{tuple(model.pos_embed.shape)}')
        side = math.isqrt(pos_embed.shape[1])
        if side * side != pos_embed.shape[1]:
            raise ValueError(f'pos_embed has {pos_embed.shape[1]} tokens, not a square grid: cannot resample it')
        state_dict['pos_embed'] = resample_abs_pos_embed(
            pos_embed, new_size=model.patch_embed.grid_size, old_size=(side, side), num_prefix_tokens=0)

    check_matches_model(state_dict, model, first_conv='patch_embed.proj', candidates=timm.list_models(module='vit_pf'))
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# Registry


def _create_vit_pf(variant: str, pretrained: bool = False, **kwargs: Any) -> PfVisionTransformer:
    return create_pf_transformer(PfVisionTransformer, variant, pretrained, checkpoint_filter_fn, 3, **kwargs)


default_cfgs = pf_transformer_cfgs(
    'vit', 'ViT', 'patch_embed.proj', 'https://drive.google.com/file/d/19lfagLJDXWvVHcb8Qm_U4_A_Kr7qYLv7/view')


@register_model
def vit_ti_maxpool(pretrained: bool = False, **kwargs: Any) -> PfVisionTransformer:
    """ViT-Ti/16, odd blocks use the 3x3 max-pool token mixer, GAP head."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_vit_pf('vit_ti_maxpool', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s_maxpool(pretrained: bool = False, **kwargs: Any) -> PfVisionTransformer:
    """ViT-S/16 (max-pool) of Table 6: odd blocks use the 3x3 max-pool token mixer, GAP head."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vit_pf('vit_s_maxpool', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b_maxpool(pretrained: bool = False, **kwargs: Any) -> PfVisionTransformer:
    """ViT-B/16, odd blocks use the 3x3 max-pool token mixer, GAP head."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vit_pf('vit_b_maxpool', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s_dwconv(pretrained: bool = False, **kwargs: Any) -> PfVisionTransformer:
    """ViT-S/16 (dw-conv) of Table 6: odd blocks mix tokens with a 5x5 depthwise conv instead."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, token_mixer='dwconv')
    return _create_vit_pf('vit_s_dwconv', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s_maxpool_all(pretrained: bool = False, **kwargs: Any) -> PfVisionTransformer:
    """ViT-S/16 with the max-pool token mixer in every block (Appendix A, the faster, less accurate variant)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, efficient_blocks='all')
    return _create_vit_pf('vit_s_maxpool_all', pretrained, **dict(model_args, **kwargs))
