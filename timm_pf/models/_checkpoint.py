""" Reading checkpoints and reporting how they differ from a model: the one place for both

:func:`read_checkpoint` reads a checkpoint file (safetensors, or ``.pth`` / ``.pt`` / ``.bin`` through
``torch.load(weights_only=True)``) and :func:`unwrap_checkpoint` takes the tensors out of its container
(``state_dict`` / ``model`` wrappers of training scripts, the EMA weights on request, DDP / compile
prefixes), refusing anything but finite tensors. :class:`CheckpointMismatch` is the one report of missing,
unexpected and mis-shaped keys: the model families' ``checkpoint_filter_fn`` raise it through
:func:`check_matches_model` (which leaves the classifier and the first conv's input channels to timm's
pretrained loader and names the registered models the checkpoint does fit), the Hub tooling through
:func:`load_strict`. Every problem raises a :class:`CheckpointError` (a ``ValueError``).
"""
import argparse
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import safetensors.torch
import torch
from torch import nn

import timm
from timm.models import clean_state_dict

__all__ = [
    'CheckpointError', 'CheckpointDtypeError', 'CheckpointMismatch', 'read_checkpoint', 'load_checkpoint_file',
    'unwrap_checkpoint', 'check_matches_model', 'fitting_models', 'load_strict',
]

_WRAPPERS = ('state_dict', 'model')  # timm train.py / DeiT-style training scripts
_EMA_WRAPPERS = ('state_dict_ema', 'model_ema')


class CheckpointError(ValueError):
    """A checkpoint cannot be read, does not fit the named model, or holds non-finite values."""


class CheckpointDtypeError(CheckpointError):
    """A checkpoint holds integer (or bool) tensors where the model has floating-point ones."""


# ---------------------------------------------------------------------------------------------------------------
# Reading

def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file whatever its name: an 8-byte little-endian header length, then the JSON header."""
    with open(path, 'rb') as f:
        start = f.read(9)
    return len(start) == 9 and start[8:] == b'{' and int.from_bytes(start[:8], 'little') < path.stat().st_size


def load_checkpoint_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The top-level dict of a checkpoint file: safetensors, else ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'checkpoint {path} does not exist')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} is not a regular file (a folder, a device or a pipe)')
    try:
        if path.suffix == '.safetensors' or _looks_like_safetensors(path):
            checkpoint = safetensors.torch.load_file(str(path), device='cpu')
        else:
            # timm train.py checkpoints also store their argparse.Namespace of arguments: a plain attribute
            # container, allowed next to tensors; anything else still refuses to unpickle
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own text advises weights_only=False: not repeated here
        reason = next((line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(
            ('Weights only load failed', 'Check the documentation', 'Please file an issue'))), '')
        if 'GLOBAL' not in reason:
            raise CheckpointError(f'cannot read checkpoint {path} (not a safetensors or torch.save file, or a '
                                  f'damaged one): {reason or type(e).__name__}') from e
        raise CheckpointError(
            f'checkpoint {path} holds Python objects besides tensors, which are never unpickled ({reason}): save '
            f'the state dict alone (torch.save(model.state_dict(), ...)) or as safetensors') from e
    except Exception as e:  # torch/safetensors raise many types for truncated or foreign files
        raise CheckpointError(f'cannot read checkpoint {path} (not a safetensors or torch.save file, or a damaged '
                              f'one): {type(e).__name__}: {e}') from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')
    return checkpoint


def unwrap_checkpoint(
        checkpoint: Mapping[str, Any],
        wrappers: Sequence[str] = _WRAPPERS,
        use_ema: bool = False,
        source: str = 'checkpoint',
) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: out of the first ``wrappers`` entry present, without DDP / compile prefixes.

    ``use_ema`` takes the EMA weights (``state_dict_ema`` / ``model_ema``) instead and fails if there are
    none. Anything but a mapping of names to finite tensors (a corrupted checkpoint) raises a
    :class:`CheckpointError`; ``source`` names the checkpoint in its message.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a mapping of names to tensors')
    key = next((k for k in (_EMA_WRAPPERS if use_ema else wrappers) if isinstance(checkpoint.get(k), Mapping)), None)
    if use_ema and key is None:
        raise CheckpointError(f'{source} has no EMA weights (no "state_dict_ema" or "model_ema" entry)')
    state_dict = checkpoint[key] if key else checkpoint
    not_tensors = [f'{k!r} is a {type(v).__name__}, not a tensor' for k, v in state_dict.items()
                   if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f'{source} is not a state dict: {"; ".join(not_tensors[:5])} (a training checkpoint keeps its '
            f'weights under {" / ".join(repr(w) for w in wrappers)})')
    # min / max propagate NaN and Inf: one pass per tensor, no tensor-sized temporaries
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and v.numel()
                  and not torch.isfinite(torch.stack(torch.aminmax(v))).all()]
    if non_finite:
        raise CheckpointError(f'{source} holds non-finite values (NaN or Inf) in {", ".join(non_finite[:8])}: '
                              f'corrupted checkpoint')
    return clean_state_dict(state_dict)


def read_checkpoint(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint: safetensors, an authors' ``.pth``/``.pth.tar`` or a timm ``train.py`` file.

    ``.pth`` files go through ``torch.load(weights_only=True)``. A dict with ``state_dict`` /
    ``state_dict_ema`` (timm ``train.py``) or ``model`` / ``model_ema`` (DeiT-style) is unwrapped;
    ``use_ema`` picks the EMA weights and fails if there are none. ``module.`` prefixes are removed.
    """
    return unwrap_checkpoint(load_checkpoint_file(path), use_ema=use_ema, source=f'checkpoint {path}')


