"""Reading checkpoints and the one mismatch report: the families' checkpoint filters (hints that name a model only
when the checkpoint fits it, integer weights) and the strict load of the Hub tooling."""
import argparse

import pytest
import safetensors.torch
import torch

import timm
import timm_pf  # noqa: F401
from timm_pf.models._checkpoint import CheckpointDtypeError, CheckpointError, load_strict, read_checkpoint
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


def test_filters_and_strict_loads_report_mismatches_alike(models):
    model = models['vit_ti_maxpool']
    state_dict = {k: v for k, v in model.state_dict().items() if k != 'blocks.3.mlp.fc1.weight'}
    state_dict['blocks.0.mlp.fc1.bias'] = torch.zeros(7)
    reports = []
    for check in (lambda: vit_filter(state_dict, model), lambda: load_strict(model, state_dict, 'weights.pth')):
        with pytest.raises(CheckpointError) as info:
            check()
        reports.append(str(info.value))
    assert reports[1].startswith('weights.pth does not fit vit_ti_maxpool.in1k: ')
    for report in reports:
        assert 'missing keys (1): blocks.3.mlp.fc1.weight' in report
        assert 'shape mismatches (1): blocks.0.mlp.fc1.bias has shape (7,), model expects (768,)' in report


def test_read_checkpoint_unwraps_training_checkpoints(models, tmp_path):
    weights = models['vit_ti_maxpool'].state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    path = tmp_path / 'last.pth.tar'  # as timm's train.py saves it: arguments, weights, EMA weights
    torch.save({'args': argparse.Namespace(lr=0.1), 'state_dict': {f'module.{k}': v for k, v in weights.items()},
                'state_dict_ema': ema, 'epoch': 3}, path)
    for use_ema, expected in ((False, weights), (True, ema)):
        got = read_checkpoint(path, use_ema=use_ema)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    torch.save({'model': weights}, path)
    with pytest.raises(CheckpointError, match='has no EMA weights'):
        read_checkpoint(path, use_ema=True)
    torch.save({'state_dict': weights, 'optimizer': argparse.Namespace()}, path)  # not unwrapped: no weights
    assert read_checkpoint(path).keys() == weights.keys()
    torch.save({'weights': [1.0]}, path)
    with pytest.raises(CheckpointError, match=r"'weights' is a list, not a tensor"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match='does not exist'):
        read_checkpoint(tmp_path / 'missing.safetensors')


def test_a_safetensors_file_is_read_whatever_its_name(models, tmp_path):
    state_dict = models['ours_r50_max'].state_dict()
    path = tmp_path / 'weights.pth'
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    loaded = read_checkpoint(path)
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], v) for k, v in state_dict.items())
