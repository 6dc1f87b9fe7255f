"""Our models and their pretrained tags in timm's registry: which architectures are ours, which tags have a
repository in :data:`~timm_pf.models._cfg.HF_HUB_ORG`, and ``'model'`` / ``'model.tag'`` -> ``'model.tag'``."""
import difflib
from typing import List, Optional

import timm
from timm.models import get_arch_pretrained_cfgs, model_entrypoint, split_model_name_tag

from ._cfg import HF_HUB_ORG

__all__ = [
    'UnknownTagError', 'pf_model_names', 'pf_pretrained_tags', 'resolve_name_tag', 'is_pf_repo', 'did_you_mean',
]


class UnknownTagError(ValueError):
    """A name that is not one of our models, or a tag it does not have (the message lists what exists)."""


def did_you_mean(name: str, candidates: Optional[List[str]] = None) -> str:
    """`` (did you mean a, b?)`` with the names of ``candidates`` (default: every timm model) closest to
    ``name``, or an empty string when none is close."""
    close = difflib.get_close_matches(name, timm.list_models() if candidates is None else candidates, n=3, cutoff=0.6)
    return f' (did you mean {", ".join(close)}?)' if close else ''


def pf_model_names() -> List[str]:
    """Every architecture registered by a ``timm_pf`` module, sorted."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('timm_pf.'))


def pf_pretrained_tags(model_names: Optional[List[str]] = None) -> List[str]:
    """``'model.tag'`` of every pretrained tag of our models whose weights live in :data:`HF_HUB_ORG`."""
    tags = []
    for arch in model_names if model_names is not None else pf_model_names():
        for name_tag, cfg in get_arch_pretrained_cfgs(arch).items():
            if cfg.hf_hub_id and is_pf_repo(cfg.hf_hub_id):
                tags.append(name_tag)
    return tags


def resolve_name_tag(name: str) -> str:
    """``'model'`` or ``'model.tag'`` of one of our models -> ``'model.tag'`` (the default tag if none given)."""
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch) or not model_entrypoint(arch).__module__.startswith('timm_pf.'):
        raise UnknownTagError(f'{arch!r} is not a timm-pf model{did_you_mean(arch, pf_model_names())}')
    tags = [split_model_name_tag(n)[1] for n in pf_pretrained_tags([arch])]
    if not tags and model_entrypoint(arch).__module__.endswith('.replace'):
        raise UnknownTagError(
            f'{arch} is the training form of Replacement Learning, which has no pretrained tag: load its weights '
            f'into timm.create_model({arch!r}, ...), turn it into its plain model with '
            f'timm_pf.replacement.finalize(model), save that with timm.models.save_for_hf(model, folder, '
            f'safe_serialization=True) and push the folder with `timm-pf push FOLDER --repo-id ORG/NAME`.')
    if not tags:
        raise UnknownTagError(f'{arch} has no pretrained tag with a {HF_HUB_ORG} Hub repository: weights of it go to '
                              f'a repository of your own (save them with timm.models.save_for_hf(model, folder, '
                              f'safe_serialization=True), then `timm-pf push FOLDER --repo-id ORG/NAME`).')
    if not tag:
        tag = tags[0]
    if tag not in tags:
        raise UnknownTagError(f'{arch} has no pretrained tag {tag!r}; its tags are: {", ".join(tags)}.')
    return f'{arch}.{tag}'


def is_pf_repo(hub_id: str) -> bool:
    """Whether a Hub id (``org/name[@revision]``) is a repository of :data:`HF_HUB_ORG`."""
    return hub_id.split('@')[0].startswith(f'{HF_HUB_ORG}/')
