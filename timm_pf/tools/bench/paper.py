"""The data that ties the benchmark to the papers: which baseline each variant is compared with
(:data:`BASELINE_RULES`), the params, MACs and speeds the papers report with the table they come from
(:data:`PAPER_REPORTS`, read from the papers' results tables of ``hub_cards/families/``) and the ratios the
package promises (:data:`SPEED_TARGETS`)."""
import fnmatch
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ..cards import CARDS_DIR, results_rows

__all__ = [
    'PAPER_IMG_SIZE', 'HEADLINE_MODELS', 'BASELINE_RULES', 'PAPER_REPORTS', 'SPEED_TARGETS', 'SCALING_SIZES',
    'SCALING_PAIRS',
    'ReportedSpeed', 'PaperReport',
    'Setting', 'SpeedTarget', 'baseline_for', 'paper_latency_ratio',
]

# The image size of every params / MACs / speed figure the papers report (ImageNet at 224 px).
PAPER_IMG_SIZE = 224

# The variants ``timm-pf bench`` runs by default, each next to its baseline.
HEADLINE_MODELS = (
    'ours_r50_hybrid', 'ours_r50_deform_max', 'vit_s_maxpool', 'pit_s_maxpool', 'parameternet_600m', 'ghostnet_dyn',
)

# Variant name pattern -> the baseline it is measured against. The first matching pattern wins.
BASELINE_RULES: Tuple[Tuple[str, str], ...] = (
    ('ours_r50se_*', 'seresnet50'),
    ('ours_r50_*', 'resnet50'),
    ('ours_r101_*', 'resnet101'),
    ('ours_wrn50_2_*', 'wide_resnet50_2'),
    ('ours_wrn101_2_*', 'wide_resnet101_2'),
    # a Replacement Learning variant finalises into its plain model
    ('vit_s_maxpool_replace', 'vit_s_maxpool'),
    *((f'resnet{depth}_replace', f'resnet{depth}') for depth in (34, 50, 101, 152)),
    ('vit_ti_*', 'vit_tiny_patch16_224'),
    ('vit_s_*', 'vit_small_patch16_224'),
    ('vit_b_*', 'vit_base_patch16_224'),
    ('pit_ti_*', 'pit_ti_224'),
    ('pit_s_*', 'pit_s_224'),
    ('pit_b_*', 'pit_b_224'),
    ('parameternet_300m*', 'ghostnet_300m'),
    ('parameternet_600m*', 'ghostnet_600m'),
    ('ghostnet_dyn*', 'ghostnet_100'),
)


@dataclass(frozen=True)
class ReportedSpeed:
    """One speed a paper reports: a latency in ms or a throughput in img/s."""
    value: float
    unit: str  # 'ms' or 'img/s'
    device: str
    batch_size: Optional[int] = None  # None where the paper does not say

    def __str__(self) -> str:
        batch = f' b{self.batch_size}' if self.batch_size else ''
        return f'{self.value:g} {self.unit} {self.device}{batch}'


@dataclass(frozen=True)
class PaperReport:
    """Params (M), MACs (G; the papers' "FLOPs" mean multiply-adds) and speeds as a paper reports them."""
    source: str
    params_m: Optional[float] = None
    gmacs: Optional[float] = None
    speeds: Tuple[ReportedSpeed, ...] = ()


_PF = 'Han et al., ICLR 2022'
_PN = 'Han et al., ParameterNet'

