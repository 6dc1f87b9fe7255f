import os

import pytest
import torch

torch.set_flush_denormal(True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import timm_pf  # noqa: E402  registers the models
from _official import fixtures_dir  # noqa: E402


@pytest.fixture(scope='session')
def official_fixtures_dir():
    return fixtures_dir()


@pytest.fixture(autouse=True, scope='session')
def _eager_dynamic_convs(tmp_path_factory):
    """The suite checks the eager paths; tests of the compiled batch-1 kernel switch it on themselves (built
    once per session into a temporary folder)."""
    os.environ['TIMM_PF_CPU_KERNELS'] = 'off'
    os.environ['TIMM_PF_KERNEL_DIR'] = str(tmp_path_factory.mktemp('kernels'))
    yield
