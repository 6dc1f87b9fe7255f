"""Side-by-side efficiency benchmark: every model next to its baseline, measured in one process.

The papers promise fewer parameters and MACs *and* faster models in practice. This module measures
all three on the machine at hand and prints the paper's reported values beside ours:

* params, MACs and activations come from :mod:`timm_pf.stats` (MACs = ``FlopCounterMode`` FLOPs / 2);
* latency is the wall time of one step (a forward pass, or with ``mode='train'`` a forward pass, a
  cross-entropy loss and a backward pass). The first ``warmup`` rounds are discarded; then every round
  runs each model once, in alternating order (A B C, C B A, ...), so that drift of a shared or
  throttling machine hits a model and its baseline alike. We report the median, the quartiles and the
  extremes over rounds, and the ratio ``median latency / median latency of the baseline`` (or of the
  minima, with ``statistic='min'``, for a busy machine), with the quartiles of the per-round (paired)
  ratios as its spread;
* peak memory of one step, weights and input included. On CUDA it is ``torch.cuda.max_memory_allocated``;
  on CPU, by default (``memory='tensors'``), the peak of live tensor storage tracked at the operator level
  (:class:`PeakTensorMemory`), the same quantity without the GPU allocator; with ``memory='rss'`` the
  growth of the resident set (Linux ``VmHWM``) during two steps of each model in a fresh process, which
  adds what kernels allocate internally and the allocator's overhead.

The data that ties it to the papers lives here too: :data:`BASELINE_RULES` (which baseline each
variant is compared with), :data:`PAPER_REPORTS` (params, MACs and speeds the papers report, with the
table they come from) and :data:`SPEED_TARGETS` (the ratios the package promises).
"""
import csv
import fnmatch
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from timm_pf.layers.cpu_kernels import CPU_KERNEL_POLICIES, cpu_kernel_policy, kernel_status
from timm_pf.layers.dynamic_conv import DynamicConv2d

__all__ = [
    'HEADLINE_MODELS', 'BASELINE_RULES', 'PAPER_REPORTS', 'SPEED_TARGETS', 'DEFAULT_BATCH_SIZES',
    'BenchInputError', 'ReportedSpeed', 'PaperReport', 'Setting', 'SpeedTarget', 'BenchOptions',
    'BenchRow', 'TargetCheck', 'BenchResult', 'PeakTensorMemory', 'baseline_for', 'resolve_models',
    'target_settings', 'paper_latency_ratio', 'run_benchmark', 'check_targets', 'format_report', 'to_csv', 'to_json', 'plot_result',
]

# The variants ``timm-pf bench`` runs by default, each next to its baseline.
HEADLINE_MODELS = (
    'ours_r50_hybrid', 'ours_r50_deform_max', 'vit_s_maxpool', 'pit_s_maxpool', 'parameternet_600m', 'ghostnet_dyn',
)

# Batch sizes of the default run: batch 1 and a batch large enough to use both cores of a laptop
# while the whole run stays near two minutes on 2 CPU cores.
DEFAULT_BATCH_SIZES = (1, 8)

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


class BenchInputError(ValueError):
    """A request the benchmark cannot run: unknown model, unavailable device, bad option."""


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
    """A promise: ``metric`` of ``model`` at ``setting`` is at most ``max_ratio`` x that of ``baseline``."""
    model: str
    baseline: str
    setting: Setting
    metric: str  # 'latency' or 'memory'
    max_ratio: float

    def __str__(self) -> str:
        return f'{self.model} {self.metric} <= {self.max_ratio:.2f}x {self.baseline}, {self.setting}'


def _targets(model: str, baseline: str, checks: Iterable[Tuple[str, int, int, str, float]]) -> List[SpeedTarget]:
    return [SpeedTarget(model, baseline, Setting(mode, bs, img), metric, ratio)
            for mode, bs, img, metric, ratio in checks]


