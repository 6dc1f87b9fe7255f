"""``timm-pf digits``: write scikit-learn's digits as an image folder for timm's train.py/validate.py."""
import argparse

from ._args import number, output_dir


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
    p.add_argument('out', type=output_dir, help='output folder')
    p.add_argument('--img-size', type=number(int, 8, 1024), default=32, help='image side in pixels, 8 to 1024 '
                                                                             '(default: 32)')
    # every class (about 180 images each) keeps images on both sides of the split
    p.add_argument('--val-fraction', type=number(float, 0.01, 0.99), default=0.2,
                   help='held-out fraction, 0.01 to 0.99 (default: 0.2)')
    p.add_argument('--seed', type=number(int, 0, 2 ** 32 - 1), default=0, help='split seed (default: 0)')
    p.set_defaults(func=_run)
