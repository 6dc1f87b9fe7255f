"""The package layout: imports run downward (layers, methods < models < tools < cli) and the import paths from
before the layout (``timm_pf.rba``, ``timm_pf.hub``, ...) still give their modules."""
import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import timm_pf
from timm_pf._moved import MOVED

PACKAGE_DIR = Path(timm_pf.__file__).parent
# A module may import from its own floor and the floors below it. layers/ and methods/ work on any
# torch/timm model and are the ground; version.py, _data (the shipped data folders) and _private (the private
# timm and torch names) are read by every floor.
FLOORS = {
    'version': 0, '_data': 0, '_private': 0, 'layers': 1, 'methods': 1, 'models': 2, 'tools': 3, 'cli': 4,
    '__main__': 5}


def _floor(module: str) -> int:
    """Floor of a module path inside the package (``'models.rba'`` -> 2); top-level files other than
    version.py stand above everything but the command line."""
    return FLOORS.get(module.split('.')[0], 3.5)


def _timm_pf_imports(path: Path):
    """(line, module inside the package) for every import of a timm_pf module in ``path``, lazy ones included."""
    package = '.'.join(path.relative_to(PACKAGE_DIR.parent).with_suffix('').parts)
    if path.name == '__init__.py':
        package += '.__init__'
    tree = ast.parse(path.read_text(encoding='utf-8'))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:-node.level]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            targets = [target] if node.module else [f'{target}.{a.name}' for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith('timm_pf.'):
                yield node.lineno, t[len('timm_pf.'):]


def test_imports_run_downward():
    upward = []
    for path in sorted(PACKAGE_DIR.rglob('*.py')):
        rel = path.relative_to(PACKAGE_DIR).with_suffix('')
        if rel.parts == ('__init__',):
            continue  # the package face: registers the models
        here = _floor('.'.join(rel.parts))
        for line, target in _timm_pf_imports(path):
            if _floor(target) > here:
                upward.append(f'{path.relative_to(PACKAGE_DIR)}:{line} imports timm_pf.{target}')
    assert not upward, 'imports that run upward:\n' + '\n'.join(upward)


def test_floor_of_modules_is_known():
    top = {p.stem for p in PACKAGE_DIR.iterdir() if p.suffix == '.py' or (p / '__init__.py').is_file()}
    assert top - set(FLOORS) == {'__init__', '_moved', 'cpu'}


@pytest.mark.parametrize('old', sorted(MOVED))
def test_old_import_paths_give_the_moved_modules(old):
    new = importlib.import_module(f'timm_pf.{MOVED[old]}')
    assert importlib.import_module(f'timm_pf.{old}') is new
    assert getattr(timm_pf, old) is new
    assert sys.modules[f'timm_pf.{old}'] is new
    # the README's forms: from timm_pf import rba / from timm_pf.replacement import finalize
    namespace = {}
    exec(f'from timm_pf import {old} as m', namespace)
    assert namespace['m'] is new


@pytest.mark.parametrize('old, sub', [('rba', 'blocks'), ('rba', 'fit'), ('bench', 'runner'), ('bench', 'measure')])
def test_submodules_of_old_paths_are_the_moved_submodules(old, sub):
    """One module object for both names: classes and exceptions of the old path are those of the new one."""
    new = importlib.import_module(f'timm_pf.{MOVED[old]}.{sub}')
    assert importlib.import_module(f'timm_pf.{old}.{sub}') is new
    assert getattr(importlib.import_module(f'timm_pf.{MOVED[old]}'), sub) is new


def test_old_import_paths_of_the_readme():
    from timm_pf.data import digits_tensors
    from timm_pf.replacement import finalize, replace_layers, replacement_report
    from timm_pf.rba import analyze, approximate, save_rba
    from timm_pf.stats import model_stats
    from timm_pf.methods import rba, replacement, stats
    from timm_pf.tools import data
    assert (digits_tensors, finalize, replace_layers, replacement_report) == (
        data.digits_tensors, replacement.finalize, replacement.replace_layers, replacement.replacement_report)
    assert (analyze, approximate, save_rba, model_stats) == (rba.analyze, rba.approximate, rba.save_rba,
                                                            stats.model_stats)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'timm_pf' has no attribute 'no_such_module'"):
        timm_pf.no_such_module  # noqa: B018


def test_import_timm_pf_does_not_import_the_analysis_tooling():
    code = ('import json, sys, timm_pf; '
            'print(json.dumps(sorted(m for m in sys.modules if m.startswith("timm_pf"))))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert 'timm_pf.models.rba' in loaded and 'timm_pf.models.replace' in loaded  # the models are registered
    tooling = {f'timm_pf.{m}' for m in MOVED} | {
        'timm_pf.methods.rba', 'timm_pf.methods.replacement', 'timm_pf.tools.bench', 'timm_pf.tools.cards',
        'timm_pf.tools.recipes', 'timm_pf.tools.data', 'timm_pf.tools.hub', 'timm_pf.methods.stats', 'timm_pf.cli'}
    assert not loaded & tooling


_TIMM_LOADERS = ('timm.models._builder.load_state_dict_from_hf', 'timm.models._builder.load_pretrained',
                 'timm.models._hub.load_state_dict_from_hf', 'timm.models.load_checkpoint',
                 'timm.models._helpers.load_state_dict', 'timm.models.load_pretrained', 'timm.create_model')


def test_import_timm_pf_replaces_no_timm_function():
    code = '''
import json, sys, timm
def attributes():
    return {f"{name}.{attr}": value for name, module in list(sys.modules.items())
            if module is not None and (name == "timm" or name.startswith("timm."))
            for attr, value in list(vars(module).items())}
before = attributes()
import timm_pf
after = attributes()
replaced = sorted(k for k, v in before.items() if after.get(k) is not v)
print(json.dumps({"compared": sorted(before), "replaced": replaced}))
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(_TIMM_LOADERS) <= set(result['compared'])  # timm's loaders are among what is checked
    assert not result['replaced'], f'import timm_pf replaces timm attributes: {result["replaced"]}'
