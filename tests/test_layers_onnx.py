"""ONNX export of the layers (issue 20): one file with a dynamic batch axis, ONNX Runtime parity at batch 1, 3
and 8 (and an empty batch), and the graph each operator exports to."""
import warnings

import pytest
import torch
from torch import nn

from _hosts import hosted
from timm_pf.layers import (
    DeformAvgPool2d, DeformMaxPool2d, DynamicConv2d, EfficientTokenMixer, LearnedDeformPool2d, PfMaxPool2d)

onnx = pytest.importorskip('onnx')
inliner = pytest.importorskip('onnx.inliner')
ort = pytest.importorskip('onnxruntime')


def _learned(reduction: str, stride: int = 1, groups: int = 1) -> LearnedDeformPool2d:
    layer = LearnedDeformPool2d(8, stride=stride, deform_groups=groups, reduction=reduction)
    nn.init.normal_(layer.offset_conv.weight, std=0.3)  # samples off the regular grid, some outside the image
    return layer


def _case(name: str):
    """(layer, inputs for batch 8)."""
    torch.manual_seed(0)
    x = torch.randn(8, 8, 10, 9)
    cases = {
        'dynamic_conv3x3_s2': lambda: (DynamicConv2d(8, 12, 3, stride=2, padding=1), (x,)),
        'dynamic_conv_dw': lambda: (DynamicConv2d(8, 8, 3, padding=1, groups=8), (x,)),
        'dynamic_conv1x1': lambda: (DynamicConv2d(8, 12, 1), (x,)),
        'dynamic_conv1x1_s2_softmax_bias': lambda: (
            DynamicConv2d(8, 12, 1, stride=2, bias=True, routing='softmax'), (x,)),
        'dynamic_conv_same': lambda: (DynamicConv2d(8, 8, 3, stride=2, padding='same', groups=2), (x,)),
        'deform_max': lambda: (_learned('max'), (x,)),
        'deform_avg_s2_groups': lambda: (_learned('avg', stride=2, groups=2), (x,)),
        'deform_max_given_offsets': lambda: (
            DeformMaxPool2d(3, 1, 1), (x, torch.randn(8, 18, 10, 9) * 3, torch.rand(8, 9, 10, 9))),
        # a stage-1 sized map: the stacked-taps grid has 9 * 56 rows, where shifted offsets lose the most bits
        'deform_max_56': lambda: (_learned('max'), (torch.randn(8, 8, 56, 56).relu() * 4,)),
        # padding below "same": no 1x1 DeformConv grid has the output's width, so this exports as GridSample
        'deform_max_unpadded': lambda: (
            DeformMaxPool2d(3, 1, 0), (x, torch.randn(8, 18, 8, 7) * 3, torch.rand(8, 9, 8, 7))),
        'deform_avg_unpadded_dilated': lambda: (
            DeformAvgPool2d(3, 1, 0, dilation=2), (x, torch.randn(8, 18, 6, 5) * 3, torch.rand(8, 9, 6, 5))),
        'pf_max_s2': lambda: (PfMaxPool2d(3, 2), (x,)),
        'token_mixer': lambda: (EfficientTokenMixer(8), (x.permute(0, 2, 3, 1).contiguous(),)),
    }
    layer, inputs = cases[name]()
    return hosted(layer, inputs).eval(), inputs


CASES = ['dynamic_conv3x3_s2', 'dynamic_conv_dw', 'dynamic_conv1x1', 'dynamic_conv1x1_s2_softmax_bias',
         'dynamic_conv_same', 'deform_max', 'deform_avg_s2_groups', 'deform_max_given_offsets', 'deform_max_56',
         'deform_max_unpadded', 'deform_avg_unpadded_dilated', 'pf_max_s2', 'token_mixer']


def _export(model: nn.Module, inputs, path) -> None:
    names = [f'input{i}' for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, tuple(t[:2] for t in inputs), str(path), input_names=names, output_names=['out'],
                          dynamic_axes={name: {0: 'batch'} for name in names})


