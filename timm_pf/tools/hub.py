"""Weights of timm-pf models on the Hugging Face Hub: fetch, convert, publish.

Fetching: every pretrained tag of our models lives in its own repository of :data:`HF_HUB_ORG`
(``timm-pf/<model>.<tag>``) and holds ``model.safetensors`` + ``config.json`` in timm's layout, so
``timm.create_model(name, pretrained=True)``, ``name.tag`` and ``hf-hub:timm-pf/<model>.<tag>[@revision]``
all load through our model builders (:mod:`timm_pf.models._pretrained`), which fetch nothing but
safetensors, check the file against the sha256 the Hub recorded for it, and turn "not cached while
offline", "no such repository/revision/file" into errors that say what is missing and how to get it.

Converting and publishing: :func:`convert_checkpoint` turns an authors' checkpoint, a timm ``train.py``
checkpoint or a safetensors file into a folder made by timm's ``save_for_hf`` after passing the family's
``checkpoint_filter_fn`` and a strict load. :func:`prepare_push` stages such a folder for the repository of
one of our pretrained tags, :func:`prepare_folder_push` stages any folder in that layout (an RBA model from
``timm_pf.rba.save_rba``, a model finalised by ``timm_pf.replacement.finalize``, ...) for an explicit
repository; both check that the weights load strictly and add a model card, and :func:`push_to_hub` uploads
the staged files through ``huggingface_hub.HfApi``.
"""
import argparse
import inspect
import json
import os
import shutil
import tempfile
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

import timm
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import validate_repo_id
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError
from timm.data.model_config import resolve_input_data_config
from timm.models import model_entrypoint, save_for_hf, split_model_name_tag

from .._private import load_model_config_from_path
from ..methods.stats import built_input_size, count_params
from ..models._cfg import HF_HUB_ORG, hub_repo_id
from ..models._checkpoint import (
    CheckpointError, CheckpointMismatch, load_checkpoint_file, load_strict, read_checkpoint, unwrap_checkpoint,
)
from ..models._pretrained import (
    CONFIG_NAME, WEIGHTS_NAME, PretrainedWeightsError, download_weights, fetch_file, hub_unreachable, sha256_file,
)
from ..models._registry import (
    UnknownTagError, did_you_mean, is_pf_repo, pf_model_names, pf_pretrained_tags, resolve_name_tag,
)
from ..version import __version__

__all__ = [
    'WEIGHTS_NAME', 'PretrainedWeightsError', 'CheckpointError', 'PushError', 'HubRefusedError', 'UnknownTagError',
    'ModelArgsError', 'ConvertResult', 'PushPlan', 'PushResult', 'pf_model_names', 'pf_pretrained_tags',
    'resolve_name_tag', 'is_pf_repo', 'hub_unreachable', 'fetch_file', 'download_weights', 'create_model',
    'read_checkpoint', 'checkpoint_filter_for',
    'convert_checkpoint', 'verify_folder', 'load_folder_model', 'prepare_push', 'prepare_folder_push',
    'require_token', 'push_to_hub',
]

CARD_NAME = 'README.md'

class ModelArgsError(ValueError):
    """A model name or model kwargs that timm cannot build."""


class PushError(RuntimeError):
    """A push was refused before anything was uploaded (no token, unknown tag, bad repository id)."""


class HubRefusedError(RuntimeError):
    """The Hub accepted a request but did not apply it (e.g. a repository stays public)."""


# ---------------------------------------------------------------------------------------------------------------
# Models named by users

