"""The one place where the ``timm-pf`` commands turn exceptions into an exit code and one message.

Exit codes: 0 ok, 1 a failure outside the user's control (the Hub unreachable or refusing, a kernel build,
an unexpected error), 2 bad input (the message names it). Commands raise; they do not print errors
themselves. ``TIMM_PF_TRACEBACK=1`` re-raises, for debugging.
"""
import importlib.util
import os
import sys
from typing import Callable, Tuple, Type

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
# An error line is cut after this many characters.
MAX_MESSAGE_CHARS = 1500
EXIT_CODES_HELP = ('exit codes: 0 ok, 1 failure outside the user\'s control (Hub unreachable or refusing, kernel '
                   'build, unexpected error), 2 bad input (the message names it)')


class BadInput(Exception):
    """Input the user can fix (a value, a path, a missing optional package): exit code 2."""


class Failure(Exception):
    """A failure the message explains (stale cards, a kernel that disagrees): exit code 1."""


def require_plot_extra(needs_it: str) -> None:
    """:class:`BadInput` before any work when matplotlib (the ``plot`` extra) is missing; ``needs_it`` names what
    needs it."""
    if importlib.util.find_spec('matplotlib') is None:
        raise BadInput(f"{needs_it} needs matplotlib: pip install 'timm-pf[plot]'")


def _loaded(module: str, *names: str) -> Tuple[Type[BaseException], ...]:
    """Exception classes of ``module`` if it was imported (an exception of an unimported module cannot occur)."""
    mod = sys.modules.get(module)
    return tuple(getattr(mod, n) for n in names) if mod is not None else ()


def _hub_endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def classify(err: BaseException) -> Tuple[int, str]:
    """Exit code and one-line message for an exception raised by a command."""
    not_found = _loaded('huggingface_hub.errors', 'RepositoryNotFoundError', 'RevisionNotFoundError',
                        'RemoteEntryNotFoundError', 'HFValidationError')
    if isinstance(err, KeyboardInterrupt):
        return 130, 'interrupted'
    if isinstance(err, BrokenPipeError):  # a ConnectionError, but the reader of stdout went away (`| head`)
        return EXIT_FAILURE, 'the output was closed before everything was written (broken pipe)'
    if isinstance(err, _loaded('timm_pf.models._pretrained', 'PretrainedWeightsError')):
        # a repository or revision that does not exist was named; offline, unreachable or corrupted is not the input
        return (EXIT_BAD_INPUT if isinstance(err.__cause__, not_found) else EXIT_FAILURE), str(err)
    bad_input = (
        BadInput, ImportError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
        FileExistsError,
        *_loaded('timm_pf.models._checkpoint', 'CheckpointError'),
        *_loaded('timm_pf.tools.hub', 'PushError', 'ModelArgsError'),
        *_loaded('timm_pf.models._registry', 'UnknownTagError'),
        *_loaded('timm_pf.tools.cards', 'CardError'),
        *_loaded('timm_pf.methods.rba.blocks', 'RbaError'),
        *_loaded('timm_pf.tools.bench.measure', 'BenchInputError'),
    )
    unreachable = (ConnectionError, TimeoutError, *_loaded('httpx2', 'HTTPError'), *_loaded('httpx', 'HTTPError'),
                   *_loaded('huggingface_hub.errors', 'LocalEntryNotFoundError', 'OfflineModeIsEnabled'))
    if isinstance(err, not_found):
        return EXIT_BAD_INPUT, f'the Hub at {_hub_endpoint()} has no such repository, revision or file: {err}'
    # HfHubHTTPError is an httpx2.HTTPError: the Hub answered, with a refusal
    if isinstance(err, _loaded('huggingface_hub.errors', 'HfHubHTTPError') + _loaded('timm_pf.tools.hub',
                                                                                       'HubRefusedError')):
        return EXIT_FAILURE, f'the Hub refused the request: {err}'
    if isinstance(err, unreachable):  # before bad_input: LocalEntryNotFoundError is a FileNotFoundError
        return EXIT_FAILURE, f'cannot reach the Hub at {_hub_endpoint()}: {type(err).__name__}: {err}'
    if isinstance(err, bad_input):
        return EXIT_BAD_INPUT, str(err)
    if isinstance(err, (Failure, *_loaded('timm_pf.layers.cpu_kernels', 'KernelBuildError'))):
        return EXIT_FAILURE, str(err)
    return EXIT_FAILURE, f'{type(err).__name__}: {err} (TIMM_PF_TRACEBACK=1 shows where)'


def run_command(func: Callable, args, prog: str) -> int:
    """``func(args)`` with every exception reported as ``prog: error: ...`` and its exit code."""
    try:
        return int(func(args) or EXIT_OK)
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get('TIMM_PF_TRACEBACK') == '1':
            raise
        code, message = classify(err)
        line = ' '.join(part.strip() for part in message.splitlines() if part.strip()) or type(err).__name__
        if len(line) > MAX_MESSAGE_CHARS:  # e.g. torch's list of every missing and mis-shaped key
            line = (f'{line[:MAX_MESSAGE_CHARS]} ... ({len(line) - MAX_MESSAGE_CHARS} more characters; '
                    f'TIMM_PF_TRACEBACK=1 shows all)')
        print(f'{prog}: error: {line}', file=sys.stderr)
        return code
