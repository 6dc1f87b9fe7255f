"""Measuring one model in one setting: the prepared model and its statistics (:class:`_Subject`), one
timed step (:class:`_Step`) and its peak memory (:class:`PeakTensorMemory`, or the resident set of a fresh
process)."""
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm_pf._private import TorchDispatchMode, tree_leaves
from timm_pf.layers.cpu_kernels import CPU_KERNEL_POLICIES
from timm_pf.methods.stats import count_activations, count_macs, count_params
from .paper import Setting

__all__ = ['BenchInputError', 'BenchOptions', 'PeakTensorMemory']

class BenchInputError(ValueError):
    """A request the benchmark cannot run: unknown model, unavailable device, bad option."""


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by PyTorch operators while the mode is active.

    Every operator output whose storage is new is counted until the storage is freed (a weak-reference
    finalizer subtracts it). This is what ``torch.cuda.max_memory_allocated`` measures on a GPU, for
    any device: activations, autograd's saved tensors, gradients and temporaries created by operators,
    but not scratch buffers that a kernel allocates internally (e.g. oneDNN's workspace) and not the
    memory allocator's caching or fragmentation. It is deterministic, which process-level measures
    (resident set size) on a shared machine are not.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in existing}
        self._live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._known or ptr in self._live:
            return
        self._live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != 'meta':
                self._track(leaf)
        return out


_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
_MEMORY_METHODS = ('tensors', 'rss', 'off')
_RUNTIMES = ('torch', 'onnxruntime')
_ONNX_EXTRA = ('onnx', 'onnxruntime', 'onnxscript')  # the ``onnx`` extra
_STATISTICS = ('median', 'min')
_PROC_STATUS, _PROC_CLEAR_REFS = '/proc/self/status', '/proc/self/clear_refs'


# More threads than this per CPU only oversubscribe (oneDNN fails to create primitives for absurd counts).
_MAX_THREADS_PER_CPU = 4


