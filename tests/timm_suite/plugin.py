"""pytest plugin for timm's tests/test_models.py run on our variants (loaded by run.py with ``-p plugin``).

It keeps the tests whose ``model_name`` is one of the variants in ``TIMM_PF_SUITE_VARIANTS`` (comma separated,
a pretrained tag counts for its architecture) and, unless ``TIMM_PF_SUITE_FULL`` is set, applies
:data:`run.DEFAULT_SKIPS`. Deselected tests are not run, so they appear nowhere in the report.
"""
import os

import pytest

from run import deselected_by_default


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    variants = set(os.environ['TIMM_PF_SUITE_VARIANTS'].split(','))
    full = bool(os.environ.get('TIMM_PF_SUITE_FULL'))
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = str(params.get('model_name', ''))
        test = item.originalname if hasattr(item, 'originalname') else item.name
        ours = name.split('.')[0] in variants
        (keep if ours and (full or not deselected_by_default(test, name)) else drop).append(item)
    items[:] = keep
    if drop:
        config.hook.pytest_deselected(items=drop)
