"""The README's commands run as written.

Each README code block marked ``<!-- readme-test -->`` runs in a fresh folder: ```python blocks with this
interpreter, ```bash blocks with ``timm-pf`` and ``python`` resolved to this interpreter (a PATH shim), with
this checkout on ``PYTHONPATH``, one thread and no network. ``<!-- readme-test hub -->`` blocks run against
the test Hub (tests/hub_server.py): the models they create with ``pretrained=True`` are published there first
(random weights), and the files they start from that a user brings (the authors' checkpoint, a ``train.py``
checkpoint) are put in place. ``<!-- readme-test slow -->`` blocks (the RBA worked example, minutes) run one
after another in one folder when ``TIMM_PF_README_SLOW=1``, with the ``<!-- readme-file: NAME -->`` blocks
saved as NAME; a ``<!-- readme-output -->`` block right after one is what it must print.
"""
import argparse
import difflib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

import timm
from _hub_client import TOKENS, client_env
from _official import load_official_fixture
from hub_server import serve_hub
from safetensors.torch import save_file
from timm_pf.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / 'README.md'
SLOW = os.environ.get('TIMM_PF_README_SLOW') == '1'

_MARKED = re.compile(r'^<!-- readme-(?P<mark>[^>]*?) -->\n```(?P<lang>\w*)\n(?P<text>.*?)^```$', re.M | re.S)


@dataclass
class Block:
    mark: str  # 'test', 'test hub', 'test slow', 'output' or 'file: NAME'
    lang: str
    text: str
    line: int
    output: Optional[str] = None  # the readme-output block that follows a test block

    @property
    def id(self) -> str:
        return f'line{self.line}-' + re.sub(r'\W+', '_', self.text.splitlines()[0])[:40]


def _readme_blocks() -> List[Block]:
    text = README.read_text()
    blocks = []
    for m in _MARKED.finditer(text):
        block = Block(m['mark'], m['lang'], m['text'], text.count('\n', 0, m.start()) + 1)
        if block.mark == 'output':
            assert blocks and blocks[-1].mark.startswith('test'), f'README line {block.line}: output of no command'
            blocks[-1].output = block.text
        else:
            blocks.append(block)
    return blocks


BLOCKS = _readme_blocks()
QUICK = [b for b in BLOCKS if b.mark in ('test', 'test hub')]
SLOW_BLOCKS = [b for b in BLOCKS if b.mark == 'test slow']
FILES = {b.mark[len('file: '):]: b.text for b in BLOCKS if b.mark.startswith('file: ')}


def test_every_marker_is_before_a_block_that_runs():
    text = README.read_text()
    markers = re.findall(r'^<!-- readme-([^>]*?) -->$', text, re.M)  # a marker is a line of its own
    assert len(markers) == len(BLOCKS) + sum(b.output is not None for b in BLOCKS), \
        'a <!-- readme-... --> marker is not directly followed by a ``` code block'
    for b in BLOCKS:
        assert b.mark in ('test', 'test hub', 'test slow') or b.mark.startswith('file: '), f'line {b.line}: {b.mark}'
        assert b.lang in ('bash', 'python'), f'README line {b.line}: a marked block must be ```bash or ```python'
    assert QUICK and SLOW_BLOCKS


def test_the_help_of_every_command_is_run():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    run = '\n'.join(b.text for b in QUICK)
    missing = [c for c in commands if not re.search(rf'^timm-pf {re.escape(c)} --help\b', run, re.M)]
    assert 'timm-pf --help' in run and not missing, f'README runs no `timm-pf <command> --help` for {missing}'


# ---------------------------------------------------------------------------------------------------- running
def _env(folder: Path) -> Dict[str, str]:
    """This interpreter as ``python`` and ``timm-pf``, this checkout first on the path, one thread, offline."""
    shim = folder / '.shim'
    shim.mkdir()
    for name, args in (('python', '"$@"'), ('timm-pf', '-m timm_pf "$@"')):
        (shim / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {args}\n')
        (shim / name).chmod(0o755)
    python_path = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get('PYTHONPATH'))))
    return dict(os.environ, PATH=f'{shim}{os.pathsep}{os.environ["PATH"]}', PYTHONPATH=python_path,
                OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')


def _run(block: Block, folder: Path, env: Dict[str, str], timeout: float) -> None:
    if block.lang == 'python':
        script = folder / f'readme_line{block.line}.py'
        script.write_text(block.text)
        argv = [sys.executable, str(script)]
    else:
        argv = ['bash', '-e', '-o', 'pipefail', '-c', block.text]
    result = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f'README line {block.line} exited {result.returncode}:\n{block.text}\n'
                                    f'--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}')
    if block.output is not None:
        diff = ''.join(difflib.unified_diff(block.output.splitlines(True), result.stdout.splitlines(True),
                                            'README', 'printed'))
        assert not diff, f'README line {block.line} printed other output than the README shows:\n{diff}'


# ----------------------------------------------------------------- what a user brings to the hub blocks
def _authors_checkpoint(path: Path) -> None:
    """The authors' R50-max checkpoint in their format, rebuilt from the official fixture."""
    torch.save(load_official_fixture('ours_r50_max')[0], path)


def _train_checkpoint(path: Path) -> None:
    """A timm train.py checkpoint (weights, EMA weights, args) of the model the README converts from one."""
    torch.manual_seed(0)
    state_dict = timm.create_model('ghostnet_dyn').state_dict()
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in state_dict.items()}
    torch.save({'epoch': 1, 'arch': 'ghostnet_dyn', 'state_dict': state_dict, 'state_dict_ema': ema,
                'args': argparse.Namespace(model='ghostnet_dyn')}, path)


BROUGHT = {'ResNet50_max.pth': _authors_checkpoint, 'output/train/last.pth.tar': _train_checkpoint}


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    with serve_hub(TOKENS, {'timm-pf': {'maintainer'}}) as (endpoint, _):
        yield client_env(endpoint, tmp_path_factory.mktemp('hf_home'))


def _publish(name: str, env: Dict[str, str], folder: Path) -> None:
    """Random weights of ``name``'s default tag pushed to its repository on the test Hub."""
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    name_tag = f'{cfg["architecture"]}.{cfg["tag"]}'
    weights = folder / f'{name_tag}.safetensors'
    save_file(timm.create_model(name_tag).state_dict(), str(weights))
    result = subprocess.run([sys.executable, '-m', 'timm_pf', 'push', str(weights), '--model', name_tag], env=env,
                            cwd=folder, capture_output=True, text=True, timeout=300)
    weights.unlink()
    assert result.returncode == 0, f'publishing {name_tag} on the test Hub failed:\n{result.stderr}'


@pytest.mark.parametrize('block', QUICK, ids=[b.id for b in QUICK])
def test_quick_block_runs_as_written(block, request, tmp_path):
    env = _env(tmp_path)
    if block.mark == 'test hub':
        env.update(request.getfixturevalue('hub'))
        del env['HF_HUB_OFFLINE']
        for name in sorted(set(re.findall(r"create_model\('([\w.]+)', pretrained=True", block.text))):
            _publish(name, env, tmp_path)
        for rel, make in BROUGHT.items():
            if rel in block.text:
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                make(tmp_path / rel)
    _run(block, tmp_path, env, timeout=600)


@pytest.mark.skipif(not SLOW, reason='set TIMM_PF_README_SLOW=1 to run the README\'s worked examples (minutes)')
def test_slow_blocks_print_what_the_readme_shows(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    env = _env(tmp_path)
    for block in SLOW_BLOCKS:
        _run(block, tmp_path, env, timeout=1800)
