"""``timm-pf bench``: each model next to its baseline (params, MACs, latency, memory) on this machine."""
import argparse
import fnmatch
import os
import sys
from typing import Dict, List, Optional, Sequence

from ._args import image_file, output_file, positive_float
from ._errors import Failure, require_plot_extra

_DEFAULT_BUDGET = {'headline': 50.0, 'targets': 240.0, 'scaling': 300.0}


def _split(values: Optional[Sequence[str]]) -> List[str]:
    return [v for value in values or () for v in value.split(',') if v]


def _write(text: str, path: str) -> None:
    if path == '-':
        sys.stdout.write(text)
    else:
        with open(path, 'w') as f:
            f.write(text)


def _plan(args: argparse.Namespace):
    """(jobs, pairs) for the request; raises BenchInputError for a bad one."""
    import timm
    from timm_pf.tools.bench import (
        DEFAULT_BATCH_SIZES, HEADLINE_MODELS, SCALING_PAIRS, SCALING_SIZES, SPEED_TARGETS, BenchInputError, Setting,
        resolve_models, target_settings)
    patterns = _split(args.models)
    if args.models is not None and not patterns:
        raise BenchInputError('--models: no model name given')
    writers: Dict[str, str] = {}  # 'stdout' or the real path -> the first flag writing there
    for flag, path in (('--csv', args.csv), ('--json', args.json), ('--markdown', args.markdown),
                       ('--plot', args.plot)):
        if path:
            where = 'stdout' if path == '-' else os.path.realpath(path)
            if where in writers:
                raise BenchInputError(f'{writers[where]} and {flag} would both write to '
                                      f'{"stdout" if path == "-" else path}: give each its own file')
            writers[where] = flag
    if args.preset == 'targets':
        if args.batch_sizes or args.img_size is not None or args.train:
            raise BenchInputError('--preset targets fixes the settings: drop --batch-sizes, --img-size and --train')
        targets = [t for t in SPEED_TARGETS if t.runtime == args.runtime
                   and (not patterns or any(fnmatch.fnmatchcase(t.model, p) for p in patterns))]
        if not targets:
            raise BenchInputError(f'no speed target with --runtime {args.runtime} concerns {", ".join(patterns)}')
        names = list(dict.fromkeys(n for t in targets for n in (t.model, t.baseline)))
        missing = [n for n in names if not timm.is_model(n)]
        if missing:
            raise BenchInputError(f'the targets need models that are not registered: {", ".join(missing)}')
        return target_settings(targets), [(t.model, t.baseline) for t in targets]
    sizes, batch_sizes = [224], DEFAULT_BATCH_SIZES
    if args.preset == 'scaling':
        pairs = [p for p in SCALING_PAIRS if not patterns or any(fnmatch.fnmatchcase(p[0], q) for q in patterns)]
        if not pairs:
            raise BenchInputError(f'no pair of --preset scaling concerns {", ".join(patterns)}')
        sizes, batch_sizes = list(SCALING_SIZES), (1,)
    elif patterns:
        pairs = resolve_models(patterns)
    else:
        available = [m for m in HEADLINE_MODELS if timm.is_model(m)]
        skipped = [m for m in HEADLINE_MODELS if m not in available]
        if skipped:
            print(f'timm-pf bench: skipping unregistered models: {", ".join(skipped)}', file=sys.stderr)
        if not available:
            raise BenchInputError('none of the default models is registered')
        pairs = resolve_models(available)
    if any(b <= 0 for b in args.batch_sizes or ()):
        raise BenchInputError('--batch-sizes must be positive')
    sizes = list(dict.fromkeys(args.img_size or sizes))
    if any(s <= 0 for s in sizes):
        raise BenchInputError(f'--img-size must be positive, got {", ".join(str(s) for s in sizes if s <= 0)}')
    if any(s < 32 for s in sizes):
        raise BenchInputError(f'--img-size must be at least 32, got {", ".join(str(s) for s in sizes if s < 32)}')
    names = list(dict.fromkeys(n for pair in pairs for n in pair if n))
    mode = 'train' if args.train else 'infer'
    jobs = [(Setting(mode, bs, size), names) for size in sizes for bs in dict.fromkeys(args.batch_sizes or batch_sizes)]
    return jobs, pairs


