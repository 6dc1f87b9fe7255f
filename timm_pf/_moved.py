"""The import paths modules had before the package was layered (``timm_pf.rba``, ``timm_pf.hub``, ...).

README examples and existing code use them: each old path is the module it moved to, imported on first use
(``import timm_pf.rba``, ``from timm_pf import rba`` or the attribute ``timm_pf.rba``), so ``import timm_pf``
itself imports none of them.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional

_PACKAGE = __name__.rpartition('.')[0]

#: old module name -> where the module lives now, relative to the package
MOVED = {
    'rba': 'methods.rba',
    'replacement': 'methods.replacement',
    'stats': 'methods.stats',
    'bench': 'tools.bench',
    'hub': 'tools.hub',
    'cards': 'tools.cards',
    'recipes': 'tools.recipes',
    'data': 'tools.data',
}


def _new_name(fullname: str) -> Optional[str]:
    """Where ``timm_pf.<old name>[.<submodule>]`` lives now (None for other names)."""
    old, _, rest = fullname[len(_PACKAGE) + 1:].partition('.') if fullname.startswith(f'{_PACKAGE}.') else ('', '', '')
    if old not in MOVED:
        return None
    return f'{_PACKAGE}.{MOVED[old]}' + (f'.{rest}' if rest else '')


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``timm_pf.<old name>`` and its submodules and puts the moved module in ``sys.modules`` under the old
    name too: one module object for both names, so classes and exceptions are the same."""

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if _new_name(fullname) is not None:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default placeholder, replaced in sys.modules by exec_module

    def exec_module(self, module: ModuleType) -> None:
        sys.modules[module.__name__] = importlib.import_module(_new_name(module.__name__))


def install() -> None:
    """Put the finder first in ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # ahead of path finders that would look for the old files


def package_getattr(name: str) -> ModuleType:
    """The package's module ``__getattr__``: ``timm_pf.<old name>`` imports the moved module."""
    if name in MOVED:
        return importlib.import_module(f'{_PACKAGE}.{name}')
    raise AttributeError(f'module {_PACKAGE!r} has no attribute {name!r}')
