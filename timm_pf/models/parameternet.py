"""ParameterNet: GhostNets whose convolutions are dynamic (mixtures of expert kernels).

Paper: "ParameterNet: Parameters Are All You Need for Large-scale Visual Pretraining of Mobile Networks",
Han et al., CVPR 2024 (arXiv:2306.14525). Official code:
https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/parameternet_pytorch

ParameterNet is "constructed by replacing the conventional convolutional layer with dynamic convolution"
(§5.2), so one class, :class:`ParameterNet` (a timm GhostNet), builds every variant from a conv factory:
``num_experts=1`` gives the plain GhostNet baselines, ``num_experts>1`` the dynamic ones (the Table 4
ablation). As in the official code
the dynamic convs are the stem, both convs of every Ghost module (primary 1x1 and cheap depthwise), the
depthwise and pointwise convs of a projection shortcut and the final 1x1 conv; the stride-2 depthwise
conv, squeeze-excite, ``conv_head`` and classifier stay static.

Variants:
* ``parameternet_600m`` / ``ghostnet_600m``: the official 600M layout (19 bottlenecks, width 1.9,
  hard-swish) of Table 2.
* ``parameternet_300m`` / ``ghostnet_300m``: not published by the authors; inferred as the GhostNet v1
  layout at width 1.45 with hard-swish, which reproduces every parameter count of Tables 2 and 4 (plain and
  with 2 / 4 / 8 experts).
* ``ghostnet_dyn``: timm's ``ghostnet_100`` (ReLU) with the same dynamic convs, key-compatible with it
  apart from the expert and routing tensors; :func:`upcycle_state_dict` turns a trained GhostNet into a
  dynamic one with identical outputs.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Type, Union

import torch
from torch import nn

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Linear, make_divisible
from timm.models import GhostNet, adapt_input_conv, register_model
from timm.models.ghostnet import GhostModule

from ..layers.dynamic_conv import DynamicConv2d, check_num_experts
from ._cfg import generate_pf_cfgs
from ._checkpoint import CheckpointMismatch, check_matches_model, fitting_models, unwrap_checkpoint
from ._pretrained import build_pf_model
from .._private import ConvBnAct, SqueezeExcite

__all__ = ['ParameterNet', 'checkpoint_filter_fn', 'upcycle_state_dict']

ConvLayer = Callable[..., nn.Module]

# timm's GhostNet squeeze-excite (hard-sigmoid gate, reduced width rounded to 4), here with the block activation
_SE_LAYER = partial(SqueezeExcite, gate_layer='hard_sigmoid', rd_round_fn=partial(make_divisible, divisor=4))

# k, expansion (mid) chs, out chs, SE ratio, stride; one inner list per stage
GHOSTNET_V1_CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 0.25, 1], [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1], [5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1]],
]

# The official ParameterNet-600M layout (parameternet_pytorch/cv/parameternet.py): 19 bottlenecks.
PARAMETERNET_600M_CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[3, 120, 40, 0.25, 1], [3, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 200, 80, 0, 1], [3, 200, 80, 0, 1],
     [3, 480, 112, 0.25, 1], [3, 672, 112, 0.25, 1], [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[3, 960, 160, 0.25, 1], [3, 960, 160, 0.25, 1], [3, 960, 160, 0.25, 1],
     [3, 960, 160, 0.25, 1], [3, 960, 160, 0.25, 1]],
]


def conv_factory(num_experts: int = 1, routing: str = 'sigmoid') -> ConvLayer:
    """``conv(in_chs, out_chs, kernel_size, stride=1, padding=0, groups=1, device=None, dtype=None)`` for the
    convs ParameterNet makes dynamic: a plain ``nn.Conv2d`` for one expert (the GhostNet baseline, Table 4's
    first row), else a :class:`DynamicConv2d` with ``num_experts`` experts."""
    check_num_experts(num_experts)
    if num_experts == 1:
        return partial(nn.Conv2d, bias=False)
    return partial(DynamicConv2d, bias=False, num_experts=num_experts, routing=routing)


class ParameterNetGhostModule(GhostModule):
    """timm's Ghost module with its primary (1x1) and cheap (depthwise 3x3) convs built by ``conv_layer``.

    timm's GhostModule has no conv argument: its two convs are replaced after its constructor.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            act_layer: Type[nn.Module],
            conv_layer: ConvLayer,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(in_chs, out_chs, act_layer=act_layer, **dd)
        init_chs = self.primary_conv[0].out_channels
        new_chs = self.cheap_operation[0].out_channels
        self.primary_conv[0] = conv_layer(in_chs, init_chs, 1, **dd)
        self.cheap_operation[0] = conv_layer(init_chs, new_chs, 3, padding=1, groups=init_chs, **dd)


