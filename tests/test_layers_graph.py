"""The layers as timm's test suite uses its own: TorchScript, FX symbolic tracing (as timm's feature extraction
runs it), TorchScript of the traced graph, timm's ``device`` / ``dtype`` constructor arguments, and an empty
batch (issue 16, item 4)."""
import pytest
import torch
from torch import nn

from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from _hosts import hosted
from timm_pf.layers import (
    ChannelsLastKernelConv2d, Conv2dNhwc, DeformAvgPool2d, DeformMaxPool2d, DynamicConv2d, EfficientTokenMixer,
    GridAttention,
    LearnedDeformPool2d, MaxPool2dNhwc, PfMaxPool2d, use_channels_last_kernels)
from timm_pf.layers.graph_capture import is_capturing_graph


def _layer(name: str):
    """(module, inputs) of every layer configuration under test."""
    torch.manual_seed(0)
    nchw, grid = torch.randn(2, 8, 9, 10), torch.randn(2, 5, 6, 12)
    offsets = (torch.randn(2, 2 * 9, 9, 10) * 2, torch.rand(2, 9, 9, 10))
    learned = LearnedDeformPool2d(8, stride=2, deform_groups=2, reduction='avg')
    nn.init.normal_(learned.offset_conv.weight, std=0.2)  # samples off the regular grid
    layers = {
        'pf_max': (PfMaxPool2d(), (nchw,)),
        'pf_max_s2': (PfMaxPool2d(3, 2), (nchw,)),
        'deform_max': (DeformMaxPool2d(3, 1, 1), (nchw,) + offsets),
        'deform_avg': (DeformAvgPool2d(3, 1, 1), (nchw,) + offsets),
        'learned_deform': (learned, (nchw,)),
        'dynamic_conv': (DynamicConv2d(8, 16, 3, stride=2, padding=1), (nchw,)),
        'dynamic_conv_softmax_bias': (DynamicConv2d(8, 8, 1, bias=True, routing='softmax'), (nchw,)),
        'dynamic_conv_same_dw': (DynamicConv2d(8, 8, 3, stride=2, padding='same', groups=8), (nchw,)),
        'mixer_max': (EfficientTokenMixer(12), (grid,)),
        'mixer_dwconv_relu': (EfficientTokenMixer(12, spatial='dwconv', act_layer='relu'), (grid,)),
        'max_pool_nhwc': (MaxPool2dNhwc(3, inplace=True), (grid,)),
        'conv_nhwc': (Conv2dNhwc(12, 6, 3, stride=2, padding=1), (grid,)),
        'channels_last_kernel_conv': (
            use_channels_last_kernels(nn.Conv2d(8, 6, 3, padding=1)),
            (nchw.contiguous(memory_format=torch.channels_last),)),
        'grid_attention': (
            GridAttention(12, num_heads=3, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm), (grid,)),
    }
    layer, inputs = layers[name]
    return hosted(layer, inputs), inputs


LAYERS = [
    'pf_max', 'pf_max_s2', 'deform_max', 'deform_avg', 'learned_deform', 'dynamic_conv', 'dynamic_conv_softmax_bias',
    'dynamic_conv_same_dw', 'mixer_max', 'mixer_dwconv_relu', 'max_pool_nhwc', 'conv_nhwc', 'channels_last_kernel_conv',
    'grid_attention']


def _fx(model: nn.Module) -> nn.Module:
    """The traced graph as timm's test suite builds it (timm's FX leaves and autowrapped functions)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


def test_fx_leaves_are_our_layer_classes():
    """What the package adds to timm's FX leaves are module classes (a function there breaks every FX trace)."""
    ours = {m for m in get_notrace_modules() if getattr(m, '__module__', '').startswith('timm_pf.')}
    assert all(isinstance(m, type) and issubclass(m, nn.Module) for m in ours), ours
    assert {DynamicConv2d, EfficientTokenMixer, PfMaxPool2d, MaxPool2dNhwc} <= ours
    assert all(isinstance(m, type) for m in get_notrace_modules())


def _run(model: nn.Module, inputs) -> torch.Tensor:
    out = model(*[t.clone() for t in inputs])  # clones: some eager paths work in place on their input
    return next(iter(out.values())) if isinstance(out, dict) else out


