"""The project's data folders, shipped inside the package.

``hub_cards/`` (model card template, family data, rendered cards) and ``train_configs/`` (the papers' training
recipes) sit at the top of the repository. In a checkout this package holds a symbolic link to each, so a
source tree, an editable install (``pip install -e``) and a built wheel (where setuptools copies the files in as
package data) all find them at the same place inside the package, read through :mod:`importlib.resources`.
"""
from importlib.resources import files
from pathlib import Path
from typing import Optional

__all__ = ['HUB_CARDS', 'TRAIN_CONFIGS', 'data_dir', 'checkout_dir']

HUB_CARDS = 'hub_cards'
TRAIN_CONFIGS = 'train_configs'


def data_dir(name: str) -> Path:
    """The installed folder ``name`` (:data:`HUB_CARDS` or :data:`TRAIN_CONFIGS`).

    pip installs a wheel as files, so the package's resources are a real folder.
    """
    if name not in (HUB_CARDS, TRAIN_CONFIGS):
        raise ValueError(f'no data folder {name!r}: expected {HUB_CARDS!r} or {TRAIN_CONFIGS!r}')
    return Path(files(__name__).joinpath(name))


def checkout_dir(name: str) -> Optional[Path]:
    """The repository folder ``name`` links to in a source checkout, or None in an installed wheel, whose copy
    belongs to the package and is not rewritten (``timm-pf card --write`` regenerates the repository's cards)."""
    link = data_dir(name)
    return link.resolve() if link.is_symlink() else None
