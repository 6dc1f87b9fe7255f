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
