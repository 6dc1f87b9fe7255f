"""The ``timm-pf`` command line. Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args, returns
an exit code). Argument values are checked by the types in ``_args``; exceptions become exit codes and
one-line messages in ``_errors`` (0 ok, 1 failure outside the user's control, 2 bad input)."""
import argparse
import importlib
import sys
from typing import List, Optional

from ._errors import EXIT_BAD_INPUT, EXIT_CODES_HELP, run_command

# Subcommand modules, in the order ``timm-pf --help`` lists them.
_COMMAND_MODULES = ('bench', 'build-kernels', 'digits', 'train-config', 'run', 'hub', 'rba', 'deform_points')


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line that names the argument (and exit code 2), not the usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _add_exit_codes(parser: argparse.ArgumentParser) -> None:
    """Append the exit codes to the help of ``parser`` and of all its subcommands."""
    parser.epilog = f'{parser.epilog}\n\n{EXIT_CODES_HELP}' if parser.epilog else EXIT_CODES_HELP
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                _add_exit_codes(sub)


def build_parser() -> argparse.ArgumentParser:
    from timm_pf import __version__
    parser = _Parser(
        prog='timm-pf',
        description='Parameter-free and dynamic-convolution models for timm: benchmark, convert, publish, analyse.',
    )
    parser.add_argument('--version', action='version', version=f'timm-pf {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in _COMMAND_MODULES:
        importlib.import_module(f'{__name__}.{name.replace("-", "_")}').register(subparsers)
    _add_exit_codes(parser)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``args`` names, whose errors point at its own help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _tolerant_streams() -> None:
    """Text the terminal's encoding cannot show (a card's section sign in an ASCII locale) is escaped, not fatal."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')


def main(argv: Optional[List[str]] = None) -> int:
    _tolerant_streams()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand that was given them
        _chosen_parser(parser, args).error(f'unrecognized arguments: {" ".join(unknown)}')
    if not getattr(args, 'func', None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    prog = f'timm-pf {args.command}' + (f' {args.rba_command}' if getattr(args, 'rba_command', None) else '')
    return run_command(args.func, args, prog)


if __name__ == '__main__':
    sys.exit(main())