# What the package promises, measured side by side by ``timm-pf bench --preset targets``. Training
# steps run at 128 px to keep CPU runs short; the memory ratios of dynamic and deformable layers are
# no better at 128 px than at 224 px (their overhead does not shrink with the image).
SPEED_TARGETS: Tuple[SpeedTarget, ...] = tuple(
    _targets('ours_r50_hybrid', 'resnet50', [
        ('infer', 1, 224, 'latency', 0.75), ('infer', 16, 224, 'latency', 0.85),
        ('train', 16, 128, 'latency', 0.90)])
    + _targets('ours_r50_max', 'resnet50', [('infer', 1, 224, 'latency', 0.70)])
    + _targets('ours_r50_deform_max', 'resnet50', [
        ('infer', 1, 224, 'latency', 1.0), ('infer', 16, 224, 'latency', 1.0), ('train', 16, 128, 'memory', 2.0)])
    + _targets('vit_s_maxpool', 'vit_small_patch16_224', [
        ('infer', 1, 224, 'latency', 0.95), ('infer', 32, 224, 'latency', 0.95)])
    + _targets('pit_s_maxpool', 'pit_s_224', [('infer', 1, 224, 'latency', 0.85), ('infer', 32, 224, 'latency', 0.85)])
    + _targets('parameternet_600m', 'ghostnet_600m', [
        ('infer', 1, 224, 'latency', 1.10), ('infer', 32, 224, 'latency', 1.20), ('train', 32, 128, 'memory', 1.5)])
)


def baseline_for(model: str) -> Optional[str]:
    """The baseline a variant is compared with (:data:`BASELINE_RULES`), or None."""
    for pattern, baseline in BASELINE_RULES:
        if fnmatch.fnmatchcase(model, pattern) and model != baseline:
            return baseline
    return None


def _registered(name: str) -> bool:
    import timm
    return timm.is_model(name)


def _unknown_model_message(name: str) -> str:
    import difflib
    import timm
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    return f'unknown model {name!r}: not registered with timm{hint}'


