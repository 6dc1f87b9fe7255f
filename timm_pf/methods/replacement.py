"""Replacement Learning: every k-th layer trained as a learnable mix of its two neighbours.

"Replacement Learning: Training Vision Tasks with Fewer Learnable Parameters" (Zhang et al., 2024,
arXiv:2410.01239), supplement A.3, Algorithm 1: layers are numbered ``l = 1..n``; each layer with
``l mod k == 0`` gives up its own parameters, which are computed every step as

    theta_l = a_l * theta_{l-1} + b_l * theta_{l+1}

from the current parameters of its neighbours, with two learnable scalars ``a_l, b_l`` per layer.
Gradients reach ``a_l``, ``b_l`` and, through the mix, both neighbours. What a layer is (supplement A.1):

* ViT: a transformer encoder layer, of which only the multi-head attention is replaced (its MLP and
  norms train normally). In models where only some blocks have attention (the max-pool ViTs of
  timm_pf), the layers are the attention blocks in depth order, and a replaced attention mixes the
  previous and next *attention* block; the other token mixers train normally.
* ResNet: a residual block, replaced whole, and only where both neighbours have the same parameter
  names and shapes (never across a stage's downsampling block).

Choices the supplement leaves open, made here and kept explicit:

* The last layer ``l = n`` has no ``theta_{n+1}``: it is never replaced, even when ``n mod k == 0``.
* ``k >= 2`` (with ``k = 1`` every neighbour would itself be replaced).
* ``a_l = b_l = 0.5`` initially (the mean of the neighbours); ``init=(a, b)`` changes it.
* Buffers (BatchNorm running statistics) stay the replaced layer's own: they are statistics of its
  input, not learnable parameters.

The mechanism is :mod:`torch.nn.utils.parametrize` with parametrizations that keep no tensor of their
own: the replaced layer's weights disappear from ``parameters()`` and ``state_dict()``, ``a_l``/``b_l``
appear as ``<layer>.neighbour_mix.a``/``.b`` (0-dim, so timm's optimizer factory puts them in the
no-weight-decay group), and deep copies (EMA) and state-dict round trips work as for any timm model.
:func:`finalize` bakes the mixes into plain weights, giving back the original architecture.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import parametrize

from timm.layers import Attention
from timm.models.resnet import BasicBlock, Bottleneck

__all__ = ['NeighbourMix', 'ReplacementReport', 'replace_layers', 'replacement_report', 'finalize', 'is_replaced']

#: Attribute under which a replaced layer holds its :class:`NeighbourMix`.
MIX_NAME = 'neighbour_mix'

_VIT_LAYERS = (Attention,)
_RESNET_LAYERS = (BasicBlock, Bottleneck)


class NeighbourMix(nn.Module):
    """The two learnable scalars of one replaced layer: ``theta = a * theta_prev + b * theta_next``.

    Algorithm 1, lines 4 and 9. The neighbouring layers are referenced, not registered as children:
    they are trained as layers of their own and must appear once in ``parameters()``/``state_dict()``.
    """

    def __init__(
            self,
            prev_layer: nn.Module,
            next_layer: nn.Module,
            init: Tuple[float, float] = (0.5, 0.5),
            dtype: Optional[torch.dtype] = None,
            device: Optional[torch.device] = None,
    ):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(init[0]), dtype=dtype, device=device))
        self.b = nn.Parameter(torch.tensor(float(init[1]), dtype=dtype, device=device))
        # A plain tuple is invisible to nn.Module.__setattr__; deep copies (EMA) still map the references
        # onto the copied neighbours.
        self.neighbours = (prev_layer, next_layer)

    def forward(self, prev_tensor: torch.Tensor, next_tensor: torch.Tensor) -> torch.Tensor:
        return self.a * prev_tensor + self.b * next_tensor

    def extra_repr(self) -> str:
        return f'a={self.a.item():.4g}, b={self.b.item():.4g}'


class _MixedTensor(nn.Module):
    """Parametrization of one tensor of a replaced layer: the mix of the same tensor of both neighbours.

    It keeps no tensor of its own (``right_inverse`` returns an empty tuple), so the replaced tensor is no
    parameter, no buffer and no ``state_dict`` entry any more.
    """

    def __init__(self, mix: NeighbourMix, prev_owner: nn.Module, next_owner: nn.Module, tensor_name: str):
        super().__init__()
        self.tensor_name = tensor_name
        self.sources = (mix, prev_owner, next_owner)  # referenced, not registered (see NeighbourMix)
        self._registered = False

    def right_inverse(self, value: torch.Tensor) -> Tuple[()]:
        if self._registered:
            raise RuntimeError(
                f'{self.tensor_name!r} of a replaced layer is computed from its neighbours and cannot be '
                'assigned; change the neighbours or a/b of its neighbour_mix, or finalize() the model first')
        self._registered = True
        return ()

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` on every submodule: the references to the neighbours cannot be scripted."""
        raise RuntimeError(
            'a model in its Replacement Learning training form (layers computed from their neighbours) cannot be '
            'scripted: timm_pf.methods.replacement.finalize(model) gives back the plain architecture, which can')

    def forward(self) -> torch.Tensor:
        mix, prev_owner, next_owner = self.sources
        return mix(getattr(prev_owner, self.tensor_name), getattr(next_owner, self.tensor_name))

    def extra_repr(self) -> str:
        return self.tensor_name


