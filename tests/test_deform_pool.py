"""Deformable max/avg-pool operators (paper §5.1, App. B): exact reductions to the regular poolings,
agreement with ``torchvision.ops.deform_conv2d`` and float64 gradient checks."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from timm_pf.layers import DeformAvgPool2d, DeformMaxPool2d, LearnedDeformPool2d, deform_pool2d
from timm_pf.layers import deform_pool as deform_pool_module

# (kernel_size, stride, padding, dilation)
POOL_CONFIGS = [
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (2, 2, 0, 1),
    (3, 1, 1, 2),
    ((3, 5), (2, 1), (1, 2), 1),
]


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _zero_offsets(x, kernel_size, stride, padding, dilation, groups=1):
    kh, kw = _pair(kernel_size)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = _out_size(x.shape[2], kh, sh, ph, dh)
    wo = _out_size(x.shape[3], kw, sw, pw, dw)
    return torch.zeros(x.shape[0], 2 * groups * kh * kw, ho, wo, dtype=x.dtype)


@pytest.mark.parametrize('kernel_size,stride,padding,dilation', POOL_CONFIGS)
def test_zero_offsets_equal_max_pool_on_non_negative_input(kernel_size, stride, padding, dilation):
    # Out-of-image samples are zeros, max_pool2d pads with -inf: identical on post-ReLU (>= 0) features.
    x = torch.rand(2, 5, 9, 11, dtype=torch.float64)
    offset = _zero_offsets(x, kernel_size, stride, padding, dilation)
    ref = F.max_pool2d(x, kernel_size, stride, padding, dilation)
    out = DeformMaxPool2d(kernel_size, stride, padding, dilation)(x, offset)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_zero_padding_semantics_on_negative_input():
    # A window that reaches outside the image sees zeros there: max(negative values, 0) = 0 at the border.
    x = -torch.rand(1, 2, 6, 6, dtype=torch.float64) - 0.1
    out = deform_pool2d(x, _zero_offsets(x, 3, 1, 1, 1), None, 3, 1, 1, 1, 'max')
    zero_padded = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 1, 0)
    torch.testing.assert_close(out, zero_padded, rtol=0, atol=1e-12)
    assert (out[..., 0, :] == 0).all() and (out[..., 1:-1, 1:-1] < 0).all()


@pytest.mark.parametrize('kernel_size,stride,padding,dilation', [c for c in POOL_CONFIGS if c[3] == 1])
def test_zero_offsets_equal_avg_pool_count_include_pad(kernel_size, stride, padding, dilation):
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    offset = _zero_offsets(x, kernel_size, stride, padding, dilation)
    ref = F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=True)
    out = DeformAvgPool2d(kernel_size, stride, padding, dilation)(x, offset)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_integer_offsets_shift_the_window():
    # Offsets of exactly (+1, -2) pixels sample the max-pool of the shifted image.
    x = torch.rand(1, 3, 10, 12, dtype=torch.float64)
    offset = _zero_offsets(x, 3, 1, 1, 1)
    offset[:, 0::2], offset[:, 1::2] = 1.0, -2.0
    # Window of output (y, x): rows y..y+2, columns x-3..x-1 of the zero-padded image.
    ref = F.max_pool2d(F.pad(x, (3, 3, 3, 3)), 3, 1, 0)[:, :, 3:13, 0:12]
    torch.testing.assert_close(deform_pool2d(x, offset, None, 3, 1, 1), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('stride,padding,dilation,groups', [(1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 2, 3), (2, 0, 1, 6)])
def test_avg_equals_torchvision_deform_conv_with_constant_kernel(stride, padding, dilation, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    ho, wo = _out_size(9, 3, stride, padding, dilation), _out_size(11, 3, stride, padding, dilation)
    offset = torch.randn(2, 2 * groups * 9, ho, wo, dtype=torch.float64) * 3  # many samples leave the image
    mask = torch.rand(2, groups * 9, ho, wo, dtype=torch.float64)
    weight = torch.full((6, 1, 3, 3), 1 / 9, dtype=torch.float64)  # depthwise, constant 1/(k*k)
    ref = torchvision.ops.deform_conv2d(x, offset, weight, stride=stride, padding=padding, dilation=dilation, mask=mask)
    out = deform_pool2d(x, offset, mask, 3, stride, padding, dilation, 'avg')
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_max_equals_per_point_bilinear_samples():
    # Reference: sample each kernel point with torchvision (a one-hot kernel), modulate, take the max.
    torch.manual_seed(1)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    offset = torch.randn(2, 2 * 2 * 9, 7, 8, dtype=torch.float64) * 2
    mask = torch.rand(2, 2 * 9, 7, 8, dtype=torch.float64)
    samples = []
    for k in range(9):
        one_hot = torch.zeros(4, 1, 3, 3, dtype=torch.float64)
        one_hot.view(4, 9)[:, k] = 1
        samples.append(torchvision.ops.deform_conv2d(x, offset, one_hot, padding=1, mask=mask))
    ref = torch.stack(samples).amax(0)
    torch.testing.assert_close(deform_pool2d(x, offset, mask, 3, 1, 1), ref, rtol=0, atol=1e-12)


def _dense_path(monkeypatch):
    """Run deform_pool2d on its exportable dense-gather path (used when tracing, compiling or exporting)."""
    monkeypatch.setattr(deform_pool_module, '_use_tap_loop', lambda *tensors: False)


def _pool_and_grads(x, offset, mask, *args):
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask) if t is not None]
    x, offset, mask = leaves if mask is not None else leaves + [None]
    out = deform_pool2d(x, offset, mask, *args)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize('reduction', ['max', 'avg'])
@pytest.mark.parametrize('with_mask', [True, False])
@pytest.mark.parametrize('taps_per_gather', [9, 4, 1])
def test_tap_loop_matches_dense_path_forward_and_backward(reduction, with_mask, taps_per_gather, monkeypatch):
    # 2 x 4 x 5 locations x 2 groups, 3 channels per group: blocks of 9, 4 + 4 + 1 or single taps
    monkeypatch.setattr(deform_pool_module, '_GATHER_BUDGET', 2 * 4 * 5 * 2 * 3 * taps_per_gather)
    torch.manual_seed(2)
    x = torch.randn(2, 6, 8, 9, dtype=torch.float64)
    offset = torch.randn(2, 2 * 2 * 9, 4, 5, dtype=torch.float64) * 2  # some samples leave the image
    mask = torch.rand(2, 2 * 9, 4, 5, dtype=torch.float64) if with_mask else None
    args = (3, 2, 1, 1, reduction)
    tap_loop = _pool_and_grads(x, offset, mask, *args)
    _dense_path(monkeypatch)
    dense = _pool_and_grads(x, offset, mask, *args)
    for a, b in zip(tap_loop, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('grad', [False, True])
def test_output_keeps_the_input_memory_format(channels_last, grad):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 9)
    x_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    offset, mask = torch.randn(2, 18, 8, 9), torch.rand(2, 9, 8, 9)
    with torch.set_grad_enabled(grad):
        out = deform_pool2d(x_in.requires_grad_(grad), offset, mask, 3, 1, 1)
        reference = deform_pool2d(x, offset, mask, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize('taps_per_gather', [9, 2])
def test_max_ties_send_the_gradient_to_the_first_tap_on_both_paths(taps_per_gather, monkeypatch):
    # Post-ReLU features have exact zeros: ties among taps. Both paths route each output's gradient to the
    # first maximal tap in row-major order, as max_pool2d does on the zero-padded input.
    monkeypatch.setattr(deform_pool_module, '_GATHER_BUDGET', 4 * 6 * 7 * taps_per_gather)
    torch.manual_seed(5)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64).relu()
    offset = _zero_offsets(x, 3, 1, 1, 1)
    padded = F.pad(x, (1, 1, 1, 1)).requires_grad_()
    expected = F.max_pool2d(padded, 3, 1, 0)
    expected.backward(torch.linspace(-1, 1, expected.numel(), dtype=x.dtype).view_as(expected))
    tap_loop = _pool_and_grads(x, offset, None, 3, 1, 1)
    _dense_path(monkeypatch)
    dense = _pool_and_grads(x, offset, None, 3, 1, 1)
    for out, grad_x in (tap_loop[:2], dense[:2]):
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
        torch.testing.assert_close(grad_x, padded.grad[..., 1:-1, 1:-1], rtol=0, atol=1e-12)


def test_backward_keeps_no_per_sample_tensor():
    # Autograd keeps the input, offsets, masks and one uint8 winning tap per output element, nothing with
    # one entry per (tap, corner) sample.
    x = torch.rand(2, 8, 12, 12, requires_grad=True)
    offset = torch.randn(2, 18, 12, 12, requires_grad=True)
    mask = torch.rand(2, 9, 12, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = deform_pool2d(x, offset, mask, 3, 1, 1)
    known = {t.untyped_storage().data_ptr() for t in (x, offset, mask)}
    extra = sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() not in known)
    assert extra <= out.numel()  # the uint8 winners


@pytest.mark.parametrize('dense', [False, True])
def test_nan_offsets_give_nan_outputs(dense, monkeypatch):
    if dense:
        _dense_path(monkeypatch)
    x = torch.rand(1, 3, 6, 6)
    offset = torch.zeros(1, 18, 6, 6)
    offset[0, 4, 2, 3] = float('nan')
    out = deform_pool2d(x, offset, None, 3, 1, 1)
    assert out[0, :, 2, 3].isnan().all() and out.isnan().sum() == 3


def test_inference_mode_then_training():
    # Size-dependent constants are cached between calls; a first call under inference_mode must not leave
    # inference tensors behind for a later training call.
    x = torch.rand(1, 4, 6, 6)
    offset = torch.randn(1, 18, 6, 6)
    with torch.inference_mode():
        expected = deform_pool2d(x, offset, None, 3, 1, 1)
    offset.requires_grad_()
    out = deform_pool2d(x, offset, None, 3, 1, 1)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert offset.grad is not None


@pytest.mark.parametrize('reduction', ['max', 'avg'])
@pytest.mark.parametrize('stride,groups,dense', [(1, 1, False), (2, 2, False), (2, 2, True)])
def test_gradcheck_input_offsets_masks(reduction, stride, groups, dense, monkeypatch):
    if dense:
        _dense_path(monkeypatch)
    torch.manual_seed(3)
    x = torch.randn(1, 2 * groups, 4, 5, dtype=torch.float64, requires_grad=True)
    ho, wo = _out_size(4, 3, stride, 1, 1), _out_size(5, 3, stride, 1, 1)
    # Non-integer offsets (bilinear weights are piecewise linear in them), some pointing outside the image.
    offset = (torch.rand(1, 2 * groups * 9, ho, wo, dtype=torch.float64) * 3 - 1.5 + 0.25).requires_grad_()
    mask = torch.rand(1, groups * 9, ho, wo, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: deform_pool2d(a, b, c, 3, stride, 1, 1, reduction), (x, offset, mask))


@pytest.mark.parametrize('reduction', ['max', 'avg'])
def test_gradgradcheck_input_offsets_masks(reduction):
    # Second-order gradients (e.g. gradient penalties) through the eager path.
    torch.manual_seed(6)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    offset = (torch.rand(1, 18, 4, 4, dtype=torch.float64) * 3 - 1.5 + 0.25).requires_grad_()
    mask = torch.rand(1, 9, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: deform_pool2d(a, b, c, 3, 1, 1, 1, reduction), (x, offset, mask))


def test_learned_pool_starts_as_half_scaled_pool():
    # Zero-initialised predictor (as DCNv2): regular grid, sigmoid(0) = 0.5 masks.
    x = torch.rand(2, 8, 10, 10)
    for stride in (1, 2):
        for reduction, ref_pool in (('max', F.max_pool2d), ('avg', F.avg_pool2d)):
            pool = LearnedDeformPool2d(8, stride=stride, reduction=reduction)
            assert pool.offset_conv.out_channels == 27 and pool.offset_conv.stride == (stride, stride)
            torch.testing.assert_close(pool(x), 0.5 * ref_pool(x, 3, stride, 1), rtol=1e-6, atol=1e-6)


def test_learned_pool_trains_its_predictor():
    pool = LearnedDeformPool2d(4)
    torch.nn.init.normal_(pool.offset_conv.weight, std=0.1)
    x = torch.rand(1, 4, 6, 6, requires_grad=True)
    pool(x).sum().backward()
    assert pool.offset_conv.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_bad_arguments_raise_clear_errors():
    x = torch.rand(1, 4, 6, 6)
    with pytest.raises(ValueError, match='reduction'):
        deform_pool2d(x, _zero_offsets(x, 3, 1, 1, 1), None, 3, 1, 1, reduction='sum')
    with pytest.raises(ValueError, match='does not match'):
        deform_pool2d(x, torch.zeros(1, 18, 5, 5), None, 3, 1, 1)
    with pytest.raises(ValueError, match='offset must be'):
        deform_pool2d(x, torch.zeros(1, 17, 6, 6), None, 3, 1, 1)
    with pytest.raises(ValueError, match='deformable groups'):
        deform_pool2d(x, torch.zeros(1, 3 * 18, 6, 6), None, 3, 1, 1)
    with pytest.raises(ValueError, match='mask must have shape'):
        deform_pool2d(x, torch.zeros(1, 18, 6, 6), torch.ones(1, 8, 6, 6), 3, 1, 1)
    with pytest.raises(ValueError, match='input must be'):
        deform_pool2d(x[0], torch.zeros(1, 18, 6, 6), None, 3, 1, 1)
    with pytest.raises(ValueError, match='odd'):
        LearnedDeformPool2d(4, kernel_size=2)


def test_composed_sampling_points_of_two_blocks():
    from timm_pf.cli.deform_points import compose_sampling_points
    zero = torch.zeros(18, 7, 7)
    predicted, regular = compose_sampling_points([zero, zero], (3.0, 3.0))
    assert predicted.shape == regular.shape == (81, 2)
    torch.testing.assert_close(predicted, regular)
    assert regular.min().item() == 1 and regular.max().item() == 5  # two 3x3 steps: a 5x5 footprint
    shifted = torch.zeros(18, 7, 7)
    shifted[1::2] = 0.5  # every point of the last block moves half a pixel right
    predicted, regular = compose_sampling_points([zero, shifted], (3.0, 3.0))
    torch.testing.assert_close(predicted[:, 1], regular[:, 1] + 0.5)


def test_deform_points_cli_writes_png(tmp_path, capsys):
    pytest.importorskip('matplotlib', reason='the picture needs matplotlib')
    from timm_pf.cli import main
    out = tmp_path / 'points.png'
    assert main(['deform-points', '--img-size', '64', '--init-std', '0.02', '--output', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    again = tmp_path / 'again.png'  # random offset predictors, and the same figure on every run
    assert main(['deform-points', '--img-size', '64', '--init-std', '0.02', '--output', str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert main(['deform-points', '--img-size', '64', '--init-std', '0.02', '--pretrained', '--output', str(out)]) == 2
    assert 'does not go with --checkpoint or --pretrained' in capsys.readouterr().err
    assert main(['deform-points', '--img-size', '64', '--blocks', 'layer9.spatial', '--output', str(out)]) == 2
    for blocks in (['layer4.2.spatial', 'layer4.1.spatial'], ['layer4.1.spatial', 'layer4.1.spatial']):
        assert main(['deform-points', '--img-size', '64', '--blocks', *blocks, '--output', str(out)]) == 2
        assert 'in model order' in capsys.readouterr().err


def test_deform_points_cli_loads_checkpoints_strictly(tmp_path, capsys):
    pytest.importorskip('matplotlib', reason='the picture needs matplotlib')
    import safetensors.torch
    import timm
    from timm_pf.cli import main
    state_dict = timm.create_model('ours_r50_deform_max').state_dict()
    out, checkpoint = tmp_path / 'points.png', tmp_path / 'weights.safetensors'
    args = ['deform-points', '--img-size', '64', '--checkpoint', str(checkpoint), '--output', str(out)]
    safetensors.torch.save_file(state_dict, str(checkpoint))
    assert main(args) == 0 and out.is_file()
    dropped = sorted(state_dict)[-1]
    safetensors.torch.save_file({k: v for k, v in state_dict.items() if k != dropped}, str(checkpoint))
    assert main(args) == 2
    assert f'does not fit the model: missing keys (1): {dropped}' in capsys.readouterr().err


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('reduction', ['max', 'avg'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(dtype, reduction, channels_last):
    # a channels-last half-precision input is where PyTorch's CPU grid_sample writes NaNs (64 channels and up)
    torch.manual_seed(4)
    x, offset, mask = (t.to(dtype) for t in (torch.rand(2, 64, 16, 15), torch.randn(2, 18, 16, 15),
                                              torch.rand(2, 9, 16, 15)))
    ref = deform_pool2d(x.float(), offset.float(), mask.float(), 3, 1, 1, reduction=reduction)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(5):  # the NaNs come and go between calls
        out = deform_pool2d(x, offset, mask, 3, 1, 1, reduction=reduction)
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)


def test_fake_tensor_mode_shares_no_constants_with_real_calls():
    # Shape inference with FakeTensorMode runs the eager path too; size-dependent constants cached by real
    # calls must not leak into it, nor its fake ones into later real calls.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    x = torch.rand(1, 4, 6, 5)
    offset = torch.randn(1, 18, 6, 5)
    expected = deform_pool2d(x, offset, None, 3, 1, 1)
    with FakeTensorMode() as mode:
        fake = deform_pool2d(mode.from_tensor(x), mode.from_tensor(offset), None, 3, 1, 1)
    assert isinstance(fake, FakeTensor) and fake.shape == (1, 4, 6, 5)
    deform_pool_module._cached_constants.cache_clear()
    with FakeTensorMode() as mode:
        deform_pool2d(mode.from_tensor(x), mode.from_tensor(offset), None, 3, 1, 1)
    out = deform_pool2d(x, offset, None, 3, 1, 1)
    assert not isinstance(out, FakeTensor)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize('reduction', ['max', 'avg'])
def test_offsets_far_outside_sample_zeros_on_both_paths(reduction):
    """Infinite or huge offsets leave the image: zeros from the tap loop and from grid_sample alike, and the
    sampled form equals the tap loop on offsets that leave the image by a few pixels (gradients included)."""
    from timm_pf.layers import sampled_deform_pool2d
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    args = ((3, 3), (1, 1), (1, 1), (1, 1), reduction)
    for value in (float('inf'), -float('inf'), 1e30):
        offset = torch.full((1, 18, 5, 6), value, dtype=torch.float64)
        assert not deform_pool2d(x, offset, None, 3, 1, 1, 1, reduction).any()
        assert not sampled_deform_pool2d(x, offset, None, *args).any()
    offset = (torch.randn(1, 18, 5, 6, dtype=torch.float64) * 4).requires_grad_()
    tap_loop = deform_pool2d(x, offset, None, 3, 1, 1, 1, reduction)
    sampled = sampled_deform_pool2d(x, offset, None, *args)
    torch.testing.assert_close(sampled, tap_loop, rtol=0, atol=1e-12)
    weights = torch.linspace(-1, 1, tap_loop.numel(), dtype=torch.float64).view_as(tap_loop)
    (grad_loop,) = torch.autograd.grad(tap_loop, offset, weights)
    (grad_sampled,) = torch.autograd.grad(sampled, offset, weights)
    torch.testing.assert_close(grad_sampled, grad_loop, rtol=0, atol=1e-10)


@pytest.mark.parametrize('kwargs, message', [
    (dict(dilation=0), 'dilation must be an int >= 1'),
    (dict(padding=-1), 'padding must be an int >= 0'),
    (dict(kernel_size=0), 'kernel_size must be an int >= 1'),
    (dict(stride=0), 'stride must be an int >= 1'),
    (dict(kernel_size=3.0), 'kernel_size must be an int >= 1'),
])
def test_pooling_geometry_that_max_pool2d_refuses_is_refused(kwargs, message):
    args = dict(dict(kernel_size=3, stride=1, padding=1), **kwargs)
    with pytest.raises(ValueError, match=message):
        deform_pool2d(torch.randn(1, 2, 4, 4), torch.zeros(1, 18, 4, 4), None, **args)


def test_layer_constructors_refuse_sizes_that_cannot_pool():
    from timm_pf.layers import PfMaxPool2d
    with pytest.raises(ValueError, match='kernel_size must be an int >= 1'):
        DeformMaxPool2d(0)
    with pytest.raises(ValueError, match='odd and positive'):
        LearnedDeformPool2d(4, kernel_size=-1)
    with pytest.raises(ValueError, match='cannot be split into 0 deformable groups'):
        LearnedDeformPool2d(4, deform_groups=0)
    with pytest.raises(ValueError, match='odd positive kernel_size'):
        PfMaxPool2d(-1)
    with pytest.raises(ValueError, match='stride >= 1'):
        PfMaxPool2d(3, 0)
