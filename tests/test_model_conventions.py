"""timm's conventions in every registered variant: device / dtype at construction, one builder, one cfg style."""
import pytest
import torch

import timm
import timm_pf  # noqa: F401
from timm_pf.models._registry import pf_model_names

# the variants of the model families (the 'rba' architecture wraps a base model given at run time)
VARIANTS = [n for n in pf_model_names() if timm.models.model_entrypoint(n).__module__ != 'timm_pf.models.rba']


def test_every_family_registers_variants():
    families = {timm.models.model_entrypoint(n).__module__.rsplit('.', 1)[-1] for n in VARIANTS}
    assert families == {'resnet_pf', 'vit_pf', 'pit_pf', 'parameternet', 'replace'}


@pytest.mark.parametrize('name', VARIANTS)
def test_device_and_dtype_at_construction(name):
    """``device='meta'`` allocates nothing, ``to_empty`` + a strict load fills it; ``dtype`` sets every parameter's."""
    bf16 = timm.create_model(name, dtype=torch.bfloat16)
    wrong_dtype = [k for k, p in bf16.named_parameters() if p.dtype != torch.bfloat16]
    assert not wrong_dtype, f'{name}: parameters not in bfloat16: {wrong_dtype[:5]}'

    meta = timm.create_model(name, device='meta')
    off_meta = [k for k, t in [*meta.named_parameters(), *meta.named_buffers()] if t.device.type != 'meta']
    assert not off_meta, f'{name}: tensors created outside the meta device: {off_meta[:5]}'
    meta.to_empty(device='cpu')
    meta.load_state_dict(bf16.state_dict(), strict=True)
    assert all(p.device.type == 'cpu' and p.dtype == torch.float32 for p in meta.parameters())
    first = next(iter(bf16.state_dict()))
    assert torch.equal(meta.state_dict()[first].to(torch.bfloat16), bf16.state_dict()[first])


@pytest.mark.parametrize('name, kwargs, error, match', [
    ('ours_r50_hybrid', dict(block_pattern=123), TypeError, r'block_pattern must be a str .*got 123 \(int\)'),
    ('ours_r50_hybrid', dict(block_pattern='XYZ'), ValueError, r"block_pattern 'XYZ': unknown letter 'X'"),
    ('ours_r50_hybrid', dict(spatial_op='bad'), ValueError, r"unknown spatial_op 'bad'; registered: max"),
    ('parameternet_600m', dict(num_experts=1.5), TypeError, r'num_experts must be a whole number >= 1, got 1.5'),
    ('parameternet_600m', dict(num_experts='4'), TypeError, r"num_experts must be a whole number >= 1, got '4'"),
    ('parameternet_600m', dict(num_experts=0), ValueError, r'num_experts must be >= 1, got 0'),
    ('ghostnet_dyn', dict(num_experts=True), TypeError, r'num_experts must be a whole number'),
    ('vit_ti_maxpool', dict(mixer_act_layer='foo'), ValueError, r"mixer_act_layer='foo': expected an activation"),
    ('pit_ti_maxpool', dict(mixer_act_layer=3), ValueError, r'mixer_act_layer=3: expected an activation'),
    ('vit_ti_maxpool', dict(token_mixer=['max']), ValueError, r"unknown token_mixer \['max'\]"),
])
def test_wrongly_typed_kwargs_are_named(name, kwargs, error, match):
    """Our own checks name the kwarg and what it takes, before timm or torch fail on it somewhere deeper."""
    with pytest.raises(error, match=match):
        timm.create_model(name, device='meta', **kwargs)



@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', ['ours_r50_deform_max', 'ours_r50_deform_avg', 'ours_r50_hybrid', 'ghostnet_dyn',
                                  'vit_ti_maxpool', 'pit_ti_maxpool'])
def test_low_precision_forward_matches_float32(name, dtype):
    """A model cast to bfloat16 / float16 gives the float32 logits up to rounding on the CPU, never NaNs (a
    channels-last half-precision ``grid_sample`` input did, in the deformable pools)."""
    kwargs = {'img_size': 64} if name.startswith(('vit', 'pit')) else {}
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, 128, 128) if not kwargs else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and not out.isnan().any()
    assert (out.float() - ref).abs().max() <= 0.1 * ref.std()


@pytest.mark.parametrize('name, kwargs', [
    ('ours_r50_max', dict(layers=(1, 1, 1, 1))),
    ('ours_r50_deform_max', dict(layers=(1, 1, 1, 1))),
    ('vit_ti_maxpool', dict(img_size=32, depth=2)),
])
def test_compiles_as_one_graph_in_inference(name, kwargs):
    """The eager fast paths (cached channels-last kernels, in-place activations and max filters) stay out of
    torch.compile's graph: inference compiles with fullgraph=True, as timm's own models do."""
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
