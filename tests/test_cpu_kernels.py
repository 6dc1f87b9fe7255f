"""The compiled batch-1 CPU kernel of DynamicConv2d: equal to the eager path, used only where it applies,
resolved by the TIMM_PF_CPU_KERNELS policy with clear reasons when it cannot be."""
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import timm
import torch
from torch.utils import cpp_extension
from torch.utils.flop_counter import FlopCounterMode

from timm_pf.tools.bench.measure import BenchOptions
from timm_pf.tools.bench.runner import _environment
from timm_pf.cli import main
from timm_pf.layers import DynamicConv2d
from timm_pf.layers import cpu_kernels as ck
from timm_pf.models.parameternet import checkpoint_filter_fn
from _official import load_official_fixture

TOOLCHAIN = shutil.which(os.environ.get('CXX', 'c++')) is not None and cpp_extension.is_ninja_available()


class CountingKernel:
    """Stands in for the kernel module and counts the calls it computed (not None)."""

    def __init__(self, module):
        self.module, self.calls, self.computed = module, 0, 0

    def sigmoid_routed_conv2d(self, *args):
        self.calls += 1
        out = self.module.sigmoid_routed_conv2d(*args)
        self.computed += out is not None
        return out


@pytest.fixture(scope='module')
def built():
    """Build the kernel once (into the session's kernel folder, under umask 000 so that the cache's own
    protections are what keeps it private); fails, not skips, if a toolchain is here."""
    if not TOOLCHAIN:
        pytest.skip('no C++ compiler or ninja: the kernel cannot be built here')
    old_umask = os.umask(0)
    try:
        with ck.cpu_kernel_policy('build'):
            assert ck.cpu_kernels() is not None, ck.kernel_status()
    finally:
        os.umask(old_umask)


@contextmanager
def counting_kernel():
    with ck.cpu_kernel_policy('auto'):
        module = ck.cpu_kernels()
        assert module is not None, ck.kernel_status()
        ck._loaded = CountingKernel(module)  # restored by the policy's exit
        yield ck._loaded


# (in, out, kernel, stride, padding, dilation, groups, experts, size)
LAYOUTS = [
    (16, 24, 1, 1, 0, 1, 1, 4, 14),  # ghost primary / pointwise shortcut
    (24, 24, 3, 1, 1, 1, 24, 4, 13),  # ghost cheap depthwise
    (24, 24, 3, 2, 1, 1, 24, 4, 15),  # strided depthwise
    (3, 16, 3, 2, 1, 1, 1, 4, 33),  # stem
    (12, 8, 3, 1, 2, 2, 2, 7, 9),  # grouped, dilated, odd expert count
    (8, 4, 1, 2, 0, 1, 1, 1, 10),  # strided 1x1, one expert
    (12, 8, 1, 1, 0, 1, 4, 4, 6),  # grouped 1x1
    (64, 96, 1, 1, 0, 1, 1, 4, 7),  # mixing split over threads (6144 x 4 floats)
    (1024, 64, 1, 1, 0, 1, 1, 4, 7),  # 65536-element kernels: several mixing tasks
]


@pytest.mark.parametrize('layout', LAYOUTS, ids=[str(c) for c in LAYOUTS])
def test_kernel_matches_eager_path(built, layout):
    cin, cout, k, stride, padding, dilation, groups, experts, size = layout
    torch.manual_seed(0)
    layer = DynamicConv2d(cin, cout, k, stride, padding, dilation, groups, num_experts=experts).eval()
    with torch.no_grad():
        layer.routing.weight.mul_(20)  # spread the coefficients over (0, 1)
    x = torch.randn(1, cin, size, size)
    with torch.no_grad(), counting_kernel() as kernel:
        fused = layer(x)
        eager = layer(x, layer.routing_weights(x))  # given coefficients: always the eager path
    assert kernel.computed == 1
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def test_official_logits_through_the_kernel(built):
    official, x, logits, meta = load_official_fixture('parameternet_600m')
    model = timm.create_model(meta['ours']).eval()
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    dynamic = sum(isinstance(m, DynamicConv2d) for m in model.modules())
    with torch.inference_mode(), counting_kernel() as kernel:
        out = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    assert kernel.computed == dynamic * x.shape[0]
    torch.testing.assert_close(out, logits, atol=1e-4, rtol=0)


def _layer(**kwargs) -> DynamicConv2d:
    torch.manual_seed(0)
    return DynamicConv2d(8, 12, 3, 1, 1, **kwargs).eval()


def _eager(layer, x, **kwargs):
    with ck.cpu_kernel_policy('off'):
        return layer(x, **kwargs)


@pytest.mark.parametrize('case', [
    'batch2', 'grad', 'autocast', 'float64', 'channels_last', 'flop_counter', 'trace', 'compile'])