@dataclass
class BenchOptions:
    """How to run: device, numerics, compilation, threads and the repeat policy."""
    device: str = 'cpu'
    dtype: str = 'float32'  # parameters and inputs are cast to it
    amp: bool = False  # autocast: bfloat16 on CPU, float16 on CUDA
    channels_last: bool = False
    compile: bool = False
    threads: Optional[int] = None  # CPU threads; None keeps torch's default
    warmup: int = 1  # discarded rounds before timing (every model's first call is one)
    repeats: Optional[int] = None  # timed rounds; None: as many as time_budget allows, 5 at least, more if unstable
    max_repeats: int = 50  # cap on the timed rounds of a setting when repeats is None
    time_budget: float = 50.0  # seconds of timed rounds in all, shared equally by the settings
    memory: str = 'tensors'  # 'tensors', 'rss' (CPU, fresh process per model and setting) or 'off'
    statistic: str = 'median'  # latency the ratios use; 'min' resists interference on a busy machine
    cpu_kernels: str = 'auto'  # batch-1 dynamic conv kernel policy (timm_pf.layers.cpu_kernels)
    runtime: str = 'torch'  # 'torch' (eager or compiled) or 'onnxruntime' (exported, timm_pf.tools.bench.onnxrt)

    def validate(self) -> None:
        if self.runtime not in _RUNTIMES:
            raise BenchInputError(f'unknown runtime {self.runtime!r}; choose one of {", ".join(_RUNTIMES)}')
        if self.cpu_kernels not in CPU_KERNEL_POLICIES:
            raise BenchInputError(
                f'unknown CPU kernel policy {self.cpu_kernels!r}; choose one of {", ".join(CPU_KERNEL_POLICIES)}')
        if self.statistic not in _STATISTICS:
            raise BenchInputError(f'unknown statistic {self.statistic!r}; choose one of {", ".join(_STATISTICS)}')
        if self.memory not in _MEMORY_METHODS:
            raise BenchInputError(f'unknown memory method {self.memory!r}; choose one of {", ".join(_MEMORY_METHODS)}')
        if self.dtype not in _DTYPES:
            raise BenchInputError(f'unknown dtype {self.dtype!r}; choose one of {", ".join(_DTYPES)}')
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise BenchInputError(f'unknown device {self.device!r}: {err}') from None
        if device.type not in ('cpu', 'cuda'):
            raise BenchInputError(f'unsupported device {self.device!r}; use cpu or cuda[:N]')
        if self.memory == 'rss' and (device.type != 'cpu' or not os.path.exists(_PROC_CLEAR_REFS)):
            raise BenchInputError('--memory rss measures CPU runs on Linux only (it resets /proc/self/clear_refs)')
        if device.type == 'cuda':
            if not torch.cuda.is_available():
                raise BenchInputError(f'--device {self.device}: CUDA is not available on this machine')
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise BenchInputError(
                    f'--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) are present')
        if self.warmup < 1:
            raise BenchInputError('--warmup must be at least 1: the first call of a model is never timed')
        if self.repeats is not None and self.repeats < 1:
            raise BenchInputError('--repeats must be at least 1')
        if self.max_repeats < 1:
            raise BenchInputError('--max-repeats must be at least 1')
        if not self.time_budget > 0:
            raise BenchInputError('--time-budget must be positive')
        if self.threads is not None and not 1 <= self.threads <= _MAX_THREADS_PER_CPU * (os.cpu_count() or 1):
            raise BenchInputError(f'--threads must be between 1 and {_MAX_THREADS_PER_CPU}x the {os.cpu_count()} '
                                  f'CPUs of this machine, got {self.threads}')
        if self.amp and self.dtype != 'float32':
            raise BenchInputError(f'--amp autocasts a float32 model: drop --dtype {self.dtype} or --amp')
        if self.runtime == 'onnxruntime':
            self._validate_onnxruntime()

    def _validate_onnxruntime(self) -> None:
        missing = [name for name in _ONNX_EXTRA if importlib.util.find_spec(name) is None]
        if missing:
            raise BenchInputError(f"--runtime onnxruntime needs {', '.join(missing)}: pip install 'timm-pf[onnx]'")
        unsupported = [flag for flag, value in (
            (f'--device {self.device}', torch.device(self.device).type != 'cpu'),
            (f'--dtype {self.dtype}', self.dtype != 'float32'), ('--amp', self.amp), ('--compile', self.compile),
            ('--channels-last', self.channels_last), ('--memory rss', self.memory == 'rss')) if value]
        if unsupported:
            raise BenchInputError(f'--runtime onnxruntime times float32 CPU inference of the exported graph: '
                                  f'drop {", ".join(unsupported)}')