def create_model(name: str, pretrained: bool = False, checkpoint: Optional[Union[str, Path]] = None,
                 **kwargs) -> nn.Module:
    """``timm.create_model`` for names and kwargs a user typed, with named errors.

    An unknown name or kwargs the model refuses raise :class:`ModelArgsError`; for an ``hf-hub:`` name the
    ``config.json`` that timm reads first is fetched through :func:`fetch_file`, so a missing repository or
    revision, or the Hub offline, raise the :class:`PretrainedWeightsError` that ``name`` / ``name.tag`` give.
    A ``local-dir:`` folder whose files are corrupted or whose weights do not fit the model it describes, and a
    ``checkpoint`` (loaded strictly after building) that cannot be read or does not fit, raise
    :class:`CheckpointError`.
    """
    if name.startswith('hf-hub:'):
        fetch_file(name[len('hf-hub:'):], CONFIG_NAME)  # cached; timm's own fetch then finds it
    elif not name.startswith('local-dir:') and not timm.is_model(name):
        raise ModelArgsError(f'unknown model {name!r}{did_you_mean(split_model_name_tag(name)[0])}')
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if name.startswith('local-dir:') and pretrained:
            _check_local_dir(Path(name[len('local-dir:'):]), kwargs)
        if not isinstance(e, (TypeError, ValueError, AssertionError)):
            raise
        given = _typed_kwargs(kwargs)
        raise ModelArgsError(f'cannot build {name}' + (f' with {given}' if given else '') +
                             f': {type(e).__name__}: {e}') from e
    if checkpoint is not None:
        load_strict(model, read_checkpoint(checkpoint), f'checkpoint {checkpoint}')
    return model


def _check_local_dir(folder: Path, kwargs: Dict[str, Any]) -> None:
    """Raise the :class:`CheckpointError` that explains why timm could not load a ``local-dir:`` folder: a
    ``config.json`` that is not JSON, weights that cannot be read, or weights that do not fit the model."""
    config = folder / CONFIG_NAME
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{config} cannot be read as JSON ({type(e).__name__}: {e}): not a folder timm '
                              f'wrote, or a corrupted one') from e
    weights = next((folder / f for f in (WEIGHTS_NAME, 'pytorch_model.bin') if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f'{folder} has no {WEIGHTS_NAME}')
    state_dict = read_checkpoint(weights)  # a file that cannot be read raises here
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=False, device='meta', **kwargs)
    except Exception:  # the model args themselves are the problem: the caller reports them
        return
    mismatch = CheckpointMismatch.between(state_dict, model.state_dict())
    if mismatch:
        raise mismatch.error(f'{weights} does not fit the model {config} describes')


# ---------------------------------------------------------------------------------------------------------------
# Converting

def _typed_kwargs(kwargs: Dict[str, Any]) -> str:
    """Model kwargs as ``--model-kwargs`` takes them: ``key=value`` separated by spaces."""
    return ' '.join(f'{k}={v!r}' for k, v in kwargs.items())


def checkpoint_filter_for(model_name: str) -> Optional[Callable]:
    """The ``checkpoint_filter_fn`` of the module that registers ``model_name`` (None if it has none)."""
    module = sys.modules[model_entrypoint(split_model_name_tag(model_name)[0]).__module__]
    return getattr(module, 'checkpoint_filter_fn', None)


def _num_classes_hint(model: nn.Module, fix: str) -> Callable[[CheckpointMismatch], List[str]]:
    """For a strict-load report: the classes of a checkpoint whose classifier differs from the model's, and
    what to do (``fix``, formatted with ``classes``, the checkpoint's)."""
    classifier = f'{model.pretrained_cfg.get("classifier")}.weight'

    def hints(mismatch: CheckpointMismatch) -> List[str]:
        return [f'the checkpoint has {shape[0]} classes and the model {want[0]}: {fix.format(classes=shape[0])}'
                for key, shape, want in mismatch.mis_shaped if key == classifier and shape[0] != want[0]]
    return hints


def _px(input_size: Tuple[int, ...]) -> str:
    """An image size for messages: ``224 px``, or ``48x40 px`` (height x width) when not square."""
    height, width = input_size[-2:]
    return f'{width} px' if height == width else f'{height}x{width} px'


@dataclass
class ConvertResult:
    name_tag: str  # the tag named, or the bare model name when the checkpoint describes itself
    folder: Path
    num_params: int
    num_classes: int
    input_size: Tuple[int, int, int]
    filtered: bool
    described_by: str  # where config.json's classes and image size come from

    @property
    def px(self) -> str:
        return _px(self.input_size)


# what config.json keeps of our cfg for weights no tag of ours describes: how to feed the model, nothing else
_DATA_CFG_KEYS = ('architecture', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode', 'first_conv',
                  'classifier', 'fixed_input_size')


