"""The private timm and torch names the package uses (timm_pf/_private.py) still exist in this timm and torch, and
no other module of the package reaches for a private name.

A timm or torch upgrade that moves or changes one of them fails here, naming it, instead of deep inside a model.
"""
import ast
import importlib
import inspect
from pathlib import Path

import pytest
import timm
import torch

import timm_pf
from timm_pf import _private

PRIVATE_NAMES = {
    # module, name: the parameters the package passes
    ('timm.models._efficientnet_blocks', 'ConvBnAct'): ('in_chs', 'out_chs', 'kernel_size', 'act_layer', 'device'),
    ('timm.models._efficientnet_blocks', 'SqueezeExcite'): ('in_chs', 'rd_ratio', 'rd_round_fn', 'act_layer',
                                                             'gate_layer', 'device'),
    ('timm.models._features', 'feature_take_indices'): ('num_features', 'indices'),
    ('timm.models._hub', 'load_model_config_from_path'): ('model_path',),
    ('torch._higher_order_ops.scan', 'scan'): ('combine_fn', 'init', 'xs'),
    ('torch.utils._python_dispatch', 'TorchDispatchMode'): (),
    ('torch.utils._python_dispatch', '_get_current_dispatch_mode'): (),
    ('torch.utils._pytree', 'tree_leaves'): ('tree',),
}


@pytest.mark.parametrize('module, name', sorted(PRIVATE_NAMES))
def test_private_name_exists(module, name):
    versions = f'timm {timm.__version__}, torch {torch.__version__}'
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f'{versions} has no {module}.{name} ({e}): timm_pf/_private.py must take it from where it moved')
    params = inspect.signature(obj).parameters
    missing = [p for p in PRIVATE_NAMES[module, name] if p not in params]
    assert not missing, f'{versions}: {module}.{name} lost the parameters {missing} that timm_pf/_private.py relies on'
    assert getattr(_private, name.lstrip('_').replace('get_current', 'current'), None) is obj


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = _private.tensor_version(t)
    t.add_(1)
    assert _private.tensor_version(t) == before + 1


def _private_references(path: Path):
    """(line, text) of every import from a private timm/torch module and every ``._name`` attribute of timm or
    torch in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            parts = node.module.split('.')
            if parts[0] in ('timm', 'torch') and any(p.startswith('_') for p in parts):
                yield node.lineno, f'from {node.module} import ...'
        elif isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__'):
            base = ast.unparse(node.value)
            if (base.split('.')[0] in ('timm', 'torch') and not base.startswith('torch.ops.')  # (aten op names)
                    or node.attr == '_version'):
                yield node.lineno, ast.unparse(node)


def test_no_other_module_uses_a_private_name():
    package = Path(timm_pf.__file__).parent
    found = [f'{path.relative_to(package)}:{line} {text}' for path in sorted(package.rglob('*.py'))
             if path.name != '_private.py' for line, text in _private_references(path)]
    assert not found, 'private timm/torch names outside timm_pf/_private.py:\n' + '\n'.join(found)
