"""Reports of a benchmark run: text or Markdown tables, CSV and JSON."""
import csv
import io
import json
import math
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

from .paper import PAPER_IMG_SIZE, Setting
from .measure import BenchOptions
from .runner import TARGET_CONDITIONS, BenchResult, BenchRow

__all__ = ['format_report', 'ratio_vs_resolution', 'run_conditions', 'to_csv', 'to_json']

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
            cells += [_ratio_cell(row), _fmt(row and row.memory_ratio, '.2f', 'x')]
        rows.append(cells[:2] + [_fmt(first.params_ratio, '.2f', 'x'), _fmt(first.macs_ratio, '.2f', 'x')] + cells[2:])
    if not rows:
        return []
    headers = ['model', 'baseline', 'params', f'MACs {settings[0].img_size}px']
    for setting in settings:
        headers += [f'latency {setting}', f'memory {setting}']
    out = [_heading('Summary: ours / baseline', markdown), _table(headers, rows, markdown), '']
    return out + _unstable_notes(result)


_UNSTABLE_MARK = ' (unstable)'


def _ratio_cell(row: Optional[BenchRow]) -> str:
    """A latency ratio, marked when it is unstable."""
    if row is None or row.latency_ratio is None:
        return '-'
    return f'{row.latency_ratio:.2f}x' + (_UNSTABLE_MARK if row.latency_ratio_unstable else '')


def _unstable_notes(result: BenchResult) -> List[str]:
    notes = [f'- {r.model} / {r.baseline}, {r.setting}: {r.latency_ratio_unstable}'
             for r in result.rows if r.latency_ratio_unstable]
    if not notes:
        return []
    return ['Unstable latency ratios (not to be quoted; targets on them are neither passed nor failed):'] + notes + ['']


def ratio_vs_resolution(result: BenchResult) -> List[Dict[str, object]]:
    """Per pair and (mode, batch size): the latency and memory ratios at each image size of the run, in
    increasing size; empty unless the run measured more than one size."""
    sizes = sorted({r.img_size for r in result.rows})
    if len(sizes) < 2:
        return []
    out = []
    for model, baseline, mode, batch_size in dict.fromkeys(
            (r.model, r.baseline, r.mode, r.batch_size) for r in result.rows if r.baseline):
        rows = [result.row(model, Setting(mode, batch_size, size)) for size in sizes]
        out.append({'model': model, 'baseline': baseline, 'mode': mode, 'batch_size': batch_size, 'sizes': [
            {'img_size': r.img_size, 'latency_ratio': r.latency_ratio, 'latency_ratio_q1': r.latency_ratio_q1,
             'latency_ratio_q3': r.latency_ratio_q3, 'latency_ratio_unstable': r.latency_ratio_unstable,
             'memory_ratio': r.memory_ratio} for r in rows if r is not None]})
    return out


def _resolution_table(result: BenchResult, markdown: bool) -> List[str]:
    sweep = ratio_vs_resolution(result)
    if not sweep:
        return []
    sizes = sorted({r.img_size for r in result.rows})
    rows = []
    for pair in sweep:
        cells = [pair['model'], pair['baseline'], f'{pair["mode"]} b{pair["batch_size"]}']
        for size in sizes:
            row = result.row(pair['model'], Setting(pair['mode'], pair['batch_size'], size))
            cells += [_ratio_cell(row), _fmt(row and row.memory_ratio, '.2f', 'x')]
        rows.append(cells)
    headers = ['model', 'baseline', 'setting'] + [f'{m} {s}px' for s in sizes for m in ('latency', 'memory')]
    return [_heading('Ratio vs resolution: ours / baseline per image size', markdown),
            _table(headers, rows, markdown), '']


