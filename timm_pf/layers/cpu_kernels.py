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

The cache (``TIMM_PF_KERNEL_DIR``, default ``~/.cache/timm_pf/kernels``) only ever loads what this user built:
folders are created 0700 and files 0600/0700 whatever the umask, the build runs in a fresh private folder and
moves the library into place (a symlink planted at the target is replaced, never followed), and a sha256 of
the library is written beside it. Before loading, the library, its checksum file and every folder between
them and the cache root must be real (no symlink), owned by the current user and not group/world writable,
and the library must match its checksum; the library is then loaded from the descriptor that was checked.
The cache root and every folder above it must be owned by the user or root and sticky where others can write
(as /tmp), so that nobody else can swap a folder between its check and its use.
Anything else is refused with a :class:`KernelBuildError` naming the reason and the fix; the eager path runs,
and a refused build warns once (``RuntimeWarning``). The compiler runs in a separate process.
"""
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Optional

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
_loaded_fds: List[int] = []
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
    return _kernel_dir() / name / f'{name}.so'


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + '.sha256')


def _unsafe_reason(st: os.stat_result, path: Path, kind: str) -> Optional[str]:
    """Why ``path`` (an ``lstat``/``fstat`` result) must not be trusted, or None."""
    if stat.S_ISLNK(st.st_mode):
        return f'{path} is a symlink'
    if kind == 'dir' and not stat.S_ISDIR(st.st_mode) or kind == 'file' and not stat.S_ISREG(st.st_mode):
        return f'{path} is not a {"folder" if kind == "dir" else "regular file"}'
    if st.st_uid != os.geteuid():
        return f'{path} is owned by uid {st.st_uid}, not by the current user (uid {os.geteuid()})'
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f'{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})'
    return None


def _check_private_dir(path: Path) -> None:
    reason = _unsafe_reason(os.lstat(path), path, 'dir')
    if reason:
        raise KernelBuildError(f'refusing the kernel cache: {reason}; delete it and run `timm-pf build-kernels`')


def _check_root(root: Path) -> None:
    """No one but the user (and root) may rename or replace what is in the cache root (a symlink to it is
    followed) or in any folder above it: each is owned by the user or root, and sticky where others can write
    (as /tmp). Otherwise someone else could swap a cache folder between its check and its use."""
    real = Path(os.path.realpath(root))
    for folder in (real, *real.parents):
        st = os.stat(folder)
        where = '' if folder == real else f': the folder above it, {folder},'
        if st.st_uid not in (0, os.geteuid()):
            raise KernelBuildError(f'refusing the kernel cache root {root}{where} is owned by uid {st.st_uid}; '
                                   f'set {_DIR_ENV} to a folder of your own')
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise KernelBuildError(f'refusing the kernel cache root {root}{where} is writable by group or others '
                                   f'(mode {stat.S_IMODE(st.st_mode):o}) and not sticky; make it private (chmod 700) '
                                   f'or set {_DIR_ENV} to a private folder')


def _private_dir(folder: Path) -> Path:
    """Create ``folder`` and every missing folder above it with mode 0700 (mkdir's mode can only lose bits to
    the umask); the cache root must be safe (:func:`_check_root`), and so must ``folder`` (:func:`_unsafe_reason`)."""
    for missing in reversed([p for p in (folder, *folder.parents) if not os.path.lexists(p)]):
        try:
            os.mkdir(missing, 0o700)
        except FileExistsError:  # made meanwhile: checked below
            pass
        except OSError as e:  # a file on the way, a folder without write permission, ...
            named = f' (set by {_DIR_ENV})' if os.environ.get(_DIR_ENV) else ''
            raise type(e)(e.errno, f'cannot create the kernel cache folder {missing}{named}: {e.strerror}') from e
    _check_root(_kernel_dir())
    _check_private_dir(folder)
    return folder


def _open_checked(path: Path) -> int:
    """Open ``path`` read-only without following a symlink and check the descriptor's owner and mode."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        reason = f'{path} is a symlink' if os.path.islink(path) else f'{path} cannot be opened ({e.strerror})'
        raise KernelBuildError(
            f'refusing the built kernel: {reason}; delete {path.parent} and run `timm-pf build-kernels`') from e
    st = os.fstat(fd)
    reason = _unsafe_reason(st, path, 'file')
    if reason:
        os.close(fd)
        raise KernelBuildError(
            f'refusing the built kernel: {reason}; delete {path.parent} and run `timm-pf build-kernels`')
    return fd