def _nodes(graph) -> list:
    """The nodes of a graph and of its subgraphs (``Scan`` / ``If`` bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _nodes(attr.g)
    return nodes


def _ops(graph) -> list:
    return [node.op_type for node in _nodes(graph)]


def _gathers_of_many(graph) -> list:
    """Gather nodes that pick more than one element per call (an im2col or a dense sampling gather); picking a
    shape entry or a plane by a constant scalar index is fine."""
    small = {t.name for t in graph.initializer if len(t.dims) == 0 or list(t.dims) == [1]}
    small |= {node.output[0] for node in _nodes(graph) if node.op_type == 'Constant'
              and all(len(a.t.dims) == 0 or list(a.t.dims) == [1] for a in node.attribute if a.name == 'value')}
    return [node for node in _nodes(graph)
            if node.op_type in ('Gather', 'GatherND', 'GatherElements') and node.input[1] not in small]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """Each case exported once (batch 2) as ``(model, inputs, session, inlined onnx model)``."""
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = _case(name)
            path = tmp_path_factory.mktemp('onnx') / f'{name}.onnx'
            _export(model, inputs, path)
            session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
            graph = inliner.inline_local_functions(onnx.load(str(path)))
            cache[name] = model, inputs, session, graph
        return cache[name]
    return get


@pytest.mark.parametrize('name', CASES)
def test_one_file_serves_every_batch_size(name, exported):
    model, inputs, session, _ = exported(name)
    for batch in (1, 3, 8, 0):
        feed = {f'input{i}': t[:batch].numpy() for i, t in enumerate(inputs)}
        with torch.no_grad():
            expected = model(*[t[:batch] for t in inputs])
        (got,) = session.run(None, feed)
        assert got.shape == tuple(expected.shape)
        # 1e-4; the 56 x 56 case's large activations and offsets also get 1e-5 of the value
        rtol = 1e-5 if name == 'deform_max_56' else 0
        torch.testing.assert_close(torch.from_numpy(got), expected.contiguous(), rtol=rtol, atol=1e-4)


@pytest.mark.parametrize('name', ['dynamic_conv3x3_s2', 'dynamic_conv_dw', 'dynamic_conv_same'])
def test_dynamic_conv_exports_convs_with_per_sample_kernels(name, exported):
    graph = exported(name)[3].graph
    # If(batch <= 1): one Conv with the sample's kernel, else a Scan over the batch whose body is a Conv
    (branch,) = [node for node in graph.node if node.op_type == 'If']
    branches = {attr.name: attr.g for attr in branch.attribute}
    assert [node.op_type for node in branches['then_branch'].node if node.op_type in ('Conv', 'Scan')] == ['Conv']
    (scan,) = [node for node in branches['else_branch'].node if node.op_type == 'Scan']
    body = next(attr.g for attr in scan.attribute if attr.name == 'body')
    (conv,) = [node for node in body.node if node.op_type == 'Conv']
    assert conv.input[1] in [i.name for i in body.input]  # the kernel is a scanned input: one per sample
    assert _ops(graph).count('Conv') == 2 and not _gathers_of_many(graph)  # no im2col


@pytest.mark.parametrize('name', ['dynamic_conv1x1', 'dynamic_conv1x1_s2_softmax_bias'])
def test_pointwise_dynamic_conv_exports_a_batched_matmul(name, exported):
    ops = _ops(exported(name)[3].graph)
    assert 'MatMul' in ops and 'Conv' not in ops and 'Scan' not in ops


def _deform_conv_attributes(graph) -> dict:
    """The attributes of the graph's one ``DeformConv`` node; the graph has no other sampling op."""
    ops = _ops(graph.graph)
    assert ops.count('DeformConv') == 1 and 'GridSample' not in ops
    assert not {'Scan', 'Loop', 'If'} & set(ops) and not _gathers_of_many(graph.graph)
    assert {opset.domain: opset.version for opset in graph.opset_import}[''] >= 19
    (node,) = [node for node in _nodes(graph.graph) if node.op_type == 'DeformConv']
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


