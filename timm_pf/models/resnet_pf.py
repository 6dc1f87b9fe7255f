"""Parameter-free ResNets: "Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022).

Paper: https://arxiv.org/abs/2202.02777 (§3.2, §4.1, Tables 2-4, Appendix A).
Official code: https://github.com/naver-ai/PfLayer (``resnet_pf.py``).

The efficient bottleneck (§3.2, Fig. A.1c) replaces the 3x3 conv + BN + ReLU triplet of a ResNet
bottleneck by a parameter-free 3x3 max-pool. Every model here is timm's :class:`~timm.models.ResNet`
built from one block class, :class:`PfBottleneck`, whose spatial operation is looked up by name in
:data:`SPATIAL_OPS`; which op each block gets is set by one ``block_pattern`` string:

* ``'E'`` efficient bottleneck: the ``spatial_op`` (default ``'max'``) replaces the triplet; where the
  block downsamples, the op carries the stride (3x3 max-pool stride 2).
* ``'B'`` regular bottleneck: 3x3 conv + BN + ReLU with the stride on the conv (ResNet v1.5).
* ``'H'`` hybrid: where the block downsamples, a regular bottleneck with a 2x2 average pool before its
  3x3 conv (which then has stride 1); every other block is efficient (§4.1 "hybrid architecture",
  Appendix A).

A pattern is one letter per stage (``'EEBB'``, the stage-level models of Table 2), or groups separated
by ``'-'`` (or the paper's ``'→'``), each either one letter for the whole stage or one letter per block
(``'EBE-BEBE-BEBEBE-BEB'``). Named patterns: ``'hybrid'`` (= ``'HHHH'``), ``'efficient'`` (= ``'EEEE'``),
``'regular'`` (= ``'BBBB'``) and ``'eb'`` (Table 2 "E/B": efficient and regular bottlenecks alternate
block by block, starting with an efficient one; in ResNet-50 every downsampling block is then regular).

The downsampling shortcut is a 1x1 conv with stride 2 + BN, as in the official code. The stem and head
are those of ResNet-50. Spatial ops receive ``(channels, stride)``; register more in
:data:`SPATIAL_OPS` (e.g. deformable pooling) and they become usable as ``spatial_op=...``.
"""
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BatchNormAct2d, create_attn, create_conv2d
from timm.models import checkpoint_seq, register_model
from timm.models.resnet import ResNet

from ..layers.cpu_layout import use_channels_last_kernels
from ..layers.deform_pool import LearnedDeformPool2d
from ..layers.graph_capture import is_capturing_graph
from ..layers.pf_pool import PfMaxPool2d
from ._cfg import PF_LAYERS_PAPER, generate_pf_cfgs
from ._checkpoint import check_matches_model, unwrap_checkpoint
from ._pretrained import build_pf_model

__all__ = [
    'SPATIAL_OPS', 'BLOCK_LETTERS', 'NAMED_BLOCK_PATTERNS', 'PfBottleneck', 'PfResNet',
    'parse_block_pattern', 'checkpoint_filter_fn',
]


def _conv_bn_act(
        channels: int,
        kernel_size: int,
        stride: int,
        groups: int = 1,
        pre_pool: bool = False,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        act_layer: Type[nn.Module] = nn.ReLU,
        device=None,
        dtype=None,
) -> nn.Module:
    """Conv + norm + activation on ``channels`` (keys ``conv``/``bn``), optionally after a 2x2 average pool;
    the block's ``norm_layer`` / ``act_layer``, as timm's ResNet uses them."""
    dd = {'device': device, 'dtype': dtype}
    layers = OrderedDict()
    if pre_pool and stride > 1:
        # Official code: nn.AvgPool2d(2, 2). ceil_mode/count_include_pad only matter for odd sizes,
        # where the official block fails (its shortcut output is one pixel larger); here it matches it.
        layers['pool'] = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        stride = 1
    layers['conv'] = create_conv2d(channels, channels, kernel_size, stride=stride, groups=groups, **dd)
    if norm_layer is nn.BatchNorm2d:  # the fused module of timm (same keys as the BatchNorm)
        layers['bn'] = BatchNormAct2d(channels, act_layer=act_layer, **dd)
    else:
        layers['bn'] = norm_layer(channels, **dd)
        layers['act'] = act_layer(inplace=True)
    return nn.Sequential(layers)


