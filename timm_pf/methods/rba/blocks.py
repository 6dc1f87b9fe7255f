"""Blocks of a timm model for RBA: finding them, capturing their outputs, and replacing spans of them by
linear maps (:class:`LinearBlockApprox`), in place and in the form the ``rba`` architecture rebuilds.

See :mod:`timm_pf.methods.rba` for the method ("Detecting and Approximating Redundant Computational Blocks
in Neural Networks", Sec. 3).
"""
from collections import OrderedDict
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'RbaError', 'BlockRef', 'LinearBlockApprox', 'Batches', 'SpanArg', 'find_blocks', 'collect_block_outputs',
    'skip_spans', 'install_spans',
]

_LAYOUTS = ('NLC', 'NCHW', 'NHWC', 'NC')
# pretrained_cfg keys that point at weights: the base model's weights are not the approximated model's
_WEIGHT_SOURCE_KEYS = ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'source', 'state_dict', 'tag', 'custom_load')

Batches = Iterable[Union[torch.Tensor, Sequence[torch.Tensor]]]
SpanArg = Tuple[Union[int, str], Union[int, str]]


class RbaError(ValueError):
    """A model, span or option that RBA cannot handle (the message says which and why)."""


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__



# ---------------------------------------------------------------------------------------------------
# Finding blocks
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockRef:
    """One block of the trunk: its module path, the ``nn.Sequential`` holding it, its position there and
    the channel count feature_info declares for that sequence (tells NHWC from NCHW block outputs)."""
    name: str
    segment: str
    position: int
    channels: Optional[int] = None


def _block_container(model: nn.Module, module_name: str) -> List[str]:
    """The ``nn.Sequential`` paths that hold the blocks behind one feature_info module."""
    module = model.get_submodule(module_name)
    parent_name = module_name.rpartition('.')[0]
    parent = model.get_submodule(parent_name) if '.' in module_name else None
    if isinstance(module, nn.Sequential):
        if isinstance(parent, nn.Sequential) and all(isinstance(m, nn.Sequential) for m in parent):
            # a sequence of stages (EfficientNet/GhostNet style): feature_info lists only some of them
            return [f'{parent_name}.{i}' for i in range(len(parent))]
        return [module_name]
    if isinstance(getattr(module, 'blocks', None), nn.Sequential):
        return [f'{module_name}.blocks']
    if isinstance(parent, nn.Sequential):
        return [parent_name]
    return []


def find_blocks(model: nn.Module) -> List[BlockRef]:
    """The blocks RBA can measure and replace, in forward order (see the module docstring)."""
    feature_info = getattr(model, 'feature_info', None)
    if not feature_info:
        raise RbaError(
            f'{_model_name(model)} has no feature_info: RBA finds the trunk blocks through the feature modules '
            f'that timm models declare, and this model declares none.')
    segments: Dict[str, Optional[int]] = OrderedDict()
    for info in feature_info:
        for seg in _block_container(model, info['module']):
            segments.setdefault(seg, info.get('num_chs'))
    blocks = [BlockRef(f'{seg}.{i}', seg, i, chs) for seg, chs in segments.items()
              for i in range(len(model.get_submodule(seg)))]
    if segments and not any(len(model.get_submodule(seg)) > 1 for seg in segments):
        raise RbaError(
            f'{_model_name(model)} has one block per nn.Sequential ({", ".join(segments)}): a span replaces the '
            f'blocks between two blocks of one nn.Sequential, so it needs at least two there')
    if not segments:
        modules = [info['module'] for info in feature_info]
        parents = {type(model.get_submodule(m.rpartition('.')[0])).__name__ for m in modules if '.' in m}
        held = (f' (they sit in {", ".join(sorted(parents))}, which may pass extra arguments to each block)'
                if parents else '')
        raise RbaError(
            f'{_model_name(model)} has no nn.Sequential of at least two blocks behind its feature modules '
            f'{modules[0]}..{modules[-1]}{held}; RBA replaces blocks inside an nn.Sequential, where each block maps '
            f'one tensor to one tensor.')
    return blocks


