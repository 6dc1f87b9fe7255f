"""The ``timm-pf`` command line. Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args, returns
an exit code)."""
import argparse
import importlib
import sys
from typing import List, Optional

# Subcommand modules, in the order ``timm-pf --help`` lists them.
_COMMAND_MODULES = ('bench', 'build-kernels', 'digits', 'train-config', 'run', 'hub', 'rba', 'deform_points')


def build_parser() -> argparse.ArgumentParser:
    from timm_pf import __version__
    parser = argparse.ArgumentParser(
        prog='timm-pf',
        description='Parameter-free and dynamic-convolution models for timm: benchmark, convert, publish, analyse.',
    )
    parser.add_argument('--version', action='version', version=f'timm-pf {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in _COMMAND_MODULES:
        importlib.import_module(f'{__name__}.{name.replace("-", "_")}').register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