@dataclass
class ReplacementReport:
    """Learnable parameters before/after and which layers were replaced (names as in ``named_modules``)."""
    params_before: int
    params_after: int
    replaced: List[str]
    skipped: Dict[str, str] = field(default_factory=dict)
    num_layers: Optional[int] = None
    interval: Optional[int] = None

    @property
    def reduction(self) -> float:
        """Fraction of the learnable parameters removed."""
        return 1 - self.params_after / self.params_before

    def __str__(self) -> str:
        interval = f' (interval {self.interval})' if self.interval else ''
        of_layers = f' of {self.num_layers}' if self.num_layers else ''
        lines = [
            f'Replacement learning{interval}: {len(self.replaced)}{of_layers} layers replaced, learnable parameters '
            f'{self.params_before:,} -> {self.params_after:,} (-{100 * self.reduction:.1f}%)',
        ]
        lines += [f'  replaced {name}' for name in self.replaced]
        lines += [f'  kept     {name}: {why}' for name, why in self.skipped.items()]
        return '\n'.join(lines)


def _default_layer_types(model: nn.Module) -> Tuple[Type[nn.Module], ...]:
    for layer_types in (_VIT_LAYERS, _RESNET_LAYERS):
        if any(isinstance(m, layer_types) for m in model.modules()):
            return layer_types
    raise TypeError(
        f'replacement learning knows the multi-head attention layers of ViTs and the residual blocks of ResNets '
        f'(timm {", ".join(t.__name__ for t in _VIT_LAYERS + _RESNET_LAYERS)}); {type(model).__name__} has none. '
        'Pass layer_types=(...) to name the layer class of another architecture.')


def _signature(module: nn.Module) -> Tuple:
    """What two layers must share to be mixed: class and every parameter's name, shape and dtype."""
    return (
        parametrize.type_before_parametrizations(module),
        tuple((name, p.shape, p.dtype) for name, p in module.named_parameters()),
    )


def _owner(module: nn.Module, tensor_name: str) -> Tuple[nn.Module, str]:
    prefix, _, attr = tensor_name.rpartition('.')
    return (module.get_submodule(prefix) if prefix else module), attr


def is_replaced(module: nn.Module) -> bool:
    """True if ``module`` (a model or one layer) holds any replaced layer."""
    return any(isinstance(m, NeighbourMix) for m in module.modules())