def _list() -> int:
    from timm_pf.tools.bench import (
        BASELINE_RULES, HEADLINE_MODELS, PAPER_REPORTS, SCALING_PAIRS, SCALING_SIZES, SPEED_TARGETS, TARGET_CONDITIONS,
    )
    print('default models (--preset headline): ' + ', '.join(HEADLINE_MODELS))
    print('\nbaselines (first matching pattern wins; MODEL:BASELINE on --models overrides):')
    for pattern, baseline in BASELINE_RULES:
        print(f'  {pattern:<20} -> {baseline}')
    print('\npaper values:')
    for name, report in PAPER_REPORTS.items():
        speeds = '; '.join(str(s) for s in report.speeds) or '-'
        params = f'{report.params_m:g} M params' if report.params_m else '-'
        macs = f'{report.gmacs:g} GMACs' if report.gmacs else '-'
        print(f'  {name:<22} {params:<16} {macs:<13} {speeds:<36} [{report.source}]')
    print(f'\npairs of --preset scaling (batch 1, {" ".join(map(str, SCALING_SIZES))} px; --img-size overrides):')
    for model, baseline in SCALING_PAIRS:
        print(f'  {model:<20} vs {baseline}')
    for runtime, flags in (('torch', ''), ('onnxruntime', ' --runtime onnxruntime')):
        print(f'\ntargets (--preset targets{flags}; {TARGET_CONDITIONS}):')
        for target in SPEED_TARGETS:
            if target.runtime == runtime:
                print(f'  {target}')
    return 0


def _run(args: argparse.Namespace) -> int:
    from timm_pf.tools.bench import (
        TARGET_CONDITIONS, TARGET_THREADS, BenchInputError, BenchOptions, format_report, plot_result, run_benchmark,
        target_deviations, to_csv, to_json,
    )
    if args.list:
        return _list()
    jobs, pairs = _plan(args)  # BenchInputError and the others: exit codes in timm_pf.cli._errors
    options = BenchOptions(
        device=args.device, dtype=args.dtype, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, threads=TARGET_THREADS if args.threads is None and args.preset == 'targets'
        else args.threads, warmup=args.warmup, repeats=args.repeats, max_repeats=args.max_repeats,
        time_budget=args.time_budget if args.time_budget is not None else _DEFAULT_BUDGET[args.preset],
        memory=args.memory, statistic=args.statistic, cpu_kernels=args.cpu_kernels, runtime=args.runtime)
    options.validate()
    if args.preset == 'targets':
        deviations = target_deviations(options, options.threads)
        if deviations:
            raise BenchInputError(f'--preset targets runs the conditions of the targets ({TARGET_CONDITIONS}): '
                                  f'drop {", ".join(deviations)}')
    if args.plot:
        require_plot_extra('--plot')
    result = run_benchmark(jobs, pairs, options, progress=not args.no_progress)
    # the files first: a closed or full stdout must not lose the run's results
    outputs = [(args.markdown, lambda: format_report(result, markdown=True)), (args.csv, lambda: to_csv(result)),
               (args.json, lambda: to_json(result) + '\n')]
    for path, render in outputs:
        if path and path != '-':
            _write(render(), path)
    if args.plot:
        plot_result(result, args.plot)
        print(f'wrote {args.plot}', file=sys.stderr)
    stdout_taken = '-' in (args.csv, args.json, args.markdown)
    print(format_report(result), file=sys.stderr if stdout_taken else sys.stdout, end='')
    for path, render in outputs:
        if path == '-':
            _write(render(), path)
    failed = [f'{c.target} ({c.status})' for c in result.targets if c.status != 'PASS']
    if args.strict and failed:
        raise Failure(f'{len(failed)} of {len(result.targets)} targets not passed: {"; ".join(failed)}')
    return 0