def _learned_deform_pool(channels: int, stride: int, reduction: str, device=None, dtype=None, **_) -> nn.Module:
    # LearnedDeformPool2d takes no device / dtype yet: built on the CPU, then moved
    return LearnedDeformPool2d(channels, stride=stride, reduction=reduction).to(device=device, dtype=dtype)


# Spatial operation of a bottleneck, by name: ``factory(channels, stride, norm_layer=, act_layer=, device=None,
# dtype=None) -> nn.Module`` (the block's norm and activation layers; ops without them ignore them). The module
# replaces the 3x3 conv + BN + ReLU of a regular bottleneck (input and output have ``channels`` channels;
# ``stride`` is 1 or 2). Extend it to add operations; ``spatial_op=<name>`` then selects them.
SPATIAL_OPS: Dict[str, Callable[..., nn.Module]] = {
    # the paper's eff-layer: 3x3 max-pool, no BN / ReLU after it (§4.1 footnote 3)
    'max': lambda channels, stride, **kw: PfMaxPool2d(3, stride),
    # Table 2 competitors: the 3x3 conv replaced by a 1x1 conv or a 3x3 depthwise conv (BN + ReLU kept)
    'conv1x1': lambda channels, stride, **kw: _conv_bn_act(channels, 1, stride, **kw),
    'dwconv3x3': lambda channels, stride, **kw: _conv_bn_act(channels, 3, stride, groups=channels, **kw),
    # regular bottleneck ('B') and the hybrid's downsampling block ('H' with stride 2, Appendix A)
    'conv3x3': lambda channels, stride, **kw: _conv_bn_act(channels, 3, stride, **kw),
    'avg_conv3x3': lambda channels, stride, **kw: _conv_bn_act(channels, 3, stride, pre_pool=True, **kw),
    # Deformable pooling (§5.1 "Deformable Max-pool Operation", App. B "Deformable Avg-pool Operation"): the
    # max-pool pools at points moved by a zero-initialised 3x3 conv predicting 18 offsets + 9 sigmoid masks
    # (DCNv2-style, built on DCNv2 per §5.1 footnote 5). With the 13 efficient blocks of the hybrid R50:
    # 18.03M params and 2.88 GMACs, as Table 3 / Table B.1 (18.0M, 2.9G).
    'deform_max': lambda channels, stride, **kw: _learned_deform_pool(channels, stride, 'max', **kw),
    'deform_avg': lambda channels, stride, **kw: _learned_deform_pool(channels, stride, 'avg', **kw),
}

BLOCK_LETTERS: Dict[str, str] = {
    'E': 'efficient bottleneck (spatial_op replaces 3x3 conv + BN + ReLU)',
    'B': 'regular bottleneck (3x3 conv + BN + ReLU)',
    'H': 'hybrid (regular with a 2x2 avg-pool before the 3x3 conv where it downsamples, else efficient)',
}

NAMED_BLOCK_PATTERNS: Tuple[str, ...] = ('hybrid', 'efficient', 'regular', 'eb')
_STAGE_SEPARATORS = re.compile(r'\s*(?:->|→|-)\s*')


def _pattern_error(pattern: str, problem: str) -> ValueError:
    letters = ', '.join(f'{k} = {v}' for k, v in BLOCK_LETTERS.items())
    return ValueError(
        f'block_pattern {pattern!r}: {problem}. Use one letter per stage (e.g. "EEBB"), stages separated '
        f'by "-" with one letter per stage or per block (e.g. "EBE-BEBE-BEBEBE-BEB"), or a name '
        f'({", ".join(NAMED_BLOCK_PATTERNS)}). Letters: {letters}.')


