"""Parameter-free ResNets: sizes of the paper, official outputs, block patterns, checkpoints, timm contract."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import ResNet
from torch import nn

from _official import load_official_fixture
from timm_pf.layers import ChannelsLastKernelConv2d, PfMaxPool2d
from timm_pf.layers.cpu_layout import _channels_last_kernel
from timm_pf.models.resnet_pf import SPATIAL_OPS, checkpoint_filter_fn, parse_block_pattern
from timm_pf.methods.stats import count_macs, count_params


def _meta(name: str, **kwargs):
    return timm.create_model(name, device='meta', **kwargs)


@pytest.mark.parametrize('name,params', [('ours_r50_max', 14_232_232), ('ours_r50_hybrid', 17_330_600)])
def test_r50_params_equal_official(name, params):
    assert count_params(_meta(name)) == params


@pytest.mark.parametrize('name,params_m,gmacs', [
    ('ours_r50_max', 14.2, 2.24),  # Table 3 / official code
    ('ours_r50_hybrid', 17.3, 2.59),
    ('ours_r101_hybrid', 26.3, 4.3),  # Table 4
    ('ours_wrn50_2_hybrid', 36.0, 5.4),
    ('ours_wrn101_2_hybrid', 53.9, 8.9),
    ('ours_r50se_hybrid', 19.9, 2.6),
])
def test_params_and_macs_match_paper(name, params_m, gmacs):
    model = _meta(name)
    assert round(count_params(model) / 1e6, 1) == params_m
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_regular_pattern_is_resnet50():
    ours = _meta('ours_r50_max', block_pattern='regular', spatial_op='conv3x3')
    ref = _meta('resnet50')
    assert count_params(ours) == count_params(ref)
    assert count_macs(ours) == count_macs(ref)


@pytest.mark.parametrize('name', ['ours_r50_max', 'ours_r50_hybrid'])
def test_official_logits(name):
    state_dict, images, logits, _ = load_official_fixture(name)
    model = timm.create_model(name).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    with torch.no_grad():
        out = model(images.float())
    assert (out - logits).abs().max().item() < 1e-4


def test_filter_passes_our_format_unchanged():
    model = timm.create_model('ours_r50_max')
    state_dict = model.state_dict()
    out = checkpoint_filter_fn(state_dict, model)
    assert list(out) == list(state_dict) and all(out[k] is state_dict[k] for k in state_dict)


def test_filter_unwraps_and_strips_module_prefix():
    official, _, _, _ = load_official_fixture('ours_r50_max')
    model = timm.create_model('ours_r50_max')
    plain = checkpoint_filter_fn(official, model)
    wrapped = checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in official.items()}}, model)
    assert wrapped.keys() == plain.keys() == model.state_dict().keys()


def test_filter_names_the_wrong_model():
    official, _, _, _ = load_official_fixture('ours_r50_max')
    model = timm.create_model('ours_r50_hybrid')
    expected = r'ours_r50_hybrid: the checkpoint fits ours_r50_max .*missing keys \(18\): layer2\.0\.spatial'
    with pytest.raises(ValueError, match=expected):
        checkpoint_filter_fn(official, model)


def test_filter_names_mis_shaped_and_unexpected_keys():
    model = timm.create_model('ours_r50_max')
    state_dict = dict(model.state_dict())
    state_dict['layer3.1.conv1.weight'] = torch.zeros(7, 1024, 1, 1)
    state_dict['layer9.0.conv1.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'layer3\.1\.conv1\.weight has shape \(7, 1024, 1, 1\), model expects '
                                         r'\(256, 1024, 1, 1\)') as err:
        checkpoint_filter_fn(state_dict, model)
    assert 'unexpected keys (1): layer9.0.conv1.weight' in str(err.value)
    with pytest.raises(ValueError, match='not a tensor'):
        checkpoint_filter_fn({**model.state_dict(), 'epoch': 3}, model)


def test_pretrained_loader_still_adapts_classifier():
    # timm adapts the classifier after the filter: a different head must not be reported as a mismatch
    model = timm.create_model('ours_r50_max', num_classes=10)
    state_dict = timm.create_model('ours_r50_max').state_dict()
    assert 'fc.weight' in checkpoint_filter_fn(state_dict, model)


@pytest.mark.parametrize('pattern,expected', [
    ('EEBB', ['EEE', 'EEEE', 'BBBBBB', 'BBB']),
    ('E→E→B→B', ['EEE', 'EEEE', 'BBBBBB', 'BBB']),
    ('B -> E -> E -> E', ['BBB', 'EEEE', 'EEEEEE', 'EEE']),
    ('e-BEBE-h-B', ['EEE', 'BEBE', 'HHHHHH', 'BBB']),
    ('hybrid', ['HHH', 'HHHH', 'HHHHHH', 'HHH']),
    ('efficient', ['EEE', 'EEEE', 'EEEEEE', 'EEE']),
    ('eb', ['EBE', 'BEBE', 'BEBEBE', 'BEB']),
])
def test_block_pattern_grammar(pattern, expected):
    assert parse_block_pattern(pattern, (3, 4, 6, 3)) == expected


@pytest.mark.parametrize('pattern,message', [
    ('EXBB', r"unknown letter 'X' \(allowed: E, B, H\)"),
    ('EEB', '3 stage groups for a network with 4 stages'),
    ('EB-E-E-E', 'stage 1 has 3 blocks, the pattern gives 2'),
])
def test_block_pattern_errors(pattern, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('ours_r50_max', block_pattern=pattern, device='meta')


def test_unknown_spatial_op():
    with pytest.raises(ValueError, match=r"unknown spatial_op 'median'; registered: max, "):
        timm.create_model('ours_r50_max', spatial_op='median', device='meta')


def _spatial(model, stage: int, block: int) -> nn.Module:
    return getattr(model, f'layer{stage}')[block].spatial


def test_block_layouts():
    hybrid = _meta('ours_r50_hybrid')
    assert all(isinstance(_spatial(hybrid, 1, i), PfMaxPool2d) for i in range(3))
    for stage in (2, 3, 4):
        down = _spatial(hybrid, stage, 0)
        assert isinstance(down.pool, nn.AvgPool2d) and down.conv.stride == (1, 1)
        assert isinstance(_spatial(hybrid, stage, 1), PfMaxPool2d)
        assert getattr(hybrid, f'layer{stage}')[0].downsample[0].stride == (2, 2)
    max_net = _meta('ours_r50_max')
    assert _spatial(max_net, 2, 0).stride == 2 and _spatial(max_net, 2, 1).stride == 1
    staged = _meta('ours_r50_max', block_pattern='EEBB')
    assert isinstance(_spatial(staged, 2, 0), PfMaxPool2d)
    assert _spatial(staged, 3, 0).conv.stride == (2, 2) and _spatial(staged, 4, 2).conv.kernel_size == (3, 3)
    eb = _meta('ours_r50_eb')
    assert [hasattr(_spatial(eb, 2, i), 'conv') for i in range(4)] == [True, False, True, False]
    dw = _meta('ours_r50_dwconv')
    assert _spatial(dw, 3, 0).conv.groups == 256 and _spatial(dw, 3, 0).conv.stride == (2, 2)
    assert _spatial(_meta('ours_r50_conv1x1'), 1, 0).conv.kernel_size == (1, 1)
    se = _meta('ours_r50se_hybrid')
    assert all(block.se is not None for stage in range(1, 5) for block in getattr(se, f'layer{stage}'))


def test_spatial_ops_are_pluggable():
    SPATIAL_OPS['test_avg'] = lambda channels, stride, **dd: nn.AvgPool2d(3, stride, padding=1)
    try:
        model = timm.create_model('ours_r50_hybrid', spatial_op='test_avg').eval()
        assert isinstance(_spatial(model, 1, 0), nn.AvgPool2d)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    finally:
        del SPATIAL_OPS['test_avg']


@pytest.fixture(scope='module')
def hybrid():
    torch.manual_seed(0)
    return timm.create_model('ours_r50_hybrid', num_classes=10).eval()


@pytest.mark.parametrize('shape,message', [
    ((1, 4, 64, 64), r'expects images of shape \(N, 3, H, W\), got \(1, 4, 64, 64\)'),
    ((3, 64, 64), r'expects images of shape \(N, 3, H, W\)'),
    ((1, 3, 0, 64), r'expects images of shape \(N, 3, H, W\), got \(1, 3, 0, 64\)'),
])
def test_bad_input(hybrid, shape, message):
    with pytest.raises(ValueError, match=message):
        hybrid(torch.randn(shape))
    with pytest.raises(ValueError, match=message):
        hybrid.forward_intermediates(torch.randn(shape))


@pytest.mark.parametrize('name', ['ours_r50_hybrid', 'ours_r50_deform_max'])
@pytest.mark.parametrize('size', [(1, 1), (16, 16), (64, 31)])
def test_inputs_below_the_network_stride_are_computed_as_by_resnet50(name, size):
    """As timm's ResNet, any image of at least one pixel: the last maps shrink to 1x1; forward, features_only
    and forward_intermediates take the same sizes."""
    model = timm.create_model(name, num_classes=5, layers=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
        final, _ = model.forward_intermediates(x)
        features = timm.create_model(name, layers=(1, 1, 1, 1), features_only=True).eval()(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert final.shape[-2:] == features[-1].shape[-2:]


def test_channels_last_execution_matches_nchw(hybrid):
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ours = hybrid(x)
        reference = hybrid.forward_head(ResNet.forward_features(hybrid, x))  # plain timm path, NCHW
        from_cl = hybrid(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ours, reference, atol=1e-5) and torch.equal(ours, from_cl)


@pytest.mark.parametrize('batch,size,last_stage_nchw',
                         [(1, 224, True), (4, 224, True), (8, 224, False), (1, 512, False)])
def test_last_stage_runs_nchw_only_on_small_maps(batch, size, last_stage_nchw):
    model = timm.create_model('ours_r50_hybrid', num_classes=10).eval()
    layouts = []
    model.layer4.register_forward_pre_hook(lambda module, args: layouts.append(
        (args[0].is_contiguous(), args[0].is_contiguous(memory_format=torch.channels_last))))
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        out = model(x)
        reference = model.forward_head(ResNet.forward_features(model, x))  # plain timm path, NCHW throughout
    assert layouts[0] == (last_stage_nchw, not last_stage_nchw)  # [1] is the reference call
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_export_with_a_dynamic_batch_serves_every_batch_size(tmp_path):
    """The last stage's layout switch must not put a bound on an exported batch dimension."""
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is needed to run the exported graph')
    model = timm.create_model('ours_r50_hybrid', num_classes=10).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                  dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    path = tmp_path / 'ours_r50_hybrid.onnx'
    torch.onnx.export(program, input_names=['x'], output_names=['logits'], f=str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (1, 3, 80):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
        (logits,) = session.run(None, {'x': x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)


def _reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output through nn.Conv2d's own path (autograd on: the cached kernels are never read)."""
    with torch.enable_grad():
        return model(x).detach()


def _check_cpu_kernels(model: nn.Module, x: torch.Tensor) -> None:
    """Inference reads channels-last copies equal to the current kxk kernels and gives nn.Conv2d's output."""
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, _reference_logits(model, x), rtol=1e-5, atol=1e-5)
    convs = [m for m in model.modules() if isinstance(m, ChannelsLastKernelConv2d)]
    assert convs
    for conv in convs:
        assert conv.weight.is_contiguous()  # the parameter itself stays NCHW (safetensors, timm's EMA)
        kernel = _channels_last_kernel(conv)
        assert kernel.is_contiguous(memory_format=torch.channels_last) and torch.equal(kernel, conv.weight)


def test_cpu_inference_reads_channels_last_kernels_of_the_current_weights(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('ours_r50_hybrid', num_classes=10).eval()
    assert isinstance(model.conv1, ChannelsLastKernelConv2d) and type(model.layer1[0].conv1) is nn.Conv2d  # 1x1
    x = torch.randn(2, 3, 64, 64)
    _check_cpu_kernels(model, x)

    other = timm.create_model('ours_r50_hybrid', num_classes=10).eval()
    model.load_state_dict(other.state_dict())  # copied in place: same tensors, new versions
    _check_cpu_kernels(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x))
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)  # any in-place write
    _check_cpu_kernels(model, x)
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    _check_cpu_kernels(model, x)
    model = model.to(torch.float64).float()
    _check_cpu_kernels(model, x)
    model.reset_classifier(3)
    _check_cpu_kernels(model, x)

    path = tmp_path / 'model.safetensors'
    save_file(other.state_dict(), str(path))  # contiguous parameters: safetensors takes them as they are
    loaded = timm.create_model('ours_r50_hybrid', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    _check_cpu_kernels(loaded, x)
    with torch.no_grad():  # (timm re-initialises the classifier: 10 classes are not the tag's 1000)
        torch.testing.assert_close(loaded.forward_features(x), other.forward_features(x))


def test_writes_through_data_reach_cpu_inference():
    """``.data`` writes count no version; the sampled values of the kernel still show them."""
    torch.manual_seed(0)
    model, other = (timm.create_model('ours_r50_max', num_classes=10).eval() for _ in range(2))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)  # fills the kernel cache
        for mine, theirs in zip((*model.parameters(), *model.buffers()), (*other.parameters(), *other.buffers())):
            mine.data.copy_(theirs.data)
        torch.testing.assert_close(model(x), other(x))
        model.conv1.weight.data.mul_(2)
        conv = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        conv.weight.copy_(model.conv1.weight)
        stem = model.act1(model.bn1(conv(x)))
        torch.testing.assert_close(model.act1(model.bn1(model.conv1(x.contiguous(memory_format=torch.channels_last)))),
                                   stem)


