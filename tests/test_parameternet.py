"""ParameterNet / GhostNet variants: paper counts, official logits, upcycling, timm features, ONNX."""
import pytest
import timm
import torch
from torch import nn

from _official import load_official_fixture
from timm_pf.layers import DynamicConv2d
from timm_pf.models.parameternet import GHOSTNET_V1_CFGS, ParameterNet, checkpoint_filter_fn, upcycle_state_dict
from timm_pf.methods.stats import count_macs, count_params

# name, kwargs, params, paper FLOPs in M (Table 2; Table 4 for 2 / 8 experts)
PAPER_COUNTS = [
    ('parameternet_600m', {}, 34_504_504, 599),
    ('ghostnet_600m', {}, 19_822_198, 579),
    ('parameternet_300m', {}, 15.7e6, 298),
    ('ghostnet_300m', {}, 8.6e6, 289),
    ('parameternet_300m', {'num_experts': 2}, 11.0e6, 293),
    ('parameternet_300m', {'num_experts': 8}, 25.2e6, 308),
]


def _norm_and_pool_elements(model: nn.Module, size: int = 224) -> int:
    """Elements normalised by BatchNorm or averaged by squeeze-excite / global pooling, per image."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.BatchNorm2d):
            total += output.numel()
        elif type(module).__name__ in ('SqueezeExcite', 'SelectAdaptivePool2d'):
            total += inputs[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize('name,kwargs,params,paper_mflops', PAPER_COUNTS,
                         ids=[f'{n}-{k.get("num_experts", "default")}' for n, k, _, _ in PAPER_COUNTS])
def test_params_and_macs_match_paper(name, kwargs, params, paper_mflops):
    model = timm.create_model(name, **kwargs)
    n_params = count_params(model)
    if isinstance(params, int):
        assert n_params == params
    else:  # the paper gives 0.1M precision only
        assert round(n_params / 1e6, 1) == params / 1e6
    macs = count_macs(model)
    assert abs(macs / 1e6 - paper_mflops) / paper_mflops < 0.022
    # The paper's counter also charges one op per BatchNorm / average-pool element; with that the
    # counts agree to the paper's rounding, pinning the (inferred 300M) layouts and expert overheads.
    assert abs((macs + _norm_and_pool_elements(model)) / 1e6 - paper_mflops) <= 0.55


def test_only_the_official_convs_are_dynamic():
    model = timm.create_model('parameternet_600m')
    dynamic = {n for n, m in model.named_modules() if isinstance(m, DynamicConv2d)}
    static = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert 'conv_stem' in dynamic and 'blocks.9.0.conv' in dynamic
    assert {'blocks.3.0.ghost1.primary_conv.0', 'blocks.3.0.ghost1.cheap_operation.0',
            'blocks.3.0.shortcut.0', 'blocks.3.0.shortcut.2'} <= dynamic
    assert {'conv_head', 'blocks.3.0.conv_dw', 'blocks.3.0.se.conv_reduce'} <= static
    assert not any('.se.' in n or 'conv_dw' in n for n in dynamic)
    assert isinstance(model.classifier, nn.Linear)
    assert len(dynamic) == 1 + 19 * 4 + 2 * 5 + 1  # stem, 2 ghost modules x 2 convs, 5 projection shortcuts, final


def test_official_logits():
    official, x, logits, meta = load_official_fixture('parameternet_600m')
    model = timm.create_model(meta['ours']).eval()
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x[1:]), logits[1:], atol=1e-4, rtol=0)


def test_checkpoint_filter_passes_ours_and_unwraps():
    model = timm.create_model('parameternet_300m', num_experts=2, num_classes=10)
    ours = model.state_dict()
    out = checkpoint_filter_fn(ours, model)
    assert out.keys() == ours.keys()
    wrapped = {'state_dict': {f'module.{k}': v for k, v in ours.items()}}
    assert checkpoint_filter_fn(wrapped, model).keys() == ours.keys()


def test_checkpoint_filter_rejects_mismatched_checkpoints():
    model = timm.create_model('parameternet_300m', num_experts=2)
    four_experts = timm.create_model('parameternet_300m').state_dict()
    with pytest.raises(ValueError, match=r'(?s)num_experts=2.*checkpoint has 4 experts'):
        checkpoint_filter_fn(four_experts, model)
    plain = timm.create_model('ghostnet_300m').state_dict()
    with pytest.raises(ValueError, match='upcycle_state_dict'):
        checkpoint_filter_fn(plain, model)
    with pytest.raises(ValueError, match='unexpected'):
        checkpoint_filter_fn({**model.state_dict(), 'extra.weight': torch.zeros(1)}, model)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


def test_ghostnet_dyn_is_key_compatible_with_ghostnet_100():
    plain_keys = set(timm.create_model('ghostnet_100').state_dict())
    dyn_keys = set(timm.create_model('ghostnet_dyn').state_dict())
    assert {k for k in dyn_keys if '.routing.' not in k} == plain_keys


def test_upcycled_ghostnet_dyn_equals_ghostnet_100():
    plain = _randomise_bn(timm.create_model('ghostnet_100')).eval()
    model = timm.create_model('ghostnet_dyn').eval()
    model.load_state_dict(upcycle_state_dict(plain.state_dict(), model), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x[:1]), plain(x[:1]), atol=1e-4, rtol=1e-4)
    experts = model.blocks[6][0].ghost1.primary_conv[0].weight
    assert not torch.allclose(experts[0], experts[1])
    with pytest.raises(ValueError, match='no dynamic convs'):
        upcycle_state_dict(plain.state_dict(), timm.create_model('ghostnet_300m'))
    with pytest.raises(ValueError, match='shape'):
        upcycle_state_dict(timm.create_model('ghostnet_050').state_dict(), model)


def test_features_intermediates_and_classifier():
    model = timm.create_model('parameternet_300m', num_experts=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = timm.create_model('parameternet_300m', num_experts=2, features_only=True)
        feats.load_state_dict(model.state_dict(), strict=False)
        outs = feats.eval()(x)
    assert [f.shape[1] for f in outs] == feats.feature_info.channels()
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2]
    assert [i.shape[1:] for i in inter[1:]] == [o.shape[1:] for o in outs[1:]]
    torch.testing.assert_close(model.forward_head(final), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 1280)


def test_drop_path_and_grad_checkpointing_train():
    model = timm.create_model('parameternet_300m', num_experts=2, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == 'DropPath']
    assert rates and max(rates) == pytest.approx(0.2) and min(rates) > 0
    model.set_grad_checkpointing(True)
    out = model.train()(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert model.conv_stem.weight.grad is not None and model.conv_stem.routing.weight.grad is not None


def test_softmax_routing_option():
    model = timm.create_model('parameternet_300m', num_experts=2, routing='softmax')
    assert model.conv_stem.routing_type == 'softmax'
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match='num_experts'):
        timm.create_model('parameternet_300m', num_experts=0)


def test_pretrained_cfgs():
    for name in ('parameternet_600m', 'parameternet_300m', 'ghostnet_600m', 'ghostnet_300m', 'ghostnet_dyn'):
        cfg = timm.create_model(name).pretrained_cfg
        assert cfg['hf_hub_id'] == f'timm-pf/{name}.in1k'
        assert cfg['paper_ids'] == 'arXiv:2306.14525'
        assert cfg['first_conv'] == 'conv_stem' and cfg['classifier'] == 'classifier'
        assert 'No weights were released' in ' '.join(cfg['notes'])


def test_onnx_dynamic_batch(tmp_path):
    """One exported graph serves any batch size (no conv groups that depend on the batch)."""
    ort = pytest.importorskip('onnxruntime')
    # the first four stages of ghostnet_dyn (stem, identity and projection shortcuts, 5x5 + SE, final conv)
    # keep the export quick; every dynamic conv kind of the full models is in it
    model = _randomise_bn(ParameterNet(GHOSTNET_V1_CFGS[:4], num_experts=4, num_classes=10)).eval()
    path = tmp_path / 'ghostnet_dyn.onnx'
    x = torch.randn(4, 3, 64, 64)
    batch = torch.export.Dim('batch', min=1, max=64)
    torch.onnx.export(model, (x[:2],), str(path), input_names=['input'], output_names=['logits'],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, optimize=False)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    with torch.no_grad():
        for n in (1, 4):
            expected = model(x[:n]).numpy()
            (got,) = session.run(None, {'input': x[:n].numpy()})
            assert got.shape == expected.shape
            assert abs(got - expected).max() < 1e-4