# ---------------------------------------------------------------------------------------------------------------
# Comparing with a model

class CheckpointMismatch:
    """How a state dict differs from a model's: missing and unexpected keys, (key, checkpoint, model) shapes."""

    def __init__(self, missing: List[str], unexpected: List[str], mis_shaped: List[Tuple[str, tuple, tuple]]):
        self.missing = missing
        self.unexpected = unexpected
        self.mis_shaped = mis_shaped

    @classmethod
    def between(
            cls,
            state_dict: Mapping[str, torch.Tensor],
            expected: Mapping[str, torch.Tensor],
            ignored: Callable[[str], bool] = lambda key: False,
    ) -> 'CheckpointMismatch':
        """How ``state_dict`` differs from the ``expected`` one (a model's), leaving out ``ignored`` keys."""
        return cls(
            missing=[k for k in expected if k not in state_dict and not ignored(k)],
            unexpected=[k for k in state_dict if k not in expected and not ignored(k)],
            mis_shaped=[(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
                        if k in expected and v.shape != expected[k].shape and not ignored(k)],
        )

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)

    def describe(self, shown: int = 5) -> List[str]:
        """One line per kind of problem, e.g. ``missing keys (2): a; b``, listing the first ``shown`` keys."""
        shapes = [f'{k} has shape {ckpt}, model expects {want}' for k, ckpt, want in self.mis_shaped]
        lines = []
        for label, items in (('missing keys', self.missing), ('unexpected keys', self.unexpected),
                             ('shape mismatches', shapes)):
            if items:
                more = f'; ... ({len(items) - shown} more)' if len(items) > shown else ''
                lines.append(f'{label} ({len(items)}): ' + '; '.join(items[:shown]) + more)
        return lines

    def error(self, subject: str, problems: Iterable[str] = ()) -> CheckpointError:
        """The error for ``subject`` (``'<checkpoint> does not fit <model>'``): ``problems`` first, then the keys."""
        return CheckpointError(f'{subject}: ' + ' | '.join([*problems, *self.describe()]))


def _mismatch(
        state_dict: Mapping[str, torch.Tensor],
        expected: Mapping[str, torch.Tensor],
        first_conv: Optional[str],
        classifier: str,
) -> CheckpointMismatch:
    """How ``state_dict`` differs from ``expected`` where it matters to timm's pretrained loader: the
    ``classifier`` and the input channels of the ``first_conv`` weight may differ (the loader drops or
    adapts them for another ``num_classes`` / ``in_chans``)."""
    mismatch = CheckpointMismatch.between(state_dict, expected, lambda k: k.startswith(f'{classifier}.'))
    mismatch.mis_shaped = [  # the first conv may differ in its input channels only
        (k, shape, want) for k, shape, want in mismatch.mis_shaped
        if not (k == f'{first_conv}.weight' and shape[:1] + shape[2:] == want[:1] + want[2:])]
    return mismatch


