"""Pooling-based Vision Transformers (PiT) with parameter-free token mixers.

"Learning Features with Parameter-Free Layers", Han et al., ICLR 2022 (arXiv:2202.02777), §4.2, §5.3,
Table 6 and Appendix A. Authors' code: https://github.com/naver-ai/PfLayer (``pit_pf.py``), on top of
PiT (Heo et al., ICCV 2021, https://github.com/naver-ai/pit).

As in the ViT models (``vit_pf.py``), every odd-indexed block of each stage replaces self-attention by the
efficient max-pool token mixer (the alternation restarts in each stage, as in the authors' code). There is
no class token: PiT's pooling layer keeps only its stride-2 depthwise conv (no class-token fc), and the
head averages the normalized tokens of the last stage.

The stages keep the tokens as a ``(B, H, W, C)`` grid; the pooling conv and the max-pool run on its
channels_last view. Blocks, attention and MLP are timm's; the patch embedding is timm's PiT ``ConvEmbedding``.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import timm
from timm.layers import LayerNorm, get_device_dtype, global_pool_nlc, trunc_normal_
from timm.models import checkpoint_seq, register_model
from timm.models.pit import ConvEmbedding

from ..layers.token_mixers import Conv2dNhwc, EfficientTokenMixer
from ._checkpoint import check_matches_model, unwrap_checkpoint
from ._pf_transformer import (
    EFFICIENT_BLOCK_PATTERNS, check_covers_patch, check_image_batch, check_mixer_args, convert_block_keys,
    create_pf_transformer, pf_block, pf_transformer_cfgs,
)
from .._private import feature_take_indices

__all__ = ['PfPoolingVisionTransformer', 'checkpoint_filter_fn']


@torch.jit.ignore  # and a leaf call of FX graphs, see _pf_transformer
def _check_input(
        x: torch.Tensor,
        in_chans: int,
        img_size: Tuple[int, int],
        patch_size: Tuple[int, int],
        dynamic_img_size: bool,
) -> torch.Tensor:
    """``x``, after checking it."""
    check_image_batch(x, in_chans)
    H, W = x.shape[-2:]
    check_covers_patch((H, W), patch_size, 'input size')
    if not dynamic_img_size and (H, W) != tuple(img_size):
        raise ValueError(
            f'input size {H}x{W} does not match the model ({img_size[0]}x{img_size[1]}): '
            f'create it with img_size=({H}, {W}) or dynamic_img_size=True')
    return x


torch.fx.wrap('_check_input')


class GridConvPooling(nn.Module):
    """PiT's pooling layer on a ``(B, H, W, C)`` grid: a depthwise conv (kernel stride+1) that widens the
    channels by ``out_dim / in_dim``; without a class token there is no class-token fc."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = Conv2dNhwc(in_dim, out_dim, kernel_size=stride + 1, stride=stride, padding=stride // 2,
                               groups=in_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PfPitStage(nn.Module):
    """Optional pooling, then blocks alternating self-attention and the efficient token mixer."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            mlp_ratio: float,
            downsample: bool,
            block_fn: Callable[..., nn.Module],
            drop_path: Sequence[float],
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.pool = GridConvPooling(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            block_fn(
                dim=dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
                norm_layer=partial(LayerNorm, eps=1e-6),
                depth=i,
                **dd,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class PfPoolingVisionTransformer(nn.Module):
    """PiT whose blocks alternate self-attention and the efficient max-pool token mixer (§4.2, App. A)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: int = 8,
            base_dims: Sequence[int] = (48, 48, 48),
            depth: Sequence[int] = (2, 6, 4),
            heads: Sequence[int] = (3, 6, 12),
            mlp_ratio: float = 4.,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            token_mixer: str = 'max',
            efficient_blocks: str = 'alternate',
            mixer_act_layer: str = 'gelu',
            mixer_kernel_size: Optional[int] = None,
            mixer_expand_ratio: int = 3,
            dynamic_img_size: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            img_size: input size the position embedding is laid out for.
            patch_size, stride: the overlapping patch embedding (kernel ``patch_size``, ``stride``).
            base_dims, depth, heads: per stage; the width of stage i is ``base_dims[i] * heads[i]``.
            global_pool: token pooling before the head: 'avg' (the paper's GAP), 'max', 'avgmax' or ''.
            token_mixer: 'max' (3x3 max-pool) or 'dwconv' (5x5 depthwise conv, Table 6's competitor).
            efficient_blocks: 'alternate' (odd-indexed blocks of every stage) or 'all'.
            mixer_act_layer: activation around the spatial operation ('gelu' as in the authors' code; the
                paper's text says 'relu').
            dynamic_img_size: accept any input size, resampling the position embedding on the fly.
            drop_path_rate: stochastic depth of the last block; block i of n gets ``rate * i / n`` (authors' code).
        """
        super().__init__()
        if not len(base_dims) == len(depth) == len(heads):
            raise ValueError(f'base_dims, depth and heads need one entry per stage, got {base_dims}, {depth}, {heads}')
        if global_pool not in ('avg', 'max', 'avgmax', ''):
            raise ValueError(f"global_pool must be 'avg', 'max', 'avgmax' or '' (there is no class token), "
                             f"got {global_pool!r}")
        check_mixer_args(token_mixer, efficient_blocks, mixer_act_layer)
        check_covers_patch(img_size, patch_size, 'img_size')
        dd = {'device': device, 'dtype': dtype}
        dims = [b * h for b, h in zip(base_dims, heads)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.dynamic_img_size = dynamic_img_size
        self.num_features = self.head_hidden_size = self.embed_dim = dims[-1]

        self.patch_embed = ConvEmbedding(in_chans, dims[0], img_size, patch_size, stride, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], *self.patch_embed.grid_size, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        block_fn = partial(
            pf_block,
            is_efficient=EFFICIENT_BLOCK_PATTERNS[efficient_blocks],
            mixer_layer=partial(
                EfficientTokenMixer,
                spatial=token_mixer,
                kernel_size=mixer_kernel_size,
                expand_ratio=mixer_expand_ratio,
                act_layer=mixer_act_layer,
            ),
        )
        total = sum(depth)
        drop_path = [drop_path_rate * i / total for i in range(total)]
        stages, self.feature_info = [], []
        for i, (dim, d, h) in enumerate(zip(dims, depth, heads)):
            start = sum(depth[:i])
            stages.append(PfPitStage(
                dims[i - 1] if i else dim, dim, d, h, mlp_ratio,
                downsample=i > 0,
                block_fn=block_fn,
                drop_path=drop_path[start:start + d],
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=stride * 2 ** i, module=f'transformers.{i}'))
        self.transformers = nn.Sequential(*stages)
        self.norm = LayerNorm(dims[-1], eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^pos_embed|patch_embed',
            blocks=r'^transformers\.(\d+)' if coarse else [
                (r'^transformers\.(\d+)\.pool', (0,)),
                (r'^transformers\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.transformers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', 'max', 'avgmax', ''):
                raise ValueError(f"global_pool must be 'avg', 'max', 'avgmax' or '', got {global_pool!r}")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position embedding, as a contiguous ``(B, H, W, C)`` grid."""
        if not torch.jit.is_scripting():
            x = _check_input(x, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size,
                             self.dynamic_img_size)
        x = self.patch_embed(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = resample_pos_embed(pos_embed, x.shape[-2:])
        return self.pos_drop((x + pos_embed).permute(0, 2, 3, 1).contiguous())

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs as NCHW maps (or NLC tokens); ``norm`` applies the final norm to the last stage's.

        Returns the intermediates, or (final normalized tokens ``(B, N, C)``, intermediates).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.transformers), indices)
        last = len(self.transformers) - 1
        x = self._embed(x)
        stages = self.transformers if torch.jit.is_scripting() or not stop_early \
            else self.transformers[:max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.flatten(1, 2) if output_fmt == 'NLC' else y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(x).flatten(1, 2), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last wanted one (and the norm / head, which fit the last stage only)."""
        take_indices, max_index = feature_take_indices(len(self.transformers), indices)
        pruned_end = max_index < len(self.transformers) - 1
        self.transformers = self.transformers[:max_index + 1]
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or pruned_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized tokens of the last stage, ``(B, H*W, C)``."""
        x = self.transformers(self._embed(x))
        return self.norm(x).flatten(1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=0)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resample_pos_embed(pos_embed: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Bicubic resampling of a ``(1, C, H, W)`` position embedding, as the authors' PiT forward does."""
    return F.interpolate(pos_embed.float(), size=size, mode='bicubic', align_corners=False).to(pos_embed.dtype)


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any],
        model: PfPoolingVisionTransformer,
) -> Dict[str, torch.Tensor]:
    """Convert an authors' ``pit_pf.py`` checkpoint (or pass ours through) for ``model``.

    Handles ``state_dict`` / ``model`` wrapping and ``module.`` prefixes, moves ``pools.{i}`` to
    ``transformers.{i+1}.pool``, renames the efficient blocks' ``attn.qkv`` to ``attn.expand``, resamples the
    position embedding to the model's grid, and raises a ValueError naming the problem when the checkpoint
    belongs to another architecture.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if 'cls_token' in state_dict:
        raise ValueError("checkpoint has a class token (timm's / the original PiT?): these models pool tokens by "
                         "global average pooling and have no class token")
    if any(k.startswith('blocks.') for k in state_dict):
        raise ValueError('checkpoint has a flat block stack (blocks.*), a ViT: load it into a vit_*_maxpool model')
    converted = {}
    for k, v in state_dict.items():
        if k.startswith('pools.'):
            index, rest = k[len('pools.'):].split('.', 1)
            k = f'transformers.{int(index) + 1}.pool.{rest}'
        converted[k] = v
    blocks = {f'transformers.{i}.blocks.{j}.': block
              for i, stage in enumerate(model.transformers) for j, block in enumerate(stage.blocks)}
    converted = convert_block_keys(converted, blocks)

    pos_embed = converted.get('pos_embed')
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        if pos_embed.ndim != 4 or pos_embed.shape[:2] != model.pos_embed.shape[:2]:
            raise ValueError(f'pos_embed of shape {tuple(pos_embed.shape)} does not fit the model '
                             f'{tuple(model.pos_embed.shape)}')
        converted['pos_embed'] = resample_pos_embed(pos_embed, model.pos_embed.shape[-2:])

    check_matches_model(converted, model, first_conv='patch_embed.conv', candidates=timm.list_models(module='pit_pf'))
    return converted


def _create_pit_pf(variant: str, pretrained: bool = False, **kwargs: Any) -> PfPoolingVisionTransformer:
    return create_pf_transformer(PfPoolingVisionTransformer, variant, pretrained, checkpoint_filter_fn, (0, 1, 2),
                                 **kwargs)


default_cfgs = pf_transformer_cfgs(
    'pit', 'PiT', 'patch_embed.conv', 'https://drive.google.com/file/d/1S9JJM2WGtDtpo-6Me7Ak74nJOlOeBKeH/view')


@register_model
def pit_ti_maxpool(pretrained: bool = False, **kwargs: Any) -> PfPoolingVisionTransformer:
    """PiT-Ti, odd blocks of each stage use the 3x3 max-pool token mixer, GAP head."""
    model_args = dict(patch_size=16, stride=8, base_dims=(32, 32, 32), depth=(2, 6, 4), heads=(2, 4, 8))
    return _create_pit_pf('pit_ti_maxpool', pretrained, **dict(model_args, **kwargs))


@register_model
def pit_s_maxpool(pretrained: bool = False, **kwargs: Any) -> PfPoolingVisionTransformer:
    """PiT-S (max-pool) of Table 6: odd blocks of each stage use the 3x3 max-pool token mixer, GAP head."""
    model_args = dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12))
    return _create_pit_pf('pit_s_maxpool', pretrained, **dict(model_args, **kwargs))


@register_model
def pit_b_maxpool(pretrained: bool = False, **kwargs: Any) -> PfPoolingVisionTransformer:
    """PiT-B, odd blocks of each stage use the 3x3 max-pool token mixer, GAP head."""
    model_args = dict(patch_size=14, stride=7, base_dims=(64, 64, 64), depth=(3, 6, 4), heads=(4, 8, 16))
    return _create_pit_pf('pit_b_maxpool', pretrained, **dict(model_args, **kwargs))


@register_model
def pit_s_dwconv(pretrained: bool = False, **kwargs: Any) -> PfPoolingVisionTransformer:
    """PiT-S (dw-conv) of Table 6: odd blocks of each stage mix tokens with a 5x5 depthwise conv instead."""
    model_args = dict(
        patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12), token_mixer='dwconv')
    return _create_pit_pf('pit_s_dwconv', pretrained, **dict(model_args, **kwargs))


@register_model
def pit_s_maxpool_all(pretrained: bool = False, **kwargs: Any) -> PfPoolingVisionTransformer:
    """PiT-S with the max-pool token mixer in every block (Appendix A, the faster, less accurate variant)."""
    model_args = dict(
        patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12), efficient_blocks='all')
    return _create_pit_pf('pit_s_maxpool_all', pretrained, **dict(model_args, **kwargs))