def _resolve_block(blocks: List[BlockRef], key: Union[int, str]) -> int:
    if isinstance(key, str) and key.lstrip('-').isdigit():
        key = int(key)
    if isinstance(key, int):
        if not -len(blocks) <= key < len(blocks):
            raise RbaError(f'block index {key} out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})')
        return key % len(blocks)
    names = [b.name for b in blocks]
    if key not in names:
        raise RbaError(f'unknown block {key!r}; blocks are {", ".join(names)}')
    return names.index(key)


def _resolve_span(blocks: List[BlockRef], span: SpanArg) -> Tuple[int, int]:
    if isinstance(span, str) or not isinstance(span, Sequence) or len(span) != 2:
        raise RbaError(f'a span is a (source, target) pair of blocks, got {span!r} (spans are a list of them, '
                       f'e.g. [(1, 3)])')
    start, end = (_resolve_block(blocks, k) for k in span)
    if end <= start:
        raise RbaError(f'span {blocks[start].name} -> {blocks[end].name}: the target block must come after the source')
    if blocks[start].segment != blocks[end].segment:
        raise RbaError(
            f'span {blocks[start].name} -> {blocks[end].name} crosses from {blocks[start].segment} into '
            f'{blocks[end].segment}: only blocks inside one nn.Sequential can be replaced (between them the '
            f'model changes resolution or width)')
    return start, end


# ---------------------------------------------------------------------------------------------------
# Capturing block outputs
# ---------------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


def _layout(model: nn.Module, ref: BlockRef, t: torch.Tensor) -> str:
    if t.ndim == 3:
        return 'NLC'
    if t.ndim == 4:
        # timm's convention is NCHW; models declare NHWC outputs (Swin), or their blocks run on NHWC grids
        # (our max-pool ViTs): then the last dim, not dim 1, holds the channels feature_info declares
        if getattr(model, 'output_fmt', None) == 'NHWC' or t.shape[1] != ref.channels == t.shape[-1]:
            return 'NHWC'
        return 'NCHW'
    if t.ndim == 2:
        return 'NC'
    raise RbaError(f'unsupported block output of shape {tuple(t.shape)}')