def _cost_table(result: BenchResult, markdown: bool) -> List[str]:
    out = []
    for img_size in dict.fromkeys(r.img_size for r in result.rows):
        rows = []
        at_paper_size = img_size == PAPER_IMG_SIZE  # the papers report their 224 px models, rows elsewhere no values
        for r in {r.model: r for r in result.rows if r.img_size == img_size}.values():
            paper = [_fmt(r.paper_params_m, 'g'), _fmt(r.paper_gmacs, 'g'), r.paper_speeds or '-',
                     r.paper_source or '-']
            rows.append([
                r.model, r.baseline or '',
                _fmt(r.params / 1e6), paper[0], _fmt(r.params_ratio, '.2f', 'x'),
                _fmt(r.macs / 1e9, '.3f'), paper[1], _fmt(r.macs_ratio, '.2f', 'x'),
                _fmt(r.activations / 1e6), *paper[2:],
            ])
        if rows:
            beside = 'paper values beside ours' if at_paper_size else f'the papers report {PAPER_IMG_SIZE}px'
            out += [_heading(f'Model cost per image at {img_size}px ({beside})', markdown),
                    _table(['model', 'baseline', 'params (M)', 'paper', 'vs base', 'GMACs', 'paper', 'vs base',
                            'acts (M)', 'paper speed', 'paper source'], rows, markdown), '']
    return out


_RATIO_OF = {'median': 'ratio = median of the per-run ratios', 'min': 'ratio of the fastest runs'}


def run_conditions(options: BenchOptions) -> str:
    """How the models ran, for table and plot titles: dtype, amp, layout, compilation, runtime."""
    return options.dtype + (' amp' if options.amp else '') + (' channels_last' if options.channels_last else '') \
        + (' compiled' if options.compile else '') + (' ONNX Runtime' if options.runtime == 'onnxruntime' else '')


def _speed_tables(result: BenchResult, markdown: bool) -> List[str]:
    out = []
    opts = result.options
    numerics = run_conditions(opts)
    for setting in dict.fromkeys(r.setting for r in result.rows):
        rows = []
        for r in result.rows:
            if r.setting != setting:
                continue
            ratio = _ratio_cell(r)
            if r.latency_ratio is not None:
                ratio = ratio.replace('x', f'x [{r.latency_ratio_q1:.2f}-{r.latency_ratio_q3:.2f}]', 1)
            paper = '-'
            if r.paper_latency_ratio is not None:
                paper = f'{r.paper_latency_ratio:.2f}x ({r.paper_latency_ratio_basis})'
            if r.error:
                timing = ['not timed', '-', '-', '-']
            else:
                timing = [_fmt(r.latency_ms, '.1f'), f'{r.latency_q1_ms:.1f}-{r.latency_q3_ms:.1f}',
                          f'{r.latency_min_ms:.1f}-{r.latency_max_ms:.1f}', _fmt(r.throughput, '.1f')]
            rows.append([r.model, r.baseline or '', *timing, _fmt(r.peak_memory_mb, '.0f'), ratio,
                         _fmt(r.memory_ratio, '.2f', 'x'), paper])
        n = max(len(r.latencies_ms) for r in result.rows if r.setting == setting)
        memory = 'peak MB' if opts.device.startswith('cuda') else f'peak MB ({_memory_method(opts)})'
        out += [_heading(f'{setting.mode}, batch {setting.batch_size}, {setting.img_size}px, '
                         f'{opts.device} {numerics}: {n} interleaved runs, {_RATIO_OF[opts.statistic]}', markdown),
                _table(['model', 'baseline', 'latency (ms)', 'IQR', 'min-max', 'img/s', memory,
                        'latency vs base [IQR]', 'memory vs base', 'paper latency ratio'], rows, markdown), '']
    errors = [f'- {r.model}, {r.setting}: {r.error}' for r in result.rows if r.error]
    if errors:
        out += ['Not timed:'] + errors + ['']
    return out


def _memory_method(options) -> str:
    return 'not measured in ONNX Runtime' if options.runtime == 'onnxruntime' else options.memory


