"""timm-pf: parameter-free and dynamic-convolution architectures for timm.

Importing this package registers every model in timm's registry, so ``timm.create_model``,
``timm.list_models('ours_*')`` and timm's scripts (``--device-modules timm_pf``) see them.
"""
from .version import __version__
from . import layers, models, rba  # rba registers the architecture of saved block approximations

__all__ = ['__version__', 'layers', 'models']
