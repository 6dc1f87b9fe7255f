"""What tests/timm_suite/run.py hands to timm's suite: every variant of ours, the Hub repositories its pretrained
tests load, and the plugin's selection of timm's tests."""
import sys
from pathlib import Path
from types import SimpleNamespace

import timm

sys.path.insert(0, str(Path(__file__).parent / 'timm_suite'))
from plugin import is_ours  # noqa: E402
from run import our_variants, weights_to_serve  # noqa: E402

USER_NAMED = {'ours_r50_hybrid', 'ours_r50_deform_max', 'parameternet_600m', 'vit_s_maxpool', 'pit_s_maxpool',
              'ghostnet_dyn'}


def test_every_variant_of_the_families_and_no_other_model():
    variants = our_variants()
    assert USER_NAMED <= set(variants) and 'rba' not in variants and 'resnet50' not in variants
    modules = {timm.models.model_entrypoint(v).__module__ for v in variants}
    assert modules == {f'timm_pf.models.{f}' for f in ('resnet_pf', 'vit_pf', 'pit_pf', 'parameternet', 'replace')}


def test_the_hub_holds_every_tag_the_pretrained_tests_load():
    from timm_pf.models.replace import PLAIN_MODELS
    variants = our_variants()
    repos = weights_to_serve(variants)
    ours = [t for t in timm.list_models(pretrained=True) if t.split('.')[0] in variants]
    assert ours and all(  # (a *_replace variant may start from one of our tags: same weights)
        repos[timm.models.get_pretrained_cfg(t).hf_hub_id].split('.')[0] == t.split('.')[0] for t in ours)
    assert all(plain in repos.values() for plain in PLAIN_MODELS.values())
    assert not any(name.split('.')[0] not in variants and name not in PLAIN_MODELS.values() for name in repos.values())


def test_the_plugin_keeps_the_tests_of_our_variants():
    def item(**params):
        return SimpleNamespace(callspec=SimpleNamespace(params=params))
    variants = {'ghostnet_dyn', 'vit_s_maxpool'}
    assert is_ours(item(model_name='ghostnet_dyn', batch_size=1), variants)
    assert is_ours(item(model_name='vit_s_maxpool.pf_in1k'), variants)
    assert not is_ours(item(model_name='resnet50'), variants)
    assert not is_ours(item(stem_type='deep'), variants) and not is_ours(SimpleNamespace(), variants)
