"""The data that ties the benchmark to the papers: which baseline each variant is compared with
(:data:`BASELINE_RULES`), the params, MACs and speeds the papers report with the table they come from
(:data:`PAPER_REPORTS`) and the ratios the package promises (:data:`SPEED_TARGETS`)."""
import fnmatch
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = [
    'HEADLINE_MODELS', 'BASELINE_RULES', 'PAPER_REPORTS', 'SPEED_TARGETS', 'SCALING_SIZES', 'SCALING_PAIRS',
    'ReportedSpeed', 'PaperReport',
    'Setting', 'SpeedTarget', 'baseline_for', 'paper_latency_ratio',
]

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
    ('vit_s_*', 'vit_small_patch16_224'),
    ('pit_s_*', 'pit_s_224'),
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
_V100 = 'V100'
_CPU = 'CPU'  # Table 4 does not name the processor
_GPU = 'GPU'  # Table 6 does not name the GPU


def _ms(value: float, device: str, batch_size: Optional[int] = None) -> ReportedSpeed:
    return ReportedSpeed(value, 'ms', device, batch_size)


def _ips(value: float, batch_size: int) -> ReportedSpeed:
    return ReportedSpeed(value, 'img/s', _GPU, batch_size)


PAPER_REPORTS: Dict[str, PaperReport] = {
    'resnet50': PaperReport(f'{_PF}, Tables 3-4', 25.6, 4.1, (_ms(8.7, _V100), _ms(45.4, _CPU))),
    'ours_r50_max': PaperReport(f'{_PF}, Table 3', 14.2, 2.2, (_ms(6.8, _V100),)),
    'ours_r50_hybrid': PaperReport(f'{_PF}, Tables 3-4', 17.3, 2.6, (_ms(7.3, _V100), _ms(39.8, _CPU))),
    'ours_r50_eb': PaperReport(f'{_PF}, Table 2', speeds=(_ms(7.7, _V100),)),
    'ours_r50_conv1x1': PaperReport(f'{_PF}, Table 2', speeds=(_ms(6.2, _V100),)),
    'ours_r50_dwconv': PaperReport(f'{_PF}, Table 2', speeds=(_ms(8.3, _V100),)),
    'ours_r50_deform_max': PaperReport(f'{_PF}, Table 3', 18.0, 2.9, (_ms(10.3, _V100),)),
    'ours_r50_deform_avg': PaperReport(f'{_PF}, Table B.1', 18.0, 2.9, (_ms(10.3, _V100),)),
    'seresnet50': PaperReport(f'{_PF}, Table 4', 28.1, 4.1, (_ms(13.9, _V100), _ms(98.0, _CPU))),
    'ours_r50se_hybrid': PaperReport(f'{_PF}, Table 4', 19.9, 2.6, (_ms(12.5, _V100), _ms(92.6, _CPU))),
    'resnet101': PaperReport(f'{_PF}, Table 4', 44.6, 7.8, (_ms(16.7, _V100), _ms(80.5, _CPU))),
    'ours_r101_hybrid': PaperReport(f'{_PF}, Table 4', 26.3, 4.3, (_ms(13.5, _V100), _ms(65.7, _CPU))),
    'wide_resnet50_2': PaperReport(f'{_PF}, Table 4', 68.9, 11.4, (_ms(9.0, _V100), _ms(84.0, _CPU))),
    'ours_wrn50_2_hybrid': PaperReport(f'{_PF}, Table 4', 36.0, 5.4, (_ms(7.3, _V100), _ms(59.8, _CPU))),
    'wide_resnet101_2': PaperReport(f'{_PF}, Table 4', 126.9, 22.8, (_ms(16.9, _V100), _ms(146.2, _CPU))),
    'ours_wrn101_2_hybrid': PaperReport(f'{_PF}, Table 4', 53.9, 8.9, (_ms(13.7, _V100), _ms(96.3, _CPU))),
    'vit_small_patch16_224': PaperReport(f'{_PF}, Table 6', speeds=(_ips(787, 256), _ips(86, 1))),
    'vit_s_maxpool': PaperReport(f'{_PF}, Table 6', speeds=(_ips(763, 256), _ips(96, 1))),
    'vit_s_dwconv': PaperReport(f'{_PF}, Table 6', speeds=(_ips(571, 256), _ips(95, 1))),
    'pit_s_224': PaperReport(f'{_PF}, Table 6', speeds=(_ips(952, 256), _ips(57, 1))),
    'pit_s_maxpool': PaperReport(f'{_PF}, Table 6', speeds=(_ips(1000, 256), _ips(92, 1))),
    'pit_s_dwconv': PaperReport(f'{_PF}, Table 6', speeds=(_ips(781, 256), _ips(90, 1))),
    'ghostnet_300m': PaperReport(f'{_PN}, Table 2', 8.6, 0.289),
    'parameternet_300m': PaperReport(f'{_PN}, Table 2', 15.7, 0.298),
    'ghostnet_600m': PaperReport(f'{_PN}, Table 2', 19.8, 0.579),
    'parameternet_600m': PaperReport(f'{_PN}, Table 2', 34.5, 0.599),
}


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
    both run in ``runtime``. ``unmet`` says why a listed target is not met today ('' for a target that holds)."""
    model: str
    baseline: str
    setting: Setting
    metric: str  # 'latency' or 'memory'
    max_ratio: float
    runtime: str = 'torch'  # 'torch' or 'onnxruntime'
    unmet: str = ''

    def __str__(self) -> str:
        runtime = ', ONNX Runtime' if self.runtime == 'onnxruntime' else ''
        unmet = f' [not met today: {self.unmet}]' if self.unmet else ''
        return f'{self.model} {self.metric} <= {self.max_ratio:.2f}x {self.baseline}, {self.setting}{runtime}{unmet}'


def _targets(model: str, baseline: str, checks: Iterable[Tuple[str, int, int, str, float]],
             runtime: str = 'torch', unmet: str = '') -> List[SpeedTarget]:
    return [SpeedTarget(model, baseline, Setting(mode, bs, img), metric, ratio, runtime, unmet)
            for mode, bs, img, metric, ratio in checks]


def _infer(batch_sizes: Iterable[int], img_size: int, max_ratio: float) -> List[Tuple[str, int, int, str, float]]:
    return [('infer', bs, img_size, 'latency', max_ratio) for bs in batch_sizes]


_PN_FLOOR = ('at batch 1 the kernel mixing reads all 19.4 M expert weights for one image, a memory-traffic '
             'floor the MACs do not show (README, targets)')

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
    + _targets('parameternet_600m', 'ghostnet_600m', _infer([1], 224, 1.10), unmet=_PN_FLOOR)
    + _targets('parameternet_600m', 'ghostnet_600m', _infer([32], 224, 1.20) + [('train', 32, 128, 'memory', 1.5)])
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


def paper_latency_ratio(model: str, baseline: str, batch_size: int) -> Tuple[Optional[float], str]:
    """The latency ratio the paper reports for the pair, preferring speeds at ``batch_size``."""
    ours, base = PAPER_REPORTS.get(model), PAPER_REPORTS.get(baseline)
    if ours is None or base is None:
        return None, ''
    candidates = []
    for a in ours.speeds:
        for b in base.speeds:
            if (a.unit, a.device, a.batch_size) == (b.unit, b.device, b.batch_size):
                ratio = a.value / b.value if a.unit == 'ms' else b.value / a.value
                # same batch size first, then an unstated one, then the nearest on a log scale
                rank = 0 if a.batch_size == batch_size else 1 if a.batch_size is None \
                    else 2 + abs(math.log(a.batch_size / batch_size))
                candidates.append((rank, ratio, str(a).replace(f'{a.value:g} {a.unit} ', '')))
    if not candidates:
        return None, ''
    _, ratio, basis = min(candidates, key=lambda c: c[0])
    return ratio, basis
