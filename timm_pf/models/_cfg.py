"""Pretrained-config helpers shared by every model family.

All converted or trained weights live under one Hugging Face Hub organisation, set here only.
"""
from typing import Any, Dict

from timm.models import generate_default_cfgs

HF_HUB_ORG = 'timm-pf'

#: Pretrained-cfg entries of the models of "Learning Features with Parameter-Free Layers" (ResNet, ViT, PiT).
PF_LAYERS_PAPER = dict(
    license='apache-2.0',
    paper_ids='arXiv:2202.02777',
    paper_name='Learning Features with Parameter-Free Layers',
    origin_url='https://github.com/naver-ai/PfLayer',
)


def hub_repo_id(name_tag: str) -> str:
    """Hub repository of a pretrained tag, e.g. ``'ours_r50_max.pf_in1k'`` -> ``'timm-pf/ours_r50_max.pf_in1k'``."""
    return f'{HF_HUB_ORG}/{name_tag}'


def generate_pf_cfgs(cfgs: Dict[str, Dict[str, Any]]):
    """``generate_default_cfgs`` with every tag pointed at its repository in :data:`HF_HUB_ORG`.

    Keys must be ``'model_name.tag'``; every tag gets ``hf_hub_id`` so ``pretrained=True`` loads
    ``model.safetensors`` through timm's own loader.
    """
    filled = {}
    for name_tag, cfg in cfgs.items():
        if '.' not in name_tag:
            raise ValueError(f'pretrained cfg key {name_tag!r} must be "model_name.tag"')
        filled[name_tag] = {**cfg, 'hf_hub_id': hub_repo_id(name_tag)}
    return generate_default_cfgs(filled)
