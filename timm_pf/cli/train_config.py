"""``timm-pf train-config``: the papers' training recipes as configs for timm's ``train.py --config``."""
import argparse
import sys
from pathlib import Path

from ._args import output_file
from ._errors import BadInput


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'train-config', help="print or write a model's training config for timm's train.py --config",
        description="Print (or write with -o) the train.py config of MODEL for RECIPE (default: the model's main "
                    'recipe, from its paper), as shipped with the package. --list shows every model and its '
                    'recipes, the main one first.')
    p.add_argument('model', nargs='?', metavar='MODEL', help='a timm-pf model, e.g. ours_r50_hybrid')
    p.add_argument('recipe', nargs='?', metavar='RECIPE', help='e.g. pflayer_improved (default: the main recipe)')
    p.add_argument('-o', '--output', type=output_file, default=None, metavar='FILE',
                   help="write the config to FILE ('-': stdout, the default)")
    p.add_argument('--list', action='store_true', help='list the models (or MODEL) and their recipes')
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from timm_pf.tools.recipes import RecipeError, find_config, shipped_configs
    if args.list:
        if args.recipe or args.output:
            raise BadInput('--list takes at most a MODEL')
        configs = shipped_configs()
        if args.model:
            try:
                find_config(args.model)
            except RecipeError as e:
                raise BadInput(str(e)) from None
            configs = {args.model: configs[args.model]}
        width = max(len(m) for m in configs)
        print(f'{"model":<{width}}  recipes (the first is the default)')
        for model, recipes in configs.items():
            print(f'{model:<{width}}  {", ".join(recipes)}')
        return 0
    if not args.model:
        raise BadInput('name a MODEL (timm-pf train-config --list shows them)')
    try:
        text = find_config(args.model, args.recipe).read_text(encoding='utf-8')
    except RecipeError as e:
        raise BadInput(str(e)) from None
    if args.output in (None, '-'):
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding='utf-8')
    except OSError as e:
        raise BadInput(f'cannot write {args.output}: {e.strerror or e}') from None
    print(f'wrote {args.output} (python train.py --config {args.output} --data-dir <data>)')
    return 0