class _Subject:
    """A model prepared for the benchmark, with its statistics per image size; ``img_size`` builds it for
    that input size (models with a position embedding)."""

    def __init__(self, name: str, options: BenchOptions, img_size: Optional[int] = None):
        import timm
        self.name, self.img_size = name, img_size
        kwargs = {} if img_size is None else {'img_size': img_size}
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as err:  # a broken model must name itself
            raise RuntimeError(f'creating {name!r} failed: {err}') from err
        self.eager = model  # float32 on CPU until prepare(); statistics are taken from it
        self.params = count_params(model)
        self.num_classes = getattr(model, 'num_classes', 1000) or 1000
        self._stats: Dict[int, Tuple[int, int]] = {}
        self.options = options
        self.model: Optional[nn.Module] = None

    def stats(self, img_size: int) -> Tuple[int, int]:
        """(MACs, activations) per image at ``img_size``."""
        if img_size not in self._stats:
            input_size = (3, img_size, img_size)
            try:
                self._stats[img_size] = (count_macs(self.eager, input_size), count_activations(self.eager, input_size))
            except Exception as err:
                raise RuntimeError(f'{self.name} failed at {img_size}px: {err}') from err
        return self._stats[img_size]

    def prepare(self) -> None:
        opts = self.options
        model = self.eager.to(device=opts.device, dtype=_DTYPES[opts.dtype])
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.eager = model
        self.model = torch.compile(model) if opts.compile else model

    def weight_bytes(self) -> int:
        tensors = list(self.eager.parameters()) + list(self.eager.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


def _autocast(options: BenchOptions):
    if not options.amp:
        return nullcontext()
    device_type = torch.device(options.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if device_type == 'cpu' else torch.float16)


class _Step:
    """One timed unit of work for one model in one setting."""

    def __init__(self, subject: _Subject, setting: Setting, options: BenchOptions):
        self.subject, self.setting, self.options = subject, setting, options
        self.device = torch.device(options.device)
        self.x = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size,
                             device=self.device, dtype=_DTYPES[options.dtype])
        if options.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.target = torch.randint(0, subject.num_classes, (setting.batch_size,), device=self.device)
        self.train = setting.mode == 'train'

    def __call__(self) -> None:
        model = self.subject.model
        model.train(self.train)
        if self.train:
            model.zero_grad(set_to_none=True)
            with _autocast(self.options):
                out = model(self.x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = F.cross_entropy(out.float(), self.target)
            loss.backward()
        else:
            with torch.no_grad(), _autocast(self.options):
                model(self.x)

    def sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def time(self) -> float:
        self.sync()
        start = time.perf_counter()
        try:
            self()
        except ValueError as err:
            if 'more than 1 value per channel' in str(err):  # F.batch_norm in training mode
                raise BenchInputError(
                    f'{self.subject.name} cannot train at {self.setting}: a BatchNorm layer gets one value per '
                    f'channel (batch x height x width = 1 at its stage); use a larger batch or image size') from err
            raise RuntimeError(f'{self.subject.name} failed at {self.setting}: {err}') from err
        except Exception as err:
            raise RuntimeError(f'{self.subject.name} failed at {self.setting}: {err}') from err
        self.sync()
        return time.perf_counter() - start

    def peak_memory(self) -> Optional[int]:
        """Peak bytes of one step: weights, buffers, input and everything the step allocates."""
        self.subject.eager.zero_grad(set_to_none=True)
        fixed = self.subject.weight_bytes() + self.x.numel() * self.x.element_size()
        if self.device.type == 'cuda':
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self()
            self.sync()
            return fixed + torch.cuda.max_memory_allocated(self.device) - before
        if self.options.memory == 'rss':
            return _peak_rss_in_fresh_process(self.subject.name, self.setting, self.options, self.subject.img_size)
        if self.options.compile:
            return None  # compiled CPU kernels allocate outside the dispatcher
        existing = [self.x, self.target, *self.subject.eager.parameters(), *self.subject.eager.buffers()]
        with PeakTensorMemory(existing) as tracker:
            self()
        return fixed + tracker.peak


    def peak_rss(self) -> int:
        """Weights, buffers, input and the resident-set growth over two steps (call in a fresh process)."""
        fixed = self.subject.weight_bytes() + self.x.numel() * self.x.element_size()
        gc.collect()
        with open(_PROC_CLEAR_REFS, 'w') as f:
            f.write('5')  # reset the high-water mark VmHWM to the current resident set
        start = _proc_status_bytes('VmRSS')
        for _ in range(2):
            self()
        return fixed + _proc_status_bytes('VmHWM') - start


def _proc_status_bytes(key: str) -> int:
    with open(_PROC_STATUS) as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f'{key} missing from {_PROC_STATUS}')


def _peak_rss_in_fresh_process(name: str, setting: Setting, options: BenchOptions,
                                img_size: Optional[int] = None) -> int:
    """Peak bytes of ``name`` (built for ``img_size`` when given, see :class:`_Subject`) in a fresh process."""
    request = json.dumps({'model': name, 'img_size': img_size, 'setting': asdict(setting), 'options': asdict(options)})
    code = 'import sys; from timm_pf.tools.bench.measure import _peak_rss_main; _peak_rss_main(sys.argv[1])'
    proc = subprocess.run([sys.executable, '-c', code, request], capture_output=True, text=True)
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1]  # the exception's line
        raise RuntimeError(f'measuring the memory of {name} at {setting} failed: {error}')
    return int(proc.stdout.strip().splitlines()[-1])


def _peak_rss_main(request: str) -> None:
    """Entry point of the fresh process of ``memory='rss'``: prints the peak in bytes."""
    import timm_pf  # noqa: F401  registers the models
    spec = json.loads(request)
    options = BenchOptions(**spec['options'])
    torch.set_flush_denormal(True)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    subject = _Subject(spec['model'], options, img_size=spec['img_size'])
    subject.prepare()
    print(_Step(subject, Setting(**spec['setting']), options).peak_rss())
