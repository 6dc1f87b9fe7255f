"""Argument types of the ``timm-pf`` commands: values, devices and paths are checked while the command line
is parsed, so bad input exits with code 2 before anything is measured, converted or written."""
import argparse
import ast
import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union


def number(kind: type = int, low: Optional[float] = None, high: Optional[float] = None,
           open_low: bool = False, open_high: bool = False) -> Callable[[str], Union[int, float]]:
    """An ``int``/``float`` argument within ``[low, high]`` (``open_*``: that bound excluded)."""
    bounds = []
    shown = '{:d}' if kind is int else '{:g}'
    if low is not None:
        bounds.append(f'{">" if open_low else ">="} {shown.format(low)}')
    if high is not None:
        bounds.append(f'{"<" if open_high else "<="} {shown.format(high)}')
    wanted = f'{"an integer" if kind is int else "a number"}' + (f' {" and ".join(bounds)}' if bounds else '')

    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {wanted}, got {text!r}') from None
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be {wanted}, got {text}')
        return value
    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, open_low=True)
non_negative_float = number(float, 0)


def device(text: str) -> str:
    """A torch device that exists on this machine (``cuda`` needs CUDA)."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'{text!r} is not a device: use cpu or cuda[:N]') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f'{text}: this machine has no CUDA device (use --device cpu)')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f'{text}: only {torch.cuda.device_count()} CUDA device(s)')
    elif dev.type != 'cpu':
        raise argparse.ArgumentTypeError(f'{text}: use cpu or cuda[:N]')
    return text


def _writable_dir(folder: Path, what: str) -> None:
    """``folder`` takes new files: a file is created there and removed (permission bits alone miss read-only and
    special file systems)."""
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f'{what}: {folder} is not a folder')
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise argparse.ArgumentTypeError(f'{what}: the folder {folder} is not writable') from None


def _path_check(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """``check`` with an operating-system error on the way (no permission, a name too long) named as bad input."""
    @functools.wraps(check)
    def checked(text: str):
        try:
            return check(text)
        except OSError as e:
            shown = text if len(text) <= 80 else text[:77] + '...'
            raise argparse.ArgumentTypeError(f'{shown}: {e.strerror or e}') from None
    return checked


def _non_empty(text: str, what: str = 'path') -> None:
    if not text.strip():
        raise argparse.ArgumentTypeError(f'an empty {what}')


@_path_check
def output_file(text: str) -> str:
    """A file to write (``-``: stdout): not a folder, in an existing writable folder."""
    if text == '-':
        return text
    _non_empty(text)
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f'{text} is a folder, not a file')
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f'{text} is not writable')
    _writable_dir(path.parent, f'cannot write {text}')
    return text


IMAGE_SUFFIXES = ('.png', '.pdf', '.svg', '.jpg', '.jpeg')


@_path_check
def image_file(text: str) -> str:
    """A figure to write: an :func:`output_file` (not stdout) whose suffix names a format matplotlib writes."""
    if text == '-':
        raise argparse.ArgumentTypeError('a figure goes to a file, not to stdout')
    if Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f'{text}: name the format with a suffix, one of {", ".join(IMAGE_SUFFIXES)}')
    return output_file(text)


@_path_check
def output_dir(text: str) -> Path:
    """A folder to write into: an existing writable folder, or one that can be created."""
    _non_empty(text)
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f'{text} is a file, not a folder')
    existing = path
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    _writable_dir(existing, f'cannot create or write the folder {text}')
    return path


@_path_check
def input_file(text: str) -> Path:
    """An existing, readable file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f'no such file: {text}')
    if not path.is_file():
        raise argparse.ArgumentTypeError(f'{text} is not a file')
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f'{text} is not readable')
    return path


def split_name(text: str) -> str:
    """The name of one split folder under ``--data-dir`` (not empty, not a path, so never the root itself)."""
    if not text.strip() or text in ('.', '..') or '/' in text or os.sep in text:
        raise argparse.ArgumentTypeError(f'{text!r} is not the name of a split folder (e.g. train, validation)')
    return text


def non_empty(text: str) -> str:
    """Any text but an empty (or blank) one."""
    _non_empty(text, 'value')
    return text


def branch_name(text: str) -> str:
    """A git branch name the Hub accepts (no spaces, ``..``, ``~^:?*[\\``, leading ``-`` or ``/``)."""
    bad = (not text.strip() or any(c.isspace() or c in '~^:?*[\\' for c in text) or '..' in text or '//' in text
           or text.startswith(('-', '/')) or text.endswith(('/', '.', '.lock')) or '@{' in text)
    if bad:
        raise argparse.ArgumentTypeError(f'{text!r} is not a valid branch name')
    return text


def key_value(text: str) -> str:
    """One ``KEY=VALUE`` of ``--model-kwargs`` (timm's ``ParseKwargs`` reads VALUE as a Python literal, else as a
    string): a keyword name, and a VALUE that opens a list, tuple or dict must be a complete literal."""
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE with a keyword name as KEY, got {text!r}')
    if value.strip()[:1] in ('[', '(', '{'):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f'{key}: {value!r} is not a complete Python literal') from None
    return text
