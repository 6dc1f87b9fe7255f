"""timm-pf: parameter-free and dynamic-convolution architectures for timm.

Importing this package registers every model in timm's registry, so ``timm.create_model``,
``timm.list_models('ours_*')`` and timm's scripts (``--device-modules timm_pf``) see them.
"""
from .version import __version__
from . import _moved, layers, models

_moved.install()  # the import paths from before the layout (timm_pf.rba, timm_pf.hub, ...)
__getattr__ = _moved.package_getattr

__all__ = ['__version__', 'layers', 'models']
