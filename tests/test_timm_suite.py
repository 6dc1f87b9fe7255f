"""The selection tests/timm_suite/run.py makes by default: every family keeps every test kind on some variant."""
import fnmatch
import sys
from pathlib import Path

import timm

sys.path.insert(0, str(Path(__file__).parent / 'timm_suite'))
from run import DEFAULT_SKIPS, LARGE_VARIANTS, deselected_by_default, our_variants  # noqa: E402


def test_skip_patterns_name_registered_variants():
    variants = our_variants()
    assert 'rba' not in variants and 'ghostnet_dyn' in variants
    stale = [p for p in LARGE_VARIANTS if not any(fnmatch.fnmatch(v, p) for v in variants)]
    assert not stale, f'DEFAULT_SKIPS patterns that match no variant: {stale}'


def test_every_family_runs_every_skipped_test_kind_on_a_smaller_variant():
    variants = our_variants()
    for test, _ in DEFAULT_SKIPS:
        for family in {timm.models.model_entrypoint(v).__module__ for v in variants}:
            members = [v for v in variants if timm.models.model_entrypoint(v).__module__ == family]
            kept = [v for v in members if not deselected_by_default(test, v)]
            assert kept, f'{test} runs on no variant of {family}'
    assert deselected_by_default('test_model_forward_torchscript', 'vit_b_maxpool')
    assert deselected_by_default('test_model_load_pretrained', 'ours_wrn101_2_hybrid.in1k')
    assert not deselected_by_default('test_model_forward', 'vit_b_maxpool')