# Where the paper reports each model: (family whose card data holds the paper's results table, the row's label
# there, the tables it comes from). The numbers are read from that table (``hub_cards/families/<family>.yaml``,
# shown on every card of the family), the one place that holds them; the first row of a label counts.
_PAPER_ROWS: Dict[str, Tuple[str, str, str]] = {
    'resnet50': ('resnet_pf', 'ResNet-50 † (Table 4)', f'{_PF}, Tables 3-4'),
    'ours_r50_max': ('resnet_pf', 'Ours-R50 (max)', f'{_PF}, Table 3'),
    'ours_r50_hybrid': ('resnet_pf', 'Ours-R50 (hybrid) †', f'{_PF}, Tables 3-4'),
    'ours_r50_eb': ('resnet_pf', 'Ours-R50 E/B (Table 2)', f'{_PF}, Table 2'),
    'ours_r50_conv1x1': ('resnet_pf', 'Ours-R50 1x1 conv (Table 2)', f'{_PF}, Table 2'),
    'ours_r50_dwconv': ('resnet_pf', 'Ours-R50 3x3 dw-conv (Table 2)', f'{_PF}, Table 2'),
    'ours_r50_deform_max': ('resnet_pf', 'Ours-R50 (deform_max)', f'{_PF}, Table 3'),
    'ours_r50_deform_avg': ('resnet_pf', 'Ours-R50 (deform_avg) † (Table B.1)', f'{_PF}, Table B.1'),
    'seresnet50': ('resnet_pf', 'ResNet-50-SE † (Table 4)', f'{_PF}, Table 4'),
    'ours_r50se_hybrid': ('resnet_pf', 'Ours-R50-SE † (Table 4)', f'{_PF}, Table 4'),
    'resnet101': ('resnet_pf', 'ResNet-101 † (Table 4)', f'{_PF}, Table 4'),
    'ours_r101_hybrid': ('resnet_pf', 'Ours-R101 † (Table 4)', f'{_PF}, Table 4'),
    'wide_resnet50_2': ('resnet_pf', 'WRN-50-2 † (Table 4)', f'{_PF}, Table 4'),
    'ours_wrn50_2_hybrid': ('resnet_pf', 'Ours-WRN50-2 † (Table 4)', f'{_PF}, Table 4'),
    'wide_resnet101_2': ('resnet_pf', 'WRN-101-2 † (Table 4)', f'{_PF}, Table 4'),
    'ours_wrn101_2_hybrid': ('resnet_pf', 'Ours-WRN101-2 † (Table 4)', f'{_PF}, Table 4'),
    'vit_small_patch16_224': ('vit_pf', 'ViT-S', f'{_PF}, Table 6'),
    'vit_s_maxpool': ('vit_pf', 'ViT-S (max-pool)', f'{_PF}, Table 6'),
    'vit_s_dwconv': ('vit_pf', 'ViT-S (dw-conv)', f'{_PF}, Table 6'),
    'pit_s_224': ('pit_pf', 'PiT-S', f'{_PF}, Table 6'),
    'pit_s_maxpool': ('pit_pf', 'PiT-S (max-pool)', f'{_PF}, Table 6'),
    'pit_s_dwconv': ('pit_pf', 'PiT-S (dw-conv)', f'{_PF}, Table 6'),
    'ghostnet_300m': ('parameternet', 'GhostNet-300M', f'{_PN}, Table 2'),
    'parameternet_300m': ('parameternet', 'ParameterNet-300M', f'{_PN}, Table 2'),
    'ghostnet_600m': ('parameternet', 'GhostNet-600M', f'{_PN}, Table 2'),
    'parameternet_600m': ('parameternet', 'ParameterNet-600M', f'{_PN}, Table 2'),
}

# Speed columns of the results tables: (unit, device). Table 4 does not name the CPU, Table 6 not the GPU;
# a throughput column names its batch sizes ("batch 256 / 1"), one cell value per batch size.
_SPEED_COLUMNS = {'GPU (ms)': ('ms', 'V100'), 'CPU (ms)': ('ms', 'CPU'),
                  'Throughput (img/s, batch 256 / 1)': ('img/s', 'GPU')}
_SCALE = {'M': 1e6, 'G': 1e9}
# The torch device type of each speed column's device.
_DEVICE_TYPES = {'V100': 'cuda', 'GPU': 'cuda', 'CPU': 'cpu'}


def _count(cell: str, column: str, unit: str) -> Optional[float]:
    """A count in ``unit`` ('M' or 'G') from a cell: ``'8.6M'``, ``'289M'``, or a number in the column's unit
    (``'Params (M)'``); None for an empty cell."""
    if not cell:
        return None
    match = re.fullmatch(r'([0-9.]+)([MG])?', cell)
    in_column = re.search(r'\(([MG])\)', column)
    given = match and (match.group(2) or (in_column and in_column.group(1)))
    if not given:
        raise ValueError(f'results table cell {cell!r} of column {column!r} is not a count')
    return round(float(match.group(1)) * _SCALE[given] / _SCALE[unit], 6)


