"""Golden outputs of the authors' code (see ../shared/fixtures/official/README.md).

The fixtures are found at ``$TIMM_PF_FIXTURES`` or ``<repo>/../shared/fixtures/official``. When they are
missing the tests that need them fail (they never skip): a green run must mean the models were checked.
"""
import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import safe_open
from timm.layers import Attention
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get('TIMM_PF_FIXTURES')
    return Path(env) if env else REPO_ROOT.parent / 'shared' / 'fixtures' / 'official'


def load_official_fixture(name: str) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict]:
    """Rebuild the official-format state dict of fixture ``name``; returns (state_dict, input, logits, meta)."""
    path = fixtures_dir() / f'{name}.safetensors'
    if not path.is_file():
        raise FileNotFoundError(
            f'official fixture {path} is missing: put shared/fixtures beside the repo or set TIMM_PF_FIXTURES')
    with safe_open(str(path), 'pt') as f:
        meta = json.loads(f.metadata()['fixture'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state_dict = {k[len('state.'):]: v for k, v in tensors.items() if k.startswith('state.')}
    for key, spec in meta['generated'].items():
        gen = torch.Generator().manual_seed(spec['seed'])
        t = torch.randn(spec['shape'], generator=gen, dtype=torch.float32) * spec['std']
        rebuilt_sum = t.double().sum().item()
        if abs(rebuilt_sum - spec['sum']) > 1e-6 * max(1.0, spec['abs_sum']):
            raise RuntimeError(f'{name}: rebuilt tensor {key} has sum {rebuilt_sum}, fixture says {spec["sum"]}')
        state_dict[key] = t
    return state_dict, tensors['input'], tensors['logits'], meta


def unfused_attention(model: nn.Module) -> nn.Module:
    """Turn off timm's fused attention: the official fixtures were produced with the non-fused path."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    return model