@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.jit.script is deprecated but timm's suite runs it
@pytest.mark.parametrize('name', LAYERS)
@pytest.mark.parametrize('kind', ['script', 'fx', 'fx_script'])
def test_graph_forms_match_eager(name, kind):
    model, inputs = _layer(name)
    model.eval()
    with torch.no_grad():
        expected = _run(model, inputs)
        graph = {'script': torch.jit.script, 'fx': _fx, 'fx_script': lambda m: torch.jit.script(_fx(m))}[kind](model)
        out = _run(graph, inputs)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', LAYERS)
def test_fx_graph_trains_like_eager(name):
    model, inputs = _layer(name)
    model.train()
    params = [p for p in model.parameters()]
    expected = torch.autograd.grad(_run(model, inputs).square().sum(), params) if params else ()
    traced = _fx(model)
    out = _run(traced, inputs)
    assert out.requires_grad == bool(params)
    if params:
        grads = torch.autograd.grad(out.square().sum(), list(traced.parameters()))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', LAYERS)
def test_device_and_dtype_reach_the_parameters(name):
    layer = type(_layer(name)[0].layer)
    args = {
        PfMaxPool2d: (), DeformMaxPool2d: (), DeformAvgPool2d: (), LearnedDeformPool2d: (8,),
        DynamicConv2d: (8, 16), EfficientTokenMixer: (12,), MaxPool2dNhwc: (), Conv2dNhwc: (12, 6, 3),
        ChannelsLastKernelConv2d: (8, 6, 3), GridAttention: (16,)}[layer]
    module = layer(*args, device='meta', dtype=torch.float64)
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in module.parameters())


@pytest.mark.filterwarnings('ignore::FutureWarning')
@pytest.mark.parametrize('name', LAYERS)
@pytest.mark.parametrize('kind', ['inference', 'train', 'script'])
def test_empty_batch_gives_empty_output(name, kind):
    model, inputs = _layer(name)
    model.train(kind == 'train')
    with torch.no_grad():
        one = _run(model, [t[:1] for t in inputs])
    empty = [t[:0].clone().requires_grad_(kind == 'train') for t in inputs]
    if kind == 'inference':
        with torch.inference_mode():
            out = model(*empty)
    else:
        out = (torch.jit.script(model) if kind == 'script' else model)(*empty)
    assert out.shape == (0,) + one.shape[1:]
    if kind == 'train':
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in empty)


@pytest.mark.parametrize('name', ['dynamic_conv', 'dynamic_conv_same_dw', 'learned_deform', 'pf_max'])
def test_jit_trace_records_the_eager_computation(name):
    model, inputs = _layer(name)
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs, check_trace=False)
        torch.testing.assert_close(traced(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings('ignore::FutureWarning')
@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('name', LAYERS)
def test_script_after_a_trace_of_the_same_class(name):
    """A layer scripted after another of its class was traced in the same process computes what eager does."""
    model, inputs = _layer(name)
    model.eval()
    other, _ = _layer(name)
    with torch.no_grad():
        torch.jit.trace(other.eval(), tuple(t[:1] for t in inputs), check_trace=False)
        torch.testing.assert_close(torch.jit.script(model)(*inputs), _run(model, inputs), rtol=1e-5, atol=1e-5)


def test_convolutions_that_pad_otherwise_than_with_zeros():
    for conv_class in (Conv2dNhwc, ChannelsLastKernelConv2d):
        with pytest.raises(ValueError, match="zeros only, got padding_mode='reflect'"):
            conv_class(4, 4, 3, padding=1, padding_mode='reflect')
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect')
    assert type(use_channels_last_kernels(reflect)) is nn.Conv2d


class _RecordsCapture(nn.Module):
    """Adds 1 to its input while a graph is being recorded: the recorded graph keeps the value seen then."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + float(is_capturing_graph())


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('kind', ['eager', 'trace', 'compile', 'export'])
def test_graph_capture_is_seen_by_every_recorder(kind):
    """The eager fast paths' guard: False in eager mode, True under each way a graph is recorded."""
    model, x = _RecordsCapture(), torch.zeros(2)
    if kind == 'trace':
        model = torch.jit.trace(model, (x,), check_trace=False)
    elif kind == 'compile':
        model = torch.compile(model, backend='eager', fullgraph=True)
    elif kind == 'export':
        model = torch.export.export(model, (x,)).module()
    expected = 0. if kind == 'eager' else 1.
    torch.testing.assert_close(model(x), torch.full_like(x, expected))
