"""Block Redundancy (BR) and Redundant Blocks Approximation (RBA) for timm models.

From "Detecting and Approximating Redundant Computational Blocks in Neural Networks" (ICLR 2025
submission; also "Foundation Models on a Budget: Approximating Blocks in Large Vision Models"):

* **Block Redundancy** of blocks ``i`` and ``j`` is the negative mean squared error between the
  representations the model produces after block ``i`` and after block ``j`` on a data subset (Sec. 3).
* **RBA** replaces blocks ``i+1 .. j`` by one linear map ``T`` fitted in closed form (least squares)
  from block ``i``'s output to block ``j``'s output, with no training (Sec. 3). As in the authors'
  code, one shared ``D x D`` matrix without bias is fitted on all tokens of all images; bias, ridge
  regularisation and one map per token position are options.

Blocks are found through timm's ``feature_info``: every feature module that is, holds (``.blocks``) or
sits in an ``nn.Sequential`` of blocks contributes that sequence (ViT/DeiT ``blocks``, PiT
``transformers.k.blocks``, ResNet ``layer1..4``, ConvNeXt/Swin ``stages.k.blocks``, and our max-pool ViT/PiT,
whose blocks run on NHWC grids). Each block's output
is captured with a forward hook while ``forward_features`` runs, stopping after the last block needed:
``forward_intermediates`` returns one tensor per *stage* on hierarchical models (ResNet, PiT), not per
block, and on ViTs the hooked outputs equal its per-block outputs (``norm=False``).

Every token (or pixel, for convolutional feature maps) is one row ``x`` of ``D`` features. Everything is
computed from running sums over a data loader, so memory does not grow with the number of images:

* BR and cosine: per block pair, sums of ``||x_i - x_j||^2`` and of ``cos(x_i, x_j)`` over rows (exact).
* linear CKA (Kornblith et al., 2019) over rows needs the centred cross-covariances ``X_i^T X_j``: one
  ``(kD) x (kD)`` float64 Gram matrix of the ``k`` same-shaped blocks stacked, plus column sums
  (exact; ``8 (kD)^2`` bytes: 170 MB for ViT-S, 680 MB for ViT-B; leave ``cka``/``linear_r2`` out of
  ``metrics`` to skip it).
* ``linear_r2``: the R^2 of the least-squares map from block ``i`` to block ``j`` on the analysis data,
  i.e. how well RBA itself would fit there, from the same Gram matrix. Unlike BR it is invariant to
  invertible linear changes of the representation, the weakness of BR the reviewers pointed out.
* The RBA fit accumulates ``X^T X`` and ``X^T Y`` in float64 and solves on the CPU in float64
  (SVD-based least squares, minimum-norm if ``X^T X`` is singular).
"""
import json
import math
from collections import OrderedDict
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import timm
from timm.models import load_pretrained, register_model, save_for_hf

__all__ = [
    'RbaError', 'BlockRef', 'LinearBlockApprox', 'RedundancyReport', 'METRICS', 'METRIC_TITLES',
    'find_blocks', 'collect_block_outputs', 'analyze', 'fit_spans', 'approximate', 'skip_spans',
    'save_rba', 'load_rba', 'extract_features', 'train_linear_probe', 'accuracy', 'evaluate_models',
]

METRICS = ('br', 'cosine', 'cka', 'linear_r2')
METRIC_TITLES = {
    'br': 'BR = -MSE',
    'cosine': 'cosine similarity',
    'cka': 'linear CKA',
    'linear_r2': 'R$^2$ of least-squares map i$\\to$j',
}
_GRAM_METRICS = ('cka', 'linear_r2')
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
    if not any(len(model.get_submodule(seg)) > 1 for seg in segments):
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
    if len(span) != 2:
        raise RbaError(f'a span is (source, target) blocks, got {span!r}')
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
    """Yield (x, y) batches, truncated to ``max_images`` images in total."""
    seen = 0
    for batch in batches:
        x, y = _split_batch(batch)
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
# Analysis: BR, cosine, linear CKA and least-squares R^2 for every pair of blocks
# ---------------------------------------------------------------------------------------------------

