"""The wheel is the product: built from the sdist, installed into a fresh virtual environment and used from a
folder outside the repository, it does what the README shows.

The fresh environment sees this environment's already installed dependencies through a ``.pth`` file (a path
line there does not process the ``.pth`` files of the added folder, so the editable install of timm_pf is not
active in it), and pip installs the wheel with the pinned constraints and no index: every dependency must
resolve as already satisfied, nothing is downloaded.
"""
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest
import timm
from safetensors.torch import save_file
from torch.utils import cpp_extension

from timm_pf._data import HUB_CARDS, TRAIN_CONFIGS, data_dir

REPO = Path(__file__).resolve().parents[1]
CARD = 'pit_ti_maxpool.in1k'  # the smallest tagged model: a few seconds to measure its card
TOOLCHAIN = shutil.which(os.environ.get('CXX', 'c++')) is not None and cpp_extension.is_ninja_available()


def _run(cmd, cwd: Path, env=None, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        _ok(out)
    return out


def _package_files() -> dict:
    """Wheel path -> source file of everything the wheel must hold, read from the repository."""
    files = {p.relative_to(REPO).as_posix(): p for p in (REPO / 'timm_pf').rglob('*.py')
             if '__pycache__' not in p.parts}
    files.update({p.relative_to(REPO).as_posix(): p for p in (REPO / 'timm_pf' / 'layers' / 'csrc').iterdir()})
    for name in (HUB_CARDS, TRAIN_CONFIGS):
        files.update({f'timm_pf/_data/{name}/{p.relative_to(REPO / name).as_posix()}': p
                      for p in (REPO / name).rglob('*') if p.is_file()})
    return files


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """The wheel, built as ``python -m build`` does: an sdist of the repository, then a wheel of the unpacked
    sdist in a folder of its own."""
    tmp = tmp_path_factory.mktemp('build')
    code = 'import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))'
    sdist = tmp / _run([sys.executable, '-c', code, tmp], cwd=REPO).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / 'src', **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    source, = (tmp / 'src').iterdir()
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', tmp / 'dist',
          source], cwd=tmp)
    built, = (tmp / 'dist').glob('timm_pf-*.whl')
    return built


