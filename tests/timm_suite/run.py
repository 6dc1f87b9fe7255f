"""Run timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) on our registered variants.

    python tests/timm_suite/run.py [--variants a,b] [--sdist-dir DIR] [-- extra pytest args]

1. Downloads the sdist of the installed (pinned) timm version from the package index with pip, once per
   ``--sdist-dir``, and unpacks its ``tests/`` (nothing of timm is committed here).
2. Starts the test Hub (``tests/hub_server.py``) and fills it with random weights (``model.safetensors`` +
   ``config.json`` written by timm's ``save_for_hf``) for every pretrained tag the selected tests load: our
   tags (repositories ``timm-pf/<model>.<tag>``) and the timm tags the ``*_replace`` variants start from.
3. Runs ``pytest -p timm_pf`` on timm's ``test_models.py`` plus ``replace_pretrained.py`` (timm's
   ``test_model_load_pretrained`` for the ``*_replace`` variants, which have no tags of their own) with
   ``HF_ENDPOINT`` at that Hub, keeping only tests of our variants (``plugin.py``); the exit code is pytest's.

Every test timm applies to a model runs on every variant, with timm's own size limits and exclusions only.
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(HERE), str(TESTS)]

def our_variants() -> List[str]:
    """Every variant registered by the model families (``timm_pf.models.*``), sorted. The ``rba`` architecture
    is not a variant: it rebuilds a saved block approximation of a base model named in its config (a required
    ``base_model`` argument), so nothing of it can be built from its name alone."""
    import timm
    import timm_pf  # noqa: F401
    return sorted(n for n in timm.list_models()
                  if timm.models.model_entrypoint(n).__module__.startswith('timm_pf.models.')
                  and timm.models.model_entrypoint(n).__module__ != 'timm_pf.models.rba')


def fetch_timm_tests(version: str, sdist_dir: Path) -> Path:
    """``tests/`` of timm ``version``'s sdist, downloaded by pip into ``sdist_dir`` and unpacked there once."""
    tests = sdist_dir / f'timm-{version}' / 'tests'
    if (tests / 'test_models.py').is_file():
        return tests
    sdist_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
                    f'timm=={version}', '-d', str(sdist_dir)], check=True)
    archive = sdist_dir / f'timm-{version}.tar.gz'
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
        tar.extractall(sdist_dir, members=members, filter='data')
    return tests


def weights_to_serve(variants: Sequence[str]) -> Dict[str, str]:
    """Hub repository -> the model (name or ``name.tag``) whose random weights it holds."""
    import timm
    from timm_pf.models.replace import PLAIN_MODELS
    repos = {}
    for name_tag in timm.list_models(pretrained=True):
        if name_tag.split('.')[0] in variants:
            repos[timm.models.get_pretrained_cfg(name_tag).hf_hub_id] = name_tag
    for variant, plain in PLAIN_MODELS.items():
        if variant in variants:
            repos[timm.models.get_pretrained_cfg(plain).hf_hub_id] = plain
    return repos


def client_fill(repos: Dict[str, str], work: str) -> None:
    """Runs in a Hub client process: upload random weights of each model to its repository."""
    import shutil
    import timm
    import timm_pf  # noqa: F401
    from huggingface_hub import HfApi
    from timm.models import save_for_hf
    api = HfApi()
    for repo_id, name in repos.items():
        folder = Path(work) / repo_id.replace('/', '--')
        save_for_hf(timm.create_model(name), str(folder), safe_serialization=True)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message='random weights of the right shapes')
        shutil.rmtree(folder)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', help='comma-separated subset of our variants (default: all)')
    parser.add_argument('--sdist-dir', type=Path, default=Path(tempfile.gettempdir()) / 'timm-pf-timm-sdist',
                        help='where the timm sdist is downloaded and unpacked (reused when present)')
    parser.add_argument('pytest_args', nargs='*', help='extra pytest arguments (after --)')
    args = parser.parse_args(argv)

    import timm
    from _hub_client import TOKENS, HubClient, client_env
    from hub_server import serve_hub

    variants = our_variants()
    if args.variants:
        unknown = sorted(set(args.variants.split(',')) - set(variants))
        if unknown:
            parser.error(f'not variants of ours: {", ".join(unknown)}')
        variants = args.variants.split(',')
    timm_tests = fetch_timm_tests(timm.__version__, args.sdist_dir)

    with tempfile.TemporaryDirectory(prefix='timm-pf-suite-') as work, \
            serve_hub(TOKENS, {'timm-pf': {'maintainer'}, 'timm': {'maintainer'}}) as (endpoint, _):
        env = client_env(endpoint, Path(work) / 'hf_home')
        repos = weights_to_serve(variants)
        print(f'timm {timm.__version__} tests on {len(variants)} variants; filling the test Hub with '
              f'{len(repos)} repositories of random weights', flush=True)
        client = HubClient(env)
        try:
            client(client_fill, repos, work)
        finally:
            client.close()
        env.pop('HF_TOKEN')  # the repositories are public: download as an anonymous user
        env.update(TIMM_PF_SUITE_VARIANTS=','.join(variants),
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')]))
        command = [sys.executable, '-m', 'pytest', '-p', 'timm_pf', '-p', 'plugin', '-p', 'no:cacheprovider',
                   '--rootdir', str(timm_tests), str(timm_tests / 'test_models.py'),
                   str(HERE / 'replace_pretrained.py'), '-q', '-rfEs', *args.pytest_args]
        print('+', ' '.join(command), flush=True)
        return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == '__main__':
    sys.exit(main())