class _GroupStats:
    """Running sums for k blocks whose outputs have the same shape."""

    def __init__(self, members: List[int], dim: int, gram: bool):
        self.members = members
        self.dim = dim
        k = len(members)
        self.rows = 0
        self.sq_diff = torch.zeros(k, k, dtype=torch.float64)
        self.cos = torch.zeros(k, k, dtype=torch.float64)
        self.gram = torch.zeros(k * dim, k * dim, dtype=torch.float64) if gram else None
        self.col_sum = torch.zeros(k * dim, dtype=torch.float64) if gram else None

    def update(self, z: torch.Tensor):
        """z: (rows, k, D) outputs of the group's blocks."""
        dev = z.device
        for name in ('sq_diff', 'cos', 'gram', 'col_sum'):
            t = getattr(self, name)
            if t is not None and t.device != dev:
                setattr(self, name, t.to(dev))
        k = z.shape[1]
        self.rows += z.shape[0]
        zf = z.float()
        unit = F.normalize(zf, dim=-1)
        for a in range(k - 1):
            diff = zf[:, a + 1:] - zf[:, a:a + 1]
            s = diff.square().sum(dim=(0, 2), dtype=torch.float64)
            self.sq_diff[a, a + 1:] += s
            self.sq_diff[a + 1:, a] += s
        self.cos += torch.einsum('rad,rbd->ab', unit, unit).double()
        if self.gram is not None:
            flat = z.reshape(z.shape[0], -1).double()
            self.gram += flat.T @ flat
            self.col_sum += flat.sum(0)

    def metrics(self, wanted: Sequence[str]) -> Dict[str, torch.Tensor]:
        k, d, n = len(self.members), self.dim, max(self.rows, 1)
        out = {}
        if 'br' in wanted:
            out['br'] = -self.sq_diff.cpu() / (n * d)
        if 'cosine' in wanted:
            out['cosine'] = self.cos.cpu() / n
        if self.gram is None:
            return out
        gram, col_sum = self.gram.cpu(), self.col_sum.cpu()
        centred = gram - torch.outer(col_sum, col_sum) / n

        def blk(m, a, b):
            return m[a * d:(a + 1) * d, b * d:(b + 1) * d]

        if 'cka' in wanted:
            norms = torch.stack([blk(centred, a, a).norm() for a in range(k)])
            cka = torch.empty(k, k, dtype=torch.float64)
            for a in range(k):
                for b in range(k):
                    cka[a, b] = blk(centred, a, b).square().sum() / (norms[a] * norms[b]).clamp_min(1e-300)
            out['cka'] = cka
        if 'linear_r2' in wanted:
            r2 = torch.full((k, k), float('nan'), dtype=torch.float64)
            for a in range(k - 1):
                # Y ~ X B with B = (X^T X)^+ X^T Y: explained energy ||Lambda^-1/2 V^T X^T Y||^2
                evals, evecs = torch.linalg.eigh(blk(gram, a, a))
                keep = evals > evals[-1].clamp_min(1e-300) * d * torch.finfo(torch.float64).eps
                scale = evecs[:, keep] / evals[keep].sqrt()
                for b in range(a + 1, k):
                    explained = (scale.T @ blk(gram, a, b)).square().sum()
                    sse = (blk(gram, b, b).trace() - explained).clamp_min(0)
                    r2[a, b] = 1 - sse / blk(centred, b, b).trace().clamp_min(1e-300)
            out['linear_r2'] = r2
        return out