def _to_tokens(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, D) rows of D features: tokens, or pixels of a feature map."""
    if layout == 'NLC':
        return t
    if layout == 'NCHW':
        return t.flatten(2).transpose(1, 2)
    if layout == 'NHWC':
        return t.flatten(1, 2)
    return t.unsqueeze(1)


def _split_batch(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], (batch[1] if len(batch) > 1 else None)


def _device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


def _iter_images(batches: Batches, max_images: Optional[int]):
    """Yield (x, y) batches, truncated to ``max_images`` images in total; each x must be finite."""
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise RbaError(f'max_images must be None or a whole number >= 1, got {max_images!r}')
    if isinstance(batches, torch.Tensor):
        raise RbaError('batches are an iterable of batches (a DataLoader, or a list such as [images]), not one tensor')
    seen = 0
    for batch in batches:
        x, y = _split_batch(batch)
        if not isinstance(x, torch.Tensor):
            raise RbaError(f'a batch is images or (images, labels), got {type(x).__name__}')
        if not torch.isfinite(x).all():
            raise RbaError(f'a batch of images holds NaN or Inf (images {seen}..{seen + len(x) - 1})')
        if max_images is not None:
            x = x[:max_images - seen]
            y = None if y is None else y[:max_images - seen]
        if len(x) == 0:
            break
        seen += len(x)
        yield x, y
        if max_images is not None and seen >= max_images:
            break


class _BlockCapture:
    """Forward hooks that keep the outputs of some blocks and stop the forward after the last one."""

    def __init__(self, model: nn.Module, blocks: List[BlockRef], wanted: Sequence[int]):
        self.model = model
        self.names = [blocks[i].name for i in sorted(set(wanted))]
        self.outputs: Dict[str, torch.Tensor] = {}
        self.handles = []

    def _hook(self, name: str, last: bool):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise RbaError(
                    f'block {name} of {_model_name(self.model)} returns {type(output).__name__}, '
                    f'RBA needs blocks that map one tensor to one tensor')
            if name in self.outputs:
                raise RbaError(
                    f'block {name} runs more than once per forward (shared weights?): its output is ambiguous')
            self.outputs[name] = output.detach()
            if last:
                raise _StopForward
        return hook

    def __enter__(self):
        for name in self.names:
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name, name == self.names[-1])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def run(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.outputs = {}
        try:
            self.model.forward_features(x)
        except _StopForward:
            pass
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RbaError(f'blocks {", ".join(missing)} of {_model_name(self.model)} did not run in forward_features')
        return self.outputs


@torch.no_grad()
def collect_block_outputs(
        model: nn.Module,
        x: torch.Tensor,
        blocks: Optional[Sequence[Union[int, str]]] = None,
) -> Dict[str, torch.Tensor]:
    """Outputs of ``blocks`` (indices or names; default all) for one input batch, keyed by block name."""
    refs = find_blocks(model)
    wanted = range(len(refs)) if blocks is None else [_resolve_block(refs, b) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        with _BlockCapture(model, refs, wanted) as capture:
            return capture.run(x)
    finally:
        model.train(was_training)



# ---------------------------------------------------------------------------------------------------
# The linear replacement and its closed-form fit
# ---------------------------------------------------------------------------------------------------
class LinearBlockApprox(nn.Module):
    """``y = W x (+ b)`` over the feature dim of a block output, replacing a span of blocks (RBA, Sec. 3).

    One ``dim x dim`` map shared by all tokens (as in the paper), or one per token position
    (``num_tokens``). ``layout`` is the block output format (NLC tokens, NCHW/NHWC feature maps, NC);
    on NCHW maps the shared map runs as a 1x1 convolution. Initialised to the identity, i.e. skipping
    the span, until fitted weights are loaded.
    """

    def __init__(self, dim: int, layout: str = 'NLC', bias: bool = False, num_tokens: Optional[int] = None):
        super().__init__()
        if layout not in _LAYOUTS:
            raise RbaError(f'unknown layout {layout!r}; one of {", ".join(_LAYOUTS)}')
        self.dim = dim
        self.layout = layout
        self.num_tokens = num_tokens
        eye = torch.eye(dim)
        self.weight = nn.Parameter(eye if num_tokens is None else eye.repeat(num_tokens, 1, 1))
        self.bias = nn.Parameter(torch.zeros(dim if num_tokens is None else (num_tokens, dim))) if bias else None

    def extra_repr(self) -> str:
        per_token = f', num_tokens={self.num_tokens}' if self.num_tokens else ''
        return f'dim={self.dim}, layout={self.layout}, bias={self.bias is not None}{per_token}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_tokens is None:
            if self.layout == 'NCHW':
                return F.conv2d(x, self.weight[:, :, None, None], self.bias)
            return F.linear(x, self.weight, self.bias)
        tokens = _to_tokens(x, self.layout)
        if tokens.shape[1] != self.num_tokens:
            raise RuntimeError(
                f'this per-token map was fitted for {self.num_tokens} tokens, the input has {tokens.shape[1]} '
                f'(a different image size?)')
        y = torch.einsum('bnd,ned->bne', tokens, self.weight)
        if self.bias is not None:
            y = y + self.bias
        if self.layout == 'NLC':
            return y
        if self.layout == 'NCHW':
            return y.transpose(1, 2).reshape(x.shape)
        if self.layout == 'NHWC':
            return y.reshape(x.shape)
        return y.squeeze(1)


# ---------------------------------------------------------------------------------------------------
# Building the approximated model (and rebuilding it from its config)
# ---------------------------------------------------------------------------------------------------

def _span_spec(blocks: List[BlockRef], i: int, j: int, module: LinearBlockApprox) -> Dict[str, Any]:
    return dict(source=blocks[i].name, target=blocks[j].name, dim=module.dim, layout=module.layout,
                bias=module.bias is not None, num_tokens=module.num_tokens)


def _install(model: nn.Module, spec: Dict[str, Any], module: nn.Module) -> None:
    """Blocks after ``source`` up to ``target``: identities, and ``module`` at ``target``'s position, so
    block indices (and checkpoint keys, forward_intermediates indices) of the other blocks stay the same."""
    blocks = find_blocks(model)
    i, j = _resolve_span(blocks, (spec['source'], spec['target']))
    container = model.get_submodule(blocks[j].segment)
    for pos in range(blocks[i].position + 1, blocks[j].position):
        container[pos] = nn.Identity()
    container[blocks[j].position] = module


def _base_model_args(model: nn.Module) -> Dict[str, Any]:
    """How to rebuild the model's architecture with ``timm.create_model``."""
    args = dict(getattr(model, '_model_args', None) or {})
    if 'base_model' in args:  # already approximated: keep its base and spans
        return args
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if not arch or not hasattr(model, '_model_args'):
        return {}
    args['base_model'] = arch
    args['spans'] = []
    return args