# timm.create_model's own arguments (what to load, how to script): not the model's kwargs that config.json records
_CREATE_MODEL_ARGS = [name for name, p in inspect.signature(timm.create_model).parameters.items()
                      if name != 'model_name' and p.kind is not p.VAR_KEYWORD]


def _train_args(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments a timm ``train.py`` checkpoint was trained with (empty for other checkpoints)."""
    args = checkpoint.get('args')
    return vars(args) if isinstance(args, argparse.Namespace) else {}


def _train_input_size(train_args: Dict[str, Any]) -> Optional[Tuple[int, int, int]]:
    """The input size of timm ``train.py`` arguments: ``input_size`` (C, H, W) before a square ``img_size``, as
    train.py resolves them (None when they set neither)."""
    if train_args.get('input_size'):
        return tuple(train_args['input_size'])
    if train_args.get('img_size'):
        return 3, train_args['img_size'], train_args['img_size']
    return None


def _described_cfg(
        model: nn.Module, input_size: Tuple[int, int, int], train_args: Dict[str, Any]) -> Dict[str, Any]:
    """Pretrained cfg of weights trained on other data: the model's data settings (train.py's where it set
    them), the image size and classes of the checkpoint, and no tag, notes or Hub id of ours."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k in _DATA_CFG_KEYS}
    cfg.update({k: train_args[k] for k in ('interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
                if train_args.get(k) not in (None, '')})
    cfg.update(input_size=input_size, num_classes=model.num_classes)
    return cfg


def convert_checkpoint(
        model_name: str,
        checkpoint: Union[str, Path],
        output_dir: Union[str, Path],
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        img_size: Optional[int] = None,
) -> ConvertResult:
    """Convert ``checkpoint`` for ``model_name`` (``model[.tag]``) into ``output_dir`` (timm's Hub layout).

    The checkpoint goes through the family's ``checkpoint_filter_fn`` (authors' keys -> ours; our own keys
    pass unchanged) and must then load strictly; ``output_dir`` gets ``model.safetensors`` and
    ``config.json`` written by timm's ``save_for_hf``. With a tag, ``config.json`` describes that tag. Without
    one it describes the checkpoint: its classifier's classes (or ``num_classes``, also taken from
    ``model_kwargs``), the input size of its timm ``train.py`` arguments (or ``img_size``, required when it has
    none), and no tag or notes of ours. ``model_kwargs`` are the model's own: ``timm.create_model``'s arguments
    (``checkpoint_path``, ``pretrained_cfg_overlay``, ...) raise :class:`ModelArgsError`.
    """
    arch, tag = split_model_name_tag(model_name)
    name_tag = resolve_name_tag(model_name)  # checks it is one of our models
    model_kwargs = dict(model_kwargs or {})
    not_model_args = [k for k in model_kwargs if k in _CREATE_MODEL_ARGS]
    if not_model_args:
        raise ModelArgsError(
            f'--model-kwargs {", ".join(not_model_args)}: not a kwarg of the model but of timm.create_model; '
            f'--model-kwargs takes the model\'s own kwargs, which config.json records to rebuild it')
    raw = load_checkpoint_file(checkpoint)
    state_dict = unwrap_checkpoint(raw, use_ema=use_ema, source=f'checkpoint {checkpoint}')
    train_args = _train_args(raw)
    if tag:
        tag_cfg = timm.models.get_pretrained_cfg(name_tag)
        other = [f'--model-kwargs {_typed_kwargs(model_kwargs)}'] if model_kwargs else []
        other += [f'--num-classes {num_classes}'] if num_classes not in (None, tag_cfg.num_classes) else []
        other += [f'--img-size {img_size}'] if img_size and (3, img_size, img_size) != tag_cfg.input_size else []
        if other:
            raise CheckpointError(
                f'{name_tag} describes its own model ({tag_cfg.num_classes} classes, {_px(tag_cfg.input_size)}, no '
                f'model kwargs), not one built with {" and ".join(other)}: convert such weights with the bare model '
                f'name (--model {arch}), and config.json describes the checkpoint')
        input_size = tag_cfg.input_size
        described_by = f'the tag {name_tag}'
        fix = f'convert weights of another class count with the bare model name (--model {arch} ' \
              f'--num-classes {{classes}})'
    else:
        name_tag = arch
        kwarg_classes = model_kwargs.pop('num_classes', None)  # recorded as config.json's num_classes
        fix = 'pass --num-classes {classes}'
        if kwarg_classes is not None:
            if num_classes not in (None, kwarg_classes):
                raise ModelArgsError(f'--model-kwargs num_classes={kwarg_classes} disagrees with --num-classes '
                                     f'{num_classes}: give the classes once')
            num_classes, fix = kwarg_classes, 'pass --model-kwargs num_classes={classes}'
        input_size = _train_input_size(train_args) if img_size is None else (3, img_size, img_size)
        if input_size is None:
            raise CheckpointError(f'{checkpoint} does not record the image size it was trained at (no timm '
                                  f'train.py arguments): pass --img-size, or name a tag of ours with --model')
        size_source = '--img-size' if img_size else 'its train.py arguments'
        classifier = f'{timm.models.get_pretrained_cfg(arch).classifier}.weight'
        if num_classes is None and classifier in state_dict:
            num_classes = state_dict[classifier].shape[0]
    kwargs = model_kwargs if num_classes is None else {**model_kwargs, 'num_classes': num_classes}
    model = create_model(name_tag, **kwargs)
    filter_fn = checkpoint_filter_for(name_tag)
    if filter_fn is not None:
        try:
            filtered = filter_fn(state_dict, model)
        except Exception as e:  # a filter meets keys or shapes it does not know
            raise CheckpointError(
                f'{checkpoint} cannot be converted for {name_tag} by its checkpoint filter: '
                f'{type(e).__name__}: {e}') from e
        # timm's filters resample position embeddings to the model's size; a conversion keeps every value
        resampled = [f'{k} {tuple(state_dict[k].shape)} -> {tuple(v.shape)}' for k, v in filtered.items()
                     if k in state_dict and v.numel() != state_dict[k].numel()]
        if resampled:
            raise CheckpointError(
                f'{checkpoint} does not fit {name_tag}: {"; ".join(resampled)} would be resampled (weights of '
                f'another image size?): build the model at the checkpoint\'s size, e.g. --model-kwargs img_size=N')
        state_dict = filtered
    load_strict(model, state_dict, str(checkpoint), target=name_tag, hints=_num_classes_hint(model, fix))
    if not tag:
        model.pretrained_cfg = _described_cfg(model, input_size, train_args)
        described_by = f'the checkpoint ({model.num_classes} classes, {_px(input_size)} from {size_source})'
    data_config = None if tag else {'input_size': input_size}
    try:
        resolve_input_data_config(model, args=data_config)
    except ValueError as e:  # a ViT/PiT is built for one image size
        built_for = built_input_size(model)
        height, width = input_size[-2:]
        size_kwarg = f'img_size={width}' if height == width else f"'img_size=({height},{width})'"
        raise CheckpointError(f'{name_tag} is built for {_px(built_for)}, not {_px(input_size)}: give the image '
                              f'size it is built for with --img-size {built_for[-1]}, or build it at '
                              f'{_px(input_size)} with --model-kwargs {size_kwarg}') from e
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix='.converting-') as written:
        # model_args go to config.json, so `local-dir:` rebuilds e.g. a scaled-down variant
        save_for_hf(model.eval(), written, model_args=model_kwargs or None, safe_serialization=True,
                    data_config=data_config)
        for fname in (WEIGHTS_NAME, CONFIG_NAME):  # both files or neither
            os.replace(Path(written) / fname, output_dir / fname)
    return ConvertResult(
        name_tag=name_tag,
        folder=output_dir,
        num_params=count_params(model),
        num_classes=model.num_classes,
        input_size=tuple(input_size),
        filtered=filter_fn is not None,
        described_by=described_by,
    )


