"""timm's conventions in every registered variant: device / dtype at construction, one builder, one cfg style."""
import pytest
import torch

import timm
import timm_pf  # noqa: F401
from timm_pf.models._registry import pf_model_names

# the variants of the model families (the 'rba' architecture wraps a base model given at run time)
VARIANTS = [n for n in pf_model_names() if timm.models.model_entrypoint(n).__module__.startswith('timm_pf.models.')]


def test_every_family_registers_variants():
    families = {timm.models.model_entrypoint(n).__module__.rsplit('.', 1)[-1] for n in VARIANTS}
    assert families == {'resnet_pf', 'vit_pf', 'pit_pf', 'parameternet', 'replace'}


@pytest.mark.parametrize('name', VARIANTS)
def test_device_and_dtype_at_construction(name):
    """``device='meta'`` allocates nothing, ``to_empty`` + a strict load fills it; ``dtype`` sets every parameter's."""
    bf16 = timm.create_model(name, dtype=torch.bfloat16)
    wrong_dtype = [k for k, p in bf16.named_parameters() if p.dtype != torch.bfloat16]
    assert not wrong_dtype, f'{name}: parameters not in bfloat16: {wrong_dtype[:5]}'

    meta = timm.create_model(name, device='meta')
    off_meta = [k for k, t in [*meta.named_parameters(), *meta.named_buffers()] if t.device.type != 'meta']
    assert not off_meta, f'{name}: tensors created outside the meta device: {off_meta[:5]}'
    meta.to_empty(device='cpu')
    meta.load_state_dict(bf16.state_dict(), strict=True)
    assert all(p.device.type == 'cpu' and p.dtype == torch.float32 for p in meta.parameters())
    first = next(iter(bf16.state_dict()))
    assert torch.equal(meta.state_dict()[first].to(torch.bfloat16), bf16.state_dict()[first])
