"""The private timm names the model families use, in one place.

Each entry says why no public timm API serves. ``tests/test_timm_private.py`` checks that every name still
exists with the expected form, so a timm upgrade that moves one fails there with a clear message.
"""
from timm.models._efficientnet_blocks import ConvBnAct, SqueezeExcite
from timm.models._features import feature_take_indices

__all__ = ['ConvBnAct', 'SqueezeExcite', 'feature_take_indices']

# ConvBnAct (keys ``conv`` / ``bn1``) and SqueezeExcite (keys ``conv_reduce`` / ``conv_expand``) are the blocks
# timm's GhostNet is made of; ParameterNet keeps GhostNet's state-dict keys, so it needs these very classes.
# ``timm.layers`` exports different classes under the same names (other keys), and ``timm.models`` none.

# feature_take_indices resolves ``forward_intermediates(indices=...)`` exactly as timm's own models do;
# timm exports it from no public module.