def fitting_models(
        state_dict: Mapping[str, torch.Tensor],
        candidates: Iterable[str],
        first_conv: Optional[str] = None,
        classifier: str = 'head',
        **model_kwargs: Any,
) -> List[str]:
    """The registered ``candidates`` (built with ``model_kwargs``) whose parameters ``state_dict`` has, by name
    and shape. Each is built on the meta device: no memory, no initialisation."""
    return [name for name in candidates if not _mismatch(
        state_dict, timm.create_model(name, device='meta', **model_kwargs).state_dict(), first_conv, classifier)]


def _family(keys: Iterable[str]) -> Optional[str]:
    """The kind of network a set of parameter names comes from, as far as the keys tell."""
    keys = set(keys)
    if any(k.startswith('transformers.') for k in keys):
        return 'a PiT'
    if 'patch_embed.proj.weight' in keys:
        return 'a ViT'
    if 'conv_stem.weight' in keys and any(k.startswith('blocks.') for k in keys):
        return 'a GhostNet / ParameterNet'
    if 'conv1.weight' in keys and any(k.startswith('layer1.') for k in keys):
        return 'a ResNet'
    return None


def _model_name(model: nn.Module) -> str:
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__


def _check_dtypes(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], subject: str) -> None:
    """Refuse integer tensors for float parameters: loading would silently turn them into floats."""
    wrong = [f'{k} is {v.dtype}, the model\'s {expected[k].dtype}' for k, v in state_dict.items()
             if k in expected and expected[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if wrong:
        more = f'; ... ({len(wrong) - 5} more)' if len(wrong) > 5 else ''
        raise CheckpointDtypeError(
            f'{subject}: {len(wrong)} integer tensors for float parameters (a corrupted or quantized checkpoint?): '
            + '; '.join(wrong[:5]) + more)


def check_matches_model(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        first_conv: Optional[str] = None,
        classifier: str = 'head',
        candidates: Sequence[str] = (),
        hints: Callable[[CheckpointMismatch, List[str]], Iterable[str]] = lambda mismatch, fits: (),
) -> None:
    """Raise a :class:`CheckpointError` naming missing, unexpected and mis-shaped keys of ``state_dict`` for ``model``.

    The ``classifier`` and the input channels of the ``first_conv`` weight may differ: timm's pretrained
    loader drops or adapts them after the filter (``num_classes`` / ``in_chans`` other than the
    checkpoint's). On a mismatch the message names those of the registered ``candidates`` the checkpoint
    fits, else the family its keys look like when it is not the model's; ``hints(mismatch, fits)`` adds
    family-specific explanations. Integer tensors for float parameters raise :class:`CheckpointDtypeError`.
    """
    expected = model.state_dict()
    name = _model_name(model)
    mismatch = _mismatch(state_dict, expected, first_conv, classifier)
    if mismatch:
        fits = fitting_models(state_dict, [c for c in candidates if c != name], first_conv, classifier)
        problems = list(hints(mismatch, fits))
        if fits:
            problems.insert(0, f'the checkpoint fits {", ".join(fits)}')
        elif _family(state_dict) and _family(state_dict) != _family(expected):
            problems.insert(0, f'its keys look like {_family(state_dict)} checkpoint')
        raise mismatch.error(f'checkpoint does not fit {name}', problems)
    _check_dtypes(state_dict, expected, f'checkpoint does not fit {name}')


def load_strict(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        source: str,
        target: Optional[str] = None,
        hints: Callable[[CheckpointMismatch], Iterable[str]] = lambda mismatch: (),
) -> None:
    """Load every tensor of ``state_dict`` (read from ``source``) into ``model``, else raise a
    :class:`CheckpointError` naming the differing keys and shapes (``target`` names the model in it, by
    default its architecture and tag; ``hints(mismatch)`` add explanations)."""
    expected = model.state_dict()
    if target is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        target = f'{_model_name(model)}.{cfg.get("tag") or ""}'.rstrip('.')
    mismatch = CheckpointMismatch.between(state_dict, expected)
    if mismatch:
        raise mismatch.error(f'{source} does not fit {target}', hints(mismatch))
    _check_dtypes(state_dict, expected, f'{source} does not fit {target}')
    model.load_state_dict(state_dict, strict=True)