def test_kernel_leaves_other_calls_to_the_eager_path(built, case):
    layer, x = _layer(), torch.randn(2 if case == 'batch2' else 1, 8, 9, 9)
    if case == 'float64':
        layer, x = layer.double(), x.double()
    if case == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    expected = _eager(layer, x)
    with counting_kernel() as kernel:
        if case == 'grad':
            out = layer(x.requires_grad_())
            out.sum().backward()
            assert layer.weight.grad is not None
        elif case == 'autocast':
            with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
                out = layer(x)
                expected = _eager(layer, x)
            assert out.dtype == torch.bfloat16
        elif case == 'flop_counter':
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                out = layer(x)
            assert counter.get_total_flops() > 0
        elif case == 'trace':
            traced = torch.jit.trace(layer, x, check_trace=False)
            x2 = torch.randn(1, 8, 9, 9)
            torch.testing.assert_close(traced(x2), _eager(layer, x2))
            out = traced(x)
        elif case == 'compile':
            out = torch.compile(layer, backend='eager')(x)
        else:
            with torch.no_grad():
                out = layer(x)
    assert kernel.computed == 0
    torch.testing.assert_close(out.detach(), expected.detach())


@pytest.mark.parametrize('kwargs', [
    {'routing': 'softmax'}, {'bias': True}, {'padding': 'same', 'stride': 2}], ids=['softmax', 'bias', 'same'])
def test_layouts_the_kernel_does_not_compute_never_call_it(built, kwargs):
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 12, 3, **{'padding': 1, **kwargs}).eval()
    x = torch.randn(1, 8, 10, 10)  # 'same' at stride 2 on an even size pads at run time
    with torch.no_grad(), counting_kernel() as kernel:
        out = layer(x)
    assert kernel.calls == 0
    torch.testing.assert_close(out, _eager(layer, x))


def test_bad_input_still_gets_the_layers_error(built):
    layer = _layer()
    with torch.no_grad(), counting_kernel(), pytest.raises(ValueError, match=r'expects \(B, 8, H, W\) input'):
        layer(torch.randn(1, 5, 9, 9))


def test_policy_off_and_auto_without_a_build(monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path))
    with ck.cpu_kernel_policy('off'):
        assert ck.cpu_kernels() is None
        assert 'TIMM_PF_CPU_KERNELS=off' in ck.kernel_status()
    with ck.cpu_kernel_policy('auto'):
        assert ck.cpu_kernels() is None  # nothing built in this folder, and auto never compiles
        assert 'timm-pf build-kernels' in ck.kernel_status()
    assert not any(tmp_path.iterdir())


def test_bad_policy_and_missing_compiler_are_named(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match='unknown CPU kernel policy'):
        with ck.cpu_kernel_policy('always'):
            pass
    monkeypatch.setenv('TIMM_PF_CPU_KERNELS', 'sometimes')
    ck_state = (ck._loaded, ck._resolved, ck._unavailable_reason)
    try:
        ck._resolved = False
        with pytest.raises(ValueError, match="TIMM_PF_CPU_KERNELS='sometimes'"):
            _layer()(torch.randn(1, 8, 9, 9))
    finally:
        ck._loaded, ck._resolved, ck._unavailable_reason = ck_state
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path))
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with ck.cpu_kernel_policy('build'):
        with pytest.raises(ck.KernelBuildError, match='no C.. compiler'):
            ck.build_cpu_kernels()
        x = torch.randn(1, 8, 9, 9)
        assert ck.cpu_kernels() is None  # the layer falls back to the eager path, with the reason
        assert 'no C++ compiler' in ck.kernel_status()
        torch.testing.assert_close(_layer()(x), _eager(_layer(), x))


def _planted_build(root, content=b'not a shared library'):
    """A cache entry as a build leaves it (private folder, library, its sha256), with ``content`` as library."""
    library = root / ck._module_name() / f'{ck._module_name()}.so'
    library.parent.mkdir(mode=0o700, parents=True)
    library.write_bytes(content)
    ck._checksum_path(library).write_text(hashlib.sha256(content).hexdigest() + '\n')
    for path, mode in ((library, 0o700), (ck._checksum_path(library), 0o600)):
        path.chmod(mode)
    return library


def _assert_refused(match):
    with pytest.raises(ck.KernelBuildError, match=match):
        ck.build_cpu_kernels()
    with ck.cpu_kernel_policy('auto'):  # the default policy falls back to the eager path, saying why
        with pytest.warns(RuntimeWarning, match=f'dynamic convs run the eager path: .*{match}'):
            assert ck.cpu_kernels() is None
        assert re.search(match, ck.kernel_status()), ck.kernel_status()


def _other_uid():
    return next(uid for uid in range(12345, 12400) if uid != os.geteuid())


def _library_owned_by_someone_else(library):
    os.chown(library, _other_uid(), -1)


