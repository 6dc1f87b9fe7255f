"""Pretrained weights of our models: fetched from our Hub organisation by our model builders.

Every pretrained tag of our models lives in its own repository of :data:`~timm_pf.models._cfg.HF_HUB_ORG`
(``timm-pf/<model>.<tag>``) holding ``model.safetensors`` + ``config.json`` in timm's layout.
:func:`build_pf_model` is timm's ``build_model_with_cfg`` for our families: for weights in one of our
repositories (``name``, ``name.tag`` or ``hf-hub:timm-pf/<model>.<tag>[@revision]``) it downloads
``model.safetensors`` itself (:func:`download_weights`: safetensors only, checked against the sha256 the Hub
recorded, named errors for what is missing) and hands the file to timm's own ``load_pretrained`` through the
public ``pretrained_cfg_overlay``, which then adapts ``in_chans`` / ``num_classes`` as for timm's models.
Weights anywhere else keep timm's own loading.
"""
import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import timm
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, model_entrypoint, resolve_pretrained_cfg
from torch import nn

from ..version import __version__
from ._cfg import HF_HUB_ORG

__all__ = [
    'WEIGHTS_NAME', 'PretrainedWeightsError', 'pf_model_names', 'pf_pretrained_tags', 'is_pf_repo', 'sha256_file',
    'download_weights', 'build_pf_model',
]

WEIGHTS_NAME = 'model.safetensors'
_SHA256_RE = re.compile(r'[0-9a-f]{64}')


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights of a timm-pf tag cannot be fetched (not published, not cached offline, corrupted)."""


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


def is_pf_repo(hub_id: str) -> bool:
    """Whether a Hub id (``org/name[@revision]``) is a repository of :data:`HF_HUB_ORG`."""
    return hub_id.startswith(f'{HF_HUB_ORG}/')


def _split_hub_id(hub_id: str):
    """``'org/name@revision'`` -> ``('org/name', 'revision')`` (revision None when not given)."""
    repo_id, _, revision = hub_id.partition('@')
    return repo_id, revision or None


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_cached_blob(path: str, where: str) -> None:
    """Compare a cached LFS file with the sha256 the Hub reported (the cache names the blob by it)."""
    blob = Path(path).resolve()
    if not _SHA256_RE.fullmatch(blob.name):
        return  # a cache without symlinks (e.g. some Windows setups) keeps no hash to compare with
    actual = sha256_file(blob)
    if actual != blob.name:
        blob.unlink()  # let the next attempt download it again
        raise PretrainedWeightsError(
            f'{where}: the downloaded file is corrupted (sha256 {actual}, the Hub says {blob.name}). '
            f'It was removed from the cache; try again.')


def _push_command(repo_id: str) -> str:
    """How weights get into ``repo_id``: ``push -m`` for a pretrained tag's repository, else ``push --repo-id``."""
    name = repo_id.split('/', 1)[-1]
    if name in pf_pretrained_tags():
        return f'`timm-pf convert` and `timm-pf push --model {name}`'
    return f'`timm-pf push <folder> --repo-id {repo_id}`'


def download_weights(hub_id: str, cache_dir: Optional[Union[str, Path]] = None) -> str:
    """Local path of ``model.safetensors`` of ``hub_id`` (``org/name[@revision]``), downloaded if needed.

    Raises :class:`PretrainedWeightsError` that names the missing piece and the way to get it.
    """
    repo_id, revision = _split_hub_id(hub_id)
    name_tag = repo_id.split('/', 1)[-1]
    at_rev = f' at revision {revision!r}' if revision else ''
    where = f'pretrained weights of {name_tag} ({hf_constants.ENDPOINT}/{repo_id}, {WEIGHTS_NAME}{at_rev})'
    try:
        path = hf_hub_download(
            repo_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
            library_name='timm-pf', library_version=__version__,
        )
    except LocalEntryNotFoundError as e:
        cache = cache_dir or hf_constants.HF_HUB_CACHE
        reason = 'HF_HUB_OFFLINE is set' if hf_constants.HF_HUB_OFFLINE else 'the Hub cannot be reached'
        rev_arg = f' --revision {revision}' if revision else ''
        raise PretrainedWeightsError(
            f'The {where} are not in the local cache ({cache}) and {reason}. Fetch them once with network '
            f'access: `hf download {repo_id} {WEIGHTS_NAME}{rev_arg}` (or create the model online), '
            f'or use pretrained=False.') from e
    except RevisionNotFoundError as e:
        raise PretrainedWeightsError(
            f'Revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit of that repository '
            f'(`huggingface_hub.HfApi().list_repo_refs({repo_id!r})`).') from e
    except RepositoryNotFoundError as e:
        raise PretrainedWeightsError(
            f'No {where} are published: the Hub has no repository {repo_id} (or it is private and your token '
            f'cannot read it: set HF_TOKEN or run `hf auth login`). Publish them with {_push_command(repo_id)}, '
            f'or use pretrained=False.') from e
    except RemoteEntryNotFoundError as e:
        raise PretrainedWeightsError(
            f'{repo_id}{at_rev} has no {WEIGHTS_NAME}: timm-pf loads only safetensors weights. '
            f'Publish them with {_push_command(repo_id)}.') from e
    _verify_cached_blob(path, where)
    return path


def build_pf_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg``, with the weights of our repositories fetched by :func:`download_weights`.

    The verified local file goes to timm as ``pretrained_cfg_overlay=dict(file=...)``, so timm's
    ``load_pretrained`` runs the family's filter and adapts the first conv and the classifier. The model's
    pretrained cfg keeps the Hub source it was resolved from.
    """
    resolved = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    ours = (pretrained and resolved.hf_hub_id and is_pf_repo(resolved.hf_hub_id)
            and resolved.source in (None, '', 'timm', 'hf-hub') and not resolved.state_dict and not resolved.file)
    if ours:
        path = download_weights(resolved.hf_hub_id, cache_dir=cache_dir)
        pretrained_cfg_overlay = dict(pretrained_cfg_overlay or {}, source='', file=path)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
        cache_dir=cache_dir, **kwargs)
    if ours:  # the weights came from the Hub repository; the local cache path is no part of the cfg
        model.pretrained_cfg.update(source=resolved.source, file=None)
    return model
