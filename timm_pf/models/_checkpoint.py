""" Checkpoint helpers shared by the model families' ``checkpoint_filter_fn``

``unwrap_checkpoint`` takes the tensors out of a training checkpoint; ``check_matches_model`` raises a
ValueError naming the missing, unexpected and mis-shaped tensors when a (converted) checkpoint does not
fit a model, with a hint naming the registered models the checkpoint does fit (or, when none does, the
family its keys look like), and a :class:`CheckpointDtypeError` for integer tensors where the model has
float ones. Each family keeps its own key conversion and its own hints about what went wrong.
"""
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

import timm
from timm.models import clean_state_dict

__all__ = ['CheckpointDtypeError', 'CheckpointMismatch', 'check_matches_model', 'fitting_models', 'unwrap_checkpoint']


class CheckpointDtypeError(ValueError):
    """A checkpoint holds integer (or bool) tensors where the model has floating-point ones."""


def unwrap_checkpoint(
        checkpoint: Mapping[str, Any],
        wrappers: Sequence[str] = ('state_dict', 'model'),
) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: out of the first ``wrappers`` entry present, without DDP / compile prefixes.

    Raises a ValueError for anything but a mapping of names to finite tensors (a corrupted checkpoint).
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'a checkpoint must be a mapping of names to tensors, got {type(checkpoint).__name__}')
    for key in wrappers:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f'checkpoint entry {k!r} is a {type(v).__name__}, not a tensor: corrupted checkpoint?')
        if v.is_floating_point() and v.numel() and not torch.isfinite(torch.stack(torch.aminmax(v))).all():
            # min / max propagate NaN and Inf: one pass, no tensor-sized temporaries
            raise ValueError(f'checkpoint tensor {k!r} holds NaN or Inf values: corrupted checkpoint')
    return clean_state_dict(checkpoint)


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
        """One line per kind of problem, listing the first ``shown`` keys."""
        shapes = [f'{k} has shape {ckpt}, model expects {want}' for k, ckpt, want in self.mis_shaped]
        lines = []
        for label, items in (('missing', self.missing), ('unexpected', self.unexpected), ('shape mismatch', shapes)):
            if items:
                more = f'; ... ({len(items) - shown} more)' if len(items) > shown else ''
                lines.append(f'{len(items)} {label}: ' + '; '.join(items[:shown]) + more)
        return lines


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


def _check_dtypes(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse integer tensors for float parameters: loading would silently turn them into floats."""
    wrong = [f'{k} is {v.dtype}, the model\'s {expected[k].dtype}' for k, v in state_dict.items()
             if k in expected and expected[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if wrong:
        more = f'; ... ({len(wrong) - 5} more)' if len(wrong) > 5 else ''
        raise CheckpointDtypeError(
            f'checkpoint does not fit {name}: {len(wrong)} integer tensors for float parameters (a corrupted or '
            f'quantized checkpoint?): ' + '; '.join(wrong[:5]) + more)


def check_matches_model(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        first_conv: Optional[str] = None,
        classifier: str = 'head',
        candidates: Sequence[str] = (),
        hints: Callable[[CheckpointMismatch, List[str]], Iterable[str]] = lambda mismatch, fits: (),
) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys of ``state_dict`` for ``model``.

    The ``classifier`` and the input channels of the ``first_conv`` weight may differ: timm's pretrained
    loader drops or adapts them after the filter (``num_classes`` / ``in_chans`` other than the
    checkpoint's). On a mismatch the message names those of the registered ``candidates`` the checkpoint
    fits, else the family its keys look like when it is not the model's; ``hints(mismatch, fits)`` adds
    family-specific explanations. Integer tensors for float parameters raise :class:`CheckpointDtypeError`.
    """
    expected = model.state_dict()
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    mismatch = _mismatch(state_dict, expected, first_conv, classifier)
    if mismatch:
        fits = fitting_models(state_dict, [c for c in candidates if c != name], first_conv, classifier)
        problems = list(hints(mismatch, fits))
        if fits:
            problems.insert(0, f'the checkpoint fits {", ".join(fits)}')
        elif _family(state_dict) and _family(state_dict) != _family(expected):
            problems.insert(0, f'its keys look like {_family(state_dict)} checkpoint')
        raise ValueError(f'checkpoint does not fit {name}: ' + ' | '.join([*problems, *mismatch.describe()]))
    _check_dtypes(state_dict, expected, name)