def _checksum_owned_by_someone_else(library):
    os.chown(ck._checksum_path(library), _other_uid(), -1)


def _folder_owned_by_someone_else(library):
    os.chown(library.parent, _other_uid(), -1)


def _world_writable_folder(library):
    library.parent.chmod(0o777)


def _group_writable_library(library):
    library.chmod(0o770)


def _symlinked_library(library):
    elsewhere = library.parent.parent / 'elsewhere.so'
    library.rename(elsewhere)
    library.symlink_to(elsewhere)


def _symlinked_folder(library):
    real = library.parent.parent / 'real-folder'
    library.parent.rename(real)
    library.parent.symlink_to(real)


def _replaced_library(library):
    library.write_bytes(b'another library')


def _missing_checksum(library):
    ck._checksum_path(library).unlink()


@pytest.mark.parametrize('plant, match', [
    (_library_owned_by_someone_else, r'\.so is owned by uid \d+, not by the current user'),
    (_checksum_owned_by_someone_else, r'\.sha256 is owned by uid \d+'),
    (_folder_owned_by_someone_else, r'refusing the kernel cache: .* is owned by uid \d+'),
    (_world_writable_folder, r'refusing the kernel cache: .* writable by group or others \(mode 777\)'),
    (_group_writable_library, r'\.so is writable by group or others \(mode 770\)'),
    (_symlinked_library, r'\.so is a symlink'),
    (_symlinked_folder, r'refusing the kernel cache: .* is a symlink'),
    (_replaced_library, r'does not match its recorded sha256 .*timm-pf build-kernels'),
    (_missing_checksum, r'\.sha256 cannot be opened'),
], ids=lambda v: v.__name__.strip('_') if callable(v) else '')
def test_a_cache_entry_that_is_not_the_users_own_build_is_never_loaded(monkeypatch, tmp_path, plant, match):
    root = tmp_path / 'shared'
    root.mkdir(mode=0o777)
    root.chmod(0o1777)  # a shared folder such as /tmp: others may create entries in it
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(root))
    library = _planted_build(root)
    monkeypatch.setattr(ck, '_import_library', lambda *a: pytest.fail('an unsafe library was loaded'))
    plant(library)
    _assert_refused(match)
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with ck.cpu_kernel_policy('build'):  # a present entry is never rebuilt over either
        with pytest.warns(RuntimeWarning, match=match):
            assert ck.cpu_kernels() is None
        assert re.search(match, ck.kernel_status())


def _root_owned_by_someone_else(root):
    os.chown(root, _other_uid(), -1)


def _root_writable_by_others(root):
    root.chmod(0o777)


def _folder_above_the_root_writable_by_others(root):
    root.parent.chmod(0o777)


@pytest.mark.parametrize('plant, match', [
    (_root_owned_by_someone_else, r'refusing the kernel cache root .*/shared is owned by uid \d+'),
    (_root_writable_by_others, r'root .*/shared is writable by group or others \(mode 777\) and not sticky'),
    (_folder_above_the_root_writable_by_others,
     r'root .*/shared: the folder above it, .* is writable by group or others \(mode 777\) and not sticky'),
], ids=lambda v: v.__name__.strip('_') if callable(v) else '')
def test_a_cache_root_others_can_rename_in_is_neither_built_in_nor_loaded(monkeypatch, tmp_path, plant, match):
    root = tmp_path / 'above' / 'shared'
    root.mkdir(mode=0o700, parents=True)
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(root))
    library = _planted_build(root)
    monkeypatch.setattr(ck, '_import_library', lambda *a: pytest.fail('an unsafe library was loaded'))
    plant(root)
    _assert_refused(match)
    shutil.rmtree(library.parent)
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('compiled into an unsafe cache'))
    with pytest.raises(ck.KernelBuildError, match=match):
        ck.build_cpu_kernels()
    assert not library.parent.exists() or not any(library.parent.iterdir())


def test_a_cache_path_that_cannot_be_made_or_a_failing_compiler_fall_back(monkeypatch, tmp_path):
    x = torch.randn(1, 8, 9, 9)
    (tmp_path / 'a-file').write_text('not a folder')
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path / 'a-file'))
    with ck.cpu_kernel_policy('build'):  # the first batch-1 call resolves the kernel: eager, with the reason
        torch.testing.assert_close(_layer()(x), _eager(_layer(), x))
        assert re.search(r'cannot create the kernel cache folder .*a-file.*TIMM_PF_KERNEL_DIR', ck.kernel_status())
    if not TOOLCHAIN:
        return
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('CXX', shutil.which('false'))
    with ck.cpu_kernel_policy('build'):
        torch.testing.assert_close(_layer()(x), _eager(_layer(), x))
        assert re.search(r"compiling dynamic_conv_cpu.cpp failed: .*CalledProcessError: .*'--version'",
                         ck.kernel_status())