def parse_block_pattern(pattern: str, layers: Sequence[int]) -> List[str]:
    """Expand ``pattern`` to one string of block letters (``E``/``B``/``H``) per stage.

    >>> parse_block_pattern('EEBB', (3, 4, 6, 3))
    ['EEE', 'EEEE', 'BBBBBB', 'BBB']
    """
    if not isinstance(pattern, str):
        raise TypeError(f'block_pattern must be a str (letters E/B/H per stage or block, or hybrid, efficient, '
                        f'regular, eb), got {pattern!r} ({type(pattern).__name__})')
    name = pattern.strip().lower()
    if name in ('hybrid', 'efficient', 'regular'):
        letter = {'hybrid': 'H', 'efficient': 'E', 'regular': 'B'}[name]
        return [letter * n for n in layers]
    if name in ('eb', 'e/b'):
        flat = ''.join('EB'[i % 2] for i in range(sum(layers)))
        starts = [sum(layers[:i]) for i in range(len(layers))]
        return [flat[s:s + n] for s, n in zip(starts, layers)]

    text = pattern.strip().upper()
    for char in _STAGE_SEPARATORS.sub('', text):
        if char not in BLOCK_LETTERS:
            raise _pattern_error(pattern, f'unknown letter {char!r} (allowed: {", ".join(BLOCK_LETTERS)})')
    groups = _STAGE_SEPARATORS.split(text) if _STAGE_SEPARATORS.search(text) else list(text)
    if len(groups) != len(layers):
        raise _pattern_error(pattern, f'{len(groups)} stage groups for a network with {len(layers)} stages')
    stages = []
    for idx, (group, num_blocks) in enumerate(zip(groups, layers)):
        if len(group) == 1:
            group = group * num_blocks
        if len(group) != num_blocks:
            raise _pattern_error(pattern, f'stage {idx + 1} has {num_blocks} blocks, the pattern gives {len(group)}')
        stages.append(group)
    return stages


def _check_spatial_op(name: str) -> None:
    if name not in SPATIAL_OPS:
        raise ValueError(f'unknown spatial_op {name!r}; registered: {", ".join(SPATIAL_OPS)}')


def _resolve_spatial_op(letter: str, stride: int, spatial_op: str) -> str:
    if letter == 'B':
        return 'conv3x3'
    if letter == 'H' and stride > 1:
        return 'avg_conv3x3'
    return spatial_op