def replace_layers(
        model: nn.Module,
        interval: int = 2,
        layer_types: Optional[Sequence[Type[nn.Module]]] = None,
        init: Tuple[float, float] = (0.5, 0.5),
) -> ReplacementReport:
    """Turn ``model`` (in place) into its replacement-learning form and report the learnable parameters.

    Args:
        model: a timm ViT (incl. timm_pf's max-pool ViTs) or ResNet, or any model whose layers are
            instances of ``layer_types``.
        interval: ``k`` of Algorithm 1: layers ``l = k, 2k, ...`` (1-based, last layer excluded) are replaced.
        layer_types: module classes that are the "layers" of Algorithm 1, numbered in depth order.
            Default: timm ``Attention`` for ViTs, timm ``BasicBlock``/``Bottleneck`` for ResNets.
        init: initial ``(a_l, b_l)``.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 2:
        raise ValueError(f'interval must be an integer >= 2 (every interval-th layer is replaced), got {interval!r}')
    if (not isinstance(init, (tuple, list)) or len(init) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in init)):
        raise ValueError(f'init must be two finite numbers (a_l, b_l), got {init!r}')
    if is_replaced(model):
        raise ValueError('model is already in replacement-learning form (call finalize() first to start over)')
    layer_types = tuple(layer_types) if layer_types else _default_layer_types(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_types)]
    params_before = sum(p.numel() for p in model.parameters())

    selected, skipped = [], {}
    for l in range(interval, len(layers) + 1, interval):  # 1-based, Algorithm 1 line 3
        name, layer = layers[l - 1]
        if l == len(layers):
            skipped[name] = f'last layer (l={l}) has no successor'
            continue
        prev_name, prev_layer = layers[l - 2]
        next_name, next_layer = layers[l]
        neighbours = ((prev_name, prev_layer), (next_name, next_layer))
        differing = [n for n, m in neighbours if _signature(m) != _signature(layer)]
        if differing:
            verb = 'differs' if len(differing) == 1 else 'differ'
            skipped[name] = f'neighbour {" and ".join(differing)} {verb} from it in class or parameter shapes'
            continue
        selected.append((name, layer, prev_layer, next_layer))
    if not selected:
        raise ValueError(
            f'interval={interval} selects no replaceable layer among the {len(layers)} '
            f'{"/".join(t.__name__ for t in layer_types)} layers of {type(model).__name__}'
            + ''.join(f'\n  {name}: {why}' for name, why in skipped.items()))

    for name, layer, prev_layer, next_layer in selected:
        tensors = list(layer.named_parameters())
        ref = tensors[0][1]
        mix = NeighbourMix(prev_layer, next_layer, init=init, dtype=ref.dtype, device=ref.device)
        for tensor_name, _ in tensors:
            owner, attr = _owner(layer, tensor_name)
            mixed = _MixedTensor(mix, _owner(prev_layer, tensor_name)[0], _owner(next_layer, tensor_name)[0], attr)
            parametrize.register_parametrization(owner, attr, mixed)
        layer.add_module(MIX_NAME, mix)

    report = replacement_report(model)
    report.params_before = params_before
    report.skipped = skipped
    report.num_layers = len(layers)
    report.interval = interval
    return report


def _replaced_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, MIX_NAME, None), NeighbourMix)]


def _mixed_tensors(layer: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(owner module, tensor name) of every mixed tensor of a replaced layer."""
    found = []
    for owner in layer.modules():
        if parametrize.is_parametrized(owner):
            found += [(owner, attr) for attr, plist in owner.parametrizations.items()
                      if isinstance(plist[0], _MixedTensor)]
    return found


@torch.no_grad()
def replacement_report(model: nn.Module) -> ReplacementReport:
    """Learnable parameters of a model in replacement-learning form, and of the same model trained normally."""
    replaced = _replaced_layers(model)
    if not replaced:
        raise ValueError('model is not in replacement-learning form (see replace_layers())')
    params_after = sum(p.numel() for p in model.parameters())
    freed = sum(getattr(owner, attr).numel() for _, layer in replaced for owner, attr in _mixed_tensors(layer))
    mix_params = sum(p.numel() for _, layer in replaced for p in getattr(layer, MIX_NAME).parameters())
    return ReplacementReport(
        params_before=params_after - mix_params + freed,
        params_after=params_after,
        replaced=[name for name, _ in replaced],
    )


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake every mix into plain weights (in place) and return the model.

    The result has exactly the parameters and ``state_dict`` keys of the original architecture (e.g. timm's
    ``vit_small_patch16_224``) and loads without this package; its outputs equal the replaced model's.
    """
    replaced = _replaced_layers(model)
    if not replaced:
        raise ValueError('model is not in replacement-learning form (see replace_layers())')
    # Every value first: a replaced layer's neighbours are never replaced, but be independent of the order.
    baked = [(owner, attr, getattr(owner, attr).clone())
             for _, layer in replaced for owner, attr in _mixed_tensors(layer)]
    for owner, attr, value in baked:
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
        delattr(owner, attr)  # whatever remove_parametrizations registered (a buffer when a/b need no grad)
        owner.register_parameter(attr, nn.Parameter(value))
    for _, layer in replaced:
        delattr(layer, MIX_NAME)
    # timm's record of the create_model kwargs (config.json of save_for_hf): the plain model takes no interval
    getattr(model, '_model_args', {}).pop('replace_interval', None)
    return model