TINY_EXTENSION = r"""
#include <Python.h>
#define NAME_OF(x) #x
#define NAME(x) NAME_OF(x)
#define INIT_OF(x) PyInit_##x
#define INIT(x) INIT_OF(x)
static PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, NAME(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""


@pytest.mark.skipif(not TOOLCHAIN, reason='no C++ compiler or ninja')
def test_builds_again_in_one_process_and_names_a_compiler_error(monkeypatch, tmp_path):
    source = tmp_path / 'tiny.cpp'
    source.write_text(TINY_EXTENSION)
    monkeypatch.setattr(ck, '_SOURCE', source)
    monkeypatch.setattr(ck, '_module_name', lambda: 'timm_pf_tiny_rebuilt')
    with ck.cpu_kernel_policy('off'):
        for root in ('a', 'a', 'b'):  # again after its cache was deleted, then into another cache
            monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path / root))
            assert ck.build_cpu_kernels().__name__ == 'timm_pf_tiny_rebuilt'
            assert ck._library_path('timm_pf_tiny_rebuilt').is_file()
            shutil.rmtree(tmp_path / root)
        source.write_text(TINY_EXTENSION + 'this is not C++;\n')
        with pytest.raises(ck.KernelBuildError, match=r'compiling tiny.cpp failed: .*tiny.cpp:\d+:\d+: error: '):
            ck.build_cpu_kernels()


def test_the_checksum_is_written_through_no_planted_symlink(tmp_path):
    target = tmp_path / 'victim'
    target.write_text('unchanged')
    link = tmp_path / 'kernel.so.sha256'
    link.symlink_to(target)
    ck._write_private(link, b'abc\n')
    assert target.read_text() == 'unchanged'
    assert not link.is_symlink() and link.read_bytes() == b'abc\n'
    assert stat.S_IMODE(link.stat().st_mode) == 0o600


def test_cache_folders_are_private_whatever_the_umask(monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path / 'a' / 'kernels'))
    old_umask = os.umask(0)
    try:
        folder = ck._private_dir(ck._library_path('k').parent)
    finally:
        os.umask(old_umask)
    for path in (folder, folder.parent, folder.parent.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_the_umask_000_build_is_private(built):
    library = ck._library_path(ck._module_name())
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in [library.parent, *library.parent.iterdir()]}
    assert modes == {library.parent.name: 0o700, library.name: 0o700, library.name + '.sha256': 0o600}
    assert (library.parent.parent.stat().st_mode & 0o077) == 0  # the cache root made by the build
    assert ck._checksum_path(library).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()


def test_a_corrupted_build_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path))
    # a name no earlier test loaded: Python would hand back an extension module it already imported
    monkeypatch.setattr(ck, '_module_name', lambda: 'timm_pf_corrupted_build')
    _planted_build(tmp_path)
    with ck.cpu_kernel_policy('auto'):
        with pytest.raises(ck.KernelBuildError, match='does not load.*delete its folder'):
            ck.build_cpu_kernels()
        with pytest.warns(RuntimeWarning, match='does not load'):
            assert ck.cpu_kernels() is None
        assert 'does not load' in ck.kernel_status()


def test_a_new_process_loads_the_build_without_compiling(built):
    env = {**os.environ, 'TIMM_PF_CPU_KERNELS': 'auto', 'CXX': '/no/compiler/here'}
    code = 'import timm_pf.layers.cpu_kernels as ck; print(ck.kernel_status())'
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith('fused CPU kernel'), out.stdout + out.stderr


def test_build_kernels_command_and_bench_report(built, capsys):
    with ck.cpu_kernel_policy('off'):  # the command switches the kernel on; the policy's exit undoes it
        assert main(['build-kernels']) == 0
    out = capsys.readouterr().out
    assert out.startswith('fused CPU kernel') and 'largest difference to the eager path' in out
    with ck.cpu_kernel_policy('auto'):
        env = _environment(BenchOptions(), [_layer()])
        assert env['dynamic_conv_batch1'].startswith('fused CPU kernel')
    assert 'dynamic_conv_batch1' not in _environment(BenchOptions(), [torch.nn.Conv2d(3, 3, 1)])


def test_a_quantized_routing_layer_takes_the_eager_path(built):
    """quantize_dynamic swaps the routing nn.Linear for a quantized one: the kernel, which reads the Linear's
    weights, is not called, and the model runs as with the kernel off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(DynamicConv2d(8, 16, 1), torch.nn.ReLU(),
                                DynamicConv2d(16, 16, 3, padding=1, groups=16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.ao.quantization's deprecation notices
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad(), counting_kernel() as kernel:
        out = quantized(x)
        assert kernel.calls == 0
    with torch.no_grad(), ck.cpu_kernel_policy('off'):
        torch.testing.assert_close(out, quantized(x))