def _applied_options(options) -> Dict[str, Any]:
    """The options as they applied to the timings: ONNX Runtime measures no memory and runs no kernel of ours."""
    applied = asdict(options)
    if options.runtime == 'onnxruntime':
        applied.update(memory=_memory_method(options), cpu_kernels='not used by ONNX Runtime')
    return applied


def _target_table(result: BenchResult, markdown: bool) -> List[str]:
    if not result.targets:
        return []
    rows = [[c.target.model, c.target.baseline, str(c.target.setting), c.target.metric,
             f'<= {c.target.max_ratio:.2f}x', _fmt(c.measured, '.2f', 'x'),
             c.status] for c in result.targets]
    unstable = [f'- {c.target}: {c.unstable}' for c in result.targets if c.status == 'UNSTABLE']
    errors = [f'- {c.target}: {c.error}' for c in result.targets if c.status == 'ERROR']
    deviations = next((c.deviations for c in result.targets if c.deviations), '')
    missing = [f'- {c.target}' for c in result.targets if c.status == 'n/a']
    method = 'CUDA allocator' if result.options.device.startswith('cuda') else _memory_method(result.options)
    out = [_heading(f'Targets (ratio to the baseline, measured side by side; memory: {method})', markdown),
            _table(['model', 'baseline', 'setting', 'metric', 'target', 'measured', 'check'], rows, markdown), '']
    if unstable:
        out += ['UNSTABLE: the ratio was too noisy to pass or fail the target (--strict counts it as a failure):']
        out += unstable + ['']
    if errors:
        out += ['ERROR: the model or its baseline could not be timed:'] + errors + ['']
    if missing:
        out += ['n/a: not measured in this run, e.g. memory with --memory off (--strict counts it as a failure):']
        out += missing + ['']
    if deviations:
        out += [f'n/c: not comparable, so neither passed nor failed: the targets hold for {TARGET_CONDITIONS}; '
                f'this run used {deviations} (--strict counts it as a failure)', '']
    return out


def format_report(result: BenchResult, markdown: bool = False) -> str:
    """The human-readable report: cost table, one speed table per setting, target checks."""
    env = result.environment
    extensions = ' '.join(env.get('cpu_extensions') or ()) or 'no vector extensions found'
    cpu = f'{env["cpu"]} ({extensions})'
    device = f'{env["gpu"]} with {cpu}' if 'gpu' in env else f'{cpu}, {env["threads"]} threads'
    header = (f'timm-pf bench on {device} (torch {env["torch"]}, timm {env["timm"]}). Ratios are ours / '
              f'baseline measured in this run; below 1 is better.')
    if 'onnxruntime' in env:
        header += (f'\nRuntime: ONNX Runtime {env["onnxruntime"]} (CPU), each model exported once per size with '
                   'torch.onnx.export and a dynamic batch, output checked against PyTorch before timing.')
    elif 'dynamic_conv_batch1' in env:
        header += f'\nDynamic convs at batch 1: {env["dynamic_conv_batch1"]}.'
    parts = [header, ''] + _summary_table(result, markdown) + _resolution_table(result, markdown)
    parts += _cost_table(result, markdown)
    parts += _speed_tables(result, markdown)
    parts += _target_table(result, markdown)
    return '\n'.join(parts).rstrip() + '\n'


_CSV_EXCLUDE = ('latencies_ms',)


def to_csv(result: BenchResult) -> str:
    """One line per (model, setting) with every measured and reported field (a resolution sweep's ratio
    per size is its lines' ``img_size``, ``latency_ratio`` and ``memory_ratio``)."""
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
        'options': _applied_options(result.options),
        'rows': [asdict(r) for r in result.rows],
        'ratio_vs_resolution': ratio_vs_resolution(result),
        'targets': [{**asdict(c.target), 'measured': c.measured, 'status': c.status, 'unstable': c.unstable,
                     'error': c.error} for c in result.targets],
    }
    return json.dumps(data, indent=2)
