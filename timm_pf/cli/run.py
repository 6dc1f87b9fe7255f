"""``timm-pf run SCRIPT [ARGS...]``: run one of timm's scripts with timm_pf's models registered.

timm's ``train.py`` takes ``--device-modules timm_pf``; ``validate.py`` and ``benchmark.py`` have no such
option, so this imports timm_pf and then runs the script as ``__main__`` with the remaining arguments.
"""
import argparse
import re
import runpy
import sys
from pathlib import Path
from typing import List, Optional

from ._errors import BadInput, Failure

# timm's train.py, validate.py and benchmark.py: parser.add_argument('--device', default='cuda', ...)
_DEFAULTS_TO_CUDA = re.compile(r"""add_argument\(\s*['"]--device['"][^)]*?default\s*=\s*['"]cuda""", re.S)


def _option(argv: List[str], *names: str) -> Optional[str]:
    """The last value of an option given as ``--name VALUE`` or ``--name=VALUE``."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(f'{name}='):
                value = arg[len(name) + 1:]
    return value


def cuda_request(script: Path, argv: List[str]) -> Optional[str]:
    """Where the script's CUDA device would come from (``--device``, its YAML ``--config``, its default), or None
    when it runs elsewhere."""
    device = _option(argv, '--device')
    if device is not None:
        return '--device' if device.startswith('cuda') else None
    config = _option(argv, '--config', '-c')
    if config and Path(config).is_file():
        found = re.search(r'^device:\s*[\'"]?([\w:]+)', Path(config).read_text(errors='replace'), re.M)
        if found:
            return f'device in {config}' if found.group(1).startswith('cuda') else None
    text = script.read_text(errors='replace')
    return "the script's default --device" if _DEFAULTS_TO_CUDA.search(text) else None


def _run(args: argparse.Namespace) -> int:
    script = args.script
    if not script.exists():
        raise BadInput(f'no such script: {script} (get it from the timm repository: huggingface/pytorch-image-models)')
    if not script.is_file():
        raise BadInput(f'{script} is not a script file (a folder, a device or a pipe)')
    import torch
    source = cuda_request(script, args.script_args)
    if source and not torch.cuda.is_available():
        print(f'timm-pf run: warning: {script.name} will ask for CUDA ({source}) and this machine has none: '
              f'add --device cpu', file=sys.stderr)
    import timm_pf  # noqa: F401  registers the models before the script resolves --model
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name='__main__')
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit('message')
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ModuleNotFoundError as e:  # a package the script imports (e.g. pandas for inference.py)
        raise BadInput(f'{script.name} needs the module {e.name!r}, which is not installed: pip install '
                       f'{(e.name or "").split(".")[0]}') from e
    except Exception as e:  # the script's own error: say where it came from (TIMM_PF_TRACEBACK=1 shows the lines)
        raise Failure(f'{script.name} failed: {type(e).__name__}: {e}') from e
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'run', help="run timm's train.py / validate.py / benchmark.py with timm_pf models registered",
        description=__doc__.split('\n\n')[1])
    p.add_argument('script', type=Path, help="path to timm's script, e.g. pytorch-image-models/validate.py")
    # argparse marks a REMAINDER positional required; the script may take no arguments
    p.add_argument('script_args', nargs=argparse.REMAINDER, help='arguments passed to the script').required = False
    p.set_defaults(func=_run)
