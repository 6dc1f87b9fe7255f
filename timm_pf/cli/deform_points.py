"""``timm-pf deform-points``: draw where deformable pools sample, as in Figure E.2 of "Learning Features with
Parameter-Free Layers" (Appendix E.2).

For a chosen output location of the last of the chosen deformable blocks, the sampling points are composed
through the chosen blocks (last to first, 9 points per block and point: 81 for the default two blocks, the
last two deformable pools of the final stage as in the paper). Red: predicted points; blue: the regular grid
the same blocks would sample without offsets; green: the location itself.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._args import image_file, input_file, non_negative_float, number
from ._errors import BadInput

_DEFAULT_CENTRES = ('0.35,0.45', '0.9,0.1')  # relative (y, x): near the centre and near a corner


def _deform_pools(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    from timm_pf.layers import LearnedDeformPool2d
    return {name: m for name, m in model.named_modules() if isinstance(m, LearnedDeformPool2d)}


def _predicted_offsets(model: torch.nn.Module, image: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Offsets ``(18, Ho, Wo)`` in feature pixels (dy, dx per kernel point) predicted by each named pool."""
    pools = _deform_pools(model)
    captured, handles = {}, []
    for name in names:
        def hook(module, args, output, name=name):
            captured[name] = module.predict_offsets(args[0])[0][0].float()
        handles.append(pools[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _interpolate(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``field`` ``(C, H, W)`` at ``points`` ``(N, 2)`` (y, x), zero outside: ``(N, C)``."""
    height, width = field.shape[-2:]
    grid = torch.stack(((2 * points[:, 1] + 1) / width - 1, (2 * points[:, 0] + 1) / height - 1), dim=-1)
    return F.grid_sample(field[None], grid[None, None], align_corners=False)[0, :, 0].t()


def compose_sampling_points(
        offsets: Sequence[torch.Tensor],
        centre: Tuple[float, float],
        kernel_size: int = 3,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Points sampled for output ``centre`` (feature pixels) through stride-1 deformable pools.

    ``offsets`` are the blocks' offset maps ``(2 * k * k, H, W)``, first block first. Returns the predicted and
    the regular (zero-offset) points, each ``(k ** (2 * len(offsets)), 2)`` as (y, x).
    """
    taps = torch.stack(torch.meshgrid(torch.arange(kernel_size), torch.arange(kernel_size), indexing='ij'), -1)
    taps = (taps.reshape(-1, 2) - (kernel_size - 1) // 2).float()
    predicted = regular = torch.tensor([centre], dtype=torch.float32)
    for offset in reversed(offsets):
        shift = _interpolate(offset, predicted).view(-1, kernel_size * kernel_size, 2)
        predicted = (predicted[:, None] + taps + shift).reshape(-1, 2)
        regular = (regular[:, None] + taps).reshape(-1, 2)
    return predicted, regular


def _load_image(path: Optional[Path], size: int):
    import numpy as np
    if path is None:
        try:
            from skimage import data
        except ImportError:
            raise BadInput("the default image comes from scikit-image: pip install 'timm-pf[plot]' "
                           "(or pass --image FILE)") from None
        pixels = data.chelsea()
    else:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert('RGB'))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BadInput(f'--image {path} is not an image that Pillow can read ({type(e).__name__}: {e})') from e
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    height, width = pixels.shape[:2]
    side = min(height, width)  # centre crop to a square, then resize
    top, left = (height - side) // 2, (width - side) // 2
    pixels = pixels[top:top + side, left:left + side, :3]
    tensor = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255  # a copy: Pillow's is read-only
    resized = F.interpolate(tensor[None], size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return resized[0].clamp(0, 1)  # antialiased resampling overshoots at sharp edges


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    from timm_pf.models._checkpoint import load_strict, read_checkpoint
    load_strict(model, read_checkpoint(path), f'checkpoint {path}', 'the model')


def _parse_centre(text: str) -> Tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a centre is "y,x" in [0, 1] relative to the image, got {text!r}')
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError(f'a centre is "y,x" in [0, 1] relative to the image, got {text!r}')
    return y, x


def draw_sampling_points(args: argparse.Namespace) -> int:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("timm-pf deform-points needs matplotlib: pip install 'timm-pf[plot]'") from None
    from timm_pf.tools.hub import create_model

    if args.init_std and (args.checkpoint or args.pretrained):
        raise BadInput('--init-std replaces the offset predictors with random ones: it illustrates a model without '
                       'trained weights, so it does not go with --checkpoint or --pretrained')
    if args.init_std:
        torch.manual_seed(0)  # the untrained model's other weights too: the same figure on every run
    model = create_model(args.model, pretrained=args.pretrained).eval()
    pools = _deform_pools(model)
    if not pools:
        raise BadInput(f'{args.model} has no deformable pools')
    if args.checkpoint:
        _load_weights(model, args.checkpoint)
    if args.init_std:
        with torch.no_grad():
            for pool in pools.values():
                pool.offset_conv.weight.normal_(0, args.init_std)
    names = list(args.blocks) if args.blocks else list(pools)[-2:]
    unknown = [n for n in names if n not in pools]
    if unknown:
        raise BadInput(f'no deformable pool named {", ".join(unknown)}; choose from {", ".join(pools)}')
    order = list(pools)
    if [order.index(n) for n in names] != sorted({order.index(n) for n in names}):
        raise BadInput(f'--blocks must name each pool once, in model order (first to last): {", ".join(names)}')
    if any(pools[n].pool.stride != (1, 1) for n in names):
        raise BadInput('the chosen pools must have stride 1')

    image = _load_image(args.image, args.img_size)
    cfg = model.pretrained_cfg
    mean, std = (torch.tensor(cfg[k]).view(3, 1, 1) for k in ('mean', 'std'))
    offsets = _predicted_offsets(model, ((image - mean) / std)[None], names)
    sizes = {tuple(offsets[n].shape[-2:]) for n in names}
    if len(sizes) != 1:
        raise BadInput(f'the chosen pools work at different resolutions {sorted(sizes)}; choose pools of one stage')
    (feat_h, feat_w), = sizes
    scale_y, scale_x = args.img_size / feat_h, args.img_size / feat_w

    centres: List[Tuple[float, float]] = args.centres or [_parse_centre(c) for c in _DEFAULT_CENTRES]
    fig, axes = plt.subplots(1, len(centres), figsize=(4 * len(centres), 4), squeeze=False)
    for ax, (rel_y, rel_x) in zip(axes[0], centres):
        centre = (min(int(rel_y * feat_h), feat_h - 1), min(int(rel_x * feat_w), feat_w - 1))
        predicted, regular = compose_sampling_points([offsets[n] for n in names], centre)
        to_image = torch.tensor([scale_y, scale_x])
        predicted, regular = (predicted + 0.5) * to_image - 0.5, (regular + 0.5) * to_image - 0.5
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.scatter(regular[:, 1], regular[:, 0], s=6, c='tab:blue', label='regular grid')
        ax.scatter(predicted[:, 1], predicted[:, 0], s=6, c='red', label='predicted')
        ax.scatter([(centre[1] + 0.5) * scale_x - 0.5], [(centre[0] + 0.5) * scale_y - 0.5], s=40, c='lime',
                   edgecolors='black', label='centre')
        ax.set_xlim(-0.5, args.img_size - 0.5)
        ax.set_ylim(args.img_size - 0.5, -0.5)
        ax.set_axis_off()
    axes[0][0].legend(loc='lower left', fontsize=7)
    fig.suptitle(f'{args.model}: sampling points of {" + ".join(names)}', fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=args.dpi)
    plt.close(fig)
    print(f'wrote {args.output}')
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'deform-points', help='draw the sampling points predicted by deformable pools on an image (Fig. E.2)',
        description=__doc__.replace('``', '`'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ours_r50_deform_max',
                        help='model with deformable pools (default: ours_r50_deform_max)')
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights of the model')
    parser.add_argument('--checkpoint', type=input_file,
                        help='weights to load (.safetensors, or a .pth/.pt state dict)')
    parser.add_argument('--init-std', type=non_negative_float, default=0.0,
                        help='randomly initialise the offset predictors with this std (illustration without '
                             'trained weights; untrained predictors are zero, so points sit on the grid)')
    parser.add_argument('--blocks', nargs='+', metavar='NAME',
                        help='deformable pools to compose, first to last (default: the last two, e.g. '
                             'layer4.1.spatial layer4.2.spatial)')
    parser.add_argument('--image', type=input_file,
                        help='image file (default: skimage.data.chelsea(), needs the plot extra)')
    parser.add_argument('--img-size', type=number(int, 32, 4096), default=224,
                        help='square input size, 32 to 4096 (default 224)')
    parser.add_argument('--centres', nargs='+', type=_parse_centre, metavar='Y,X',
                        help='output locations to draw, relative "y,x" in [0, 1] '
                             '(default: near the centre and near a corner)')
    parser.add_argument('--output', type=image_file, default='deform_points.png',
                        help='figure to write (.png, .pdf, .svg, .jpg; default: deform_points.png)')
    parser.add_argument('--dpi', type=number(int, 10, 1200), default=150, help='resolution of the figure (default 150)')
    parser.set_defaults(func=draw_sampling_points)