def _speeds(row: Dict[str, str]) -> Tuple[ReportedSpeed, ...]:
    speeds = []
    for column, (unit, device) in _SPEED_COLUMNS.items():
        values = [v.strip() for v in row.get(column, '').split('/') if v.strip()]
        batches = [int(b) for b in re.findall(r'\d+', column.partition('batch')[2])] or [None] * len(values)
        speeds += [ReportedSpeed(float(v), unit, device, b) for v, b in zip(values, batches)]
    return tuple(speeds)


def _paper_reports(cards_dir: Union[str, Path] = CARDS_DIR) -> Dict[str, PaperReport]:
    """:data:`PAPER_REPORTS` read from the families' results tables in ``cards_dir`` (:data:`_PAPER_ROWS`)."""
    tables, reports = {}, {}
    for model, (family, label, source) in _PAPER_ROWS.items():
        if family not in tables:
            tables[family] = results_rows(family, cards_dir)
        rows = tables[family]
        row = next((r for r in rows if r.get('Model') == label), None)
        if row is None:
            raise ValueError(f'the results table of the {family} family has no row {label!r} (for {model})')
        params = next((_count(v, k, 'M') for k, v in row.items() if k.startswith('Params')), None)
        gmacs = next((_count(v, k, 'G') for k, v in row.items() if k.startswith('FLOPs')), None)
        reports[model] = PaperReport(source, params, gmacs, _speeds(row))
    return reports


PAPER_REPORTS: Dict[str, PaperReport] = _paper_reports()


@dataclass(frozen=True)
class Setting:
    """One measured condition: inference or a training step, at a batch size and square image size."""
    mode: str  # 'infer' or 'train'
    batch_size: int
    img_size: int

    def __str__(self) -> str:
        return f'{self.mode} b{self.batch_size} {self.img_size}px'


@dataclass(frozen=True)
class SpeedTarget:
    """A promise: ``metric`` of ``model`` at ``setting`` is at most ``max_ratio`` x that of ``baseline``,
    both run in ``runtime``."""
    model: str
    baseline: str
    setting: Setting
    metric: str  # 'latency' or 'memory'
    max_ratio: float
    runtime: str = 'torch'  # 'torch' or 'onnxruntime'

    def __str__(self) -> str:
        runtime = ', ONNX Runtime' if self.runtime == 'onnxruntime' else ''
        return f'{self.model} {self.metric} <= {self.max_ratio:.2f}x {self.baseline}, {self.setting}{runtime}'


def _targets(model: str, baseline: str, checks: Iterable[Tuple[str, int, int, str, float]],
             runtime: str = 'torch') -> List[SpeedTarget]:
    return [SpeedTarget(model, baseline, Setting(mode, bs, img), metric, ratio, runtime)
            for mode, bs, img, metric, ratio in checks]


def _infer(batch_sizes: Iterable[int], img_size: int, max_ratio: float) -> List[Tuple[str, int, int, str, float]]:
    return [('infer', bs, img_size, 'latency', max_ratio) for bs in batch_sizes]


