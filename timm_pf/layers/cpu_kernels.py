"""Optional compiled CPU kernel for batch-1 inference of :class:`~timm_pf.layers.DynamicConv2d`.

At batch 1 a dynamic conv in eager PyTorch is five operator calls (pool, linear, sigmoid, mix, conv)
where a static conv is one, and in a running network each small call costs tens of microseconds, which
is most of ParameterNet's batch-1 overhead over GhostNet. ``csrc/dynamic_conv_cpu.cpp`` does the pool,
routing and mixing in one call (then ATen's convolution) and is compiled on this machine with PyTorch's
extension builder (a C++ compiler and ninja; ``pip install 'timm-pf[kernels]'`` brings ninja).

When it is used is set by ``TIMM_PF_CPU_KERNELS`` (read at first use):

* ``auto`` (default): use the kernel if it has been built before (``timm-pf build-kernels``), never compile;
* ``build``: compile it on first use if needed (once per source / torch version, cached);
* ``off``: always the eager path.

Results equal the eager path up to float rounding; training, export, ``torch.compile``, autocast, other
dtypes or devices and batches > 1 always take the eager path.
"""
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

__all__ = [
    'CPU_KERNEL_POLICIES', 'KernelBuildError', 'build_cpu_kernels', 'cpu_kernels', 'kernel_status',
    'cpu_kernel_policy']

CPU_KERNEL_POLICIES = ('auto', 'build', 'off')
_POLICY_ENV = 'TIMM_PF_CPU_KERNELS'
_DIR_ENV = 'TIMM_PF_KERNEL_DIR'
_SOURCE = Path(__file__).parent / 'csrc' / 'dynamic_conv_cpu.cpp'
_CFLAGS = ('-O3', '-fopenmp')


class KernelBuildError(RuntimeError):
    """The CPU kernel cannot be compiled here (no compiler or ninja, or the compiler failed)."""


_loaded: Optional[ModuleType] = None
_resolved = False
_unavailable_reason = ''


def _checked_policy(policy: str, source: str) -> str:
    if policy not in CPU_KERNEL_POLICIES:
        raise ValueError(f'{source}{policy!r}: expected one of {", ".join(CPU_KERNEL_POLICIES)}')
    return policy


def _policy() -> str:
    return _checked_policy(os.environ.get(_POLICY_ENV, 'auto').strip().lower() or 'auto', f'{_POLICY_ENV}=')


def _kernel_dir() -> Path:
    if os.environ.get(_DIR_ENV):
        return Path(os.environ[_DIR_ENV])
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return cache / 'timm_pf' / 'kernels'


@functools.lru_cache(maxsize=None)
def _module_name() -> str:
    """Unique per source, flags, torch and Python build, so a stale binary is never imported."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    for part in (*_CFLAGS, torch.__version__, sys.version, sysconfig.get_platform()):
        digest.update(part.encode())
    return f'timm_pf_dynamic_conv_cpu_{digest.hexdigest()[:16]}'


def _library_path(name: str) -> Path:
    return _kernel_dir() / name / f'{name}.so'  # where torch's extension builder puts it


def _import_library(name: str, path: Path) -> ModuleType:
    # torch must be imported first: the library links against libtorch
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_cpu_kernels(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the CPU kernel and make :class:`DynamicConv2d` use it.

    Raises:
        KernelBuildError: no C++ compiler or ninja, or compilation failed.
    """
    global _loaded, _resolved, _unavailable_reason
    name = _module_name()
    path = _library_path(name)
    if path.exists():
        try:
            module = _import_library(name, path)
        except ImportError as e:
            raise KernelBuildError(f'the built kernel {path} does not load ({e}); delete its folder to rebuild') from e
    else:
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)  # no "CUDA runtime" notice
        from torch.utils import cpp_extension
        compiler = os.environ.get('CXX', 'c++')
        if shutil.which(compiler) is None:
            raise KernelBuildError(f'no C++ compiler ({compiler!r} not found; set CXX or install g++)')
        if not cpp_extension.is_ninja_available():
            raise KernelBuildError("ninja is not installed (pip install 'timm-pf[kernels]')")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name, [str(_SOURCE)], extra_cflags=list(_CFLAGS), extra_ldflags=['-fopenmp'],
                build_directory=str(path.parent), verbose=verbose)
        except (RuntimeError, OSError, ImportError) as e:
            raise KernelBuildError(f'compiling {_SOURCE.name} failed: {e}') from e
    _loaded, _resolved, _unavailable_reason = module, True, ''
    return module


def cpu_kernels() -> Optional[ModuleType]:
    """The loaded kernel module, or None when the eager path is to be used (see the module docstring)."""
    global _loaded, _resolved, _unavailable_reason
    if _resolved:
        return _loaded
    policy = _policy()
    _resolved = True
    if policy == 'off':
        _unavailable_reason = f'{_POLICY_ENV}=off'
        return None
    name = _module_name()
    path = _library_path(name)
    if policy == 'auto' and not path.exists():
        _unavailable_reason = 'not built (run `timm-pf build-kernels`)'
        return None
    try:
        return build_cpu_kernels()
    except KernelBuildError as e:
        _unavailable_reason = str(e)
        return None


def kernel_status() -> str:
    """One line saying which batch-1 CPU path dynamic convs take, and why."""
    if cpu_kernels() is not None:
        return f'fused CPU kernel ({_library_path(_module_name())})'
    return f'eager ({_unavailable_reason})'


@contextmanager
def cpu_kernel_policy(policy: str) -> Iterator[None]:
    """Run a block under ``policy`` (also set for the processes it starts): the first batch-1 dynamic conv
    call in it resolves the kernel (``build`` compiles it then if needed). The previous policy is restored."""
    global _loaded, _resolved, _unavailable_reason
    _checked_policy(policy, 'unknown CPU kernel policy ')
    saved_env, saved_state = os.environ.get(_POLICY_ENV), (_loaded, _resolved, _unavailable_reason)
    os.environ[_POLICY_ENV] = policy
    _loaded, _resolved, _unavailable_reason = None, False, ''
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_POLICY_ENV, None)
        else:
            os.environ[_POLICY_ENV] = saved_env
        _loaded, _resolved, _unavailable_reason = saved_state
