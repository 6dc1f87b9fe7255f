""" Checkpoint helpers shared by the model families' ``checkpoint_filter_fn``

``unwrap_checkpoint`` takes the tensors out of a training checkpoint; ``check_matches_model`` raises a
ValueError naming the missing, unexpected and mis-shaped tensors when a (converted) checkpoint does not
fit a model. Each family keeps its own key conversion and its own hints about what went wrong.
"""
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.models._helpers import clean_state_dict

__all__ = ['CheckpointMismatch', 'check_matches_model', 'unwrap_checkpoint']


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


def check_matches_model(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        first_conv: Optional[str] = None,
        classifier: str = 'head',
        hints: Callable[[CheckpointMismatch], Iterable[str]] = lambda mismatch: (),
) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys of ``state_dict`` for ``model``.

    The ``classifier`` and the input channels of the ``first_conv`` weight may differ: timm's pretrained
    loader drops or adapts them after the filter (``num_classes`` / ``in_chans`` other than the
    checkpoint's). ``hints`` adds family-specific explanations (e.g. the checkpoint's block layout).
    """
    mismatch = CheckpointMismatch.between(state_dict, model.state_dict(), lambda k: k.startswith(f'{classifier}.'))
    mismatch.mis_shaped = [  # the first conv may differ in its input channels only
        (k, shape, want) for k, shape, want in mismatch.mis_shaped
        if not (k == f'{first_conv}.weight' and shape[:1] + shape[2:] == want[:1] + want[2:])]
    if mismatch:
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        problems = [*hints(mismatch), *mismatch.describe()]
        raise ValueError(f'checkpoint does not fit {name}: ' + ' | '.join(problems))