def resolve_models(patterns: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``(model, baseline)`` pairs for globs and names; ``'MODEL:BASELINE'`` pairs explicitly.

    Raises :class:`BenchInputError` for a glob that matches no registered model or an unknown name.
    """
    import timm
    pairs: List[Tuple[str, Optional[str]]] = []
    for pattern in patterns:
        pattern, _, explicit_baseline = pattern.partition(':')
        if any(ch in pattern for ch in '*?['):
            names = timm.list_models(pattern)
            if not names:
                raise BenchInputError(f'--models pattern {pattern!r} matches no registered model')
        elif _registered(pattern):
            names = [pattern]
        else:
            raise BenchInputError(_unknown_model_message(pattern))
        if explicit_baseline and not _registered(explicit_baseline):
            raise BenchInputError(_unknown_model_message(explicit_baseline))
        for name in names:
            pair = (name, explicit_baseline or baseline_for(name))
            if pair not in pairs:
                pairs.append(pair)
    for model, baseline in pairs:
        if baseline is not None and not _registered(baseline):
            raise BenchInputError(f'baseline {baseline!r} of {model!r} is not registered with timm')
    return pairs


def target_settings(targets: Sequence[SpeedTarget]) -> List[Tuple[Setting, List[str]]]:
    """The settings the targets need, each with the models to run in it (in first-use order)."""
    jobs: Dict[Setting, List[str]] = {}
    for target in targets:
        models = jobs.setdefault(target.setting, [])
        for name in (target.baseline, target.model):
            if name not in models:
                models.append(name)
    return list(jobs.items())


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by PyTorch operators while the mode is active.

    Every operator output whose storage is new is counted until the storage is freed (a weak-reference
    finalizer subtracts it). This is what ``torch.cuda.max_memory_allocated`` measures on a GPU, for
    any device: activations, autograd's saved tensors, gradients and temporaries created by operators,
    but not scratch buffers that a kernel allocates internally (e.g. oneDNN's workspace) and not the
    memory allocator's caching or fragmentation. It is deterministic, which process-level measures
    (resident set size) on a shared machine are not.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in existing}
        self._live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._known or ptr in self._live:
            return
        self._live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != 'meta':
                self._track(leaf)
        return out


_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
_MEMORY_METHODS = ('tensors', 'rss', 'off')
_STATISTICS = {'median': statistics.median, 'min': min}
_PROC_STATUS, _PROC_CLEAR_REFS = '/proc/self/status', '/proc/self/clear_refs'


@dataclass
class BenchOptions:
    """How to run: device, numerics, compilation, threads and the repeat policy."""
    device: str = 'cpu'
    dtype: str = 'float32'  # parameters and inputs are cast to it
    amp: bool = False  # autocast: bfloat16 on CPU, float16 on CUDA
    channels_last: bool = False
    compile: bool = False
    threads: Optional[int] = None  # CPU threads; None keeps torch's default
    warmup: int = 1  # discarded rounds before timing (every model's first call is one)
    repeats: Optional[int] = None  # timed rounds; None: as many as time_budget allows, within [3, 50]
    time_budget: float = 50.0  # seconds of timed rounds in all, shared equally by the settings
    memory: str = 'tensors'  # 'tensors', 'rss' (CPU, fresh process per model and setting) or 'off'
    statistic: str = 'median'  # latency the ratios use; 'min' resists interference on a busy machine
    cpu_kernels: str = 'auto'  # batch-1 dynamic conv kernel policy (timm_pf.layers.cpu_kernels)

    def validate(self) -> None:
        if self.cpu_kernels not in CPU_KERNEL_POLICIES:
            raise BenchInputError(
                f'unknown CPU kernel policy {self.cpu_kernels!r}; choose one of {", ".join(CPU_KERNEL_POLICIES)}')
        if self.statistic not in _STATISTICS:
            raise BenchInputError(f'unknown statistic {self.statistic!r}; choose one of {", ".join(_STATISTICS)}')
        if self.memory not in _MEMORY_METHODS:
            raise BenchInputError(f'unknown memory method {self.memory!r}; choose one of {", ".join(_MEMORY_METHODS)}')
        if self.dtype not in _DTYPES:
            raise BenchInputError(f'unknown dtype {self.dtype!r}; choose one of {", ".join(_DTYPES)}')
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise BenchInputError(f'unknown device {self.device!r}: {err}') from None
        if device.type not in ('cpu', 'cuda'):
            raise BenchInputError(f'unsupported device {self.device!r}; use cpu or cuda[:N]')
        if self.memory == 'rss' and (device.type != 'cpu' or not os.path.exists(_PROC_CLEAR_REFS)):
            raise BenchInputError('--memory rss measures CPU runs on Linux only (it resets /proc/self/clear_refs)')
        if device.type == 'cuda':
            if not torch.cuda.is_available():
                raise BenchInputError(f'--device {self.device}: CUDA is not available on this machine')
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise BenchInputError(
                    f'--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) are present')
        if self.warmup < 1:
            raise BenchInputError('--warmup must be at least 1: the first call of a model is never timed')
        if self.repeats is not None and self.repeats < 1:
            raise BenchInputError('--repeats must be at least 1')
        if self.threads is not None and self.threads < 1:
            raise BenchInputError('--threads must be at least 1')


_MIN_AUTO_REPEATS, _MAX_AUTO_REPEATS = 3, 50


@dataclass
class BenchRow:
    """One model in one setting, with its baseline's ratios and the paper's values."""
    model: str
    baseline: Optional[str]
    mode: str
    batch_size: int
    img_size: int
    params: int
    macs: int  # per image
    activations: int  # per image
    latencies_ms: List[float]
    latency_ms: float  # median
    latency_q1_ms: float
    latency_q3_ms: float
    latency_min_ms: float
    latency_max_ms: float
    throughput: float  # images per second at the median latency
    peak_memory_mb: Optional[float]
    params_ratio: Optional[float] = None
    macs_ratio: Optional[float] = None
    latency_ratio: Optional[float] = None  # latency / baseline latency (median, or min with statistic='min')
    latency_ratio_q1: Optional[float] = None  # quartiles of the per-round paired ratios
    latency_ratio_q3: Optional[float] = None
    memory_ratio: Optional[float] = None
    paper_source: Optional[str] = None
    paper_params_m: Optional[float] = None
    paper_gmacs: Optional[float] = None
    paper_speeds: str = ''
    paper_latency_ratio: Optional[float] = None
    paper_latency_ratio_basis: str = ''

    @property
    def setting(self) -> Setting:
        return Setting(self.mode, self.batch_size, self.img_size)


@dataclass
class TargetCheck:
    target: SpeedTarget
    measured: Optional[float]  # None when the run did not measure it

    @property
    def status(self) -> str:
        if self.measured is None:
            return 'n/a'
        return 'PASS' if self.measured <= self.target.max_ratio else 'FAIL'


@dataclass
class BenchResult:
    rows: List[BenchRow]
    options: BenchOptions
    environment: Dict[str, object]
    targets: List[TargetCheck] = field(default_factory=list)

    def row(self, model: str, setting: Setting) -> Optional[BenchRow]:
        return next((r for r in self.rows if r.model == model and r.setting == setting), None)


def _quantiles(values: Sequence[float]) -> Tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive')
    return q1, median, q3


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


def _environment(options: BenchOptions, models: Iterable[nn.Module] = ()) -> Dict[str, object]:
    import timm
    from timm_pf import __version__
    env: Dict[str, object] = {
        'timm_pf': __version__, 'torch': torch.__version__, 'timm': timm.__version__,
        'python': platform.python_version(), 'platform': platform.platform(),
        'cpu': _cpu_name(), 'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(),
    }
    if torch.device(options.device).type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(torch.device(options.device))
    elif any(isinstance(m, DynamicConv2d) for model in models for m in model.modules()):
        env['dynamic_conv_batch1'] = kernel_status()
    return env


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Subject:
    """A model prepared for the benchmark, with its statistics per image size."""

    def __init__(self, name: str, options: BenchOptions):
        import timm
        from timm_pf.stats import count_params
        self.name = name
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as err:  # a broken model must name itself
            raise RuntimeError(f'creating {name!r} failed: {err}') from err
        self.eager = model  # float32 on CPU until prepare(); statistics are taken from it
        self.params = count_params(model)
        self.num_classes = getattr(model, 'num_classes', 1000) or 1000
        self._stats: Dict[int, Tuple[int, int]] = {}
        self.options = options
        self.model: Optional[nn.Module] = None

    def stats(self, img_size: int) -> Tuple[int, int]:
        """(MACs, activations) per image at ``img_size``."""
        from timm_pf.stats import count_activations, count_macs
        if img_size not in self._stats:
            input_size = (3, img_size, img_size)
            try:
                self._stats[img_size] = (count_macs(self.eager, input_size), count_activations(self.eager, input_size))
            except Exception as err:
                raise RuntimeError(f'{self.name} failed at {img_size}px: {err}') from err
        return self._stats[img_size]

    def prepare(self) -> None:
        opts = self.options
        model = self.eager.to(device=opts.device, dtype=_DTYPES[opts.dtype])
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.eager = model
        self.model = torch.compile(model) if opts.compile else model

    def weight_bytes(self) -> int:
        tensors = list(self.eager.parameters()) + list(self.eager.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


def _autocast(options: BenchOptions):
    if not options.amp:
        return nullcontext()
    device_type = torch.device(options.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if device_type == 'cpu' else torch.float16)


class _Step:
    """One timed unit of work for one model in one setting."""

    def __init__(self, subject: _Subject, setting: Setting, options: BenchOptions):
        self.subject, self.setting, self.options = subject, setting, options
        self.device = torch.device(options.device)
        self.x = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size,
                             device=self.device, dtype=_DTYPES[options.dtype])
        if options.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.target = torch.randint(0, subject.num_classes, (setting.batch_size,), device=self.device)
        self.train = setting.mode == 'train'

    def __call__(self) -> None:
        model = self.subject.model
        model.train(self.train)
        if self.train:
            model.zero_grad(set_to_none=True)
            with _autocast(self.options):
                out = model(self.x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = F.cross_entropy(out.float(), self.target)
            loss.backward()
        else:
            with torch.no_grad(), _autocast(self.options):
                model(self.x)

    def sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def time(self) -> float:
        self.sync()
        start = time.perf_counter()
        try:
            self()
        except Exception as err:
            raise RuntimeError(f'{self.subject.name} failed at {self.setting}: {err}') from err
        self.sync()
        return time.perf_counter() - start

    def peak_memory(self) -> Optional[int]:
        """Peak bytes of one step: weights, buffers, input and everything the step allocates."""
        self.subject.eager.zero_grad(set_to_none=True)
        fixed = self.subject.weight_bytes() + self.x.numel() * self.x.element_size()
        if self.device.type == 'cuda':
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self()
            self.sync()
            return fixed + torch.cuda.max_memory_allocated(self.device) - before
        if self.options.memory == 'rss':
            return _peak_rss_in_fresh_process(self.subject.name, self.setting, self.options)
        if self.options.compile:
            return None  # compiled CPU kernels allocate outside the dispatcher
        existing = [self.x, self.target, *self.subject.eager.parameters(), *self.subject.eager.buffers()]
        with PeakTensorMemory(existing) as tracker:
            self()
        return fixed + tracker.peak


    def peak_rss(self) -> int:
        """Weights, buffers, input and the resident-set growth over two steps (call in a fresh process)."""
        fixed = self.subject.weight_bytes() + self.x.numel() * self.x.element_size()
        gc.collect()
        with open(_PROC_CLEAR_REFS, 'w') as f:
            f.write('5')  # reset the high-water mark VmHWM to the current resident set
        start = _proc_status_bytes('VmRSS')
        for _ in range(2):
            self()
        return fixed + _proc_status_bytes('VmHWM') - start


def _proc_status_bytes(key: str) -> int:
    with open(_PROC_STATUS) as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f'{key} missing from {_PROC_STATUS}')


def _peak_rss_in_fresh_process(name: str, setting: Setting, options: BenchOptions) -> int:
    request = json.dumps({'model': name, 'setting': asdict(setting), 'options': asdict(options)})
    code = 'import sys; from timm_pf.bench import _peak_rss_main; _peak_rss_main(sys.argv[1])'
    proc = subprocess.run([sys.executable, '-c', code, request], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'measuring the memory of {name} at {setting} failed:\n{proc.stderr[-2000:]}')
    return int(proc.stdout.strip().splitlines()[-1])


def _peak_rss_main(request: str) -> None:
    """Entry point of the fresh process of ``memory='rss'``: prints the peak in bytes."""
    import timm_pf  # noqa: F401  registers the models
    spec = json.loads(request)
    options = BenchOptions(**spec['options'])
    torch.set_flush_denormal(True)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    subject = _Subject(spec['model'], options)
    subject.prepare()
    print(_Step(subject, Setting(**spec['setting']), options).peak_rss())


class _Progress:
    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit='run', file=sys.stderr, dynamic_ncols=True, leave=False)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def step(self, description: str) -> None:
        if self.bar is not None:
            self.bar.set_description(description, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interleaved(steps: Dict[str, _Step], rounds: int, progress: _Progress, label: str) -> Dict[str, List[float]]:
    """``rounds`` rounds of every step; odd rounds run in reverse order."""
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(steps[name].time())
            progress.step(f'{label} {name}')
    return times


def run_benchmark(
        jobs: Sequence[Tuple[Setting, Sequence[str]]],
        pairs: Sequence[Tuple[str, Optional[str]]],
        options: BenchOptions,
        progress: bool = True,
) -> BenchResult:
    """Measure every model of each job's setting, interleaved, and pair the rows with ``pairs``.

    ``jobs`` lists (setting, models); ``pairs`` gives each model's baseline (models without one get
    no ratios). Raises :class:`BenchInputError` for bad options, RuntimeError when a model fails.
    """
    options.validate()
    if options.threads is not None and torch.device(options.device).type == 'cpu':
        torch.set_num_threads(options.threads)
    if torch.device(options.device).type != 'cpu':
        return _run_benchmark(jobs, pairs, options, progress)
    torch.set_flush_denormal(True)
    with cpu_kernel_policy(options.cpu_kernels):  # a build (~30 s, once per machine) is the first call's
        return _run_benchmark(jobs, pairs, options, progress)


def _run_benchmark(
        jobs: Sequence[Tuple[Setting, Sequence[str]]],
        pairs: Sequence[Tuple[str, Optional[str]]],
        options: BenchOptions,
        progress: bool,
) -> BenchResult:
    baselines = dict(pairs)
    bar = _Progress(progress)
    try:
        subjects: Dict[str, _Subject] = {}
        for _, names in jobs:
            for name in names:
                if name not in subjects:
                    bar.add(1)
                    subjects[name] = _Subject(name, options)
                    for setting, job_names in jobs:
                        if name in job_names:
                            subjects[name].stats(setting.img_size)
                    subjects[name].prepare()
                    bar.step(f'build {name}')
        measured: Dict[Tuple[str, Setting], Tuple[List[float], Optional[int]]] = {}
        budget = options.time_budget / max(1, len(jobs))
        for setting, names in jobs:
            steps = {name: _Step(subjects[name], setting, options) for name in names}
            bar.add(options.warmup * len(steps))
            warm = _interleaved(steps, options.warmup, bar, f'{setting} warm-up')
            repeats = options.repeats
            if repeats is None:
                round_time = sum(times[-1] for times in warm.values())
                repeats = int(min(_MAX_AUTO_REPEATS, max(_MIN_AUTO_REPEATS, budget // max(round_time, 1e-6))))
            measure_memory = options.memory != 'off'
            bar.add(repeats * len(steps) + (len(steps) if measure_memory else 0))
            times = _interleaved(steps, repeats, bar, str(setting))
            for name, step in steps.items():
                peak = None
                if measure_memory:
                    peak = step.peak_memory()
                    bar.step(f'{setting} memory {name}')
                measured[(name, setting)] = ([t * 1e3 for t in times[name]], peak)
                step.subject.eager.zero_grad(set_to_none=True)  # free a training step's gradients
    finally:
        bar.close()

    rows = []
    for setting, names in jobs:
        for name in _grouped(names, baselines):
            baseline = baselines.get(name)
            if baseline not in names:
                baseline = None
            rows.append(_make_row(name, baseline, setting, subjects, measured, options))
    result = BenchResult(rows, options, _environment(options, (s.eager for s in subjects.values())))
    result.targets = check_targets(result)
    return result


def _grouped(names: Sequence[str], baselines: Dict[str, Optional[str]]) -> List[str]:
    """Models ordered so that each baseline comes first, followed by its variants."""
    order: List[str] = []
    for name in names:
        base = baselines.get(name)
        head = base if base in names else name
        if head not in order:
            order.append(head)
            order.extend(n for n in names if baselines.get(n) == head and n != head)
    order.extend(n for n in names if n not in order)
    return order


def _make_row(name: str, baseline: Optional[str], setting: Setting, subjects: Dict[str, _Subject],
              measured: Dict[Tuple[str, Setting], Tuple[List[float], Optional[int]]],
              options: BenchOptions) -> BenchRow:
    subject = subjects[name]
    latencies, peak = measured[(name, setting)]
    macs, activations = subject.stats(setting.img_size)
    q1, median, q3 = _quantiles(latencies)
    report = PAPER_REPORTS.get(name)
    row = BenchRow(
        model=name, baseline=baseline, mode=setting.mode, batch_size=setting.batch_size,
        img_size=setting.img_size, params=subject.params, macs=macs, activations=activations,
        latencies_ms=latencies, latency_ms=median, latency_q1_ms=q1, latency_q3_ms=q3,
        latency_min_ms=min(latencies), latency_max_ms=max(latencies),
        throughput=setting.batch_size / (median / 1e3),
        peak_memory_mb=None if peak is None else peak / 2 ** 20,
    )
    if report is not None:
        row.paper_source, row.paper_params_m, row.paper_gmacs = report.source, report.params_m, report.gmacs
        row.paper_speeds = '; '.join(str(s) for s in report.speeds)
    if baseline is not None:
        base_latencies, base_peak = measured[(baseline, setting)]
        base_macs, _ = subjects[baseline].stats(setting.img_size)
        row.params_ratio = subject.params / subjects[baseline].params
        row.macs_ratio = macs / base_macs if base_macs else None
        statistic = _STATISTICS[options.statistic]
        row.latency_ratio = statistic(latencies) / statistic(base_latencies)
        paired = [a / b for a, b in zip(latencies, base_latencies)]
        row.latency_ratio_q1, _, row.latency_ratio_q3 = _quantiles(paired)
        if peak is not None and base_peak:
            row.memory_ratio = peak / base_peak
        row.paper_latency_ratio, row.paper_latency_ratio_basis = paper_latency_ratio(
            name, baseline, setting.batch_size)
    return row


def check_targets(result: BenchResult, targets: Sequence[SpeedTarget] = SPEED_TARGETS) -> List[TargetCheck]:
    """The targets this run measured (model and baseline both run in the target's setting)."""
    checks = []
    for target in targets:
        row = result.row(target.model, target.setting)
        if row is None or row.baseline != target.baseline:
            continue
        value = row.latency_ratio if target.metric == 'latency' else row.memory_ratio
        checks.append(TargetCheck(target, value))
    return checks


# ---------------------------------------------------------------------------------------------------
# Reports


def _fmt(value: Optional[float], spec: str = '.2f', suffix: str = '') -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:{spec}}{suffix}'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
        lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
        return '\n'.join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = '  '.join(f'{{:<{w}}}' if i < 2 else f'{{:>{w}}}' for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*('-' * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return '\n'.join(lines)


def _heading(text: str, markdown: bool) -> str:
    return f'### {text}' if markdown else f'== {text} =='


def _summary_table(result: BenchResult, markdown: bool) -> List[str]:
    settings = list(dict.fromkeys(r.setting for r in result.rows))
    rows = []
    for model, baseline in dict.fromkeys((r.model, r.baseline) for r in result.rows if r.baseline):
        cells = [model, baseline]
        first = None
        for setting in settings:
            row = result.row(model, setting)
            first = first or row
            cells += [_fmt(row and row.latency_ratio, '.2f', 'x'), _fmt(row and row.memory_ratio, '.2f', 'x')]
        rows.append(cells[:2] + [_fmt(first.params_ratio, '.2f', 'x'), _fmt(first.macs_ratio, '.2f', 'x')] + cells[2:])
    if not rows:
        return []
    headers = ['model', 'baseline', 'params', 'MACs']
    for setting in settings:
        headers += [f'latency {setting}', f'memory {setting}']
    return [_heading('Summary: ours / baseline', markdown), _table(headers, rows, markdown), '']


def _cost_table(result: BenchResult, markdown: bool) -> List[str]:
    out = []
    seen = set()
    for img_size in dict.fromkeys(r.img_size for r in result.rows):
        rows = []
        for r in result.rows:
            if r.img_size != img_size or r.model in seen:
                continue
            seen.add(r.model)
            rows.append([
                r.model, r.baseline or '',
                _fmt(r.params / 1e6), _fmt(r.paper_params_m, 'g'), _fmt(r.params_ratio, '.2f', 'x'),
                _fmt(r.macs / 1e9, '.3f'), _fmt(r.paper_gmacs, 'g'), _fmt(r.macs_ratio, '.2f', 'x'),
                _fmt(r.activations / 1e6), r.paper_speeds or '-', r.paper_source or '-',
            ])
        if rows:
            out += [_heading(f'Model cost per image at {img_size}px (paper values beside ours)', markdown),
                    _table(['model', 'baseline', 'params (M)', 'paper', 'vs base', 'GMACs', 'paper', 'vs base',
                            'acts (M)', 'paper speed', 'paper source'], rows, markdown), '']
    return out


def _speed_tables(result: BenchResult, markdown: bool) -> List[str]:
    out = []
    opts = result.options
    numerics = opts.dtype + (' amp' if opts.amp else '') + (' channels_last' if opts.channels_last else '') \
        + (' compiled' if opts.compile else '')
    for setting in dict.fromkeys(r.setting for r in result.rows):
        rows = []
        for r in result.rows:
            if r.setting != setting:
                continue
            ratio = _fmt(r.latency_ratio, '.2f', 'x')
            if r.latency_ratio is not None:
                ratio += f' [{r.latency_ratio_q1:.2f}-{r.latency_ratio_q3:.2f}]'
            paper = '-'
            if r.paper_latency_ratio is not None:
                paper = f'{r.paper_latency_ratio:.2f}x ({r.paper_latency_ratio_basis})'
            rows.append([
                r.model, r.baseline or '',
                _fmt(r.latency_ms, '.1f'), f'{r.latency_q1_ms:.1f}-{r.latency_q3_ms:.1f}',
                f'{r.latency_min_ms:.1f}-{r.latency_max_ms:.1f}', _fmt(r.throughput, '.1f'),
                _fmt(r.peak_memory_mb, '.0f'), ratio, _fmt(r.memory_ratio, '.2f', 'x'), paper,
            ])
        n = len(result.row(rows[0][0], setting).latencies_ms)
        memory = 'peak MB' if opts.device.startswith('cuda') else f'peak MB ({opts.memory})'
        out += [_heading(f'{setting.mode}, batch {setting.batch_size}, {setting.img_size}px, '
                         f'{opts.device} {numerics}: {n} interleaved runs, ratios of the {opts.statistic}', markdown),
                _table(['model', 'baseline', 'latency (ms)', 'IQR', 'min-max', 'img/s', memory,
                        'latency vs base [IQR]', 'memory vs base', 'paper latency ratio'], rows, markdown), '']
    return out


def _target_table(result: BenchResult, markdown: bool) -> List[str]:
    if not result.targets:
        return []
    rows = [[c.target.model, c.target.baseline, str(c.target.setting), c.target.metric,
             f'<= {c.target.max_ratio:.2f}x', _fmt(c.measured, '.2f', 'x'), c.status] for c in result.targets]
    method = 'CUDA allocator' if result.options.device.startswith('cuda') else result.options.memory
    return [_heading(f'Targets (ratio to the baseline, measured side by side; memory: {method})', markdown),
            _table(['model', 'baseline', 'setting', 'metric', 'target', 'measured', 'check'], rows, markdown), '']


def format_report(result: BenchResult, markdown: bool = False) -> str:
    """The human-readable report: cost table, one speed table per setting, target checks."""
    env = result.environment
    device = env.get('gpu') or f'{env["cpu"]}, {env["threads"]} threads'
    header = (f'timm-pf bench on {device} (torch {env["torch"]}, timm {env["timm"]}). Ratios are ours / '
              f'baseline measured in this run; below 1 is better.')
    if 'dynamic_conv_batch1' in env:
        header += f'\nDynamic convs at batch 1: {env["dynamic_conv_batch1"]}.'
    parts = [header, ''] + _summary_table(result, markdown) + _cost_table(result, markdown)
    parts += _speed_tables(result, markdown)
    parts += _target_table(result, markdown)
    return '\n'.join(parts).rstrip() + '\n'


_CSV_EXCLUDE = ('latencies_ms',)


def to_csv(result: BenchResult) -> str:
    """One line per (model, setting) with every measured and reported field."""
    names = [f for f in BenchRow.__dataclass_fields__ if f not in _CSV_EXCLUDE]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator='\n')
    writer.writeheader()
    for row in result.rows:
        values = asdict(row)
        writer.writerow({k: '' if values[k] is None else values[k] for k in names})
    return buf.getvalue()


def to_json(result: BenchResult) -> str:
    """Environment, options, rows (with every timed run) and target checks as JSON."""
    data = {
        'environment': result.environment,
        'options': asdict(result.options),
        'rows': [asdict(r) for r in result.rows],
        'targets': [{**asdict(c.target), 'measured': c.measured, 'status': c.status} for c in result.targets],
    }
    return json.dumps(data, indent=2)


def plot_result(result: BenchResult, path: str) -> None:
    """Latency vs params and latency vs GMACs, one row of panels per setting, one colour per family.

    Raises ImportError with an install hint when matplotlib (the ``plot`` extra) is missing.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'timm-pf[plot]'") from err
    settings = list(dict.fromkeys(r.setting for r in result.rows))
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.5 * len(settings)), squeeze=False)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for axes_row, setting in zip(axes, settings):
        rows = [r for r in result.rows if r.setting == setting]
        families = list(dict.fromkeys(r.baseline or r.model for r in rows))
        by_name = {r.model: r for r in rows}
        for ax, (xkey, xlabel) in zip(axes_row, [('params', 'params (M)'), ('macs', 'GMACs per image')]):
            scale = 1e6 if xkey == 'params' else 1e9
            for i, family in enumerate(families):
                color = colors[i % len(colors)]
                for r in rows:
                    if (r.baseline or r.model) != family:
                        continue
                    x = getattr(r, xkey) / scale
                    is_base = r.model == family
                    ax.scatter(x, r.latency_ms, color=color, marker='s' if is_base else 'o', s=50, zorder=3,
                               label=family if is_base else None)
                    spread = [[r.latency_ms - r.latency_q1_ms], [r.latency_q3_ms - r.latency_ms]]
                    ax.errorbar(x, r.latency_ms, yerr=spread, color=color, fmt='none', zorder=2)
                    ax.annotate(r.model, (x, r.latency_ms), fontsize=7, xytext=(4, 4), textcoords='offset points')
                    base = by_name.get(r.baseline) if r.baseline else None
                    if base is not None:
                        ax.plot([getattr(base, xkey) / scale, x], [base.latency_ms, r.latency_ms], color=color,
                                linestyle='--', linewidth=1, zorder=1)
            ax.set_xscale('log')
            ax.set_yscale('log')
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel('latency (ms, median; bars: IQR)')
            ax.set_title(f'{setting}, {result.options.device} {result.options.dtype}', fontsize=10)
            ax.grid(True, which='both', alpha=0.3)
        axes_row[0].legend(fontsize=8, title='family (square: baseline)', title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
