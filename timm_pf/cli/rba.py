"""``timm-pf rba analyze|apply|evaluate``: Block Redundancy and Redundant Blocks Approximation.

    timm-pf rba analyze  --model M --data-dir ROOT --output DIR    # BR/cosine/CKA/R^2 heatmap + ranked spans
    timm-pf rba apply    --model M --data-dir ROOT --span 3:7 --output DIR   # fit, save model.safetensors + config.json
    timm-pf rba evaluate --model M --data-dir ROOT --span 3:7     # top-1 before/after: own head and linear probe

``ROOT`` is an image folder (``ROOT/<split>/<class>/*.png``), e.g. one written by
``timm_pf.data.export_digits``. Spans are ``i:j`` (block indices or names): blocks ``i+1..j`` are replaced
by a linear map from block ``i``'s output to block ``j``'s.
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from timm.utils import ParseKwargs

from ._args import (
    device, input_file, key_value, non_negative_float, non_negative_int, number, output_dir, output_file, positive_int,
    split_name,
)
from ._errors import BadInput, require_plot_extra


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'rba', help='find redundant blocks (Block Redundancy) and replace them by closed-form linear maps (RBA)',
        description=__doc__.replace('``', '`'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='rba_command', metavar='ACTION', required=True)

    analyze = commands.add_parser('analyze', help='similarity of every pair of blocks; heatmap and ranked spans')
    _add_model_args(analyze)
    _add_data_args(analyze, images_help='images of --split to measure on')
    analyze.add_argument('--metrics', default='br,cosine,cka,linear_r2',
                         help='comma-separated subset of br,cosine,cka,linear_r2 (cka and linear_r2 keep a '
                              '(blocks*dim)^2 float64 matrix)')
    analyze.add_argument('--rank-by', default='br', help='metric that ranks the spans (default: br, the paper\'s)')
    analyze.add_argument('--top', type=positive_int, default=10, help='spans to print (default 10)')
    analyze.add_argument('--max-blocks', type=positive_int, default=None,
                         help='list only spans replacing at most this many blocks')
    analyze.add_argument('--output', type=output_dir, default='rba_analysis',
                         help='folder for rba_metrics.json, rba_spans.md and rba_heatmap.png (it must not hold '
                              'them already; default: rba_analysis)')
    analyze.add_argument('--no-plot', action='store_true', help='skip the heatmap (no matplotlib needed)')
    analyze.set_defaults(func=run_analyze)

    apply = commands.add_parser('apply', help='fit the linear maps for spans and save the approximated model')
    _add_model_args(apply)
    _add_data_args(apply, images_help='images of --split to fit the maps on')
    _add_fit_args(apply)
    apply.add_argument('--output', type=output_dir, required=True,
                       help='folder for model.safetensors + config.json (timm.create_model("local-dir:<folder>")); '
                            'it must not hold them already')
    apply.set_defaults(func=run_apply)

    evaluate = commands.add_parser('evaluate', help='top-1 before/after with the model head and a linear probe')
    _add_model_args(evaluate)
    _add_data_args(evaluate, images_help='images of --split to fit the maps on (with --span)')
    _add_fit_args(evaluate, required=False)
    evaluate.add_argument('--rba-model', type=Path, default=None,
                          help='folder written by "rba apply" (instead of fitting --span here)')
    evaluate.add_argument('--val-split', type=split_name, default='validation', help='split to measure accuracy on')
    evaluate.add_argument('--probe-images', type=positive_int, default=None,
                          help='images of --split the linear probes train on (default: all)')
    evaluate.add_argument('--skip-baseline', action='store_true',
                          help='also evaluate the spans removed without a map (the paper\'s "skip")')
    evaluate.add_argument('--output', type=output_file, default=None, help='write the results as JSON here')
    evaluate.set_defaults(func=run_evaluate)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True,
                        help='timm model name, or hf-hub:<repo> / local-dir:<folder> (their weights are loaded)')
    parser.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained weights')
    parser.add_argument('--checkpoint', type=input_file, default=None,
                        help='weights to load (.safetensors, or .pth read weights-only)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, type=key_value,
                        help='extra model arguments as key=value, e.g. img_size=32 num_classes=10')
    parser.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda[:N] (default: cuda if available)')


def _add_data_args(parser: argparse.ArgumentParser, images_help: str) -> None:
    parser.add_argument('--data-dir', type=Path, required=True, help='image folder root with one folder per split')
    parser.add_argument('--split', type=split_name, default='train',
                        help='split used for the analysis/fit (default: train)')
    parser.add_argument('--num-images', type=positive_int, default=1000,
                        help=f'{images_help} (random subset; default 1000)')
    parser.add_argument('--batch-size', type=positive_int, default=32, help='images per batch (default 32)')
    parser.add_argument('--workers', type=non_negative_int, default=0, help='data loader processes (default 0)')
    parser.add_argument('--crop-pct', type=number(float, 0.1, 2.0), default=None,
                        help='override the model\'s eval crop_pct (0.1 to 2)')
    parser.add_argument('--seed', type=non_negative_int, default=0, help='seed of the image subset')


def _add_fit_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument('--span', action='append', required=required, default=[],
                        help='i:j, blocks by index or name (repeat for several spans); a negative index counts '
                             'from the end: --span=-3:-1')
    parser.add_argument('--bias', action='store_true', help='fit a bias as well (the paper\'s map has none)')
    parser.add_argument('--ridge', type=non_negative_float, default=0.0,
                        help='ridge strength, relative to the mean feature energy (default 0: plain least squares)')
    parser.add_argument('--per-token', action='store_true', help='one map per token position instead of one shared')


def _create_model(args) -> nn.Module:
    from timm_pf.tools.hub import create_model
    # a local-dir:/hf-hub: source names saved weights: load them
    pretrained = args.pretrained or args.model.startswith(('local-dir:', 'hf-hub:'))
    model = create_model(args.model, pretrained=pretrained, checkpoint=args.checkpoint, **args.model_kwargs)
    return model.to(args.device).eval()


def _check_fresh_output(folder: Path, names: Sequence[str]) -> None:
    """Refuse an output folder that already holds files this command writes (an earlier run's, or the model
    being read): nothing is overwritten or mixed with older results."""
    present = [name for name in names if (folder / name).exists()]
    if present:
        raise FileExistsError(f'{folder} already holds {", ".join(present)}: choose another --output or remove them')


def _data_config(model: nn.Module, args) -> Dict[str, Any]:
    from timm.data.model_config import resolve_input_data_config
    overrides = {'crop_pct': args.crop_pct} if args.crop_pct is not None else {}
    return resolve_input_data_config(model, args=overrides)


def _loader(model: nn.Module, args, split: str, num_images: Optional[int],
            class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[DataLoader, Dict[str, int]]:
    """Eval-transformed loader over a seeded random subset of ``split``, and its classes (folder name -> label).
    With ``class_to_idx`` (another split's classes) the labels are that split's, and the split may not hold
    other classes."""
    from timm.data import create_dataset, create_transform
    root = args.data_dir / split
    if not root.is_dir():
        raise BadInput(f'no folder {root}: --data-dir must hold one image folder per split (--split/--val-split)')
    first_conv = model.get_submodule(model.pretrained_cfg['first_conv']) \
        if (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv') else None
    in_chans = getattr(first_conv, 'in_channels', 3)
    if in_chans != 3:
        raise BadInput(f'{args.model} takes {in_chans}-channel images and image folders are read as RGB: build it '
                       f'with in_chans=3')
    config = _data_config(model, args)
    try:
        dataset = create_dataset('', root=str(args.data_dir), split=split)
        classes = dict(getattr(dataset.reader, 'class_to_idx', {}))
        if class_to_idx is not None and classes != class_to_idx:
            extra = sorted(set(classes) - set(class_to_idx))
            if extra:
                raise BadInput(f'{root} has classes that --split {args.split} has not: {", ".join(extra[:5])}'
                               f'{" ..." if len(extra) > 5 else ""} (the splits must share their class folders)')
            dataset = create_dataset('', root=str(args.data_dir), split=split, class_map=class_to_idx)
            classes = class_to_idx
    except RuntimeError as e:  # timm's folder reader finds no images
        raise BadInput(f'{root}: {e}') from e
    dataset.transform = create_transform(**{k: v for k, v in config.items() if k in (
        'input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}, is_training=False)
    if num_images is not None and num_images < len(dataset):
        generator = torch.Generator().manual_seed(args.seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=generator)[:num_images].tolist())
    if len(dataset) == 0:
        raise BadInput(f'{root} holds no images')
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers), classes


def _parse_spans(specs: Sequence[str]) -> List[Tuple[str, str]]:
    spans = []
    for spec in specs:
        source, sep, target = spec.partition(':')
        if not sep or not source or not target:
            raise BadInput(f'bad --span {spec!r}: write i:j (block indices or names), e.g. 3:7 or blocks.3:blocks.7')
        spans.append((source, target))
    return spans


def _input_size(model: nn.Module, args) -> Tuple[int, ...]:
    return tuple(_data_config(model, args)['input_size'])


def _fmt_stats_line(name: str, model: nn.Module, input_size) -> str:
    from timm_pf.methods.stats import count_macs, count_params
    return f'{name:>10}: {count_params(model) / 1e6:8.3f} M params  {count_macs(model, input_size) / 1e6:10.2f} M MACs'


_ANALYSIS_FILES = ('rba_metrics.json', 'rba_spans.md', 'rba_heatmap.png')


def run_analyze(args) -> int:
    from timm_pf.methods.rba import METRICS, analyze
    metrics = [m.strip() for m in args.metrics.split(',') if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise BadInput(f'unknown metrics {", ".join(unknown) or repr(args.metrics)}: --metrics is a comma-separated '
                       f'subset of {",".join(METRICS)}')
    if args.rank_by not in metrics:
        raise BadInput(f'--rank-by {args.rank_by} is not among --metrics {",".join(metrics)}')
    if not args.no_plot:  # before the analysis, not after
        require_plot_extra('the heatmap (without --no-plot)')
    _check_fresh_output(args.output, _ANALYSIS_FILES)
    model = _create_model(args)
    loader, _ = _loader(model, args, args.split, args.num_images)
    report = analyze(model, loader, metrics=metrics, device=args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    report.to_json(args.output / 'rba_metrics.json')
    table = report.table(args.rank_by, max_blocks=args.max_blocks)
    (args.output / 'rba_spans.md').write_text(table + '\n')
    print(f'{report.model_name}: {len(report.block_names)} blocks, {report.num_images} images of {args.split}; '
          f'spans ranked by {args.rank_by} (higher = more redundant)')
    print('\n'.join(table.splitlines()[:args.top + 2]))
    print(f'wrote {args.output / "rba_metrics.json"}, {args.output / "rba_spans.md"}')
    if not args.no_plot:
        try:
            path = report.plot(args.output / 'rba_heatmap.png')
        except ImportError as e:
            raise BadInput(f'{e} (or pass --no-plot)') from e
        print(f'wrote {path}')
    return 0


def run_apply(args) -> int:
    from timm_pf.methods.rba import approximate, save_rba
    spans = _parse_spans(args.span)
    _check_fresh_output(args.output, ('model.safetensors', 'config.json'))
    model = _create_model(args)
    loader, _ = _loader(model, args, args.split, args.num_images)
    approx = approximate(model, spans, loader, bias=args.bias, ridge=args.ridge, per_token=args.per_token,
                         device=args.device)
    input_size = _input_size(model, args)
    for spec in approx.rba_spans[-len(spans):]:  # the spans fitted now (a model approximated before has more)
        print(f'replaced the blocks after {spec["source"]} up to {spec["target"]} by a {spec["dim"]}x{spec["dim"]} '
              f'linear map' + (' per token' if spec['num_tokens'] else ''))
    print(_fmt_stats_line('original', model, input_size))
    print(_fmt_stats_line('rba', approx, input_size))
    save_rba(approx, args.output)
    print(f'wrote {args.output / "model.safetensors"}, {args.output / "config.json"} '
          f'(load: import timm_pf; timm.create_model("local-dir:{args.output}", pretrained=True))')
    return 0


def _load_rba_model(folder: Path, base: nn.Module) -> nn.Module:
    """The model ``rba apply`` wrote to ``folder``, checked to be an approximation of ``base`` (the blocks it
    keeps hold ``base``'s weights)."""
    from timm_pf.tools.hub import load_folder_model
    approx, _ = load_folder_model(folder)
    if not getattr(approx, 'rba_spans', None):
        raise BadInput(f'--rba-model {folder} holds {approx.pretrained_cfg.get("architecture")}, not a model '
                       f'written by "rba apply"')
    ours, theirs = base.state_dict(), approx.state_dict()
    kept = [k for k in ours if k in theirs]
    differing = [k for k in kept if ours[k].shape != theirs[k].shape or not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    if not kept:
        raise BadInput(f'--rba-model {folder} was not made from this --model: they share no weights')
    if differing:
        raise BadInput(f'--rba-model {folder} was not made from this --model: {len(differing)} of the {len(kept)} '
                       f'weights they share differ (first: {differing[0]})')
    return approx


def run_evaluate(args) -> int:
    from timm_pf.methods.rba import approximate, evaluate_models, skip_spans
    if bool(args.span) == bool(args.rba_model):
        raise BadInput('give either --span (fit the maps here) or --rba-model (a folder from "rba apply")')
    model = _create_model(args)
    if args.rba_model:
        approx = _load_rba_model(args.rba_model, model).to(args.device).eval()
    else:
        fit_loader, _ = _loader(model, args, args.split, args.num_images)
        approx = approximate(model, _parse_spans(args.span), fit_loader, bias=args.bias, ridge=args.ridge,
                             per_token=args.per_token, device=args.device)
    spans = [(s['source'], s['target']) for s in approx.rba_spans]
    if args.val_split == args.split:
        print(f'note: the linear probes train on {args.split} and are measured on it too (--val-split)')
    models = {'original': model}
    if args.skip_baseline:
        models['skip'] = skip_spans(model, spans)
    models['rba'] = approx
    train_loader, classes = _loader(model, args, args.split, args.probe_images)
    val_loader, _ = _loader(model, args, args.val_split, None, class_to_idx=classes)  # labelled as the probe's
    rows = evaluate_models(models, train_loader, val_loader, _input_size(model, args), len(classes) or None,
                           device=args.device)
    print(f'{args.model}, spans {", ".join(f"{s}:{t}" for s, t in spans)}; top-1 on {args.val_split} '
          f'({len(val_loader.dataset)} images), probe trained on {len(train_loader.dataset)} images of {args.split}')
    print('| model | params (M) | MACs (M) | head top-1 | linear-probe top-1 |')
    print('|---|---|---|---|---|')
    for r in rows:
        head = 'n/a' if r['head_top1'] is None else f'{r["head_top1"]:.2f}'
        print(f'| {r["model"]} | {r["params"] / 1e6:.3f} | {r["macs"] / 1e6:.2f} | {head} | {r["probe_top1"]:.2f} |')
    if args.output:
        Path(args.output).write_text(json.dumps(dict(model=args.model, spans=spans, results=rows), indent=1))
        print(f'wrote {args.output}')
    return 0
