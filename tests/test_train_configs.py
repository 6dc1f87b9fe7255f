"""train_configs/: every registered variant has a config, and every config is a valid timm train.py config.

The argument set of timm's train.py is recorded in tests/data/timm_train_args.json (see
tests/record_timm_train_args.py), so these checks run without the timm repository.
"""
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from timm_pf.cli import main as cli_main
from timm_pf.tools import recipes

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'train_configs'
TRAIN_ARGS = json.loads((Path(__file__).parent / 'data' / 'timm_train_args.json').read_text())['arguments']
ALL_CONFIGS = sorted(CONFIG_DIR.rglob('*.yaml'))


def _check_value(key: str, value, spec: dict) -> None:
    kind, nargs, choices = spec['kind'], spec['nargs'], spec['choices']
    if kind == 'flag':
        assert isinstance(value, bool), f'{key} is a flag: true or false, got {value!r}'
        return
    values = value if nargs in ('+', '*') or isinstance(nargs, int) else [value]
    if nargs in ('+', '*') or isinstance(nargs, int):
        assert isinstance(value, (list, dict)), f'{key} takes a list, got {value!r}'
        if isinstance(nargs, int):
            assert len(value) == nargs, f'{key} takes {nargs} values, got {value!r}'
    if kind == 'any':
        return
    for v in values:
        if v is None:
            continue
        if kind == 'int':
            assert isinstance(v, int) and not isinstance(v, bool), f'{key} takes integers, got {v!r}'
        elif kind == 'float':
            assert isinstance(v, (int, float)) and not isinstance(v, bool), f'{key} takes numbers, got {v!r}'
        elif kind == 'str':
            assert isinstance(v, str), f'{key} takes text, got {v!r}'
        if choices is not None:
            assert v in choices, f'{key}={v!r} is not one of {choices}'


def test_configs_exist():
    assert len(ALL_CONFIGS) >= len(recipes.our_models())


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_is_valid_for_train_py(path):
    cfg = yaml.safe_load(path.read_text())
    assert isinstance(cfg, dict), f'{path} is not a mapping'
    assert 'timm_pf' in cfg.get('device_modules', []), f'{path} must list device_modules: [timm_pf]'
    assert cfg['model'] in timm.list_models(), f'{path} names unknown model {cfg["model"]!r}'
    unknown = sorted(set(cfg) - set(TRAIN_ARGS))
    assert not unknown, f'{path}: not arguments of timm train.py: {unknown}'
    for key, value in cfg.items():
        _check_value(key, value, TRAIN_ARGS[key])
    with torch.device('meta'):  # builds the model with the config's kwargs, without allocating weights
        timm.create_model(cfg['model'], num_classes=cfg.get('num_classes', 1000), **cfg.get('model_kwargs', {}))
    assert path.read_text().startswith('#'), f'{path} must start with a comment citing its source'


def test_every_variant_has_a_config():
    missing = [m for m in recipes.our_models() if not (CONFIG_DIR / f'{m}.yaml').is_file()]
    assert not missing, f'no train config for {missing}; run python -m timm_pf.tools.recipes --write'


def test_generated_configs_are_up_to_date():
    assert recipes.main(['--check', '--dir', str(CONFIG_DIR)]) == 0


def test_validator_rejects_a_typo():
    with pytest.raises(AssertionError):
        _check_value('sched', 3, TRAIN_ARGS['sched'])
    assert 'weight_decay' in TRAIN_ARGS and 'weight_decy' not in TRAIN_ARGS


def test_recipes_match_the_papers():
    std, imp = recipes.RECIPES['pflayer_standard'].args, recipes.RECIPES['pflayer_improved'].args
    assert (std['opt'], std['momentum'], std['batch_size'], std['lr'], std['sched'], std['weight_decay'],
            std['epochs'], std['scale']) == ('sgd', 0.9, 256, 0.4, 'step', 1e-4, 90, [0.08, 1.0])
    assert (imp['sched'], imp['lr'], imp['batch_size'], imp['model_ema'], imp['smoothing'], imp['aa'],
            imp['reprob'], imp['weight_decay'], imp['epochs']) == (
        'cosine', 0.5, 512, True, 0.1, 'rand-m9-mstd0.5', 0.2, 1e-5, 400)
    pn = recipes.RECIPES['parameternet_in1k'].args
    assert (pn['opt'], pn['batch_size'], pn['lr'], pn['sched'], pn['warmup_epochs'], pn['weight_decay'],
            pn['smoothing'], pn['reprob'], pn['model_ema_decay'], pn['epochs']) == (
        'adamw', 1024, 1e-3, 'cosine', 20, 0.05, 0.1, 0.25, 0.9999, 300)


