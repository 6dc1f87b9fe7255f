"""Block Redundancy and the other similarities of every pair of blocks (Sec. 3), from running sums over
a data loader (see :mod:`timm_pf.methods.rba`)."""
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    Batches, RbaError, _BlockCapture, _device, _iter_images, _layout, _model_name, _to_tokens, find_blocks,
)

__all__ = ['METRICS', 'METRIC_TITLES', 'RedundancyReport', 'analyze']

METRICS = ('br', 'cosine', 'cka', 'linear_r2')
METRIC_TITLES = {
    'br': 'BR = -MSE',
    'cosine': 'cosine similarity',
    'cka': 'linear CKA',
    'linear_r2': 'R$^2$ of least-squares map i$\\to$j',
}
_GRAM_METRICS = ('cka', 'linear_r2')

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
        # each row's cosines in float32, summed over the rows in float64 (a float32 sum over rows and channels
        # at once was off by 2e-4 for equal directions)
        self.cos += torch.bmm(unit, unit.transpose(1, 2)).sum(0, dtype=torch.float64)
        if self.gram is not None:
            flat = z.reshape(z.shape[0], -1).double()
            self.gram += flat.T @ flat
            self.col_sum += flat.sum(0)

    def metrics(self, wanted: Sequence[str]) -> Dict[str, torch.Tensor]:
        k, d, n = len(self.members), self.dim, max(self.rows, 1)
        out = {}
        if 'br' in wanted:
            out['br'] = -self.sq_diff.cpu() / (n * d) + 0.0  # + 0.0: no -0.0 for equal outputs
        if 'cosine' in wanted:
            out['cosine'] = (self.cos.cpu() / n).clamp(-1.0, 1.0)  # float32 row cosines can round past 1
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
            out['cka'] = cka.clamp(0.0, 1.0)  # its range; float64 rounding put the diagonal at 1 + 7e-16
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

        ``params_removed`` is the net saving of a shared ``D x D`` map without bias. In the report of an
        approximated model, spans that replace blocks its maps already replace are left out.
        """
        if rank_by not in self.metrics:
            raise RbaError(f'cannot rank by {rank_by!r}: this report has {", ".join(self.metrics)}')
        if max_blocks is not None and max_blocks < 1:
            raise RbaError(f'max_blocks must be None or >= 1, got {max_blocks}')
        # spans an earlier RBA replaced: a span that replaces any of their blocks cannot be applied
        replaced = [tuple(self.block_names.index(name) for name in span)
                    for span in self.notes.get('replaced_spans', [])]
        rows = []
        for i in range(len(self.block_names)):
            for j in range(i + 1, len(self.block_names)):
                if self.segments[i] != self.segments[j] or (max_blocks is not None and j - i > max_blocks):
                    continue
                values = {m: self.metrics[m][i][j] for m in self.metrics}
                if math.isnan(values[rank_by]) or any(max(i, k) < min(j, l) for k, l in replaced):
                    continue
                rows.append(dict(
                    source=self.block_names[i], target=self.block_names[j], source_index=i, target_index=j,
                    num_blocks=j - i, **values,
                    params_removed=sum(self.block_params[i + 1:j + 1]) - self.block_dims[j] ** 2,
                ))
        return sorted(rows, key=lambda r: r[rank_by], reverse=True)

    def table(self, rank_by: str = 'br', top: Optional[int] = None, max_blocks: Optional[int] = None) -> str:
        """Markdown table of the ranked spans."""
        if top is not None and top < 0:
            raise RbaError(f'top must be None or >= 0, got {top}')
        rows = self.spans(rank_by, max_blocks)[:top]
        head = ['rank', 'span (i -> j)', 'blocks replaced', *self.metrics, 'params removed']
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for rank, r in enumerate(rows, 1):
            replaced = self.block_names[r['source_index'] + 1:r['target_index'] + 1]
            replaced_cell = f'{replaced[0]}..{replaced[-1]} ({len(replaced)})' if len(replaced) > 1 else replaced[0]
            cells = [str(rank), f"{r['source']} -> {r['target']}", replaced_cell,
                     *(f'{r[m] + 0.0:.4g}' for m in self.metrics), f"{r['params_removed']:,}"]  # + 0.0: no -0
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
                            ax.text(j, i, f'{mat[i, j] + 0.0:.3g}', ha='center', va='center',
                                    fontsize=5.5 if n <= 8 else 4.5,
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
                    if not torch.isfinite(z).all():
                        raise RbaError(f'outputs of blocks {", ".join(blocks[i].name for i in group.members)} hold '
                                       f'NaN or Inf: their similarities are undefined')
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
    # blocks an earlier RBA replaced by identities pass their input on: no similarity of theirs means anything
    removed = {i for i, ref in enumerate(blocks) if isinstance(model.get_submodule(ref.name), nn.Identity)}
    for group in groups.values():
        values = group.metrics(metrics)
        for a, i in enumerate(group.members):
            dims[i] = group.dim
            for b, j in enumerate(group.members):
                if i not in removed and j not in removed:
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
        notes=dict(rows='every token (or feature-map pixel) of every image', layouts=sorted(set(layouts)),
                   **({'removed_blocks': [blocks[i].name for i in sorted(removed)]} if removed else {}),
                   **({'replaced_spans': [[s['source'], s['target']] for s in model.rba_spans]}
                      if getattr(model, 'rba_spans', None) else {})),
    )
