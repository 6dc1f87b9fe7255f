"""Side-by-side efficiency benchmark: every model next to its baseline, measured in one process.

The papers promise fewer parameters and MACs *and* faster models in practice. This module measures
all three on the machine at hand and prints the paper's reported values beside ours:

* params, MACs and activations come from :mod:`timm_pf.methods.stats` (MACs = ``FlopCounterMode``
  FLOPs / 2);
* latency is the wall time of one step (a forward pass, or with ``mode='train'`` a forward pass, a
  cross-entropy loss and a backward pass). The first ``warmup`` rounds are discarded; then every round
  runs each model once, in alternating order (A B C, C B A, ...), so that drift of a shared or
  throttling machine hits a model and its baseline alike. We report the median, the quartiles and the
  extremes over rounds, and the ratio to the baseline: the median of the per-round (paired) ratios with
  their quartiles (or, with ``statistic='min'`` for a busy machine, the ratio of the fastest runs). A
  ratio from too few rounds or with a wide spread keeps the run measuring (up to ``max_repeats`` rounds)
  and, if it stays so, is marked unstable in every report (:mod:`timm_pf.tools.bench.ratio`);
* peak memory of one step, weights and input included. On CUDA it is ``torch.cuda.max_memory_allocated``;
  on CPU, by default (``memory='tensors'``), the peak of live tensor storage tracked at the operator level
  (:class:`PeakTensorMemory`), the same quantity without the GPU allocator; with ``memory='rss'`` the
  growth of the resident set (Linux ``VmHWM``) during two steps of each model in a fresh process, which
  adds what kernels allocate internally and the allocator's overhead.

Several image sizes make a resolution sweep: models with a position embedding (ViT, PiT) are built for
each size, and a size a model cannot take (a patch embedding needs whole patches) is refused before
anything is timed. With ``runtime='onnxruntime'`` the same rounds time each model's ONNX export
(:mod:`timm_pf.tools.bench.onnxrt`).

The data that ties it to the papers lives in :mod:`timm_pf.tools.bench.paper`: :data:`BASELINE_RULES`
(which baseline each variant is compared with), :data:`PAPER_REPORTS` (params, MACs and speeds the
papers report, with the table they come from) and :data:`SPEED_TARGETS` (the ratios the package promises).
"""
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from timm_pf.layers.cpu_kernels import cpu_kernel_policy, kernel_status
from timm_pf.layers.dynamic_conv import DynamicConv2d
from .measure import BenchInputError, BenchOptions, _Step, _Subject
from .onnxrt import OnnxModel, OnnxModelError, onnx_step
from .paper import (
    PAPER_IMG_SIZE, PAPER_REPORTS, SPEED_TARGETS, Setting, SpeedTarget, baseline_for, paper_latency_ratio,
)
from .ratio import MIN_STABLE_ROUNDS, latency_ratio, quantiles

__all__ = [
    'DEFAULT_BATCH_SIZES', 'TARGET_THREADS', 'TARGET_CONDITIONS', 'BenchRow', 'TargetCheck', 'BenchResult',
    'resolve_models', 'target_settings', 'target_deviations', 'run_benchmark', 'check_targets',
]

# Batch sizes of the default run: batch 1 and a batch large enough to use both cores of a laptop
# while the whole run stays near two minutes on 2 CPU cores.
DEFAULT_BATCH_SIZES = (1, 8)

# The conditions the targets are promised under; a run under others measures them but gives no verdict.
TARGET_THREADS = 2
TARGET_CONDITIONS = (f'CPU, {TARGET_THREADS} threads, float32, no --amp, --channels-last or --compile, '
                     '--cpu-kernels build')


def _registered(name: str) -> bool:
    import timm
    return timm.is_model(name)


def _unknown_model_message(name: str) -> str:
    from timm_pf.models._registry import did_you_mean
    return f'unknown model {name!r}: not registered with timm{did_you_mean(name)}'