# What the package promises, measured side by side by ``timm-pf bench --preset targets`` (CPU, 2 threads).
# Training steps run at 128 px to keep CPU runs short; the memory ratios of dynamic and deformable layers
# are no better at 128 px than at 224 px (their overhead does not shrink with the image). At 224 px the
# max-pool ViT/PiT have about the MACs of attention (1.03x / 0.98x), so they promise parity there; their
# lead grows with the token count (the resolution targets, see SCALING_PAIRS).
SPEED_TARGETS: Tuple[SpeedTarget, ...] = tuple(
    _targets('ours_r50_hybrid', 'resnet50', _infer([1], 224, 0.75) + _infer([16], 224, 0.85)
             + [('train', 16, 128, 'latency', 0.90)])
    + _targets('ours_r50_max', 'resnet50', _infer([1], 224, 0.70))
    + _targets('ours_r50_deform_max', 'resnet50', _infer([1, 16], 224, 1.0) + [('train', 16, 128, 'memory', 2.0)])
    + _targets('vit_s_maxpool', 'vit_small_patch16_224',
               _infer([1, 32], 224, 1.05) + _infer([1], 512, 0.88) + _infer([1], 1024, 0.78))
    + _targets('pit_s_maxpool', 'pit_s_224',
               _infer([1, 32], 224, 1.00) + _infer([1], 448, 0.88) + _infer([1], 672, 0.75))
    + _targets('parameternet_600m', 'ghostnet_600m',
               _infer([1], 224, 1.10) + _infer([32], 224, 1.20) + [('train', 32, 128, 'memory', 1.5)])
    # deployment: the same pairs exported and run in ONNX Runtime (CPU, 2 threads), ``--runtime onnxruntime``
    + _targets('parameternet_600m', 'ghostnet_600m', _infer([1], 224, 1.30) + _infer([8], 224, 1.50), 'onnxruntime')
    + _targets('ghostnet_dyn', 'ghostnet_100', _infer([1], 224, 1.30) + _infer([8], 224, 1.50), 'onnxruntime')
    + _targets('ours_r50_deform_max', 'resnet50', _infer([1, 8], 224, 1.10), 'onnxruntime')
    + _targets('ours_r50_max', 'resnet50', _infer([1, 8], 224, 0.75), 'onnxruntime')
    + _targets('ours_r50_hybrid', 'resnet50', _infer([1, 8], 224, 0.80), 'onnxruntime')
)


# ``timm-pf bench --preset scaling``: batch-1 inference of these pairs at these sizes. Per token, the
# max-pool mixer costs 6d^2 MACs (Linear(d, 3d) and Linear(3d, d)) and attention 4d^2 + 2Nd (qkv, output
# projection, QK^T and AV over N tokens), so the ratio falls as the token count N grows past d.
# PiT's fused attention keeps its memory linear in N: pit_s_224 at 1024 px, batch 1, peaks at 0.11 GiB of
# tensors (1.2 GB resident), so every pair runs the whole range on a 24 GiB machine.
SCALING_SIZES = (224, 384, 512, 768, 1024)
SCALING_PAIRS: Tuple[Tuple[str, str], ...] = (
    ('vit_s_maxpool', 'vit_small_patch16_224'), ('pit_s_maxpool', 'pit_s_224'),
    ('ours_r50_hybrid', 'resnet50'), ('ours_r50_deform_max', 'resnet50'),
)


def baseline_for(model: str) -> Optional[str]:
    """The baseline a variant is compared with (:data:`BASELINE_RULES`), or None."""
    for pattern, baseline in BASELINE_RULES:
        if fnmatch.fnmatchcase(model, pattern) and model != baseline:
            return baseline
    return None


def paper_latency_ratio(model: str, baseline: str, batch_size: int, device_type: str) -> Tuple[Optional[float], str]:
    """The latency ratio the paper reports for the pair on a ``device_type`` ('cpu' or 'cuda') device, preferring
    speeds at ``batch_size``."""
    ours, base = PAPER_REPORTS.get(model), PAPER_REPORTS.get(baseline)
    if ours is None or base is None:
        return None, ''
    candidates = []
    for a in ours.speeds:
        for b in base.speeds:
            if (a.unit, a.device, a.batch_size) == (b.unit, b.device, b.batch_size) \
                    and _DEVICE_TYPES[a.device] == device_type:
                ratio = a.value / b.value if a.unit == 'ms' else b.value / a.value
                # same batch size first, then an unstated one, then the nearest on a log scale
                rank = 0 if a.batch_size == batch_size else 1 if a.batch_size is None \
                    else 2 + abs(math.log(a.batch_size / batch_size))
                candidates.append((rank, ratio, str(a).replace(f'{a.value:g} {a.unit} ', '')))
    if not candidates:
        return None, ''
    _, ratio, basis = min(candidates, key=lambda c: c[0])
    return ratio, basis
