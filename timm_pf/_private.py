"""The private timm and torch names the package uses, in one place.

Each entry says why no public API serves. ``tests/test_private_names.py`` checks that every name still exists
with the expected form, so a timm or torch upgrade that moves one fails there with a clear message.
"""
import torch
from timm.models._efficientnet_blocks import ConvBnAct, SqueezeExcite
from timm.models._features import feature_take_indices
from timm.models._hub import load_model_config_from_path
from torch._higher_order_ops.scan import scan
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_leaves

__all__ = ['ConvBnAct', 'SqueezeExcite', 'TorchDispatchMode', 'current_dispatch_mode', 'feature_take_indices',
           'load_model_config_from_path', 'scan', 'tensor_version', 'tree_leaves']

# ConvBnAct (keys ``conv`` / ``bn1``) and SqueezeExcite (keys ``conv_reduce`` / ``conv_expand``) are the blocks
# timm's GhostNet is made of; ParameterNet keeps GhostNet's state-dict keys, so it needs these very classes.
# ``timm.layers`` exports different classes under the same names (other keys), and ``timm.models`` none.

# feature_take_indices resolves ``forward_intermediates(indices=...)`` exactly as timm's own models do;
# timm exports it from no public module.

# load_model_config_from_path reads a Hub folder's config.json exactly as timm's ``hf-hub:`` loading does
# (architecture, model args); timm exports only the variant that downloads from the Hub.

# scan is the operator ``torch.export`` turns into an ONNX ``Scan`` over a dynamic batch (the dynamic conv's
# export path); torch has it under no public name yet.

# TorchDispatchMode is how the MAC counter and the benchmark's memory measurement see every aten call, and
# tree_leaves walks the tensors of its arguments; torch documents the mode (``__torch_dispatch__``) but exports it
# from no public module. The current dispatch mode tells the deformable pool that such a mode (FlopCounterMode,
# a tracer's fake mode) is watching, so it takes its dense path; torch has no public query for it.
current_dispatch_mode = _get_current_dispatch_mode


def tensor_version(tensor: torch.Tensor) -> int:
    """How many in-place writes ``tensor`` has seen: torch's ``_version`` counter, which has no public name."""
    return tensor._version