@dataclass
class RedundancyReport:
    """Pairwise block similarities of one model; ``metrics[m][i][j]`` is NaN where undefined."""
    model_name: str
    block_names: List[str]
    segments: List[str]
    block_params: List[int]
    block_dims: List[int]
    num_images: int
    metrics: Dict[str, List[List[float]]]
    notes: Dict[str, Any] = field(default_factory=dict)

    def spans(self, rank_by: str = 'br', max_blocks: Optional[int] = None) -> List[Dict[str, Any]]:
        """Replaceable spans (source, target) ranked by a metric, most redundant first.

        ``params_removed`` is the net saving of a shared ``D x D`` map without bias.
        """
        if rank_by not in self.metrics:
            raise RbaError(f'cannot rank by {rank_by!r}: this report has {", ".join(self.metrics)}')
        rows = []
        for i in range(len(self.block_names)):
            for j in range(i + 1, len(self.block_names)):
                if self.segments[i] != self.segments[j] or (max_blocks and j - i > max_blocks):
                    continue
                values = {m: self.metrics[m][i][j] for m in self.metrics}
                if math.isnan(values[rank_by]):
                    continue
                rows.append(dict(
                    source=self.block_names[i], target=self.block_names[j], source_index=i, target_index=j,
                    num_blocks=j - i, **values,
                    params_removed=sum(self.block_params[i + 1:j + 1]) - self.block_dims[j] ** 2,
                ))
        return sorted(rows, key=lambda r: r[rank_by], reverse=True)

    def table(self, rank_by: str = 'br', top: Optional[int] = None, max_blocks: Optional[int] = None) -> str:
        """Markdown table of the ranked spans."""
        rows = self.spans(rank_by, max_blocks)[:top]
        head = ['rank', 'span (i -> j)', 'blocks replaced', *self.metrics, 'params removed']
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for rank, r in enumerate(rows, 1):
            replaced = self.block_names[r['source_index'] + 1:r['target_index'] + 1]
            replaced_cell = f'{replaced[0]}..{replaced[-1]} ({len(replaced)})' if len(replaced) > 1 else replaced[0]
            cells = [str(rank), f"{r['source']} -> {r['target']}", replaced_cell,
                     *(f'{r[m]:.4g}' for m in self.metrics), f"{r['params_removed']:,}"]
            lines.append('| ' + ' | '.join(cells) + ' |')
        return '\n'.join(lines)

    def to_json(self, path: Union[str, Path]) -> None:
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v
        data = asdict(self)
        data['metrics'] = {m: [[clean(v) for v in row] for row in mat] for m, mat in self.metrics.items()}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> 'RedundancyReport':
        data = json.loads(Path(path).read_text())
        data['metrics'] = {m: [[float('nan') if v is None else v for v in row] for row in mat]
                           for m, mat in data['metrics'].items()}
        return cls(**data)

    def plot(self, path: Union[str, Path], metrics: Optional[Sequence[str]] = None, dpi: int = 100) -> Path:
        """Heatmaps of the metrics side by side (needs matplotlib: ``pip install timm-pf[plot]``)."""
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError('the heatmap needs matplotlib: pip install "timm-pf[plot]"') from e
        import numpy as np
        metrics = list(metrics or self.metrics)
        n = len(self.block_names)
        segments = list(dict.fromkeys(self.segments))
        single_segment = len(segments) == 1
        # one stage: block index; several: stage.position (stages numbered in forward order)
        labels = [str(i) if single_segment else f'{segments.index(seg)}.{name.rpartition(".")[2]}'
                  for i, (seg, name) in enumerate(zip(self.segments, self.block_names))]
        side = 4.2 + max(0, n - 12) * 0.2
        fig, axes = plt.subplots(1, len(metrics), figsize=(side * len(metrics), side), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            mat = np.array(self.metrics[m], dtype=float)
            cmap = plt.get_cmap('viridis').with_extremes(bad='#dddddd')
            im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, interpolation='nearest')
            ax.set_title(METRIC_TITLES.get(m, m), fontsize=10)
            ticks = range(n)
            ax.set_xticks(ticks, labels, rotation=90 if not single_segment else 0, fontsize=7)
            ax.set_yticks(ticks, labels, fontsize=7)
            ax.set_xlabel(f'block j ({segments[0]}.j)' if single_segment else 'block j (stage.block)', fontsize=8)
            ax.set_ylabel('block i', fontsize=8)
            if n <= 10:
                finite = mat[np.isfinite(mat)]
                mid = (finite.max() + finite.min()) / 2 if finite.size else 0
                for i in range(n):
                    for j in range(n):
                        if np.isfinite(mat[i, j]):
                            ax.text(j, i, f'{mat[i, j] + 0.0:.2g}', ha='center', va='center', fontsize=5.5 if n <= 8 else 4.5,
                                    color='black' if mat[i, j] > mid else 'white')
            bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            bar.formatter.set_useOffset(False)
            bar.update_ticks()
        title = f'{self.model_name}: block similarities over {self.num_images} images (higher = more redundant)'
        if not single_segment:
            title += '\nstages: ' + ', '.join(f'{k} = {seg}' for k, seg in enumerate(segments))
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path