def test_the_wheel_holds_the_package_its_data_and_its_cpp_source(wheel):
    expected = _package_files()
    with zipfile.ZipFile(wheel) as archive:
        held = {n for n in archive.namelist() if '.dist-info/' not in n}
        assert held == set(expected), (f'missing: {sorted(set(expected) - held)}\n'
                                       f'unexpected: {sorted(held - set(expected))}')
        changed = [n for n in sorted(held) if archive.read(n) != expected[n].read_bytes()]
        entry_points = next(archive.read(n).decode() for n in archive.namelist() if n.endswith('/entry_points.txt'))
        licenses = [n for n in archive.namelist() if '.dist-info/licenses/' in n]
        assert [archive.read(n) for n in licenses] == [(REPO / 'LICENSE').read_bytes()], licenses
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith('.dist-info/METADATA'))
    assert not changed, f'differ from the repository: {changed}'
    assert 'License-Expression: Apache-2.0' in metadata and 'License-File: LICENSE' in metadata
    assert 'Apache License' in (REPO / 'LICENSE').read_text()
    assert 'timm-pf = timm_pf.cli:main' in entry_points


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed, and the environment its commands run with."""
    root = tmp_path_factory.mktemp('venv')
    venv.create(root / 'venv', with_pip=False)
    python = root / 'venv' / 'bin' / 'python'
    purelib = Path(_run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        cwd=root).stdout.strip())
    (purelib / '_test_dependencies.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'TIMM_PF_CPU_KERNELS')}
    env.update(TIMM_PF_KERNEL_DIR=str(root / 'kernels'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    out = _run([python, '-m', 'pip', 'install', '--no-index', '-c', REPO / '.ci' / 'constraints.txt', wheel],
               cwd=root, env=env)
    assert 'Successfully installed timm-pf' in out.stdout, out.stdout
    work = root / 'work'
    work.mkdir()
    return dict(python=python, timm_pf=root / 'venv' / 'bin' / 'timm-pf', site=purelib, env=env, work=work)


@pytest.fixture(scope='module')
def runs(installed) -> Dict[str, List[subprocess.CompletedProcess]]:
    """The README's commands, run with the installed ``timm-pf`` from the work folder. Each sequence runs in order
    (later commands read what earlier ones wrote); two sequences run at a time, the longest first."""
    work, timm_pf = installed['work'], installed['timm_pf']
    save_file(timm.create_model(CARD.split('.')[0]).state_dict(), work / 'weights.safetensors')
    where = ('import importlib.metadata as m, timm_pf, timm_pf.tools.cards as c, timm_pf.tools.recipes as r; '
             'print(timm_pf.__file__, c.CARDS_DIR, r.CONFIG_DIR, m.distribution("timm-pf").locate_file(""), sep="\\n")')
    sequences = {
        'bench': [[timm_pf, 'bench', '--models', 'ghostnet_dyn:ghostnet_100', '--img-size', '32', '--batch-sizes', '1',
                   '--repeats', '2', '--memory', 'off', '--no-progress']] if TOOLCHAIN else [],
        'rba': [[timm_pf, 'digits', 'digits', '--img-size', '16'],
                [timm_pf, 'rba', 'analyze', '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=16',
                 'patch_size=8', 'depth=4', 'embed_dim=32', 'num_heads=2', 'num_classes=10', '--data-dir', 'digits',
                 '--num-images', '32', '--batch-size', '32', '--no-plot', '--output', 'rba']],
        'push': [[timm_pf, 'convert', 'weights.safetensors', '--model', CARD, '-o', 'converted'],
                 [timm_pf, 'push', 'converted', '--model', CARD, '--dry-run']],
        'card': [[timm_pf, 'card', CARD], [timm_pf, 'card', CARD, '--check']],
        'train-config': [[timm_pf, 'train-config', 'ours_r50_hybrid', 'quickstart/digits'],
                         [timm_pf, 'train-config', '--list']],
        'deform-points': [[timm_pf, 'deform-points', '--img-size', '64', '--init-std', '0.02',
                           '--output', 'points.png']],
        'where': [[installed['python'], '-c', where]],
    }

    def run(commands):
        return [_run(cmd, cwd=work, env=installed['env'], ok=False) for cmd in commands]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, commands) for name, commands in sequences.items()}
    return {name: future.result() for name, future in futures.items()}


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f'{" ".join(done.args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}'
    return done.stdout


def test_timm_pf_and_its_data_come_from_the_new_environment(installed, runs):
    paths = _ok(runs['where'][0]).split()
    assert [Path(p) for p in paths] == [installed['site'] / 'timm_pf' / '__init__.py',
                                        installed['site'] / 'timm_pf' / '_data' / HUB_CARDS,
                                        installed['site'] / 'timm_pf' / '_data' / TRAIN_CONFIGS,
                                        installed['site']]
    assert not (installed['site'] / 'timm_pf' / '_data' / HUB_CARDS).is_symlink()


def test_card_and_card_check(runs):
    printed, checked = runs['card']
    assert _ok(printed) == (REPO / 'hub_cards' / 'cards' / f'{CARD}.md').read_text(encoding='utf-8')
    _ok(checked)


def test_convert_then_push_dry_run_with_the_card(installed, runs):
    converted, pushed = runs['push']
    _ok(converted)
    assert {p.name for p in (installed['work'] / 'converted').iterdir()} == {'model.safetensors', 'config.json'}
    out = _ok(pushed)
    card_sha = hashlib.sha256((REPO / 'hub_cards' / 'cards' / f'{CARD}.md').read_bytes()).hexdigest()
    assert out.startswith(f'dry run: would upload {CARD} to ') and f'sha256 {card_sha}' in out, out


@pytest.mark.skipif(not TOOLCHAIN, reason='no C++ compiler or ninja: the kernel cannot be built here')
def test_bench_builds_the_cpu_kernel_from_the_shipped_source(installed, runs):
    out = _ok(runs['bench'][0])
    assert 'Dynamic convs at batch 1: fused CPU kernel' in out and '\nghostnet_dyn  ghostnet_100 ' in out, out
    assert list(Path(installed['env']['TIMM_PF_KERNEL_DIR']).rglob('*.so'))


def test_digits_then_rba_analyze(installed, runs):
    digits, analyzed = runs['rba']
    assert _ok(digits).startswith('wrote 1437 train and 360 validation images')
    assert '32 images of train' in _ok(analyzed)
    assert (installed['work'] / 'rba' / 'rba_metrics.json').is_file()


def test_deform_points(installed, runs):
    _ok(runs['deform-points'][0])
    assert (installed['work'] / 'points.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_train_config(runs):
    printed, listed = runs['train-config']
    assert _ok(printed) == (REPO / 'train_configs' / 'quickstart' / 'digits.yaml').read_text(encoding='utf-8')
    assert 'pflayer_standard, pflayer_improved, quickstart/digits' in _ok(listed)


def test_checkout_data_is_the_top_level_folders():
    """In a checkout timm_pf/_data links to hub_cards/ and train_configs/ at the top of the repository."""
    for name in (HUB_CARDS, TRAIN_CONFIGS):
        assert data_dir(name).samefile(REPO / name)
    with pytest.raises(ValueError, match="no data folder 'cards'"):
        data_dir('cards')


def test_every_extra_the_docs_and_messages_name_is_declared():
    """``pip install 'timm-pf[name]'`` in the README or in an error message must name an extra of pyproject.toml."""
    import re
    tomllib = pytest.importorskip('tomllib', reason='Python 3.11+ reads pyproject.toml with tomllib')
    extras = set(tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies'])
    texts = [REPO / 'README.md', *(REPO / 'timm_pf').rglob('*.py')]
    named = {m for p in texts for m in re.findall(r"timm-pf\[([\w,]+)\]", p.read_text(encoding='utf-8'))}
    named = {e for m in named for e in m.split(',')}
    assert {'digits', 'onnx', 'plot', 'kernels'} <= named
    assert named <= extras, named - extras