def test_odd_feature_sizes(hybrid):
    # 200 px gives a 25x25 map before stage 3, where the official hybrid block fails (avg-pool 12 vs shortcut 13)
    assert hybrid(torch.randn(1, 3, 200, 200)).shape == (1, 10)


def test_timm_contract(hybrid):
    x = torch.randn(2, 3, 64, 64)
    final, inters = hybrid.forward_intermediates(x)
    assert [t.shape[1:] for t in inters] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]
    assert final.shape == (2, 2048, 2, 2)
    features = timm.create_model('ours_r50_max', features_only=True, out_indices=(1, 4)).eval()
    assert features.feature_info.channels() == [256, 2048]
    assert [f.shape[-1] for f in features(x)] == [16, 2]

    model = timm.create_model('ours_r50_max', drop_path_rate=0.1, num_classes=5)
    model.reset_classifier(3)
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert model.fc.out_features == 3
    assert all(p.grad is not None for p in model.parameters())
    assert model.layer4[2].drop_path is not None


def test_pretrained_cfgs():
    tags = [f'ours_r50_{v}.pf_in1k{s}' for v in ('max', 'hybrid') for s in ('', '_long')] + [
        f'{name}.in1k' for name in ('ours_r50_eb', 'ours_r50_conv1x1', 'ours_r50_dwconv', 'ours_r101_hybrid',
                                    'ours_wrn50_2_hybrid', 'ours_wrn101_2_hybrid', 'ours_r50se_hybrid')]
    assert set(tags) <= set(timm.list_pretrained('ours_*'))
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.license == 'apache-2.0' and cfg.paper_ids == 'arXiv:2202.02777'
        assert cfg.origin_url == 'https://github.com/naver-ai/PfLayer' and not cfg.url
        assert cfg.hf_hub_id == f'timm-pf/{tag}' and cfg.first_conv == 'conv1' and cfg.classifier == 'fc'
        assert cfg.notes and 'top-1' in cfg.notes[0]
    official = timm.models.get_pretrained_cfg('ours_r50_hybrid.pf_in1k')
    assert 'paper Table 3' in official.notes[0] and 'drive.google.com' in official.notes[1]
    assert timm.create_model('ours_r50_max', device='meta').pretrained_cfg['tag'] == 'pf_in1k_long'