class PfBottleneck(nn.Module):
    """ResNet bottleneck whose spatial op (3x3 conv + BN + ReLU in ResNet) comes from :data:`SPATIAL_OPS`.

    1x1 conv + BN + ReLU -> spatial op -> 1x1 conv + BN [-> SE] -> + shortcut -> ReLU (§3.2, Fig. A.1c).
    In ResNet-SE the SE module stays at its place in every block, efficient ones included (Appendix A).
    """
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            spatial_op: str = 'max',
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Any] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Callable[[], nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        _check_spatial_op(spatial_op)
        unsupported = dict(cardinality=(cardinality, 1), reduce_first=(reduce_first, 1),
                           dilation=(max(dilation, first_dilation or 1), 1), aa_layer=(aa_layer, None))
        for arg, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f'PfBottleneck supports only {arg}={supported!r}, got {value!r}')
        dd = dict(device=device, dtype=dtype)
        width = int(planes * base_width / 64)
        outplanes = planes * self.expansion
        self.spatial_op = spatial_op

        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(width, **dd)
        self.act1 = act_layer(inplace=True)
        self.spatial = SPATIAL_OPS[spatial_op](width, stride, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.se = create_attn(attn_layer, outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.drop_block(self.spatial(x))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class _StageBlocks:
    """Block factory for one stage: each call (from timm's ``make_blocks``) builds the next block of the pattern."""
    expansion = PfBottleneck.expansion

    def __init__(self, letters: str, spatial_op: str):
        self.letters = letters
        self.spatial_op = spatial_op
        self.built = 0

    def __call__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 **kwargs) -> PfBottleneck:
        letter = self.letters[self.built]
        self.built += 1
        op = _resolve_spatial_op(letter, stride, self.spatial_op)
        return PfBottleneck(inplanes, planes, stride, downsample, spatial_op=op, **kwargs)


class PfResNet(ResNet):
    """timm ResNet of :class:`PfBottleneck` blocks laid out by ``block_pattern`` (see module docstring).

    The stem max-pool uses the fast parameter-free pool too (same result as ``nn.MaxPool2d``). On CPU
    the network runs in channels-last memory format whatever the input's layout: PyTorch's CPU pooling
    and 1x1 convolutions are fastest there (same values), and CPU inference reads its kxk kernels from
    channels-last copies (``ChannelsLastKernelConv2d``: the parameters stay NCHW for safetensors and timm's
    EMA). The exception is a last stage with few pixels (see :func:`_last_stage_layout`), which runs NCHW.
    Inputs are checked: ``in_chans`` channels and at least one pixel per side (any size, as timm's ResNet).
    """

    def __init__(
            self,
            layers: Sequence[int] = (3, 4, 6, 3),
            block_pattern: str = 'hybrid',
            spatial_op: str = 'max',
            **kwargs,
    ):
        _check_spatial_op(spatial_op)
        stages = parse_block_pattern(block_pattern, layers)
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError('PfResNet supports output_stride=32 only (its pooling blocks do not dilate)')
        block_fns = tuple(_StageBlocks(letters, spatial_op) for letters in stages)
        super().__init__(block=block_fns, layers=tuple(layers), **kwargs)
        self.block_pattern = '-'.join(stages)
        self.spatial_op = spatial_op
        self.maxpool = PfMaxPool2d(3, stride=2)
        use_channels_last_kernels(self)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet init (Kaiming for every conv), then the offset predictors of the deformable pools
        back to zero (``LearnedDeformPool2d``): training starts from the regular pooling grid (§5.1)."""
        super().init_weights(zero_init_last=zero_init_last)
        for module in self.modules():
            if isinstance(module, LearnedDeformPool2d):
                module.reset_parameters()

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = _prepare_input(x, self.in_chans, type(self).__name__)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ResNet steps after the input check, written out: TorchScript has no ``super()``. The features
        of an NCHW input come back NCHW, whatever layout the CPU path chose inside (:func:`_layout_of`)."""
        given = x
        x = self._prepare_input(x)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
            if not torch.jit.is_scripting():
                x = _last_stage_layout(x)
            x = self.layer4(x)
        if not torch.jit.is_scripting():
            x = _layout_of(x, given)
        return x

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's ``forward_intermediates``, every returned map NCHW for an NCHW input (:func:`_layout_of`)."""
        out = super().forward_intermediates(self._prepare_input(x), *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _layout_of(out, x)
        if isinstance(out, list):
            return [_layout_of(t, x) for t in out]
        final, intermediates = out
        return _layout_of(final, x), [_layout_of(t, x) for t in intermediates]


@torch.jit.ignore  # TorchScript skips it (see PfResNet._prepare_input), FX graphs scripted later call it
def _prepare_input(x: torch.Tensor, in_chans: int, model_name: str) -> torch.Tensor:
    """Check the input's shape and, on CPU, lay it out channels-last. Any height and width of at least one pixel
    is computed, as by timm's ResNet (the maps shrink to 1x1; ``features_only`` takes the same sizes)."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f'{model_name} expects images of shape (N, {in_chans}, H, W), got {tuple(x.shape)}')
    if x.device.type == 'cpu':
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# Output pixels per call (batch x height x width) below which the last stage runs NCHW on CPU.
_NCHW_LAST_STAGE_PIXELS = 256


@torch.jit.ignore  # TorchScript keeps the input's layout
def _last_stage_layout(x: torch.Tensor) -> torch.Tensor:
    """On CPU, the input of the last stage (stride 2, 2048 channels out) in NCHW when its output has fewer than
    :data:`_NCHW_LAST_STAGE_PIXELS` pixels per call (batch 1 to 4 at 224 px: 7x7 maps), else as it is.

    oneDNN's channels-last 1x1 convolutions split their work over pixels; with 49 of them and 2048 channels its
    blocked NCHW kernels run the stage's convolutions 1.2-2x faster (measured with 2 threads and oneDNN's AVX2
    and AVX-512 kernels), while the earlier stages and larger maps are faster channels-last. Values are the same
    in both layouts. Traced, compiled and exported graphs keep one layout.
    """
    if x.device.type != 'cpu' or x.dim() != 4 or is_capturing_graph():
        return x
    out_pixels = x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2)
    return x.contiguous() if out_pixels < _NCHW_LAST_STAGE_PIXELS else x


@torch.jit.ignore  # TorchScript keeps the input's layout throughout
def _layout_of(x: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous (NCHW) when the caller's input ``given`` is, so that outputs do not depend on the layout
    the CPU path picked per batch size (``.view`` works as for ``resnet50``); other inputs get the maps as the
    path left them."""
    if x.dim() == 4 and given.dim() == 4 and given.is_contiguous() and not x.is_contiguous():
        return x.contiguous()
    return x


# leaf calls of FX graphs: the checks and the layout choices need the concrete input
torch.fx.wrap('_prepare_input')
torch.fx.wrap('_last_stage_layout')
torch.fx.wrap('_layout_of')


# Official (naver-ai/PfLayer resnet_pf.py) parameter names -> ours.
_OFFICIAL_KEY_RULES = (
    (re.compile(r'^conv1\.0\.'), 'conv1.'),
    (re.compile(r'^conv1\.1\.'), 'bn1.'),
    (re.compile(r'\.reduction_block\.0\.'), '.conv1.'),
    (re.compile(r'\.reduction_block\.1\.'), '.bn1.'),
    (re.compile(r'\.conv_block\.1\.0\.'), '.spatial.conv.'),  # avg-pool + conv of hybrid downsampling blocks
    (re.compile(r'\.conv_block\.1\.1\.'), '.spatial.bn.'),
    (re.compile(r'\.conv_block\.0\.'), '.spatial.conv.'),  # regular bottleneck
    (re.compile(r'\.conv_block\.1\.'), '.spatial.bn.'),
    (re.compile(r'\.expansion_block\.0\.'), '.conv3.'),
    (re.compile(r'\.expansion_block\.1\.'), '.bn3.'),
)


def _block_layout(keys) -> str:
    """Per stage, 'C' for each block whose spatial op has parameters, 'P' for parameter-free ones."""
    blocks = {}
    for key in keys:
        match = re.match(r'^layer(\d+)\.(\d+)\.', key)
        if match:
            block = (int(match.group(1)), int(match.group(2)))
            blocks[block] = blocks.get(block, False) or '.spatial.' in key
    stages = {}
    for (stage, idx), has_conv in sorted(blocks.items()):
        stages.setdefault(stage, []).append('C' if has_conv else 'P')
    return '-'.join(''.join(v) for _, v in sorted(stages.items()))


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an official PfLayer checkpoint to this model's keys; our own format passes through unchanged.

    Accepts a plain state dict or one wrapped in ``state_dict`` / ``model``, with or without the
    ``module.`` prefix of DataParallel. Raises ``ValueError`` naming missing, unexpected and mis-shaped
    parameters when the checkpoint does not fit ``model`` (the classifier and the input channels of the
    first conv are left to timm's pretrained loader, which adapts them).
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any('.reduction_block.' in k or k.startswith('conv1.0.') for k in state_dict):
        converted = {}
        for key, value in state_dict.items():
            for pattern, replacement in _OFFICIAL_KEY_RULES:
                key, count = pattern.subn(replacement, key)
                if count:
                    break
            converted[key] = value
        state_dict = converted
    check_matches_model(
        state_dict, model, first_conv='conv1', classifier='fc', candidates=timm.list_models(module='resnet_pf'),
        hints=lambda mismatch, fits: _layout_hint(state_dict, model))
    return state_dict


def _layout_hint(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> List[str]:
    """The block layouts of checkpoint and model, when the checkpoint has ResNet blocks laid out otherwise."""
    ckpt_layout, model_layout = _block_layout(state_dict), _block_layout(model.state_dict())
    if not ckpt_layout or ckpt_layout == model_layout:
        return []
    return [f'block layout (C = spatial op with parameters, P = parameter-free): checkpoint {ckpt_layout}, '
            f'model {model_layout}']


def _create_resnet_pf(variant: str, pretrained: bool = False, **kwargs: Any) -> PfResNet:
    return build_pf_model(PfResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **PF_LAYERS_PAPER, **kwargs,
    }


def _official(drive_id: str, recipe: str) -> Dict[str, Any]:
    return _cfg(notes=(
        f"ImageNet-1k top-1 / top-5: paper Table 3 and the PfLayer README ({recipe}; in the model card's "
        f'results table)',
        f"authors' weights: https://drive.google.com/file/d/{drive_id}/view "
        f'(convert with timm_pf.models.resnet_pf.checkpoint_filter_fn)',
    ))


def _to_train(source: str) -> Dict[str, Any]:
    return _cfg(notes=(f"ImageNet-1k top-1 / top-5: {source} (in the model card's results table)",
                       'weights to be trained with the timm-pf recipes; none released by the authors'))


_LONG = 'further training recipe of Appendix C, 600 epochs'
_RECIPE = 'further training recipe of Appendix C, 400 epochs'

default_cfgs = generate_pf_cfgs({
    'ours_r50_max.pf_in1k_long': _official('1TQfwMXENn7s78Myc58svKVpHi5OVsdGX', _LONG),
    'ours_r50_max.pf_in1k': _official('1MoCdVLPau4XuI0BVGEwDkiwibpybqWTX', _RECIPE),
    'ours_r50_hybrid.pf_in1k_long': _official('1f5fOwEItFITqzofvQ6d-kLLOTs-c1k3o', _LONG),
    'ours_r50_hybrid.pf_in1k': _official('1CyajEQUfWo9oetqcIhexVjfRXU-iGHk1', _RECIPE),
    'ours_r50_eb.in1k': _to_train('paper Table 2 (E/B, 90 epochs)'),
    'ours_r50_conv1x1.in1k': _to_train('paper Table 2 (1x1 conv, 90 epochs)'),
    'ours_r50_dwconv.in1k': _to_train('paper Table 2 (3x3 dwconv, 90 epochs)'),
    'ours_r101_hybrid.in1k': _to_train('paper Table 4 (Ours-R101)'),
    'ours_wrn50_2_hybrid.in1k': _to_train('paper Table 4 (Ours-WRN50-2)'),
    'ours_wrn101_2_hybrid.in1k': _to_train('paper Table 4 (Ours-WRN101-2)'),
    'ours_r50se_hybrid.in1k': _to_train('paper Table 4 (Ours-R50-SE)'),
    'ours_r50_deform_max.in1k': _to_train(
        'paper Table 3 / Table B.1 (Ours-R50 (deform_max)), 90 epochs and the Appendix C recipe; COCO box AP in '
        'Table 5'),
    'ours_r50_deform_avg.in1k': _to_train('paper Table B.1 (Ours-R50 (deform_avg)), Appendix C recipe'),
})


@register_model
def ours_r50_max(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50-max: efficient bottlenecks everywhere (Table 2 E→E→E→E, Table 3 Ours-R50 (max))."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='efficient')
    return _create_resnet_pf('ours_r50_max', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50_hybrid(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50-hybrid: regular bottlenecks (with 2x2 avg-pool) only where downsampling (§4.1, Tables 2-4)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='hybrid')
    return _create_resnet_pf('ours_r50_hybrid', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50_eb(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50 E/B: efficient and regular bottlenecks alternate block by block (Table 2)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='eb')
    return _create_resnet_pf('ours_r50_eb', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50_conv1x1(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50 with every 3x3 conv replaced by a 1x1 conv (Table 2 competitor)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='efficient', spatial_op='conv1x1')
    return _create_resnet_pf('ours_r50_conv1x1', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50_dwconv(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50 with every 3x3 conv replaced by a 3x3 depthwise conv (Table 2 competitor)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='efficient', spatial_op='dwconv3x3')
    return _create_resnet_pf('ours_r50_dwconv', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r101_hybrid(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """ResNet-101 with the hybrid design (Table 4 Ours-R101)."""
    model_args = dict(layers=(3, 4, 23, 3), block_pattern='hybrid')
    return _create_resnet_pf('ours_r101_hybrid', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_wrn50_2_hybrid(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """Wide ResNet-50-2 with the hybrid design (Table 4 Ours-WRN50-2)."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128, block_pattern='hybrid')
    return _create_resnet_pf('ours_wrn50_2_hybrid', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_wrn101_2_hybrid(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """Wide ResNet-101-2 with the hybrid design (Table 4 Ours-WRN101-2)."""
    model_args = dict(layers=(3, 4, 23, 3), base_width=128, block_pattern='hybrid')
    return _create_resnet_pf('ours_wrn101_2_hybrid', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50se_hybrid(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """SE-ResNet-50 with the hybrid design, SE kept in every block (Table 4 Ours-R50-SE, Appendix A)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='hybrid', block_args=dict(attn_layer='se'))
    return _create_resnet_pf('ours_r50se_hybrid', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50_deform_max(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50-hybrid with deformable max-pools in its 13 efficient blocks (§5.1, Table 3, Table 5)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='hybrid', spatial_op='deform_max')
    return _create_resnet_pf('ours_r50_deform_max', pretrained, **dict(model_args, **kwargs))


@register_model
def ours_r50_deform_avg(pretrained: bool = False, **kwargs: Any) -> PfResNet:
    """R50-hybrid with deformable avg-pools in its 13 efficient blocks (Appendix B, Table B.1)."""
    model_args = dict(layers=(3, 4, 6, 3), block_pattern='hybrid', spatial_op='deform_avg')
    return _create_resnet_pf('ours_r50_deform_avg', pretrained, **dict(model_args, **kwargs))
