"""``timm-pf digits``: write scikit-learn's digits as an image folder for timm's train.py/validate.py."""
import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from timm_pf.tools.data import export_digits
    root = export_digits(args.out, img_size=args.img_size, val_fraction=args.val_fraction, seed=args.seed)
    counts = {split: sum(1 for _ in (root / split).rglob('*.png')) for split in ('train', 'validation')}
    print(f'wrote {counts["train"]} train and {counts["validation"]} validation images to {root}')
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'digits', help="export scikit-learn's digits as an image folder (train/, validation/)",
        description="Write scikit-learn's 1797 digits, upscaled to RGB PNGs, as OUT/{train,validation}/<class>/.")
    p.add_argument('out', type=Path, help='output folder')
    p.add_argument('--img-size', type=int, default=32, help='image side in pixels (default: 32)')
    p.add_argument('--val-fraction', type=float, default=0.2, help='held-out fraction (default: 0.2)')
    p.add_argument('--seed', type=int, default=0, help='split seed (default: 0)')
    p.set_defaults(func=_run)