def test_official_pth_through_timm_pretrained_loader(tmp_path):
    official, _, _, _ = load_official_fixture('ours_r50_hybrid')
    path = tmp_path / 'checkpoint.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in official.items()}, 'epoch': 90}, path)
    model = timm.create_model(
        'ours_r50_hybrid', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.fc.out_features == 10
    assert torch.equal(model.layer2[0].spatial.conv.weight, official['layer2.0.conv_block.1.0.weight'])


@pytest.mark.parametrize('name', ['ours_r50_hybrid', 'ours_r50_dwconv', 'ours_r50_eb'])
def test_norm_and_act_layers_reach_every_block(name):
    """``norm_layer`` / ``act_layer`` apply to the spatial convs too (frozen-BN or GroupNorm backbones), as in
    timm's ResNet; the default model keeps its keys."""
    class MyBN(nn.BatchNorm2d):
        pass

    model = timm.create_model(name, norm_layer=MyBN, act_layer='silu', device='meta')
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is MyBN for m in norms), {type(m).__name__ for m in norms}
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    default = timm.create_model(name, device='meta')
    assert list(model.state_dict()) == list(default.state_dict())


@pytest.mark.parametrize('batch', [1, 8])
def test_outputs_keep_the_inputs_layout_at_every_batch_size(batch):
    """The CPU path runs channels-last inside (NCHW for small last stages), but what it returns for an NCHW input
    is NCHW, as timm's ResNet returns it: ``.view`` works on the features at any batch size."""
    model = timm.create_model('ours_r50_max', num_classes=10, layers=(1, 1, 1, 1)).eval()
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        cl = model.forward_features(x.contiguous(memory_format=torch.channels_last))
    for t in [features, final, *intermediates, *only]:
        assert t.is_contiguous(), t.shape
    features.view(batch, -1)
    assert torch.equal(cl, features)