def _read_folder(
        folder: Path, make_it: str) -> Tuple[Dict[str, Any], str, Dict[str, Any], Dict[str, torch.Tensor]]:
    """Pretrained cfg, architecture, model args and weights of a folder in timm's ``save_for_hf`` layout
    (safetensors only)."""
    if not folder.is_dir():
        raise CheckpointError(f'{folder} is not a folder with {WEIGHTS_NAME} + {CONFIG_NAME}: make one with {make_it}')
    if not (folder / WEIGHTS_NAME).is_file() and any(folder.glob('*.bin')):
        raise CheckpointError(f'{folder} has pickle weights but no {WEIGHTS_NAME}: timm-pf publishes only safetensors '
                              f'(save with safe_serialization=True)')
    for fname in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / fname).is_file():
            raise CheckpointError(f'{folder} has no {fname}: make it with {make_it}')
    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(folder)
    except Exception as e:
        raise CheckpointError(f'{folder / CONFIG_NAME} is not a timm config: {type(e).__name__}: {e}') from e
    model_args = {k: v for k, v in model_args.items() if k != 'pretrained_cfg'}
    return pretrained_cfg, arch, model_args, read_checkpoint(folder / WEIGHTS_NAME)


def verify_folder(folder: Union[str, Path], name_tag: str) -> nn.Module:
    """Check that a converted folder holds weights that load strictly into ``name_tag`` as
    ``timm.create_model(name_tag, pretrained=True)`` builds it (the folder's own model args, e.g. a smaller
    variant or another class count, do not apply there); a folder converted for another tag is refused;
    returns the model."""
    folder = Path(folder)
    pretrained_cfg, arch, model_args, state_dict = _read_folder(folder, '`timm-pf convert`')
    expected_arch = split_model_name_tag(name_tag)[0]
    if arch != expected_arch:
        raise CheckpointError(f'{folder} holds weights of {arch}, not of {expected_arch}')
    folder_tag = pretrained_cfg.get('tag')
    if folder_tag and f'{arch}.{folder_tag}' != name_tag:
        raise CheckpointError(f'{folder} was converted for {arch}.{folder_tag} (its {CONFIG_NAME}), not for '
                              f'{name_tag}: push it with -m {arch}.{folder_tag}')
    model = timm.create_model(name_tag, pretrained=False)
    built_with = f' (the folder was made with {", ".join(f"{k}={v!r}" for k, v in model_args.items())})' \
        if model_args else ''
    load_strict(model, state_dict, str(folder / WEIGHTS_NAME),
                target=f"{name_tag} as timm.create_model('{name_tag}', pretrained=True) builds it{built_with}")
    return model