def register(subparsers) -> None:
    from timm_pf.layers.cpu_kernels import CPU_KERNEL_POLICIES
    p = subparsers.add_parser(
        'bench', help='params, MACs, latency and memory of each model next to its baseline',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            'Measure each model next to its baseline in one process: params, MACs, activations, latency\n'
            '(median and spread over interleaved runs), throughput, peak memory, and the ratios to the\n'
            "baseline, with the papers' reported values beside them. Without --models it runs the six\n"
            'headline variants at batch 1 and 8, 224 px, which takes one to two minutes on 2 CPU cores.\n'
            '--preset targets runs the speed and memory ratios the package promises (several minutes);\n'
            '--preset scaling runs the ViT/PiT and ResNet pairs at batch 1 from 224 to 1024 px (--img-size\n'
            'overrides the sizes), with a ratio-vs-resolution table.'),
        epilog=('examples:\n'
                '  timm-pf bench\n'
                "  timm-pf bench --models 'ours_r50_*' --batch-sizes 1 16\n"
                '  timm-pf bench --models resnet18:resnet10t --img-size 128\n'
                '  timm-pf bench --preset targets --markdown targets.md\n'
                '  timm-pf bench --models vit_s_maxpool --img-size 224 512 1024 --batch-sizes 1 --plot sweep.png\n'
                '  timm-pf bench --device cuda --amp --batch-sizes 1 256 --plot bench.png'))
    p.add_argument('--models', nargs='+', metavar='PATTERN',
                   help='model names or globs (comma or space separated); each is paired with its baseline; '
                        'MODEL:BASELINE pairs explicitly (default: the six headline variants)')
    p.add_argument('--preset', choices=('headline', 'targets', 'scaling'), default='headline',
                   help='targets: exactly the settings and conditions of the promised ratios (refuses flags that '
                        'change them); scaling: the resolution sweep of the ViT, PiT and ResNet pairs (default: '
                        'headline)')
    p.add_argument('--batch-sizes', nargs='+', type=int, metavar='N', help='batch sizes (default: 1 8)')
    p.add_argument('--img-size', nargs='+', type=int, metavar='PX',
                   help='square image sizes in pixels; several sizes sweep the resolution (models with a position '
                        'embedding are built for each size) and add a ratio-vs-resolution table (default: 224)')
    p.add_argument('--train', action='store_true', help='time a training step (forward, loss, backward)')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:N] (default: cpu)')
    p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                   help='cast parameters and inputs (default: float32)')
    p.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, float16 on CUDA)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    p.add_argument('--compile', action='store_true', help='torch.compile every model (compile time is warm-up)')
    p.add_argument('--runtime', default='torch', metavar='{torch,onnxruntime}',
                   help='torch (default) or onnxruntime: export each model once per size (torch.onnx.export, '
                        'dynamic batch), check its output against PyTorch (1e-4), time it in ONNX Runtime on the '
                        "CPU (needs the onnx extra: pip install 'timm-pf[onnx]')")
    p.add_argument('--threads', type=int, help='CPU threads (default: torch default; --preset targets: 2, the only '
                                               'count it takes)')
    p.add_argument('--warmup', type=int, default=1, help='discarded rounds per setting (default: 1)')
    p.add_argument('--repeats', type=int,
                   help='timed rounds per setting (default: fill --time-budget, at least 5, more while a '
                        'ratio is unstable)')
    p.add_argument('--max-repeats', type=int, default=50,
                   help='cap on the timed rounds per setting without --repeats (default: 50)')
    p.add_argument('--time-budget', type=positive_float, metavar='SECONDS',
                   help='seconds of timed rounds, shared by the settings (default per --preset: '
                        + ', '.join(f'{k} {v:g}' for k, v in _DEFAULT_BUDGET.items()) + ')')
    p.add_argument('--memory', choices=('tensors', 'rss', 'off'), default='tensors',
                   help='peak memory on CPU: tensors = live tensor storage tracked per operator (like '
                        "CUDA's max_memory_allocated; default), rss = resident-set growth of a fresh process "
                        'per model and setting (Linux; adds kernel scratch and allocator overhead; slower), off')
    p.add_argument('--statistic', choices=('median', 'min'), default='median',
                   help='latency statistic of the ratios and targets (default: median; min resists '
                        'interference from other processes on a busy machine)')
    p.add_argument('--cpu-kernels', choices=CPU_KERNEL_POLICIES, default='build',
                   help='compiled batch-1 CPU kernel of the dynamic convs: build = compile it if needed (once, '
                        'about a minute on 2 cores, needs a C++ compiler and ninja; eager when it cannot), '
                        'auto = use it if built, off = eager PyTorch (default: build)')
    p.add_argument('--csv', type=output_file, metavar='PATH',
                   help="write one CSV line per model and setting ('-': stdout)")
    p.add_argument('--json', type=output_file, metavar='PATH', help="write everything as JSON ('-': stdout)")
    p.add_argument('--markdown', type=output_file, metavar='PATH', help="write the tables as markdown ('-': stdout)")
    p.add_argument('--plot', type=image_file, metavar='PNG',
                   help='latency vs params and vs GMACs per family (needs matplotlib)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--strict', action='store_true',
                   help='exit 1 unless every target the run covers passes: a target that fails, is unstable, '
                        'could not be timed, was not measured (n/a: memory with --memory off) or was measured '
                        'outside its conditions (n/c; --list prints them) counts as a failure')
    p.add_argument('--list', action='store_true', help='list default models, baselines, paper values and targets')
    p.set_defaults(func=_run)