@torch.no_grad()
def analyze(
        model: nn.Module,
        batches: Batches,
        metrics: Sequence[str] = METRICS,
        max_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> RedundancyReport:
    """BR (and cosine, linear CKA, least-squares R^2) between the outputs of every pair of blocks.

    ``batches`` yields images or (images, labels) batches, e.g. a DataLoader; only running sums are
    kept (see the module docstring). Pairs of blocks with differently shaped outputs get NaN.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise RbaError(f'unknown metrics {sorted(unknown)}; choose from {", ".join(METRICS)}')
    blocks = find_blocks(model)
    dev = _device(model, device)
    was_training = model.training
    model.eval()
    groups: Dict[Tuple[int, ...], _GroupStats] = OrderedDict()
    layouts: List[str] = []
    num_images = 0
    try:
        with _BlockCapture(model, blocks, range(len(blocks))) as capture:
            for x, _ in _iter_images(batches, max_images):
                outputs = capture.run(x.to(dev))
                layouts = [_layout(model, ref, outputs[ref.name]) for ref in blocks]
                tokens = [_to_tokens(outputs[ref.name], lay) for ref, lay in zip(blocks, layouts)]
                if not groups:
                    shapes: Dict[Tuple[int, ...], List[int]] = OrderedDict()
                    for i, t in enumerate(tokens):
                        shapes.setdefault(tuple(t.shape[1:]), []).append(i)
                    want_gram = any(m in metrics for m in _GRAM_METRICS)
                    groups = OrderedDict((s, _GroupStats(members, s[-1], want_gram)) for s, members in shapes.items())
                for shape, group in groups.items():
                    z = torch.stack([tokens[i] for i in group.members], dim=2)  # (B, N, k, D)
                    if tuple(z.shape[1:2]) + tuple(z.shape[3:]) != shape:
                        raise RbaError(f'block outputs changed shape between batches ({shape} vs {tuple(z.shape)}): '
                                       f'use images of one size')
                    group.update(z.flatten(0, 1))
                num_images += len(x)
    finally:
        model.train(was_training)
    if not num_images:
        raise RbaError('no images to analyse: the data loader is empty')

    n = len(blocks)
    mats = {m: [[float('nan')] * n for _ in range(n)] for m in metrics}
    dims = [0] * n
    for group in groups.values():
        values = group.metrics(metrics)
        for a, i in enumerate(group.members):
            dims[i] = group.dim
            for b, j in enumerate(group.members):
                for m in metrics:
                    mats[m][i][j] = float(values[m][a, b])
    block_params = [sum(p.numel() for p in model.get_submodule(b.name).parameters()) for b in blocks]
    return RedundancyReport(
        model_name=_model_name(model),
        block_names=[b.name for b in blocks],
        segments=[b.segment for b in blocks],
        block_params=block_params,
        block_dims=dims,
        num_images=num_images,
        metrics={m: mats[m] for m in metrics},
        notes=dict(rows='every token (or feature-map pixel) of every image', layouts=sorted(set(layouts))),
    )


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
    overlap. Returns float32 modules with weights solved in float64.
    """
    blocks = find_blocks(model)
    resolved = [_resolve_span(blocks, s) for s in spans]
    if not resolved:
        raise RbaError('no span to fit')
    for a, (i, j) in enumerate(resolved):
        for k, l in resolved[a + 1:]:
            if max(i, k) < min(j, l):  # the replaced blocks i+1..j and k+1..l intersect
                raise RbaError(
                    f'spans {blocks[i].name} -> {blocks[j].name} and {blocks[k].name} -> {blocks[l].name} overlap: '
                    f'each map is fitted on the original model, so spans may share an end block but not replace the '
                    f'same blocks')
    dev = _device(model, device)
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
        module = LinearBlockApprox(dim, layouts[j], bias=bias, num_tokens=num_tokens)
        with torch.no_grad():
            module.weight.copy_(weight.float())
            if b is not None:
                module.bias.copy_(b.float())
        modules.append(module.to(dev))
    return modules


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


@register_model
def rba(pretrained: bool = False, base_model: Optional[str] = None,
        spans: Sequence[Union[Dict[str, Any], SpanArg]] = (), **kwargs) -> nn.Module:
    """A timm architecture with spans of blocks replaced by linear maps (RBA).

    ``base_model`` is the timm architecture, ``spans`` the records ``approximate`` writes, or bare
    ``(source, target)`` pairs; other kwargs go to the base model. Weights come from a saved/pushed
    checkpoint (``local-dir:``/``hf-hub:``); without them the maps are identities (the "skip" baseline),
    which has the structure, and so the speed, of the fitted model.
    """
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    cache_dir = kwargs.pop('cache_dir', None)
    kwargs.pop('pretrained_model_args', None)
    if not base_model:
        raise RbaError("the 'rba' architecture needs base_model=<timm architecture> and spans=[...]; make one with "
                       "timm_pf.rba.approximate or load a saved one with timm.create_model('local-dir:<folder>')")
    model = timm.create_model(base_model, **kwargs)
    base_args = dict(model._model_args, base_model=base_model, spans=[])
    specs = _complete_spans(model, spans)
    for spec in specs:
        _install(model, spec, LinearBlockApprox(spec['dim'], spec['layout'], spec['bias'], spec['num_tokens']))
    _mark_approximated(model, base_args, specs)
    if hasattr(pretrained_cfg, 'to_dict'):
        pretrained_cfg = pretrained_cfg.to_dict()
    if isinstance(pretrained_cfg, str):
        raise RbaError(
            f"'rba' has no pretrained tags (got {pretrained_cfg!r}); load saved weights via local-dir:/hf-hub:")
    model.pretrained_cfg.update({k: v for k, v in (pretrained_cfg or {}).items() if v is not None})
    model.pretrained_cfg.update(overlay or {})
    model.pretrained_cfg['architecture'] = 'rba'
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        load_pretrained(model, pretrained_cfg=model.pretrained_cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get('in_chans', 3), cache_dir=cache_dir)
    return model


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


# ---------------------------------------------------------------------------------------------------
# Evaluation: the model's own head and a linear probe on its pre-logits features
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(
        model: nn.Module,
        batches: Batches,
        max_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre-logits features, logits, labels): the final norm and pooling (class token for ViTs) as
    ``forward_head(..., pre_logits=True)`` gives them, the features the paper's linear probe reads."""
    dev = _device(model, device)
    was_training = model.training
    model.eval()
    feats, logits, labels = [], [], []
    try:
        for x, y in _iter_images(batches, max_images):
            if y is None:
                raise RbaError('evaluation needs labelled batches (images, labels)')
            tokens = model.forward_features(x.to(dev))
            pre = model.forward_head(tokens, pre_logits=True)
            feats.append(pre.float().cpu())
            logits.append(model.forward_head(tokens).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise RbaError('no images to evaluate: the data loader is empty')
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def train_linear_probe(
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: Optional[int] = None,
        weight_decay: float = 1e-4,
        max_iter: int = 200,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS (deterministic).

    The standardisation is folded into the returned layer, which takes raw features.
    """
    num_classes = num_classes or int(labels.max()) + 1
    feats = features.double()
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():
        w = weight / std
        probe.weight.copy_(w.float())
        probe.bias.copy_((bias - w @ mean).float())
    return probe


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def evaluate_models(
        models: Dict[str, nn.Module],
        train_batches: Batches,
        val_batches: Batches,
        input_size: Sequence[int],
        num_classes: Optional[int] = None,
        probe_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> List[Dict[str, Any]]:
    """Params, MACs and top-1 of each model with its own head and with a linear probe trained on its
    pre-logits features of ``train_batches`` (the paper's protocol, Sec. 4); head accuracy is None when
    the head's classes differ from the data's."""
    from timm_pf.stats import count_macs, count_params
    rows = []
    for name, model in models.items():
        train_feats, _, train_labels = extract_features(model, train_batches, probe_images, device)
        val_feats, val_logits, val_labels = extract_features(model, val_batches, None, device)
        classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
        probe = train_linear_probe(train_feats, train_labels, classes)
        with torch.no_grad():
            probe_acc = accuracy(probe(val_feats), val_labels)
        rows.append(dict(
            model=name,
            params=count_params(model),
            macs=count_macs(model, input_size),
            head_top1=accuracy(val_logits, val_labels) if val_logits.shape[-1] == classes else None,
            probe_top1=probe_acc,
        ))
    return rows
