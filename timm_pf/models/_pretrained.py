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
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ..version import __version__
from ._registry import is_pf_repo, pf_pretrained_tags

__all__ = [
    'WEIGHTS_NAME', 'CONFIG_NAME', 'PretrainedWeightsError', 'sha256_file', 'hub_unreachable', 'fetch_file',
    'download_weights', 'build_pf_model',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
_SHA256_RE = re.compile(r'[0-9a-f]{64}')


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights of a timm-pf tag cannot be fetched (not published, not cached offline, corrupted)."""


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


def _verify_cached_blob(path: str, where: str, offline: Optional[str]) -> None:
    """Compare a cached LFS file with the sha256 the Hub reported (the cache names the blob by it)."""
    blob = Path(path).resolve()
    if not _SHA256_RE.fullmatch(blob.name):
        return  # a cache without symlinks (e.g. some Windows setups) keeps no hash to compare with
    actual = sha256_file(blob)
    if actual != blob.name:
        blob.unlink()  # let the next attempt download it again
        again = f'fetch it again with network access ({offline} now)' if offline else 'try again'
        raise PretrainedWeightsError(
            f'{where}: the downloaded file is corrupted (sha256 {actual}, the Hub says {blob.name}). '
            f'It was removed from the cache; {again}.')


def _push_command(repo_id: str) -> str:
    """How weights get into ``repo_id``: ``push -m`` for a pretrained tag's repository, else ``push --repo-id``."""
    name = repo_id.split('/', 1)[-1]
    if name in pf_pretrained_tags():
        return f'`timm-pf convert` and `timm-pf push --model {name}`'
    return f'`timm-pf push <folder> --repo-id {repo_id}`'


def _transport_errors() -> Tuple[type, ...]:
    """Errors of the HTTP client ``huggingface_hub`` uses (httpx2 or httpx; requests' are OSErrors)."""
    return tuple(sys.modules[m].HTTPError for m in ('httpx2', 'httpx') if m in sys.modules)


def hub_unreachable() -> Optional[str]:
    """Why the Hub cannot be reached, when that is known at once: ``HF_HUB_OFFLINE``, or the endpoint's host
    refuses connections or does not resolve. None when it may be reachable (also behind a proxy, not probed)."""
    if hf_constants.is_offline_mode():
        return 'HF_HUB_OFFLINE is set'
    if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY',
                                        'all_proxy')):
        return None
    url = urlsplit(hf_constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == 'https' else 80)
        socket.create_connection((url.hostname, port), timeout=5).close()
    except ConnectionRefusedError:
        return f'{url.netloc} refuses connections'
    except socket.gaierror:
        return f'{url.hostname} does not resolve'
    except (OSError, ValueError):  # a timeout or the like: let the client try, with its retries
        return None
    return None


def fetch_file(hub_id: str, filename: str = WEIGHTS_NAME, cache_dir: Optional[Union[str, Path]] = None) -> str:
    """Local path of ``filename`` of ``hub_id`` (``org/name[@revision]``), downloaded if needed.

    When :func:`hub_unreachable` says the Hub cannot be reached, only the cache is read (no retries, no
    waiting). Raises :class:`PretrainedWeightsError` that names the missing piece and the way to get it, with
    the same wording for every file of a repository and every way of naming the model.
    """
    repo_id, revision = _split_hub_id(hub_id)
    name_tag = repo_id.split('/', 1)[-1]
    at_rev = f' at revision {revision!r}' if revision else ''
    where = f'pretrained weights of {name_tag} ({hf_constants.ENDPOINT}/{repo_id}{at_rev})'
    offline = hub_unreachable()
    try:
        path = hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline is not None,
            library_name='timm-pf', library_version=__version__,
        )
    except LocalEntryNotFoundError as e:
        cache = cache_dir or hf_constants.HF_HUB_CACHE
        rev_arg = f' --revision {revision}' if revision else ''
        raise PretrainedWeightsError(
            f'The {where} are not in the local cache ({cache}) and {offline or "the Hub cannot be reached"}. '
            f'Fetch them once with network access: `hf download {repo_id} {WEIGHTS_NAME} {CONFIG_NAME}{rev_arg}` '
            f'(or create the model online), or build the model without pretrained weights.') from e
    except RevisionNotFoundError as e:
        raise PretrainedWeightsError(
            f'Revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit of that repository '
            f'(`huggingface_hub.HfApi().list_repo_refs({repo_id!r})`).') from e
    except RepositoryNotFoundError as e:
        raise PretrainedWeightsError(
            f'No {where} are published: the Hub has no repository {repo_id} (or it is private and your token '
            f'cannot read it: set HF_TOKEN or run `hf auth login`). Publish them with {_push_command(repo_id)}, '
            f'or build the model without pretrained weights.') from e
    except RemoteEntryNotFoundError as e:
        only = ': timm-pf loads only safetensors weights' if filename == WEIGHTS_NAME else ''
        raise PretrainedWeightsError(
            f'{repo_id}{at_rev} has no {filename}{only}. Publish them with {_push_command(repo_id)}.') from e
    except (HfHubHTTPError, OSError, *_transport_errors()) as e:  # refused, cut off mid-download, timed out
        raise PretrainedWeightsError(
            f'The {where} could not be fetched: {type(e).__name__}: {e}. Try again later.') from e
    if filename == WEIGHTS_NAME:
        _verify_cached_blob(path, where, offline)
    return path


def download_weights(hub_id: str, cache_dir: Optional[Union[str, Path]] = None) -> str:
    """Local path of ``model.safetensors`` of ``hub_id`` (``org/name[@revision]``); see :func:`fetch_file`."""
    return fetch_file(hub_id, WEIGHTS_NAME, cache_dir=cache_dir)


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
    # a user's own file or state dict replaces our weights, as in timm; under an hf-hub source these keys come from
    # the repository's config.json, and timm itself ignores them there (it loads from the repository)
    own_weights = resolved.source != 'hf-hub' and (resolved.state_dict or resolved.file)
    ours = (pretrained and resolved.hf_hub_id and is_pf_repo(resolved.hf_hub_id)
            and resolved.source in (None, '', 'timm', 'hf-hub') and not own_weights)
    if ours:
        path = download_weights(resolved.hf_hub_id, cache_dir=cache_dir)
        pretrained_cfg_overlay = dict(pretrained_cfg_overlay or {}, source='', file=path, state_dict=None)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
        cache_dir=cache_dir, **kwargs)
    if ours:  # the weights came from the Hub repository; the local cache path is no part of the cfg
        model.pretrained_cfg.update(source=resolved.source, file=None)
    return model