def resolve_models(patterns: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``(model, baseline)`` pairs for globs and names; ``'MODEL:BASELINE'`` pairs explicitly.

    Raises :class:`BenchInputError` for a glob that matches no registered model or an unknown name.
    """
    import timm
    pairs: List[Tuple[str, Optional[str]]] = []
    for pattern in patterns:
        if pattern.startswith(('local-dir:', 'hf-hub:')):
            raise BenchInputError(f'--models {pattern}: bench builds registered models by name (weights do not '
                                  'change their timing), not local-dir: or hf-hub: sources')
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
        if explicit_baseline and explicit_baseline in names:
            raise BenchInputError(f'--models {pattern}:{explicit_baseline} pairs {explicit_baseline} with itself')
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


def target_deviations(options: BenchOptions, threads: int) -> List[str]:
    """The flags by which a run with ``options`` on ``threads`` CPU threads leaves :data:`TARGET_CONDITIONS`."""
    return [flag for flag, differs in (
        (f'--device {options.device}', torch.device(options.device).type != 'cpu'),
        (f'--threads {threads}', threads != TARGET_THREADS),
        (f'--dtype {options.dtype}', options.dtype != 'float32'), ('--amp', options.amp),
        ('--channels-last', options.channels_last), ('--compile', options.compile),
        (f'--cpu-kernels {options.cpu_kernels}',  # ONNX Runtime runs no kernel of ours
         options.runtime == 'torch' and options.cpu_kernels != 'build'),
    ) if differs]


def _baselines(pairs: Sequence[Tuple[str, Optional[str]]]) -> Dict[str, Optional[str]]:
    """Each model's baseline; raises :class:`BenchInputError` for a model paired with two."""
    baselines: Dict[str, Optional[str]] = {}
    for name, baseline in pairs:
        known = baselines.get(name)
        if known is not None and baseline is not None and baseline != known:
            raise BenchInputError(f'{name} is paired with {known} and {baseline}: a model has one baseline per run, '
                                  'compare the other in a run of its own')
        baselines[name] = baseline or known
    return baselines


# Extra rounds for unstable ratios stop at ``options.max_repeats`` rounds or this many times the setting's budget.
_EXTENSION_BUDGET_FACTOR = 3.0


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
    latencies_ms: List[float]  # empty when the model could not be timed (``error`` says why)
    latency_ms: Optional[float]  # median
    latency_q1_ms: Optional[float]
    latency_q3_ms: Optional[float]
    latency_min_ms: Optional[float]
    latency_max_ms: Optional[float]
    throughput: Optional[float]  # images per second at the median latency
    peak_memory_mb: Optional[float]
    params_ratio: Optional[float] = None
    macs_ratio: Optional[float] = None
    latency_ratio: Optional[float] = None  # median of the per-round paired ratios (fastest runs with 'min')
    latency_ratio_q1: Optional[float] = None  # its spread (timm_pf.tools.bench.ratio)
    latency_ratio_q3: Optional[float] = None
    latency_ratio_unstable: str = ''  # why the ratio is not to be quoted; '' when it is stable
    memory_ratio: Optional[float] = None
    paper_source: Optional[str] = None  # the paper fields: at PAPER_IMG_SIZE only, the size the papers report
    paper_params_m: Optional[float] = None
    paper_gmacs: Optional[float] = None
    paper_speeds: str = ''
    paper_latency_ratio: Optional[float] = None  # inference only, from speeds on the run's device type
    paper_latency_ratio_basis: str = ''
    error: str = ''  # why the model was not timed (ONNX Runtime: export failed or output differs from PyTorch)

    @property
    def setting(self) -> Setting:
        return Setting(self.mode, self.batch_size, self.img_size)


@dataclass
class TargetCheck:
    target: SpeedTarget
    measured: Optional[float]  # None when the run did not measure it
    unstable: str = ''  # why the measured ratio is unstable; then the target is neither passed nor failed
    error: str = ''  # why the model or its baseline could not be timed
    deviations: str = ''  # how the run left TARGET_CONDITIONS; then the target is neither passed nor failed

    @property
    def status(self) -> str:
        if self.deviations:
            return 'n/c'
        if self.error:
            return 'ERROR'
        if self.measured is None:
            return 'n/a'
        if self.unstable:
            return 'UNSTABLE'
        return 'PASS' if self.measured <= self.target.max_ratio else 'FAIL'


@dataclass
class BenchResult:
    rows: List[BenchRow]
    options: BenchOptions
    environment: Dict[str, object]
    targets: List[TargetCheck] = field(default_factory=list)

    def row(self, model: str, setting: Setting) -> Optional[BenchRow]:
        return next((r for r in self.rows if r.model == model and r.setting == setting), None)


def _environment(options: BenchOptions, models: Iterable[nn.Module] = ()) -> Dict[str, object]:
    import timm
    from timm_pf import __version__
    env: Dict[str, object] = {
        'timm_pf': __version__, 'torch': torch.__version__, 'timm': timm.__version__,
        'python': platform.python_version(), 'platform': platform.platform(),
        'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(),
    }
    env['cpu'], env['cpu_extensions'] = _cpuinfo()
    if options.runtime == 'onnxruntime':
        import onnxruntime
        env['onnxruntime'] = onnxruntime.__version__
    if torch.device(options.device).type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(torch.device(options.device))
    elif any(isinstance(m, DynamicConv2d) for model in models for m in model.modules()):
        env['dynamic_conv_batch1'] = kernel_status()
    return env


# The vector extensions that decide CPU kernel speed (x86 'flags', Arm 'Features' of /proc/cpuinfo).
_VECTOR_EXTENSIONS = (
    'sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16',
    'avx_vnni', 'amx_tile', 'amx_bf16', 'amx_int8', 'asimd', 'asimdhp', 'sve', 'sve2', 'bf16', 'i8mm',
)


def _cpuinfo(path: str = '/proc/cpuinfo') -> Tuple[str, List[str]]:
    """The CPU's model name and which of :data:`_VECTOR_EXTENSIONS` it has (first processor of ``path``)."""
    name, flags = '', set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and not name:
                    name = value.strip()
                elif key in ('flags', 'Features') and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), [e for e in _VECTOR_EXTENSIONS if e in flags]


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