@pytest.mark.parametrize('name', ['deform_max', 'deform_max_given_offsets', 'deform_max_56'])
def test_deform_max_pool_exports_one_deform_conv_of_the_stacked_taps(name, exported):
    _, inputs, _, graph = exported(name)
    attrs = _deform_conv_attributes(graph)
    # 1x1 depthwise sampling of the stacked taps: no matrix product over the taps
    assert attrs['kernel_shape'] == [1, 1] and attrs['group'] == inputs[0].shape[1]
    assert 'ReduceMax' in _ops(graph.graph)


@pytest.mark.parametrize('name', ['deform_avg_s2_groups', 'deform_avg_unpadded_dilated'])
def test_deform_avg_pool_exports_one_deformable_depthwise_conv(name, exported):
    model, inputs, _, graph = exported(name)
    attrs = _deform_conv_attributes(graph)
    pool = getattr(model.layer, 'pool', model.layer)  # a LearnedDeformPool2d's pool, or the pool itself
    assert attrs['kernel_shape'] == list(pool.kernel_size) and attrs['group'] == inputs[0].shape[1]
    assert attrs['strides'] == list(pool.stride) and attrs['dilations'] == list(pool.dilation)
    assert attrs['pads'] == list(pool.padding) * 2
    assert 'ReduceMean' not in _ops(graph.graph)  # the mean is the convolution's 1 / K weights


def test_deform_pool_below_same_padding_exports_grid_sample(exported):
    ops = _ops(exported('deform_max_unpadded')[3].graph)
    assert ops.count('GridSample') == 1 and 'DeformConv' not in ops and 'ReduceMax' in ops


@pytest.mark.parametrize('name, dynamo', [
    *[(name, True) for name in ('deform_max', 'deform_avg_s2_groups', 'dynamic_conv3x3_s2', 'dynamic_conv_dw',
                                'dynamic_conv1x1', 'dynamic_conv_same')],
    # the TorchScript-based exporter records a dynamic conv for the traced batch size (see below)
    ('deform_max', False), ('deform_avg_s2_groups', False)])
def test_exported_with_dynamic_height_and_width_serves_every_size(name, dynamo, tmp_path):
    """Dynamic height and width: one file serves sizes above, below and off the exported one. A deformable pool's
    graph held the exported size's padding (wrong results at larger sizes, without an error); a dynamic conv did
    not export (its routing scale and strided scanned convolutions)."""
    model, inputs = _case(name)
    path = tmp_path / f'{name}_any_size.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (inputs[0][:2],), str(path), input_names=['input0'], output_names=['out'],
                          dynamic_axes={'input0': {0: 'batch', 2: 'height', 3: 'width'}}, dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for height, width in ((10, 9), (33, 40), (17, 5), (3, 3)):
        x = torch.randn(3, 8, height, width)
        with torch.no_grad():
            expected = model(x)
        (got,) = session.run(None, {'input0': x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-4)


def test_deform_pool_exports_grid_sample_for_runtimes_without_deform_conv(tmp_path):
    """The TorchScript-based exporter, at an opset before DeformConv (19), writes the GridSample form."""
    model, inputs = _case('deform_max')
    path = tmp_path / 'deform_max_opset18.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (inputs[0][:2],), str(path), dynamo=False, opset_version=18, input_names=['input0'],
                          output_names=['out'], dynamic_axes={'input0': {0: 'batch'}})
    ops = _ops(onnx.load(str(path)).graph)
    assert 'GridSample' in ops and 'DeformConv' not in ops
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (1, 3):
        with torch.no_grad():
            expected = model(inputs[0][:batch])
        (got,) = session.run(None, {'input0': inputs[0][:batch].numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize('name', ['dynamic_conv3x3_s2', 'dynamic_conv_dw', 'dynamic_conv1x1'])
def test_dynamic_conv_traces_and_exports_with_the_torchscript_exporter(name, tmp_path):
    """``torch.jit.trace`` (its check re-traces and compares the graphs) and the TorchScript-based exporter record the
    eager path for the traced batch size, as for timm's CondConv2d: the traced module and the ONNX file match."""
    model, inputs = _case(name)
    x = inputs[0][:2]
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(model, (x,))
        path = tmp_path / f'{name}_torchscript.onnx'
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['input0'], output_names=['out'])
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-6)
    (got,) = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'input0': x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-5)