def _mark_approximated(model: nn.Module, base_args: Dict[str, Any], new_specs: List[Dict[str, Any]]) -> None:
    if base_args:
        model._model_args = dict(base_args, spans=list(base_args.get('spans', [])) + new_specs)
    cfg = {k: v for k, v in (getattr(model, 'pretrained_cfg', None) or {}).items() if k not in _WEIGHT_SOURCE_KEYS}
    cfg['architecture'] = 'rba'
    model.pretrained_cfg = model.default_cfg = cfg
    model.rba_spans = list(getattr(model, 'rba_spans', [])) + new_specs

def skip_spans(model: nn.Module, spans: Sequence[SpanArg], inplace: bool = False) -> nn.Module:
    """The "skip" baseline of the paper (Table 2): the spans' blocks removed, with no map (identity)."""
    blocks = find_blocks(model)
    out = model if inplace else deepcopy(model)
    for span in spans:
        i, j = _resolve_span(blocks, span)
        spec = dict(source=blocks[i].name, target=blocks[j].name)
        _install(out, spec, nn.Identity())
    return out


def _complete_spans(model: nn.Module, spans: Sequence[Union[Dict[str, Any], SpanArg]]) -> List[Dict[str, Any]]:
    """Span records with block names, map width and layout; a bare (source, target) is completed by
    running one blank image through the base model."""
    from timm.data.model_config import resolve_input_data_config
    blocks = find_blocks(model)
    specs = []
    for span in spans:
        spec = dict(span) if isinstance(span, dict) else dict(source=span[0], target=span[1])
        i, j = _resolve_span(blocks, (spec['source'], spec['target']))
        spec.update(source=blocks[i].name, target=blocks[j].name)
        if 'dim' not in spec or 'layout' not in spec:
            blank = torch.zeros(1, *resolve_input_data_config(model)['input_size'])
            out = collect_block_outputs(model, blank, [j])[blocks[j].name]
            spec['layout'] = _layout(model, blocks[j], out)
            spec['dim'] = _to_tokens(out, spec['layout']).shape[-1]
        spec.setdefault('bias', False)
        spec.setdefault('num_tokens', None)
        specs.append(spec)
    return specs



def install_spans(model: nn.Module, base_model: str, spans: Sequence[Union[Dict[str, Any], SpanArg]]) -> None:
    """Rebuild an approximated architecture in place: ``model`` is ``base_model`` fresh from
    ``timm.create_model``, ``spans`` the records ``approximate`` writes (or bare pairs); the maps start as
    identities until weights are loaded."""
    base_args = dict(model._model_args, base_model=base_model, spans=[])
    specs = _complete_spans(model, spans)
    for spec in specs:
        _install(model, spec, LinearBlockApprox(spec['dim'], spec['layout'], spec['bias'], spec['num_tokens']))
    _mark_approximated(model, base_args, specs)