def load_folder_model(folder: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a folder in timm's ``save_for_hf`` layout describes, with its weights loaded strictly.

    The model is rebuilt from ``config.json`` (architecture, model args, pretrained cfg) exactly as
    ``timm.create_model('local-dir:<folder>')`` and ``'hf-hub:<repo>'`` will rebuild it; returns it with
    its model args. Weights that do not fit it raise :class:`CheckpointError` with the differing keys/shapes.
    """
    folder = Path(folder)
    _, arch, model_args, state_dict = _read_folder(
        folder, "timm's `save_for_hf(model, folder, safe_serialization=True)` or `timm_pf.rba.save_rba`")
    described = f'the model {folder / CONFIG_NAME} describes ({arch}' + \
        (f' with model_args {model_args})' if model_args else ')')
    if not timm.is_model(arch):
        raise CheckpointError(f'{folder / CONFIG_NAME} names the architecture {arch!r}, which timm does not know: '
                              f'import the package that registers it first')
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=False)
    except Exception as e:  # model_args the architecture does not take, or values it refuses
        raise CheckpointError(f'cannot build {described}: {type(e).__name__}: {e}') from e
    load_strict(model, state_dict, str(folder / WEIGHTS_NAME), target=described)
    return model.eval(), model_args


# ---------------------------------------------------------------------------------------------------------------
# Publishing

# weights an earlier push in timm's pickle layout left; a push replaces them with model.safetensors
STALE_WEIGHTS = ('pytorch_model.bin',)


@dataclass
class PushPlan:
    """What a push uploads: staged files (weights, config, card) and where they go."""
    label: str  # what is pushed, for messages: 'model.tag', or the architecture of a pushed folder
    repo_id: str
    revision: Optional[str]
    private: bool
    folder: Path
    files: List[Tuple[str, int, str]] = field(default_factory=list)  # (name, bytes, sha256)

    def describe(self) -> str:
        branch = self.revision or 'main'
        visibility = 'private' if self.private else 'public if new, else as it is'
        lines = [f'{hf_constants.ENDPOINT}/{self.repo_id} (branch {branch}, {visibility}):']
        lines += [f'  {name:<20} {size:>14,d} bytes  sha256 {digest}' for name, size, digest in self.files]
        lines += [f'  {name:<20} deleted if the branch holds one (weights in the older pickle format)'
                  for name in STALE_WEIGHTS]
        return '\n'.join(lines)


def _plan(label: str, repo_id: str, staging_dir: Path, card_text: str, revision: Optional[str],
          private: bool) -> PushPlan:
    """Write the card next to the staged weights and config and list the three files."""
    (staging_dir / CARD_NAME).write_text(card_text, encoding='utf-8')
    files = [(f, (staging_dir / f).stat().st_size, sha256_file(staging_dir / f))
             for f in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)]
    return PushPlan(label=label, repo_id=repo_id, revision=revision, private=private, folder=staging_dir,
                    files=files)


def _copy_weights_and_config(folder: Path, staging_dir: Path) -> None:
    staging_dir.mkdir(parents=True, exist_ok=True)
    for fname in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(folder / fname, staging_dir / fname)


def prepare_push(
        model_name: str,
        source: Union[str, Path],
        staging_dir: Union[str, Path],
        revision: Optional[str] = None,
        private: bool = False,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        card_text: Optional[str] = None,
) -> PushPlan:
    """Stage ``source`` (a converted folder or a checkpoint) for ``model_name`` in ``staging_dir``.

    A checkpoint is converted first; the weights must load strictly into the named model. The model card
    is rendered from ``hub_cards/`` unless ``card_text`` is given.
    """
    from .cards import card_path, render_card, weights_provenance
    name_tag = resolve_name_tag(model_name)
    if weights_provenance(name_tag) is None:
        raise PushError(f'nothing says where the weights of {name_tag} come from: list the tag under "converted" '
                        f'in its hub_cards/families/ file or add its train_configs/ recipe (see hub_cards/README.md)')
    source, staging_dir = Path(source), Path(staging_dir)
    if source.is_dir():
        if use_ema or num_classes is not None:
            raise PushError(f'{source} is a converted folder, pushed as it is: --ema and --num-classes apply '
                            f'to a checkpoint converted on the way')
        # the weights must load into the model the tag's users get; its own config.json goes with them (not the
        # folder's), so `name.tag` and `hf-hub:` build the same model with the same data config
        staging_dir.mkdir(parents=True, exist_ok=True)
        save_for_hf(verify_folder(source, name_tag), str(staging_dir), safe_serialization=True)
    else:  # a conversion for a tag loads strictly into the tag's model and writes the tag's config.json
        convert_checkpoint(name_tag, source, staging_dir, use_ema=use_ema, num_classes=num_classes)
    if card_text is None:  # the committed card (checked against the model by the tests), else a fresh one
        committed = card_path(name_tag)
        card_text = committed.read_text(encoding='utf-8') if committed.is_file() else render_card(name_tag)
    return _plan(name_tag, hub_repo_id(name_tag), staging_dir, card_text, revision, private)


def _check_repo_id(repo_id: str) -> None:
    if repo_id.count('/') != 1:
        raise PushError(f'--repo-id must be ORG/NAME (a user or organisation and a repository name), got {repo_id!r}')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f'{repo_id!r} is not a valid Hub repository id: {e}') from e
    tag_repos = {hub_repo_id(t): t for t in pf_pretrained_tags()}
    if repo_id in tag_repos:
        raise PushError(f'{repo_id} is the repository of the pretrained tag {tag_repos[repo_id]}: push it with '
                        f'`timm-pf push <folder> -m {tag_repos[repo_id]}`')


def prepare_folder_push(
        folder: Union[str, Path],
        repo_id: str,
        staging_dir: Union[str, Path],
        revision: Optional[str] = None,
        private: bool = False,
        card_text: Optional[str] = None,
) -> PushPlan:
    """Stage a folder in timm's ``save_for_hf`` layout for the repository ``repo_id`` (``ORG/NAME``).

    For models that are not one of our pretrained tags: an RBA model (``timm_pf.rba.save_rba``), a model
    finalised by ``timm_pf.replacement.finalize`` and saved with ``save_for_hf``, any timm model. The weights
    must load strictly into the model rebuilt from ``config.json`` (:func:`load_folder_model`). The card is
    ``card_text``, else for ``timm-pf/<variant>`` of a Replacement Learning variant its committed card (the
    folder must then hold the variant's plain model), else one rendered now with the model's measured stats
    (:func:`timm_pf.cards.render_folder_card`).
    """
    from .cards import card_path, parse_stats, render_folder_card
    from ..models.replace import PLAIN_MODELS
    _check_repo_id(repo_id)
    folder, staging_dir = Path(folder), Path(staging_dir)
    if folder.exists() and not folder.is_dir():
        raise PushError(f"{folder} is a file: --repo-id pushes a folder in timm's save_for_hf layout "
                        f"(model.safetensors + config.json); convert a checkpoint of one of our models with "
                        f"`timm-pf convert` first")
    model, model_args = load_folder_model(folder)
    arch = model.pretrained_cfg['architecture']
    variant = next((v for v in PLAIN_MODELS if hub_repo_id(v) == repo_id), None)
    if variant is not None:
        if arch != PLAIN_MODELS[variant]:
            raise CheckpointError(
                f'{repo_id} publishes {variant} finalised into a plain {PLAIN_MODELS[variant]}, but {folder} holds '
                f'a {arch}: finalise the trained model with timm_pf.replacement.finalize and save it with '
                f'timm.models.save_for_hf')
        committed = card_path(variant).read_text(encoding='utf-8')
        card_params = parse_stats(committed)['Parameters']
        if not card_params.startswith(f'{count_params(model):,d} '):
            raise CheckpointError(
                f'{folder} holds a {arch} with {count_params(model):,d} parameters; {repo_id} publishes the one its '
                f'card describes ({card_params}): the {variant} of the recipe, finalised')
        if card_text is None:
            card_text = committed
    if card_text is None:
        card_text = render_folder_card(model, model_args, repo_id)
    _copy_weights_and_config(folder, staging_dir)
    label = f'rba of {model_args["base_model"]}' if arch == 'rba' else arch
    return _plan(label, repo_id, staging_dir, card_text, revision, private)


def require_token(token: Optional[str] = None, namespace: str = HF_HUB_ORG) -> str:
    """``token``, else the usual ``huggingface_hub`` sources (``HF_TOKEN``, the ``hf auth login`` cache)."""
    token = token or get_token()
    if not token:
        raise PushError('no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access '
                        f'to {namespace})')
    return token


@dataclass
class PushResult:
    commit_url: str
    private: bool  # the repository's visibility after the push, as the Hub reports it


def push_to_hub(plan: PushPlan, token: Optional[str] = None, commit_message: Optional[str] = None) -> PushResult:
    """Upload a staged :class:`PushPlan` (creating the repository and branch if needed); see :func:`require_token`.

    ``plan.private`` makes an existing public repository private before anything is uploaded (the Hub's
    refusal propagates as ``HfHubHTTPError``, :class:`HubRefusedError` if it ignores the request); the
    visibility in the result is read back from the Hub after the upload.
    """
    api = HfApi(token=require_token(token, plan.repo_id.split('/')[0]), library_name='timm-pf',
                library_version=__version__)
    api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)  # keeps an existing repo's visibility
    if plan.private and not api.model_info(plan.repo_id).private:
        api.update_repo_settings(plan.repo_id, private=True)
        if not api.model_info(plan.repo_id).private:
            raise HubRefusedError(f'{plan.repo_id} is still public after the request to make it private; '
                                  f'nothing was uploaded')
    if plan.revision and plan.revision != hf_constants.DEFAULT_REVISION:
        api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=plan.repo_id,
        folder_path=str(plan.folder),
        revision=plan.revision,
        allow_patterns=[name for name, _, _ in plan.files],
        delete_patterns=list(STALE_WEIGHTS),
        commit_message=commit_message or f'Add {plan.label} weights (timm-pf {__version__})',
    )
    return PushResult(commit_url=commit.commit_url, private=bool(api.model_info(plan.repo_id).private))