class ParameterNetConvBnAct(ConvBnAct):
    """timm's ConvBnAct (``conv``, ``bn1`` with activation) with its conv built by ``conv_layer``.

    timm's ConvBnAct has no conv argument: its conv is replaced after its constructor.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            act_layer: Type[nn.Module],
            conv_layer: ConvLayer,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(in_chs, out_chs, 1, act_layer=act_layer, **dd)
        self.conv = conv_layer(in_chs, out_chs, 1, **dd)


class ParameterNetBottleneck(nn.Module):
    """Ghost bottleneck (timm's layout and keys) with a conv factory, SE activation and drop-path.

    ghost1 -> [stride-2 depthwise conv + BN] -> [SE] -> ghost2, plus the identity or a projection
    shortcut (depthwise conv + BN + 1x1 conv + BN). The official ParameterNet passes the block
    activation to the SE (hard-swish in ParameterNet-600M) and drops the residual branch per sample,
    which timm's GhostBottleneck has no arguments for.
    """

    def __init__(
            self,
            in_chs: int,
            mid_chs: int,
            out_chs: int,
            dw_kernel_size: int = 3,
            stride: int = 1,
            act_layer: Type[nn.Module] = nn.ReLU,
            se_ratio: float = 0.,
            drop_path_rate: float = 0.,
            conv_layer: ConvLayer = nn.Conv2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        dw_padding = (dw_kernel_size - 1) // 2
        self.stride = stride
        self.ghost1 = ParameterNetGhostModule(in_chs, mid_chs, act_layer, conv_layer, **dd)
        if stride > 1:
            self.conv_dw = nn.Conv2d(
                mid_chs, mid_chs, dw_kernel_size, stride=stride, padding=dw_padding, groups=mid_chs, bias=False, **dd)
            self.bn_dw = nn.BatchNorm2d(mid_chs, **dd)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = _SE_LAYER(mid_chs, rd_ratio=se_ratio, act_layer=act_layer, **dd) if se_ratio else None
        self.ghost2 = ParameterNetGhostModule(mid_chs, out_chs, nn.Identity, conv_layer, **dd)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                conv_layer(in_chs, in_chs, dw_kernel_size, stride=stride, padding=dw_padding, groups=in_chs, **dd),
                nn.BatchNorm2d(in_chs, **dd),
                conv_layer(in_chs, out_chs, 1, **dd),
                nn.BatchNorm2d(out_chs, **dd),
            )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        return self.drop_path(x) + shortcut


class ParameterNet(GhostNet):
    """GhostNet with optional dynamic convolutions (ParameterNet).

    Subclasses timm's GhostNet for its forward, features, intermediates, pruning and classifier API;
    only the construction differs: the conv factory (``num_experts``, ``routing``), the activation
    (``act_layer``), stochastic depth (``drop_path_rate``, linear over stages as in the official code)
    and the head width (``head_hidden_size``). timm's constructor has no argument for any of them: it runs
    on the meta device (no memory, no initialisation) to set the attributes its methods use (feature info,
    stage ends, pooling), then every layer is built here.
    """

    def __init__(
            self,
            cfgs: List[List[List[Union[int, float]]]],
            num_classes: int = 1000,
            width: float = 1.0,
            in_chans: int = 3,
            output_stride: int = 32,
            global_pool: str = 'avg',
            drop_rate: float = 0.2,
            drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.ReLU,
            num_experts: int = 1,
            routing: str = 'sigmoid',
            head_hidden_size: int = 1280,
            device=None,
            dtype=None,
    ):
        if output_stride != 32:
            raise ValueError(f'ParameterNet supports output_stride=32 only (no dilation), got {output_stride}')
        conv_layer = conv_factory(num_experts, routing)
        super().__init__(
            cfgs, num_classes=num_classes, width=width, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, device='meta')
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts

        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = conv_layer(in_chans, stem_chs, 3, stride=2, padding=1, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = act_layer(inplace=True)
        prev_chs = stem_chs

        stage_dpr = [drop_path_rate * i / max(len(cfgs) - 1, 1) for i in range(len(cfgs))]
        stages = []
        for stage_idx, cfg in enumerate(cfgs):
            layers = []
            for kernel_size, exp_size, chs, se_ratio, stride in cfg:
                out_chs = make_divisible(chs * width, 4)
                mid_chs = make_divisible(exp_size * width, 4)
                layers.append(ParameterNetBottleneck(
                    prev_chs, mid_chs, out_chs, kernel_size, stride, act_layer=act_layer, se_ratio=se_ratio,
                    drop_path_rate=stage_dpr[stage_idx], conv_layer=conv_layer, **dd))
                prev_chs = out_chs
            stages.append(nn.Sequential(*layers))
        stages.append(nn.Sequential(ParameterNetConvBnAct(prev_chs, self.pool_dim, act_layer, conv_layer, **dd)))
        self.blocks = nn.Sequential(*stages)

        self.head_hidden_size = head_hidden_size
        self.conv_head = nn.Conv2d(self.pool_dim, head_hidden_size, 1, 1, 0, bias=True, **dd)
        self.act2 = act_layer(inplace=True)
        self.classifier = Linear(head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()


def _dynamic_convs(model: nn.Module) -> Dict[str, DynamicConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicConv2d)}


# Training checkpoints keep the EMA weights beside the raw ones: the EMA ones are preferred.
_WRAPPERS = ('state_dict_ema', 'state_dict', 'model')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an official ParameterNet checkpoint (or pass one of ours through) to ``model``'s keys.

    The official ``DynamicConv`` keeps its experts in a CondConv2d child (``<conv>.cond_conv.weight``)
    beside the routing ``nn.Linear`` (``<conv>.routing.*``); ours is the CondConv2d itself, so
    ``.cond_conv.`` is dropped. ``module.`` prefixes, ``state_dict_ema`` (preferred) / ``state_dict`` /
    ``model`` wrappers and thop's ``total_ops`` / ``total_params`` buffers are removed. A dynamic stem is
    adapted to the model's input channels here (timm's loader adapts static stems only). Missing or
    unexpected keys and shape mismatches (other than the classifier, which timm re-sizes) raise
    ``ValueError`` naming the tensors.
    """
    out = {}
    for key, value in unwrap_checkpoint(state_dict, _WRAPPERS).items():
        if key.endswith(('total_ops', 'total_params')):
            continue
        out[key.replace('.cond_conv.', '.')] = value
    if isinstance(model.conv_stem, DynamicConv2d):
        out.update(_adapt_dynamic_stem(out, model.conv_stem))

    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier', 'classifier')
    check_matches_model(
        out, model, first_conv='conv_stem', classifier=classifier,
        candidates=[*timm.list_models(module='parameternet'), 'ghostnet_100'],
        hints=lambda mismatch, fits: _mismatch_hints(out, model, mismatch, classifier))
    return out


def _adapt_dynamic_stem(state_dict: Dict[str, torch.Tensor], stem: DynamicConv2d) -> Dict[str, torch.Tensor]:
    """The stem's experts and routing for ``stem.in_channels`` inputs, as timm's ``adapt_input_conv`` adapts a
    static stem (summed for one channel, else repeated and rescaled): the routing weights act on the
    per-channel means, a 1x1 conv of them. Empty if the checkpoint's stem already fits (or is not one)."""
    routing, experts = state_dict.get('conv_stem.routing.weight'), state_dict.get('conv_stem.weight')
    if routing is None or experts is None or routing.ndim != 2 or routing.shape[1] == stem.in_channels:
        return {}
    num_experts, base_chans = routing.shape
    out_chs, _, kh, kw = stem.weight_shape
    if experts.shape != (num_experts, out_chs * base_chans * kh * kw):
        return {}  # reported by the shape check
    experts = adapt_input_conv(stem.in_channels, experts.reshape(num_experts * out_chs, base_chans, kh, kw), base_chans)
    routing = adapt_input_conv(stem.in_channels, routing[:, :, None, None], base_chans)
    return {'conv_stem.weight': experts.reshape(num_experts, -1), 'conv_stem.routing.weight': routing[:, :, 0, 0]}


def _mismatch_hints(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        mismatch: CheckpointMismatch,
        classifier: str,
) -> List[str]:
    """Explain the two usual mistakes: a plain GhostNet checkpoint of the model's layout, or another number of
    experts."""
    hints = []
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if (arch and getattr(model, 'num_experts', 1) > 1
            and fitting_models(state_dict, [arch], 'conv_stem', classifier, num_experts=1)):
        hints.append(f'this is a plain GhostNet checkpoint of the {arch} layout: convert it with upcycle_state_dict()')
    if any(k == 'conv_stem.routing.weight' for k, _, _ in mismatch.mis_shaped):
        hints.append(f'model num_experts={getattr(model, "num_experts", None)}, checkpoint has '
                     f'{state_dict["conv_stem.routing.weight"].shape[0]} experts per dynamic conv')
    return hints


def upcycle_state_dict(
        state_dict: Dict[str, Any],
        model: nn.Module,
        expert_noise: float = 0.01,
        seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Turn a plain GhostNet state dict into one for ``model``, its dynamic-conv twin.

    Every static conv weight becomes ``num_experts`` experts whose mixture equals it for every input
    (see :meth:`DynamicConv2d.upcycled_state`), so the upcycled model's outputs equal the plain model's;
    ``expert_noise`` (relative, zero-sum over experts) lets the experts diverge in training.
    Example: ``upcycle_state_dict(timm.create_model('ghostnet_100', pretrained=True).state_dict(),
    timm.create_model('ghostnet_dyn'))``.
    """
    plain = unwrap_checkpoint(state_dict, _WRAPPERS)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    dynamic = _dynamic_convs(model)
    if not dynamic:
        raise ValueError(f'{type(model).__name__} has no dynamic convs to upcycle into')
    for name, conv in dynamic.items():
        if f'{name}.weight' not in plain:
            raise ValueError(f'plain checkpoint has no {name}.weight for the dynamic conv {name}')
        local = conv.upcycled_state(
            plain.pop(f'{name}.weight'), plain.pop(f'{name}.bias', None), expert_noise, generator)
        out.update({f'{name}.{k}': v for k, v in local.items()})
    expected = model.state_dict()
    for key, value in plain.items():
        if key.endswith(('total_ops', 'total_params')):
            continue
        if key not in expected:
            raise ValueError(f'plain checkpoint key {key} has no counterpart in {type(model).__name__}')
        if value.shape != expected[key].shape:
            raise ValueError(f'{key}: plain checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}')
        out[key] = value
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f'plain checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:4]}')
    return out


def _create_parameternet(variant: str, pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    return build_pf_model(
        ParameterNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


_PAPER = 'ParameterNet: Parameters Are All You Need for Large-scale Visual Pretraining of Mobile Networks'
_NO_RELEASE = (
    'No weights were released by the authors; this tag names where weights trained with the '
    'timm-pf train configs are published.')


def _cfg(notes: str, **kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2306.14525',
        'paper_name': _PAPER,
        'origin_url': 'https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/parameternet_pytorch',
        'notes': (notes, _NO_RELEASE),
        **kwargs,
    }


default_cfgs = generate_pf_cfgs({
    'parameternet_600m.in1k': _cfg('ParameterNet-600M, official layout (paper Table 2).'),
    'parameternet_300m.in1k': _cfg(
        'ParameterNet-300M; layout inferred (GhostNet v1 at width 1.45, hard-swish) from the paper counts '
        '(Tables 2 and 4).'),
    'ghostnet_600m.in1k': _cfg('GhostNet-600M baseline (ParameterNet-600M with static convs, paper Table 2).'),
    'ghostnet_300m.in1k': _cfg('GhostNet-300M baseline (inferred layout, static convs, paper Table 2).'),
    'ghostnet_dyn.in1k': _cfg(
        'GhostNet 1.0x (timm ghostnet_100) with 4-expert dynamic convs; upcycle a trained ghostnet_100 '
        'with upcycle_state_dict(). Not a model of the paper\'s tables.'),
})


@register_model
def parameternet_600m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """ParameterNet-600M (Table 2): the official 600M GhostNet layout with 4-expert dynamic convs."""
    model_args = dict(cfgs=PARAMETERNET_600M_CFGS, width=1.9, act_layer=nn.Hardswish, num_experts=4)
    return _create_parameternet('parameternet_600m', pretrained, **dict(model_args, **kwargs))


@register_model
def parameternet_300m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """ParameterNet-300M (Tables 2, 4): inferred GhostNet v1 layout at width 1.45, 4-expert dynamic convs."""
    model_args = dict(cfgs=GHOSTNET_V1_CFGS, width=1.45, act_layer=nn.Hardswish, num_experts=4)
    return _create_parameternet('parameternet_300m', pretrained, **dict(model_args, **kwargs))


@register_model
def ghostnet_600m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """GhostNet-600M baseline (Table 2): ParameterNet-600M with static convs."""
    model_args = dict(cfgs=PARAMETERNET_600M_CFGS, width=1.9, act_layer=nn.Hardswish)
    return _create_parameternet('ghostnet_600m', pretrained, **dict(model_args, **kwargs))


@register_model
def ghostnet_300m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """GhostNet-300M baseline (Table 2): ParameterNet-300M with static convs."""
    model_args = dict(cfgs=GHOSTNET_V1_CFGS, width=1.45, act_layer=nn.Hardswish)
    return _create_parameternet('ghostnet_300m', pretrained, **dict(model_args, **kwargs))


@register_model
def ghostnet_dyn(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """GhostNet 1.0x (timm ``ghostnet_100``, ReLU) with 4-expert dynamic convs."""
    model_args = dict(cfgs=GHOSTNET_V1_CFGS, width=1.0, act_layer=nn.ReLU, num_experts=4)
    return _create_parameternet('ghostnet_dyn', pretrained, **dict(model_args, **kwargs))
