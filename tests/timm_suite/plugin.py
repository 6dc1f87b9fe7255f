"""pytest plugin for timm's tests/test_models.py run on our variants (loaded by run.py with ``-p plugin``).

It keeps the tests whose ``model_name`` is one of the variants in ``TIMM_PF_SUITE_VARIANTS`` (comma separated,
a pretrained tag counts for its architecture); the others are deselected, so they appear nowhere in the report.
At the end it prints the outcomes per variant.
"""
import os
from collections import Counter, defaultdict
from typing import Dict

import pytest

_VARIANT_OF: Dict[str, str] = {}  # node id of a kept test -> the variant it tests


def is_ours(item: pytest.Item, variants: set) -> bool:
    """Whether ``item`` tests one of ``variants`` (by architecture name or ``name.tag``)."""
    return _variant(item) in variants


def _variant(item: pytest.Item) -> str:
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    return str(params.get('model_name', '')).split('.')[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    variants = set(os.environ['TIMM_PF_SUITE_VARIANTS'].split(','))
    keep, drop = [], []
    for item in items:
        (keep if is_ours(item, variants) else drop).append(item)
    items[:] = keep
    _VARIANT_OF.update((item.nodeid, _variant(item)) for item in keep)
    if drop:
        config.hook.pytest_deselected(items=drop)


def pytest_terminal_summary(terminalreporter) -> None:
    outcomes = defaultdict(Counter)
    for outcome in ('passed', 'failed', 'error', 'skipped', 'xfailed', 'xpassed'):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, 'nodeid', None) in _VARIANT_OF:
                outcomes[_VARIANT_OF[report.nodeid]][outcome] += 1
    terminalreporter.write_sep('-', f'timm tests per variant ({len(outcomes)} variants)')
    for variant in sorted(outcomes):
        counts = outcomes[variant]
        terminalreporter.write_line(f'{variant}: ' + ', '.join(f'{n} {o}' for o, n in counts.items()))
