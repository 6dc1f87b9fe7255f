"""Record the argument set of timm's ``train.py`` so config tests can run without it.

Usage: python tests/record_timm_train_args.py PATH/TO/train.py "<where it came from>" > tests/data/timm_train_args.json

Importing train.py builds its argument parser (it only trains under ``__main__``), so each argument's
dest, type, nargs and choices are read from the parser itself.
"""
import argparse
import importlib.util
import json
import sys


def describe(action: argparse.Action) -> dict:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        kind = 'flag'
    elif action.type in (int, float, str):
        kind = action.type.__name__
    elif type(action) is argparse._StoreAction and action.type is None:
        kind = 'str'
    else:
        kind = 'any'  # custom actions such as ParseKwargs, or custom type callables
    return {
        'kind': kind,
        'nargs': action.nargs,
        'choices': list(action.choices) if action.choices is not None else None,
        'options': list(action.option_strings),
    }


def main() -> None:
    path, origin = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location('timm_train_script', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = {a.dest: describe(a) for a in module.parser._actions if a.dest != 'help'}
    json.dump({'origin': origin, 'arguments': args}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
