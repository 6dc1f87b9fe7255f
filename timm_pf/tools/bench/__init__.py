"""Side-by-side efficiency benchmark: every model next to its baseline, measured in one process.

paper: the papers' numbers, the baselines and the speed targets; measure: one model in one setting
(latency step, statistics, peak memory); runner: the interleaved run and its rows; report: tables,
CSV and JSON; plot: the latency plot. The method is described in :mod:`timm_pf.tools.bench.runner`.
"""
from .measure import BenchInputError, BenchOptions, PeakTensorMemory
from .paper import (
    BASELINE_RULES, HEADLINE_MODELS, PAPER_REPORTS, SCALING_PAIRS, SCALING_SIZES, SPEED_TARGETS, PaperReport,
    ReportedSpeed, Setting, SpeedTarget, baseline_for, paper_latency_ratio,
)
from .plot import plot_result
from .report import format_report, ratio_vs_resolution, to_csv, to_json
from .runner import (
    DEFAULT_BATCH_SIZES, TARGET_CONDITIONS, TARGET_THREADS, BenchResult, BenchRow, TargetCheck, check_targets,
    resolve_models, run_benchmark, target_deviations, target_settings,
)

__all__ = [
    'HEADLINE_MODELS', 'BASELINE_RULES', 'PAPER_REPORTS', 'SPEED_TARGETS', 'SCALING_PAIRS', 'SCALING_SIZES',
    'DEFAULT_BATCH_SIZES', 'TARGET_THREADS', 'TARGET_CONDITIONS', 'BenchInputError', 'ReportedSpeed', 'PaperReport',
    'Setting', 'SpeedTarget', 'BenchOptions',
    'BenchRow', 'TargetCheck', 'BenchResult', 'PeakTensorMemory', 'baseline_for', 'resolve_models',
    'target_settings', 'target_deviations', 'paper_latency_ratio', 'run_benchmark', 'check_targets', 'format_report',
    'ratio_vs_resolution', 'to_csv', 'to_json', 'plot_result',
]
