"""DynamicConv2d and per_sample_conv2d: exactness of every execution path, routing, upcycling, MACs."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import pad_same
from torch import nn

from timm_pf.layers import DynamicConv2d, per_sample_conv2d
from timm_pf.layers import dynamic_conv
from timm_pf.methods.stats import count_macs

# (in, out, kernel, stride, padding, groups): pointwise, depthwise s1/s2, dense stem-like, grouped, 5x5 dw,
# strided 1x1, grouped 1x1
CONV_CASES = [
    (8, 12, 1, 1, 0, 1),
    (8, 8, 3, 1, 1, 8),
    (8, 8, 3, 2, 1, 8),
    (3, 6, 3, 2, 1, 1),
    (8, 6, 3, 1, 1, 2),
    (6, 6, 5, 2, 2, 6),
    (8, 4, 1, 2, 0, 1),
    (8, 6, 1, 1, 0, 2),
]


def _reference(x, weight, bias, stride, padding, groups):
    return torch.cat([
        F.conv2d(x[b:b + 1], weight[b], None if bias is None else bias[b], stride=stride, padding=padding,
                 groups=groups)
        for b in range(x.shape[0])])


@pytest.fixture(params=[False, True], ids=['eager', 'export'])
def exporting(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(dynamic_conv, '_is_exporting', lambda: True)
    return request.param


@pytest.mark.parametrize('case', CONV_CASES, ids=[str(c) for c in CONV_CASES])
@pytest.mark.parametrize('batch', [1, 3])
def test_per_sample_conv2d_matches_reference(case, batch, exporting):
    cin, cout, k, s, p, g = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, 11, 10, generator=gen)
    weight = torch.randn(batch, cout, cin // g, k, k, generator=gen)
    bias = torch.randn(batch, cout, generator=gen)
    for b in (None, bias):
        out = per_sample_conv2d(x, weight, b, (s, s), (p, p), (1, 1), g)
        ref = _reference(x, weight, b, s, p, g)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_per_sample_conv2d_samples_are_independent():
    x = torch.randn(2, 4, 6, 6)
    weight = torch.randn(2, 4, 1, 3, 3)
    out = per_sample_conv2d(x, weight, None, (1, 1), (1, 1), (1, 1), 4)
    swapped = per_sample_conv2d(x, weight.flip(0), None, (1, 1), (1, 1), (1, 1), 4)
    assert not torch.allclose(out, swapped)


@pytest.mark.parametrize('case', CONV_CASES[:4], ids=[str(c) for c in CONV_CASES[:4]])
def test_gradients_match_reference(case, exporting):
    cin, cout, k, s, p, g = case
    x = torch.randn(3, cin, 7, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, cout, cin // g, k, k, dtype=torch.float64, requires_grad=True)
    out = per_sample_conv2d(x, weight, None, (s, s), (p, p), (1, 1), g)
    grads = torch.autograd.grad(out.square().sum(), (x, weight))
    ref = _reference(x, weight, None, s, p, g)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, weight))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('routing', ['sigmoid', 'softmax'])
@pytest.mark.parametrize('case', CONV_CASES[:4], ids=[str(c) for c in CONV_CASES[:4]])
def test_dynamic_conv_is_a_routed_mixture_of_experts(case, routing):
    cin, cout, k, s, p, g = case
    conv = DynamicConv2d(cin, cout, k, s, p, groups=g, num_experts=3, routing=routing, bias=True)
    x = torch.randn(4, cin, 9, 9)
    logits = conv.routing(x.mean((2, 3)))
    coeffs = torch.sigmoid(logits) if routing == 'sigmoid' else logits.softmax(-1)
    torch.testing.assert_close(conv.routing_weights(x), coeffs)
    if routing == 'softmax':
        torch.testing.assert_close(coeffs.sum(-1), torch.ones(4))
    experts = conv.weight.view(3, cout, cin // g, k, k)
    weight = torch.einsum('be,eoihw->boihw', coeffs, experts)
    bias = coeffs @ conv.bias
    torch.testing.assert_close(conv(x), _reference(x, weight, bias, s, p, g), atol=1e-5, rtol=1e-5)


# kernel sizes (in x out of a 1x1 conv) whose element counts share 64, 8 and 1 with 64: every block count
@pytest.mark.parametrize('cin,cout', [(16, 8), (6, 12), (9, 5)])
def test_batch_one_blocked_mixing_matches_reference(cin, cout, monkeypatch):
    """At batch 1 big kernels are mixed as a batched matmul over column blocks of the experts (a strided
    view): forced on for small kernels here, the output must equal the plainly mixed convolution."""
    monkeypatch.setattr(dynamic_conv, 'BLOCKED_MIX_NUMEL', 1)
    conv = DynamicConv2d(cin, cout, 1, num_experts=4).eval()
    nn.init.normal_(conv.routing.weight)
    x = torch.randn(1, cin, 5, 4)
    with torch.inference_mode():
        coeffs = conv.routing_weights(x)
        weight = (coeffs @ conv.weight).view(1, cout, cin, 1, 1)
        torch.testing.assert_close(conv(x), _reference(x, weight, None, 1, 0, 1), atol=1e-6, rtol=1e-5)
        # non-contiguous experts fall back to the one-row matmul
        experts_t = conv.weight.t().contiguous().t()
        torch.testing.assert_close(dynamic_conv._mix_one_sample(coeffs, experts_t), coeffs @ conv.weight)


@pytest.mark.parametrize('batch', [1, 3])
def test_dynamic_same_padding_matches_reference(batch):
    """padding='same' with stride 2 pads at run time (TF 'same'); the routing pools the unpadded input."""
    conv = DynamicConv2d(4, 6, 3, stride=2, padding='same', num_experts=3).eval()
    assert conv.dynamic_padding
    x = torch.randn(batch, 4, 9, 8)
    with torch.no_grad():
        coeffs = torch.sigmoid(conv.routing(x.mean((2, 3))))
        weight = (coeffs @ conv.weight).view(batch, 6, 4, 3, 3)
        ref = _reference(pad_same(x, (3, 3), (2, 2)), weight, None, 2, 0, 1)
        torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)


def _training_grads(conv, x):
    out = conv(x)
    return out, torch.autograd.grad(out.square().sum(), [x] + list(conv.parameters()))


@pytest.mark.parametrize('chunked', [False, True], ids=['one-chunk', 'chunked'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('case', CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_training_path_gradients_match_plain_autograd(case, batch, chunked, monkeypatch):
    """The eager training path mixes the kernels again in backward; its gradients (input, experts, routing,
    bias) must equal plain autograd through the mixing and the convolution (the export path)."""
    cin, cout, k, s, p, g = case
    torch.manual_seed(0)
    conv = DynamicConv2d(cin, cout, k, s, p, groups=g, num_experts=3, bias=True).double()
    nn.init.normal_(conv.routing.weight)
    x = torch.randn(batch, cin, 9, 8, dtype=torch.float64, requires_grad=True)
    if chunked:  # one sample per chunk
        monkeypatch.setattr(dynamic_conv, 'MIX_CHUNK_NUMEL', conv.weight.shape[1])
    out, grads = _training_grads(conv, x)
    monkeypatch.setattr(dynamic_conv, '_is_exporting', lambda: True)
    ref_out, ref_grads = _training_grads(conv, x)
    torch.testing.assert_close(out, ref_out)
    assert len(grads) == 5  # x, experts, bias, routing weight and bias
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_training_path_keeps_no_mixed_kernels():
    """Autograd keeps the input, the coefficients and the experts, not the batch x kernel mixed weights."""
    conv = DynamicConv2d(64, 64, 3, 1, 1, num_experts=4)
    x = torch.randn(8, 64, 4, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conv(x).sum().backward()
    mixed_numel = x.shape[0] * conv.weight.shape[1]
    assert all(t.numel() < mixed_numel for t in saved), [tuple(t.shape) for t in saved]
    assert x.grad is not None and conv.weight.grad.abs().sum() > 0 and conv.routing.weight.grad.abs().sum() > 0


def test_training_under_autocast():
    conv = DynamicConv2d(8, 8, 3, 1, 1, groups=8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all() and conv.routing.weight.grad.abs().sum() > 0


def test_parameter_layout_follows_condconv():
    conv = DynamicConv2d(16, 32, 3, groups=4, num_experts=5)
    assert conv.weight.shape == (5, 32 * 4 * 3 * 3)
    assert isinstance(conv.routing, nn.Linear) and conv.routing.weight.shape == (5, 16)
    assert conv.routing.bias is not None
    mlp = DynamicConv2d(16, 32, 1, num_experts=5, routing='softmax', routing_hidden_ratio=0.5)
    assert mlp.routing.fc1.weight.shape == (8, 16) and mlp.routing.fc2.weight.shape == (5, 8)


def test_bad_arguments_and_inputs_raise():
    with pytest.raises(ValueError, match='num_experts'):
        DynamicConv2d(4, 4, 3, num_experts=0)
    with pytest.raises(ValueError, match='routing'):
        DynamicConv2d(4, 4, 3, routing='gumbel')
    conv = DynamicConv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r'\(B, 4, H, W\)'):
        conv(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r'\(B, 4, H, W\)'):
        conv(torch.randn(4, 8, 8))


@pytest.mark.parametrize('routing', ['sigmoid', 'softmax'])
@pytest.mark.parametrize('num_experts', [3, 4])
def test_upcycled_state_reproduces_static_conv(routing, num_experts):
    static = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)
    conv = DynamicConv2d(6, 6, 3, padding=1, groups=6, bias=True, num_experts=num_experts, routing=routing)
    state = conv.upcycled_state(static.weight, static.bias, expert_noise=0.05,
                                generator=torch.Generator().manual_seed(1))
    conv.load_state_dict(state)
    x = torch.randn(3, 6, 8, 8)
    torch.testing.assert_close(conv(x), static(x), atol=1e-5, rtol=1e-5)
    experts = conv.weight
    assert not torch.allclose(experts[0], experts[1]), 'noise should make the experts differ'
    with pytest.raises(ValueError, match='shape'):
        conv.upcycled_state(torch.randn(6, 1, 5, 5), static.bias)
    with pytest.raises(ValueError, match='bias'):
        conv.upcycled_state(static.weight, None)


@pytest.mark.parametrize('batch', [1, 4])
def test_macs_are_conv_plus_fusion_plus_routing(batch):
    """Counted MACs follow the paper's complexity analysis (§4.2): convolution + weight fusion + routing."""
    cin, cout, k, stride, e, size = 8, 16, 3, 2, 4, 16
    conv = DynamicConv2d(cin, cout, k, stride, 1, num_experts=e)
    out_hw = (size // stride) ** 2
    conv_macs = out_hw * cout * cin * k * k
    fusion_macs = e * cout * cin * k * k
    routing_macs = cin * e
    assert count_macs(conv, (cin, size, size), batch_size=batch) == conv_macs + fusion_macs + routing_macs


def test_half_precision_routing_of_a_large_map_stays_finite():
    """The spatial sum of a large map overflows float16 (65504): half precision and autocast route on the mean."""
    torch.manual_seed(0)
    conv = DynamicConv2d(16, 16, 3, padding=1).eval()
    x = torch.relu(torch.randn(1, 16, 160, 160)) * 4 + 2  # channel sums near 9e4
    with torch.no_grad():
        expected = conv.routing_weights(x)
        with torch.autocast('cpu', dtype=torch.float16):
            autocast = conv.routing_weights(x)
            assert conv(x).isfinite().all()
        half = conv.half().routing_weights(x.half())
    for routing in (autocast, half):
        torch.testing.assert_close(routing.float(), expected, rtol=0, atol=2e-3)


def test_shapes_that_cannot_convolve_are_refused_when_built_or_called():
    with pytest.raises(ValueError, match='cannot be split into 4 groups'):
        DynamicConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match='kernel_size must be positive'):
        DynamicConv2d(4, 4, 0)
    with pytest.raises(ValueError, match='one kernel per sample: 1 samples, 3 kernels'):
        per_sample_conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 4, 4, 3, 3), padding=(1, 1))


def test_runs_on_the_meta_device():
    """timm's default-cfg test builds and runs models on the meta device, which has no autocast state."""
    conv = DynamicConv2d(3, 8, 3, padding=1, device='meta')
    assert conv(torch.empty(1, 3, 16, 16, device='meta')).shape == (1, 8, 16, 16)