def _interleaved(steps: Dict[str, _Step], rounds: int, progress: _Progress, label: str,
                 times: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """``rounds`` more rounds of every step, appended to ``times``; odd rounds run in reverse order."""
    names = list(steps)
    times = times if times is not None else {name: [] for name in names}
    done = len(times[names[0]])
    for r in range(done, done + rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(steps[name].time())
            progress.step(f'{label} {name}')
    return times


def _unstable_pairs(times: Dict[str, List[float]], baselines: Dict[str, Optional[str]], statistic: str) -> List[str]:
    return [name for name, base in baselines.items() if name in times and base in times
            and latency_ratio(times[name], times[base], statistic).unstable]


def _timed_rounds(steps: Dict[str, _Step], baselines: Dict[str, Optional[str]], options: BenchOptions,
                  budget: float, progress: _Progress, label: str) -> Dict[str, List[float]]:
    """Warm-up, then the timed rounds: a fixed ``options.repeats``, or as many as ``budget`` seconds allow
    (at least :data:`MIN_STABLE_ROUNDS`), extended while a ratio is unstable, up to ``options.max_repeats``
    rounds and :data:`_EXTENSION_BUDGET_FACTOR` times the budget."""
    progress.add(options.warmup * len(steps))
    warm = _interleaved(steps, options.warmup, progress, f'{label} warm-up')
    if options.repeats is not None:
        progress.add(options.repeats * len(steps))
        return _interleaved(steps, options.repeats, progress, label)
    round_time = max(sum(t[-1] for t in warm.values()), 1e-6)
    rounds = int(min(options.max_repeats, max(MIN_STABLE_ROUNDS, budget // round_time)))
    start = time.perf_counter()
    progress.add(rounds * len(steps))
    times = _interleaved(steps, rounds, progress, label)
    while (rounds < options.max_repeats and _unstable_pairs(times, baselines, options.statistic)
           and time.perf_counter() - start < _EXTENSION_BUDGET_FACTOR * budget):
        extra = min(rounds, options.max_repeats - rounds)
        progress.add(extra * len(steps))
        times = _interleaved(steps, extra, progress, f'{label} (unstable, more rounds)', times)
        rounds += extra
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
    _baselines(pairs)
    if options.runtime == 'onnxruntime' and any(setting.mode != 'infer' for setting, _ in jobs):
        raise BenchInputError('--runtime onnxruntime times inference only: drop --train')
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
    baselines = _baselines(pairs)
    bar = _Progress(progress)
    onnx = options.runtime == 'onnxruntime'
    folder = tempfile.TemporaryDirectory(prefix='timm-pf-bench-') if onnx else nullcontext()
    try:
        subjects = _build_subjects(jobs, options, bar)
        measured: Dict[Tuple[str, Setting], Tuple[List[float], Optional[int]]] = {}
        failures: Dict[Tuple[str, Setting], str] = {}
        onnx_models: Dict[Tuple[str, int], OnnxModel] = {}
        budget = options.time_budget / max(1, len(jobs))
        for setting, names in jobs:
            steps = {}
            for name in names:
                if not onnx:
                    steps[name] = _Step(subjects[name, setting.img_size], setting, options)
                    continue
                key = (name, setting.img_size)
                if key not in onnx_models:  # once per model and size: the batch axis is dynamic
                    bar.add(1)
                    onnx_models[key] = OnnxModel(subjects[key], setting.img_size, options, folder.name)
                    bar.step(f'export {name} {setting.img_size}px')
                try:
                    steps[name] = onnx_step(onnx_models[key], setting, options)
                except OnnxModelError as err:
                    failures[name, setting] = str(err)
            if not steps:
                continue
            times = _timed_rounds(steps, baselines, options, budget, bar, str(setting))
            measure_memory = options.memory != 'off'
            bar.add(len(steps) if measure_memory else 0)
            for name, step in steps.items():
                peak = None
                if measure_memory:
                    peak = step.peak_memory()
                    bar.step(f'{setting} memory {name}')
                measured[(name, setting)] = ([t * 1e3 for t in times[name]], peak)
                step.subject.eager.zero_grad(set_to_none=True)  # free a training step's gradients
    finally:
        bar.close()
        if onnx:
            folder.cleanup()

    rows = []
    for setting, names in jobs:
        for name in _grouped(names, baselines):
            baseline = baselines.get(name)
            if baseline not in names:
                baseline = None
            rows.append(_make_row(name, baseline, setting, subjects, measured, failures, options))
    unique = {id(s): s for s in subjects.values()}.values()
    result = BenchResult(rows, options, _environment(options, (s.eager for s in unique)))
    result.targets = check_targets(result)
    return result


def _fixed_input_size(name: str) -> bool:
    """Whether the model is built for one input size (ViT, PiT: ``img_size=`` lays out its position embedding)."""
    import timm
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None:  # a variant without cfgs of its own (the *_replace ones): its model's, built on the meta device
        model = timm.create_model(name, device='meta')
        return bool((getattr(model, 'pretrained_cfg', None) or {}).get('fixed_input_size', False))
    return bool(cfg.fixed_input_size)


def _size_error(subject: _Subject, img_size: int) -> str:
    """Why ``subject`` cannot take ``img_size`` px images ('' when it can): a patch embedding needs whole patches."""
    embed = getattr(subject.eager, 'patch_embed', None)
    conv = next((m for m in embed.modules() if isinstance(m, nn.Conv2d)), None) if embed is not None else None
    if conv is None:
        return ''
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    if img_size >= kernel and (img_size - kernel) % stride == 0:
        return ''
    sizes = f'a multiple of {stride}' if kernel % stride == 0 else f'{kernel} plus a multiple of {stride}'
    return f'{subject.name} needs {sizes}, at least {kernel} (its {kernel}x{kernel}/{stride} patch embedding)'


def _build_subjects(jobs: Sequence[Tuple[Setting, Sequence[str]]], options: BenchOptions,
                    progress: _Progress) -> Dict[Tuple[str, int], _Subject]:
    """The prepared model of each (name, image size) the jobs need: one per size for models built for one
    input size, one for all sizes otherwise. Raises :class:`BenchInputError` naming every model that
    cannot take a requested size, before anything is timed."""
    sizes: Dict[str, List[int]] = {}
    for setting, names in jobs:
        for name in names:
            sizes.setdefault(name, [])
            if setting.img_size not in sizes[name]:
                sizes[name].append(setting.img_size)
    subjects: Dict[Tuple[str, int], _Subject] = {}
    errors: List[str] = []
    for name, name_sizes in sizes.items():
        fixed = _fixed_input_size(name)
        builds = [[s] for s in name_sizes] if fixed else [name_sizes]
        progress.add(len(builds))
        for build in builds:
            subject = _Subject(name, options, img_size=build[0] if fixed else None)
            bad = [s for s in build if _size_error(subject, s)]
            if bad:
                errors.append(f'{_size_error(subject, bad[0])}: got {", ".join(map(str, bad))}')
                continue
            for img_size in build:
                subject.stats(img_size)
                subjects[name, img_size] = subject
            subject.prepare()
            progress.step(f'build {name}')
    if errors:
        raise BenchInputError('--img-size: ' + '; '.join(dict.fromkeys(errors)))
    return subjects


def _grouped(names: Sequence[str], baselines: Dict[str, Optional[str]]) -> List[str]:
    """Models ordered so that each baseline comes first, followed by its variants."""
    order: List[str] = []
    for name in names:
        base = baselines.get(name)
        head = base if base in names else name
        if head not in order:
            order.append(head)
            order.extend(n for n in names if baselines.get(n) == head and n != head and n not in order)
    order.extend(n for n in names if n not in order)
    return order


def _make_row(name: str, baseline: Optional[str], setting: Setting, subjects: Dict[Tuple[str, int], _Subject],
              measured: Dict[Tuple[str, Setting], Tuple[List[float], Optional[int]]],
              failures: Dict[Tuple[str, Setting], str], options: BenchOptions) -> BenchRow:
    subject = subjects[name, setting.img_size]
    latencies, peak = measured.get((name, setting), ([], None))
    macs, activations = subject.stats(setting.img_size)
    q1, median, q3 = quantiles(latencies) if latencies else (None, None, None)
    report = PAPER_REPORTS.get(name)
    row = BenchRow(
        model=name, baseline=baseline, mode=setting.mode, batch_size=setting.batch_size,
        img_size=setting.img_size, params=subject.params, macs=macs, activations=activations,
        latencies_ms=latencies, latency_ms=median, latency_q1_ms=q1, latency_q3_ms=q3,
        latency_min_ms=min(latencies, default=None), latency_max_ms=max(latencies, default=None),
        throughput=setting.batch_size / (median / 1e3) if latencies else None,
        peak_memory_mb=None if peak is None else peak / 2 ** 20, error=failures.get((name, setting), ''),
    )
    if report is not None and setting.img_size == PAPER_IMG_SIZE:  # the papers report their 224 px models
        row.paper_source, row.paper_params_m, row.paper_gmacs = report.source, report.params_m, report.gmacs
        row.paper_speeds = '; '.join(str(s) for s in report.speeds)
    if baseline is not None:
        base_latencies, base_peak = measured.get((baseline, setting), ([], None))
        base = subjects[baseline, setting.img_size]
        base_macs, _ = base.stats(setting.img_size)
        row.params_ratio = subject.params / base.params
        row.macs_ratio = macs / base_macs if base_macs else None
        if latencies and base_latencies:
            ratio = latency_ratio(latencies, base_latencies, options.statistic)
            row.latency_ratio, row.latency_ratio_q1, row.latency_ratio_q3 = ratio.value, ratio.q1, ratio.q3
            row.latency_ratio_unstable = ratio.unstable
        if peak is not None and base_peak:
            row.memory_ratio = peak / base_peak
        if setting.mode == 'infer' and setting.img_size == PAPER_IMG_SIZE:  # the papers time inference
            row.paper_latency_ratio, row.paper_latency_ratio_basis = paper_latency_ratio(
                name, baseline, setting.batch_size, torch.device(options.device).type)
    return row


def check_targets(result: BenchResult, targets: Optional[Sequence[SpeedTarget]] = None) -> List[TargetCheck]:
    """The targets (default :data:`SPEED_TARGETS`) this run measured: model and baseline both ran in the
    target's setting and runtime. A run outside :data:`TARGET_CONDITIONS` gives them no verdict ('n/c')."""
    deviations = ', '.join(target_deviations(result.options, result.environment['threads']))
    checks = []
    for target in SPEED_TARGETS if targets is None else targets:
        row = result.row(target.model, target.setting)
        if row is None or row.baseline != target.baseline or target.runtime != result.options.runtime:
            continue
        base = result.row(target.baseline, target.setting)
        error = '; '.join(f'{r.model}: {r.error}' for r in (row, base) if r is not None and r.error)
        if target.metric == 'latency':
            checks.append(TargetCheck(target, row.latency_ratio, row.latency_ratio_unstable, error, deviations))
        else:
            checks.append(TargetCheck(target, row.memory_ratio, error=error, deviations=deviations))
    return checks
