"""The families' checkpoint filters: hints that name a model only when the checkpoint fits it, integer weights."""
import pytest
import torch

import timm
import timm_pf  # noqa: F401
from timm_pf.models._checkpoint import CheckpointDtypeError
from timm_pf.models.parameternet import checkpoint_filter_fn as parameternet_filter
from timm_pf.models.resnet_pf import checkpoint_filter_fn as resnet_filter
from timm_pf.models.vit_pf import checkpoint_filter_fn as vit_filter


@pytest.fixture(scope='module')
def models():
    names = ('ghostnet_dyn', 'ghostnet_100', 'ours_r50_max', 'ours_r50_hybrid', 'vit_ti_maxpool')
    return {n: timm.create_model(n) for n in names}


def _error(filter_fn, state_dict, model) -> str:
    with pytest.raises(ValueError) as info:
        filter_fn(state_dict, model)
    return str(info.value)


def test_other_family_checkpoint_names_the_family_not_a_model(models):
    message = _error(resnet_filter, models['ghostnet_dyn'].state_dict(), models['ours_r50_max'])
    assert 'look like a GhostNet / ParameterNet checkpoint' in message
    assert 'the checkpoint fits' not in message
    message = _error(parameternet_filter, models['ours_r50_hybrid'].state_dict(), models['ghostnet_dyn'])
    assert 'look like a ResNet checkpoint' in message and 'plain GhostNet' not in message
    message = _error(vit_filter, models['ours_r50_max'].state_dict(), models['vit_ti_maxpool'])
    assert 'look like a ResNet checkpoint' in message


def test_checkpoint_of_a_sibling_variant_is_named(models):
    message = _error(resnet_filter, models['ours_r50_hybrid'].state_dict(), models['ours_r50_max'])
    assert 'the checkpoint fits ours_r50_hybrid' in message and 'checkpoint PPP-CPPP-CPPPPP-CPP' in message
    message = _error(resnet_filter, models['ours_r50_max'].state_dict(), models['ours_r50_hybrid'])
    assert 'the checkpoint fits ours_r50_max' in message


def test_plain_ghostnet_checkpoint_points_to_upcycling(models):
    message = _error(parameternet_filter, models['ghostnet_100'].state_dict(), models['ghostnet_dyn'])
    assert 'fits ghostnet_100' in message and 'upcycle_state_dict()' in message


def test_integer_weights_are_refused(models):
    state_dict = dict(models['ours_r50_max'].state_dict())
    state_dict['layer1.0.conv1.weight'] = state_dict['layer1.0.conv1.weight'].round().to(torch.int64)
    with pytest.raises(CheckpointDtypeError, match=r'layer1\.0\.conv1\.weight is torch\.int64'):
        resnet_filter(state_dict, models['ours_r50_max'])
    state_dict = dict(models['ghostnet_dyn'].state_dict())
    state_dict['conv_stem.routing.bias'] = state_dict['conv_stem.routing.bias'].to(torch.int32)
    with pytest.raises(CheckpointDtypeError, match='integer tensors for float parameters'):
        parameternet_filter(state_dict, models['ghostnet_dyn'])
    # integer buffers stay integers: BatchNorm's num_batches_tracked passes
    assert resnet_filter(models['ours_r50_max'].state_dict(), models['ours_r50_max'])


def test_dynamic_stem_is_adapted_to_other_input_channels(models):
    """timm's loader adapts static stems only; the ParameterNet filter adapts experts and routing the same way."""
    source = models['ghostnet_dyn'].eval()
    grey = timm.create_model('ghostnet_dyn', in_chans=1, num_classes=10).eval()
    state_dict = parameternet_filter(source.state_dict(), grey)
    grey.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith('classifier.')}, strict=False)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # one channel: the sum over the source channels, i.e. the grey image given as RGB
        torch.testing.assert_close(grey.forward_features(x), source.forward_features(x.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-4)
