"""The private timm names the model families use (timm_pf/models/_timm_private.py) still exist in this timm.

A timm upgrade that moves or changes one of them fails here, naming it, instead of deep inside a model.
"""
import importlib
import inspect

import pytest
import timm

PRIVATE_NAMES = {
    # module, name: the parameters the families pass
    ('timm.models._efficientnet_blocks', 'ConvBnAct'): ('in_chs', 'out_chs', 'kernel_size', 'act_layer', 'device'),
    ('timm.models._efficientnet_blocks', 'SqueezeExcite'): ('in_chs', 'rd_ratio', 'rd_round_fn', 'act_layer',
                                                             'gate_layer', 'device'),
    ('timm.models._features', 'feature_take_indices'): ('num_features', 'indices'),
}


@pytest.mark.parametrize('module, name', sorted(PRIVATE_NAMES))
def test_private_timm_name_exists(module, name):
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f'timm {timm.__version__} has no {module}.{name} ({e}): timm_pf/models/_timm_private.py '
                    f'must take it from where timm moved it')
    params = inspect.signature(obj).parameters
    missing = [p for p in PRIVATE_NAMES[module, name] if p not in params]
    assert not missing, (f'timm {timm.__version__}: {module}.{name} lost the parameters {missing} that '
                         f'timm_pf/models/_timm_private.py relies on')


def test_the_families_use_these_names():
    from timm_pf.models import _timm_private
    for module, name in PRIVATE_NAMES:
        assert getattr(_timm_private, name) is getattr(importlib.import_module(module), name)
