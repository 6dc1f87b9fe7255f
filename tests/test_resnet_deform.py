"""Ours-R50 (deform_max / deform_avg): §5.1 Table 3, Table 5, Appendix B Table B.1."""
import pytest
import timm
import torch

from timm_pf.layers import LearnedDeformPool2d
from timm_pf.models.resnet_pf import SPATIAL_OPS
from timm_pf.methods.stats import count_macs, count_params

DEFORM_MODELS = ['ours_r50_deform_max', 'ours_r50_deform_avg']


def _randomise_offsets(model: torch.nn.Module, std: float = 0.05) -> None:
    """Move the predictors off their zero initialisation so the sampling points actually deform."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, LearnedDeformPool2d):
            with torch.no_grad():
                module.offset_conv.weight.normal_(0, std, generator=generator)
                module.offset_conv.bias.normal_(0, std, generator=generator)


@pytest.mark.parametrize('name', DEFORM_MODELS)
def test_params_and_macs_match_paper(name):
    model = timm.create_model(name)
    # Table 3 / Table B.1: 18.0M params, 2.9 GFLOPs (MACs).
    assert count_params(model) == pytest.approx(18.0e6, rel=0.01)
    assert count_macs(model, (3, 224, 224)) == pytest.approx(2.9e9, rel=0.01)


@pytest.mark.parametrize('name', DEFORM_MODELS)
def test_deformable_pools_replace_the_hybrid_max_pools(name):
    model = timm.create_model(name)
    hybrid = timm.create_model('ours_r50_hybrid')
    pools = [m for m in model.modules() if isinstance(m, LearnedDeformPool2d)]
    hybrid_max_blocks = [b for b in hybrid.modules() if getattr(b, 'spatial_op', None) == 'max' and hasattr(b, 'conv3')]
    assert len(pools) == len(hybrid_max_blocks) == 13
    assert {p.pool.reduction for p in pools} == {name.rsplit('_', 1)[1]}
    # Only the offset predictors (3x3 conv -> 27 channels, with bias) add parameters to the hybrid.
    predictor_params = sum(9 * p.offset_conv.in_channels * 27 + 27 for p in pools)
    assert count_params(model) == count_params(hybrid) + predictor_params


@pytest.mark.parametrize('name', DEFORM_MODELS)
@pytest.mark.parametrize('zero_init_last', [True, False])
def test_a_new_model_pools_on_the_regular_grid(name, zero_init_last):
    """timm's ResNet init draws every conv from Kaiming; the offset predictors must stay at zero (§5.1), so a
    new model pools where the hybrid's max/avg-pool does."""
    model = timm.create_model(name, zero_init_last=zero_init_last)
    pools = [m for m in model.modules() if isinstance(m, LearnedDeformPool2d)]
    assert pools and all(not p.offset_conv.weight.any() and not p.offset_conv.bias.any() for p in pools)
    x = torch.randn(1, 64, 9, 9)
    offsets, masks = pools[0].predict_offsets(x)
    assert not offsets.any() and torch.equal(masks, torch.full_like(masks, 0.5))


def test_spatial_ops_registered():
    for op in ('deform_max', 'deform_avg'):
        module = SPATIAL_OPS[op](32, 1)
        assert isinstance(module, LearnedDeformPool2d)
        assert module(torch.rand(1, 32, 8, 8)).shape == (1, 32, 8, 8)


@pytest.mark.parametrize('name', DEFORM_MODELS)
def test_forward_backward_reaches_offset_predictors(name):
    model = timm.create_model(name, num_classes=10, zero_init_last=False)  # let gradients enter every branch
    _randomise_offsets(model)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    pools = [m for m in model.modules() if isinstance(m, LearnedDeformPool2d)]
    assert all(p.offset_conv.weight.grad.abs().sum() > 0 for p in pools)


@pytest.mark.parametrize('name', DEFORM_MODELS)
def test_features_only_for_detection(name):
    # Table 5 uses these networks as Faster R-CNN + FPN backbones.
    model = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4))
    features = model(torch.randn(1, 3, 96, 128))
    assert [f.shape[1] for f in features] == model.feature_info.channels() == [256, 512, 1024, 2048]
    assert [tuple(f.shape[-2:]) for f in features] == [(24, 32), (12, 16), (6, 8), (3, 4)]


@pytest.mark.parametrize('name', DEFORM_MODELS)
def test_onnx_export_with_a_dynamic_batch_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is needed to run the exported graph')
    model = timm.create_model(name, num_classes=10).eval()
    _randomise_offsets(model)
    with torch.no_grad():  # timm zero-initialises each block's last BN scale: without this no pool reaches the logits
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(0.3)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        pools = [m for m in model.modules() if isinstance(m, LearnedDeformPool2d)]
        for pool in pools:
            pool.offset_conv.weight.zero_()
        assert (model(x) - expected).abs().max() > 1e-3  # the offsets change the logits
        _randomise_offsets(model)
    path = tmp_path / f'{name}.onnx'
    torch.onnx.export(model, (x[:2],), str(path), input_names=['x'], output_names=['logits'],
                      dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (1, 3, 8):
        (logits,) = session.run(None, {'x': x[:batch].numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected[:batch], rtol=0, atol=1e-4)
