"""End-to-end training with timm's own train.py / validate.py on scikit-learn's digits (CPU).

Runs the README's quickstart: export digits, train the scaled-down ours_r50_hybrid of
train_configs/quickstart/digits.yaml, validate the checkpoint with validate.py, convert it with
``timm-pf convert``; and the same training with ``torchrun --nproc_per_node=2`` (gloo).

timm's scripts are not part of the timm wheel: set TIMM_PF_TRAIN_SCRIPT to the train.py of a checkout of
huggingface/pytorch-image-models (validate.py is taken from the same folder). Without it these tests skip.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / 'train_configs' / 'quickstart' / 'digits.yaml'
TRAIN_SCRIPT = os.environ.get('TIMM_PF_TRAIN_SCRIPT')
MODEL_KWARGS = ['layers=[1,1,1,1]', 'channels=[16,32,64,128]', 'stem_width=16']

pytestmark = pytest.mark.skipif(
    not TRAIN_SCRIPT or not Path(TRAIN_SCRIPT).is_file(),
    reason="set TIMM_PF_TRAIN_SCRIPT to timm's train.py (from huggingface/pytorch-image-models) to run "
           "the end-to-end training tests")


def _run(cmd, cwd, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp('digits')
    _run([sys.executable, '-m', 'timm_pf', 'digits', str(root)], cwd=REPO)
    return root


def _validate(checkpoint: Path, digits: Path, workdir: Path) -> dict:
    results = workdir / 'results.json'
    validate = Path(TRAIN_SCRIPT).with_name('validate.py')
    _run([sys.executable, '-m', 'timm_pf', 'run', str(validate), '--data-dir', str(digits),
          '--model', 'ours_r50_hybrid', '--model-kwargs', *MODEL_KWARGS, '--num-classes', '10',
          '--img-size', '32', '--device', 'cpu', '--no-prefetcher', '--workers', '1', '--batch-size', '128',
          '--checkpoint', str(checkpoint), '--results-file', str(results), '--results-format', 'json'],
         cwd=workdir)
    return json.loads(results.read_text())


def _train(cmd_prefix, digits: Path, workdir: Path, extra=()) -> Path:
    _run([*cmd_prefix, TRAIN_SCRIPT, '--config', str(CONFIG), '--data-dir', str(digits),
          '--output', str(workdir), '--experiment', 'run', *extra], cwd=workdir)
    checkpoint = workdir / 'run' / 'model_best.pth.tar'
    assert checkpoint.is_file(), f'train.py wrote no checkpoint: {sorted(p.name for p in (workdir / "run").iterdir())}'
    return checkpoint


def test_quickstart_trains_validates_and_converts(digits, tmp_path):
    checkpoint = _train([sys.executable], digits, tmp_path)
    results = _validate(checkpoint, digits, tmp_path)
    assert results['top1'] >= 90.0, f'quickstart reached only {results["top1"]:.1f}% top-1 (chance is 10%)'

    out = tmp_path / 'converted'
    _run([sys.executable, '-m', 'timm_pf', 'convert', str(checkpoint), '--model', 'ours_r50_hybrid',
          '--model-kwargs', *MODEL_KWARGS, '--num-classes', '10', '--output', str(out)], cwd=tmp_path)
    converted = load_file(str(out / 'model.safetensors'))
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py also saves its arguments
        trained = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    assert converted.keys() == trained.keys()
    assert all(torch.equal(converted[k], trained[k]) for k in trained)


def test_quickstart_with_torchrun_two_processes(digits, tmp_path):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517']
    # timm picks the gloo backend for CPU devices by itself
    checkpoint = _train(torchrun, digits, tmp_path, extra=['--batch-size', '32'])
    results = _validate(checkpoint, digits, tmp_path)
    assert results['top1'] >= 90.0, f'two-process run reached only {results["top1"]:.1f}% top-1'
