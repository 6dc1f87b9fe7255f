"""The compiled batch-1 CPU kernel of DynamicConv2d: equal to the eager path, used only where it applies,
resolved by the TIMM_PF_CPU_KERNELS policy with clear reasons when it cannot be."""
import os
import shutil
import subprocess
import sys
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
    """Build the kernel once (into the session's kernel folder); fails, not skips, if a toolchain is here."""
    if not TOOLCHAIN:
        pytest.skip('no C++ compiler or ninja: the kernel cannot be built here')
    with ck.cpu_kernel_policy('build'):
        assert ck.cpu_kernels() is not None, ck.kernel_status()


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


def test_a_corrupted_build_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(tmp_path))
    path = ck._library_path(ck._module_name())
    path.parent.mkdir(parents=True)
    path.write_bytes(b'not a shared library')
    with ck.cpu_kernel_policy('auto'):
        with pytest.raises(ck.KernelBuildError, match='does not load.*delete its folder'):
            ck.build_cpu_kernels()
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