def _fd_sha256(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _import_library(name: str, origin: str) -> ModuleType:
    # torch must be imported first: the library links against libtorch
    loader = importlib.machinery.ExtensionFileLoader(name, origin)
    spec = importlib.util.spec_from_file_location(name, origin, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_verified(name: str, library: Path) -> ModuleType:
    """Load ``library`` only if it, its checksum file and the folders below the cache root are this user's
    and unmodified; the library is loaded from the checked descriptor, so it cannot be swapped in between."""
    root, folder = _kernel_dir(), library.parent
    _check_root(root)
    for parent in (folder, *folder.parents):
        if parent == root:
            break
        _check_private_dir(parent)
    fd = _open_checked(_checksum_path(library))
    try:
        expected = os.read(fd, 256).decode('ascii', 'replace').strip()
    finally:
        os.close(fd)
    fd = _open_checked(library)
    try:
        if _fd_sha256(fd) != expected:
            raise KernelBuildError(
                f'refusing the built kernel: {library} does not match its recorded sha256 (changed after the '
                f'build); delete {folder} and run `timm-pf build-kernels`')
        origin = f'/proc/self/fd/{fd}' if os.path.exists(f'/proc/self/fd/{fd}') else str(library)
        try:
            module = _import_library(name, origin)
        except ImportError as e:
            raise KernelBuildError(
                f'the built kernel {library} does not load ({e}); delete its folder to rebuild') from e
    except BaseException:
        os.close(fd)
        raise
    # the descriptor of a loaded library stays open: the loader knows the library by its path, and a later
    # library opened under the same number would be taken for this one
    _loaded_fds.append(fd)
    return module


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a fresh file renamed into place: an existing entry,
    symlink or not, is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.tmp-')
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# The build runs in a fresh interpreter: torch's extension builder renames a second build of one name in a
# process (``name_v1``), which a later process could not import under ``name``, and the parent only ever imports
# the library through the checks of :func:`_load_verified`.
_BUILD_SCRIPT = """
import json, logging, sys
logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)  # no "CUDA runtime" notice
from torch.utils import cpp_extension
name, source, cflags, build_dir, verbose = json.loads(sys.argv[1])
cpp_extension.load(name, [source], extra_cflags=cflags, extra_ldflags=['-fopenmp'], build_directory=build_dir,
                   verbose=verbose)
"""


def _build_error(done: subprocess.CompletedProcess) -> str:
    """The line that says why a build failed: the compiler's first error, else Python's exception line."""
    lines = (done.stdout or '').strip().splitlines()
    compiler_error = next((line for line in lines if ': error:' in line or ': fatal error:' in line), None)
    exception = next((line for line in reversed(lines) if re.match(r'[\w.]+(Error|Exception)\b', line)), None)
    return (compiler_error or exception or (lines or [f'exit code {done.returncode}'])[-1]).strip()


def _compile(name: str, library: Path, verbose: bool) -> ModuleType:
    """Compile into a fresh private folder (in another process), move the library and its sha256 into
    ``library``'s folder, and load it from there."""
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)  # no "CUDA runtime" notice
    from torch.utils import cpp_extension
    folder = _private_dir(library.parent)
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        raise KernelBuildError(f'no C++ compiler ({compiler!r} not found; set CXX or install g++)')
    if not cpp_extension.is_ninja_available():
        raise KernelBuildError("ninja is not installed (pip install 'timm-pf[kernels]')")
    with _private_umask():
        build_dir = Path(tempfile.mkdtemp(dir=folder, prefix='build-'))
        try:
            args = json.dumps([name, str(_SOURCE), list(_CFLAGS), str(build_dir), verbose])
            done = subprocess.run([sys.executable, '-c', _BUILD_SCRIPT, args], stdout=None if verbose else
                                  subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode:
                raise KernelBuildError(f'compiling {_SOURCE.name} failed: {_build_error(done)}'
                                       + ('' if verbose else ' (`timm-pf build-kernels --verbose` shows all)'))
            built = build_dir / library.name
            os.chmod(built, 0o700)
            with open(built, 'rb') as f:
                _write_private(_checksum_path(library), hashlib.sha256(f.read()).hexdigest().encode() + b'\n')
            os.replace(built, library)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f'compiling {_SOURCE.name} failed: {e}') from e
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return _load_verified(name, library)


def build_cpu_kernels(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the CPU kernel and make :class:`DynamicConv2d` use it.

    Raises:
        KernelBuildError: no C++ compiler or ninja, the compiler failed, or the cached build is not safe to
            load (see the module docstring).
    """
    global _loaded, _resolved, _unavailable_reason
    name = _module_name()
    library = _library_path(name)
    if os.path.lexists(library):
        module = _load_verified(name, library)
    else:
        module = _compile(name, library, verbose)
    _loaded, _resolved, _unavailable_reason = module, True, ''
    return module


def cpu_kernels() -> Optional[ModuleType]:
    """The loaded kernel module, or None when the eager path is to be used (see the module docstring)."""
    global _resolved, _unavailable_reason
    if _resolved:
        return _loaded
    policy = _policy()
    _resolved = True
    if policy == 'off':
        _unavailable_reason = f'{_POLICY_ENV}=off'
        return None
    name = _module_name()
    path = _library_path(name)
    if policy == 'auto' and not os.path.lexists(path):
        _unavailable_reason = 'not built (run `timm-pf build-kernels`)'
        return None
    try:
        return build_cpu_kernels()
    except (KernelBuildError, OSError) as e:  # OSError: a cache folder that cannot be created
        _unavailable_reason = str(e)
        if os.path.lexists(path):  # the user's build is there but refused: say so where it happens
            warnings.warn(f'timm_pf: dynamic convs run the eager path: {e}', RuntimeWarning, stacklevel=2)
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
