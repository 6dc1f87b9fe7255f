"""Small real datasets that ship with common packages, for examples and tests that must run offline.

scikit-learn's ``load_digits`` (1797 greyscale 8x8 digits, 10 classes) is upscaled to RGB images, either
as tensors in memory or written as an image folder that timm's ``train.py``/``validate.py`` read.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['digits_split', 'digits_tensors', 'export_digits']


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of scikit-learn's digits: (train_images, train_labels, val_images, val_labels),
    images as float arrays in [0, 1] of shape (N, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install 'timm-pf[digits]'") from e
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, digits.target, test_size=val_fraction, random_state=seed, stratify=digits.target)
    return x_tr, y_tr, x_va, y_va


def _upscale(images: np.ndarray, img_size: int) -> torch.Tensor:
    x = torch.from_numpy(images).unsqueeze(1)
    x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
    return x.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()


def digits_tensors(
        img_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        normalize: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as RGB tensors (N, 3, img_size, img_size): (x_train, y_train, x_val, y_val).

    With ``normalize`` the images are standardised with ImageNet mean/std, as timm's loaders do.
    """
    x_tr, y_tr, x_va, y_va = digits_split(val_fraction, seed)
    xs = [_upscale(x_tr, img_size), _upscale(x_va, img_size)]
    if normalize:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        xs = [(x - mean) / std for x in xs]
    return xs[0], torch.from_numpy(y_tr).long(), xs[1], torch.from_numpy(y_va).long()


def export_digits(
        root: Union[str, Path],
        img_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
) -> Path:
    """Write digits as PNGs in the image-folder layout ``root/{train,validation}/<class>/<index>.png``.

    That layout is what timm's ``train.py`` (``--train-split train --val-split validation``) and
    ``validate.py`` read. Returns ``root``. Raises FileExistsError when ``root`` already has a split folder:
    images of another split seed or size would mix with the new ones.
    """
    from PIL import Image
    root = Path(root)
    existing = [split for split in ('train', 'validation') if (root / split).exists()]
    if existing:
        raise FileExistsError(f'{root} already has {" and ".join(f"{s}/" for s in existing)}: write the digits to a '
                              f'new folder, or remove {"them" if len(existing) > 1 else "it"} first')
    x_tr, y_tr, x_va, y_va = digits_split(val_fraction, seed)
    root.mkdir(parents=True, exist_ok=True)
    # written into a hidden folder of root and moved into place when complete: an interrupted export leaves no
    # split folder that looks finished
    staging = Path(tempfile.mkdtemp(prefix='.digits-', dir=root))
    try:
        for split, images, labels in (('train', x_tr, y_tr), ('validation', x_va, y_va)):
            for i, (image, label) in enumerate(zip(images, labels)):  # one image at a time: large sizes fit
                pixels = (_upscale(image[None], img_size)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
                out = staging / split / str(int(label))
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.numpy()).save(out / f'{i:05d}.png')
        for split in ('train', 'validation'):
            os.rename(staging / split, root / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
