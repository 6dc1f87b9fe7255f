"""RBA: the closed-form least-squares fit of a linear map per span (Sec. 3), the approximated model, and
its saved form (timm's Hub layout, rebuilt by the ``rba`` architecture of :mod:`timm_pf.models.rba`)."""
import math
from copy import deepcopy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import timm
from timm.models import save_for_hf

from .blocks import (
    Batches, LinearBlockApprox, RbaError, SpanArg, _BlockCapture, _base_model_args, _device, _install, _iter_images,
    _layout, _mark_approximated, _resolve_span, _span_spec, _to_tokens, find_blocks,
)

__all__ = ['fit_spans', 'approximate', 'save_rba', 'load_rba']

class _FitStats:
    """Running X^T X and X^T Y (float64) for one span; X gets a column of ones when fitting a bias."""

    def __init__(self, bias: bool, per_token: bool):
        self.bias = bias
        self.per_token = per_token
        self.xtx = self.xty = None
        self.rows = 0

    def update(self, x: torch.Tensor, y: torch.Tensor):
        """x, y: (B, N, D) source and target rows."""
        x, y = x.double(), y.double()
        if self.bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        if self.per_token:
            xt, yt = x.transpose(0, 1), y.transpose(0, 1)  # (N, B, D)
            xtx, xty = xt.transpose(1, 2) @ xt, xt.transpose(1, 2) @ yt
        else:
            xf, yf = x.flatten(0, 1), y.flatten(0, 1)
            xtx, xty = xf.T @ xf, xf.T @ yf
        if self.xtx is None:
            self.xtx, self.xty = xtx, xty
        else:
            self.xtx += xtx
            self.xty += xty
        self.rows += x.shape[0] * (1 if self.per_token else x.shape[1])

    def solve(self, ridge: float = 0.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight (out, in) or (N, out, in), bias) minimising ||Y - X W^T - b||^2 + ridge * mean(diag(X^T X)) ||W||^2.

        The ridge strength is relative to the mean feature energy, so one value means the same on any model.
        """
        xtx, xty = self.xtx.cpu(), self.xty.cpu()
        if not (torch.isfinite(xtx).all() and torch.isfinite(xty).all()):
            raise RbaError('the block outputs hold NaN or Inf (or overflow float64 sums): no map can be fitted')
        d = xty.shape[-1]
        if ridge:
            diag = xtx.diagonal(dim1=-2, dim2=-1)[..., :d]
            reg = ridge * diag.mean(-1, keepdim=True)  # (..., 1)
            xtx = xtx.clone()
            xtx.diagonal(dim1=-2, dim2=-1)[..., :d] += reg
        solution = torch.linalg.lstsq(xtx, xty, driver='gelsd').solution  # (..., D(+1), D)
        weight = solution[..., :d, :].transpose(-1, -2).contiguous()
        bias = solution[..., d, :].contiguous() if self.bias else None
        return weight, bias


def fit_spans(
        model: nn.Module,
        spans: Sequence[SpanArg],
        batches: Batches,
        bias: bool = False,
        ridge: float = 0.0,
        per_token: bool = False,
        max_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> List[LinearBlockApprox]:
    """Fit one linear map per span (source block i, target block j) in one pass over ``batches``.

    All maps are fitted on the original model's representations (the paper's protocol), so spans must not
    overlap, nor overlap the spans an approximated ``model`` already replaces. Returns modules in the model's
    floating-point dtype with weights solved in float64.
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf:
        raise RbaError(f'ridge must be a finite number >= 0, got {ridge!r}')
    blocks = find_blocks(model)
    resolved = [_resolve_span(blocks, s) for s in spans]
    if not resolved:
        raise RbaError('no span to fit')
    replaced = [_resolve_span(blocks, (spec['source'], spec['target'])) for spec in getattr(model, 'rba_spans', [])]
    for a, (i, j) in enumerate(resolved):
        for k, l in resolved[a + 1:] + replaced:
            if max(i, k) < min(j, l):  # the replaced blocks i+1..j and k+1..l intersect
                already = ' (already replaced in this model)' if (k, l) in replaced else ''
                raise RbaError(
                    f'spans {blocks[i].name} -> {blocks[j].name} and {blocks[k].name} -> {blocks[l].name}{already} '
                    f'overlap: each map is fitted on the original model, so spans may share an end block but not '
                    f'replace the same blocks')
    dev = _device(model, device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    stats = [_FitStats(bias, per_token) for _ in resolved]
    layouts: Dict[int, str] = {}
    was_training = model.training
    model.eval()
    num_images = 0
    try:
        with torch.no_grad(), _BlockCapture(model, blocks, [k for s in resolved for k in s]) as capture:
            for x, _ in _iter_images(batches, max_images):
                outputs = capture.run(x.to(dev))
                for (i, j), st in zip(resolved, stats):
                    src, tgt = outputs[blocks[i].name], outputs[blocks[j].name]
                    if src.shape != tgt.shape:
                        raise RbaError(
                            f'span {blocks[i].name} -> {blocks[j].name}: outputs have shapes {tuple(src.shape[1:])} '
                            f'and {tuple(tgt.shape[1:])}; a D x D map needs equal shapes')
                    layouts[j] = _layout(model, blocks[j], src)
                    st.update(_to_tokens(src, layouts[j]), _to_tokens(tgt, layouts[j]))
                num_images += len(x)
    finally:
        model.train(was_training)
    if not num_images:
        raise RbaError('no images to fit on: the data loader is empty')
    modules = []
    for (i, j), st in zip(resolved, stats):
        weight, b = st.solve(ridge)
        dim = weight.shape[-1]
        num_tokens = weight.shape[0] if per_token else None
        module = LinearBlockApprox(dim, layouts[j], bias=bias, num_tokens=num_tokens).to(dev, dtype)
        with torch.no_grad():  # the float64 solution cast once, to the model's dtype
            module.weight.copy_(weight)
            if b is not None:
                module.bias.copy_(b)
        modules.append(module)
    return modules


def approximate(
        model: nn.Module,
        spans: Sequence[SpanArg],
        batches: Batches,
        bias: bool = False,
        ridge: float = 0.0,
        per_token: bool = False,
        max_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        inplace: bool = False,
) -> nn.Module:
    """RBA: a copy of ``model`` with the blocks after each span's source up to its target replaced by
    the fitted linear map (forward, forward_features, forward_intermediates, reset_classifier keep working).

    If ``model`` was made by ``timm.create_model``, the result records ``base_model`` and ``spans`` as its
    model args, so ``save_rba``/timm's ``save_for_hf``/``push_to_hf_hub`` write a config.json from which
    ``timm.create_model('local-dir:...')`` or ``'hf-hub:...'`` rebuilds it (architecture ``'rba'``).
    """
    modules = fit_spans(model, spans, batches, bias, ridge, per_token, max_images, device)
    blocks = find_blocks(model)
    specs = [_span_spec(blocks, *_resolve_span(blocks, s), m) for s, m in zip(spans, modules)]
    base_args = _base_model_args(model)
    out = model if inplace else deepcopy(model)
    for spec, module in zip(specs, modules):
        _install(out, spec, module)
    _mark_approximated(out, base_args, specs)
    return out

def save_rba(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` in timm's Hub format (``timm.models.save_for_hf``).

    ``timm.create_model('local-dir:<directory>')`` (after ``import timm_pf``) rebuilds the model.
    """
    args = getattr(model, '_model_args', None) or {}
    if 'base_model' not in args:
        raise RbaError(
            'cannot save: this model does not record how to rebuild it. Approximate a model made by '
            'timm.create_model (which records its architecture and arguments).')
    directory = Path(directory)
    save_for_hf(model, directory, safe_serialization=True)
    return directory


def load_rba(directory: Union[str, Path], **kwargs) -> nn.Module:
    """Load a model saved by ``save_rba`` (same as ``timm.create_model('local-dir:<dir>', pretrained=True)``)."""
    directory = Path(directory)
    if not (directory / 'config.json').is_file():
        raise RbaError(f'{directory} has no config.json: not a saved model folder')
    return timm.create_model(f'local-dir:{directory}', pretrained=True, **kwargs)
