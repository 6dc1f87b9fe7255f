"""``timm-pf run SCRIPT [ARGS...]``: run one of timm's scripts with timm_pf's models registered.

timm's ``train.py`` takes ``--device-modules timm_pf``; ``validate.py`` and ``benchmark.py`` have no such
option, so this imports timm_pf and then runs the script as ``__main__`` with the remaining arguments.
"""
import argparse
import runpy
import sys
from pathlib import Path

from ._errors import BadInput


def _run(args: argparse.Namespace) -> int:
    script = args.script
    if not script.is_file():
        raise BadInput(f'no such script: {script} (get it from the timm repository: huggingface/pytorch-image-models)')
    import timm_pf  # noqa: F401  registers the models before the script resolves --model
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name='__main__')
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit('message')
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'run', help="run timm's train.py / validate.py / benchmark.py with timm_pf models registered",
        description=__doc__.split('\n\n')[1])
    p.add_argument('script', type=Path, help="path to timm's script, e.g. pytorch-image-models/validate.py")
    p.add_argument('script_args', nargs=argparse.REMAINDER, help='arguments passed to the script')
    p.set_defaults(func=_run)