# ---------------------------------------------------------------------------------------------------------------
# timm-pf train-config: the shipped configs, for users without a clone

def test_shipped_configs_name_every_file_once():
    configs = recipes.shipped_configs(CONFIG_DIR)
    files = sorted(p for by_recipe in configs.values() for p in by_recipe.values())
    assert files == ALL_CONFIGS
    assert list(configs['ours_r50_hybrid']) == ['pflayer_standard', 'pflayer_improved', 'quickstart/digits']
    assert list(configs['parameternet_600m']) == ['parameternet_in1k', 'parameternet_in22k', 'parameternet_in22k_ft']
    assert list(configs['resnet50_replace']) == ['replacement_deep_resnet']
    for model, by_recipe in configs.items():
        for path in by_recipe.values():
            assert yaml.safe_load(path.read_text())['model'] == model


def test_the_package_ships_the_repository_configs():
    assert recipes.CONFIG_DIR.samefile(CONFIG_DIR)


@pytest.mark.parametrize('argv, rel', [
    (['ours_r50_hybrid'], 'ours_r50_hybrid.yaml'),
    (['ours_r50_hybrid', 'pflayer_standard'], 'ours_r50_hybrid.yaml'),
    (['ours_r50_hybrid', 'pflayer_improved'], 'pflayer_improved/ours_r50_hybrid.yaml'),
    (['ours_r50_hybrid', 'quickstart/digits'], 'quickstart/digits.yaml'),
    (['ghostnet_dyn', 'parameternet_in22k_ft'], 'parameternet_in22k_ft/ghostnet_dyn.yaml'),
])
def test_train_config_prints_and_writes_the_config(argv, rel, capsys, tmp_path):
    assert cli_main(['train-config', *argv]) == 0
    expected = (CONFIG_DIR / rel).read_text()
    assert capsys.readouterr().out == expected
    out = tmp_path / 'cfg.yaml'
    assert cli_main(['train-config', *argv, '-o', str(out)]) == 0
    assert out.read_text() == expected
    assert str(out) in capsys.readouterr().out
    assert cli_main(['train-config', *argv, '-o', '-']) == 0  # '-' is stdout, as for bench's outputs
    assert capsys.readouterr().out == expected


def test_train_config_list(capsys):
    assert cli_main(['train-config', '--list']) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert set(rows) == set(recipes.our_models())
    assert rows['ours_r50_max'] == 'pflayer_standard, pflayer_improved'
    assert rows['vit_s_replace'] == 'replacement'
    assert cli_main(['train-config', 'pit_s_maxpool', '--list']) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ['pit_s_maxpool', 'deit']


@pytest.mark.parametrize('argv, message', [
    (['ours_r50_hybri'], "no training config for 'ours_r50_hybri' (did you mean ours_r50_hybrid"),
    (['resnet50'], "no training config for 'resnet50'"),
    (['ours_r50_max', 'deit'], "ours_r50_max has no recipe 'deit'; its recipes: pflayer_standard, pflayer_improved"),
    (['ours_r50_max', '-o', '{missing}/cfg.yaml'],
     'argument -o/--output: cannot write {missing}/cfg.yaml: {missing} is not a folder'),
    (['ours_r50_max', '-o', '{tmp}'], 'argument -o/--output: {tmp} is a folder, not a file'),
    (['nope', '--list'], "no training config for 'nope'"),
    (['ours_r50_max', 'deit', '--list'], '--list takes at most a MODEL'),
    ([], 'name a MODEL'),
])
def test_train_config_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    fill = dict(missing=tmp_path / 'missing', tmp=tmp_path)
    try:
        code = cli_main(['train-config', *[a.format(**fill) for a in argv]])
    except SystemExit as e:  # refused while parsing
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err.startswith('timm-pf train-config: error: ' + message.format(**fill)), captured.err
    assert captured.err.count('\n') == 1
    assert not (tmp_path / 'missing').exists()
