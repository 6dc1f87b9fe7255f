"""The client side of the Hub tests: ``huggingface_hub`` in a fresh process that talks to tests/hub_server.py.

``huggingface_hub`` reads its endpoint, cache and offline switch when it is imported, and the test process
imported it already (conftest imports timm), so the client side runs in worker processes started with those
variables set (:class:`HubClient`); the ``client_*`` functions run there.
"""
import contextlib
import hashlib
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Optional

import torch

import timm
from timm_pf.cli import main as cli_main

MAINTAINER_TOKEN = 'hf_test_maintainer'
OUTSIDER_TOKEN = 'hf_test_outsider'
TOKENS = {MAINTAINER_TOKEN: 'maintainer', OUTSIDER_TOKEN: 'outsider'}


def client_env(endpoint: str, home: Path) -> Dict[str, str]:
    """Environment of a client of the test Hub at ``endpoint``, with its cache under ``home``."""
    return {
        'HF_ENDPOINT': endpoint,
        'HF_HUB_DISABLE_XET': '1',
        'HF_TOKEN': MAINTAINER_TOKEN,
        'HF_HOME': str(home),
        'HF_HUB_CACHE': str(home / 'hub'),
        'HF_HUB_DISABLE_TELEMETRY': '1',
        'HF_HUB_DISABLE_PROGRESS_BARS': '1',
    }


def tensor_digests(state_dict: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 of every tensor's dtype, shape and bytes: equal digests mean bit-identical weights."""
    return {k: hashlib.sha256(f'{v.dtype}{tuple(v.shape)}'.encode() + v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in state_dict.items()}


def client_ready() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


@contextlib.contextmanager
def _environ(env: Dict[str, Optional[str]]):
    """``os.environ`` with ``env`` applied (None removes a variable), restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def client_cli(argv, env: Optional[Dict[str, Optional[str]]] = None):
    """Run ``timm-pf`` in the client process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with _environ(env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def client_pull(name: str, token: Optional[str] = MAINTAINER_TOKEN, cache_dir: Optional[str] = None):
    """``create_model(name, pretrained=True)``: ('ok', digests) or ('error', type name, message)."""
    with _environ({'HF_TOKEN': token}):
        try:
            model = timm.create_model(name, pretrained=True, cache_dir=cache_dir)
            return 'ok', tensor_digests(model.state_dict())
        except Exception as e:
            return 'error', type(e).__name__, str(e)


def client_upload_folder(repo_id: str, folder: str) -> None:
    """Publish a folder as is, with plain ``HfApi`` (no timm-pf checks)."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message='upload')


class HubClient:
    """One worker process whose ``huggingface_hub`` was imported with ``env`` set."""

    def __init__(self, env: Dict[str, str]):
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'))
            self.endpoint = self.pool.submit(client_ready).result()  # the worker starts with env
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def __call__(self, fn, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs).result()

    def close(self):
        self.pool.shutdown()
