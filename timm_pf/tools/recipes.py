"""The papers' ImageNet training recipes as timm ``train.py`` configs (``train_configs/``).

Each recipe is a set of ``train.py`` arguments (YAML keys are the arguments' dest names) with the source it
comes from. Every registered variant gets ``train_configs/<variant>.yaml`` with its family's main recipe;
further recipes of a family go to ``train_configs/<recipe>/<variant>.yaml``. The files are generated::

    python -m timm_pf.tools.recipes --write      # rewrite train_configs/
    python -m timm_pf.tools.recipes --check      # exit 1 if a file is missing or out of date

The folder ships inside the package (:mod:`timm_pf._data`), so an installed package has it too: ``timm-pf
train-config MODEL [RECIPE]`` prints a config (:func:`find_config`).

Batch sizes are the papers' global batch: timm's ``--batch-size`` is per process, so divide it by the number
of processes (and keep ``lr``) when training on several GPUs.
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import yaml

from .._data import TRAIN_CONFIGS, checkout_dir, data_dir
from ..models._registry import did_you_mean

__all__ = [
    'Recipe', 'RECIPES', 'FAMILY_RECIPES', 'MODEL_RECIPES', 'RecipeError', 'recipes_for', 'render_config',
    'expected_configs', 'shipped_configs', 'find_config',
]

CONFIG_DIR = data_dir(TRAIN_CONFIGS)


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    args: Dict[str, Any]
    notes: Tuple[str, ...] = field(default_factory=tuple)


_PFLAYER = 'Han et al., "Learning Features with Parameter-Free Layers", ICLR 2022 (arXiv:2202.02777)'
_PARAMETERNET = 'Han et al., "ParameterNet: Parameters Are All You Need" (arXiv:2306.14525), Table 1'
_REPLACEMENT = ('Zhang et al., "Replacement Learning: Training Vision Tasks with Fewer Learnable Parameters" '
                '(arXiv:2410.01239), supplement A.1 (ImageNet)')
_REPLACEMENT_NOTES = (
    'AdamW, weight decay 1e-4, 100 epochs, cosine annealing; no warm-up is mentioned, so none is used.',
    'The supplement does not state the interval k; 2 (every 2nd layer replaced) is this package\'s default.',
    "Augmentation and label smoothing are not given: train.py's defaults apply.",
)


def _replacement_recipe(name: str, models: str, batch_size: int, lr: float, note: str) -> Recipe:
    """Supplement A.1: one ImageNet recipe, with batch size and lr per architecture."""
    return Recipe(
        name=name,
        source=f'{_REPLACEMENT}: the {models} settings, batch {batch_size}, lr {lr}',
        args=dict(
            model_kwargs={'replace_interval': 2}, opt='adamw', lr=lr, batch_size=batch_size, weight_decay=1e-4,
            sched='cosine', epochs=100, warmup_epochs=0,
        ),
        notes=_REPLACEMENT_NOTES + (note,),
    )

RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name='pflayer_standard',
        source=f'{_PFLAYER}, §4.1 footnote 4: the standard 90-epoch ImageNet setup of Tables 2-4',
        args=dict(
            opt='sgd', momentum=0.9, lr=0.4, batch_size=256, sched='step', epochs=90, decay_epochs=30,
            decay_rate=0.1, warmup_epochs=0, weight_decay=1e-4, img_size=224, scale=[0.08, 1.0],
            color_jitter=0.0, smoothing=0.0, train_interpolation='bilinear',
        ),
        notes=(
            "timm's 'sgd' optimizer is SGD with Nesterov momentum, as the paper uses.",
            'lr 0.4 is the linear-scaling value the paper states for its batch of 256.',
        ),
    ),
    Recipe(
        name='pflayer_improved',
        source=f'{_PFLAYER}, Appendix C: the improved recipe of the dagger rows of Table 3',
        args=dict(
            opt='sgd', momentum=0.9, lr=0.5, batch_size=512, sched='cosine', epochs=400, weight_decay=1e-5,
            model_ema=True, smoothing=0.1, aa='rand-m9-mstd0.5', reprob=0.2, img_size=224,
            scale=[0.08, 1.0],
        ),
        notes=(
            'The paper does not give the EMA decay or warm-up: these are timm defaults.',
            'Footnote 6: 600 epochs (--epochs 600) gave the longer-trained weights (R50-max 75.5, hybrid 78.0).',
        ),
    ),
    Recipe(
        name='deit',
        source=(f'{_PFLAYER}, §5.3 Table 6 "+DeiT" column: the DeiT recipe (Touvron et al., 2021) as used '
                'by PiT (Heo et al., 2021)'),
        args=dict(
            opt='adamw', lr=1e-3, batch_size=1024, weight_decay=0.05, sched='cosine', epochs=300,
            warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, aa='rand-m9-mstd0.5-inc1',
            reprob=0.25, mixup=0.8, cutmix=1.0, drop_path=0.1, aug_repeats=3, img_size=224,
            interpolation='bicubic', train_interpolation='bicubic',
        ),
        notes=('DeiT scales lr as 5e-4 x batch / 512: 1e-3 for the global batch of 1024.',
               'Repeated augmentation (aug_repeats: 3) needs a distributed run (torchrun); with one process add '
               '--aug-repeats 0, which timm\'s train.py otherwise refuses.',
               'With -inc1, RandAugment of timm 1.0.31 can posterize to 0 bits, which Pillow >= 13 refuses '
               '(ValueError: bits must be between or equal to 1 and 8): there, install pillow<13.'),
    ),
    Recipe(
        name='parameternet_in1k',
        source=f'{_PARAMETERNET}, ImageNet-1K column',
        args=dict(
            opt='adamw', lr=1e-3, batch_size=1024, sched='cosine', epochs=300, warmup_epochs=20,
            weight_decay=0.05, smoothing=0.1, aa='rand-m9-mstd0.5', reprob=0.25, model_ema=True,
            model_ema_decay=0.9999, img_size=224,
        ),
        notes=('The paper ticks RandAugment without a magnitude: m9 is timm\'s usual choice.',),
    ),
    Recipe(
        name='parameternet_in22k',
        source=f'{_PARAMETERNET}, ImageNet-22K pretraining column',
        args=dict(
            opt='adamw', lr=4e-3, batch_size=4096, sched='cosine', epochs=90, warmup_epochs=5,
            weight_decay=0.05, smoothing=0.1, aa='rand-m9-mstd0.5', reprob=0.25, num_classes=21841,
            img_size=224,
        ),
        notes=('Point --data-dir (or --dataset) at ImageNet-22K.',),
    ),
    Recipe(
        name='parameternet_in22k_ft',
        source=f'{_PARAMETERNET}, ImageNet-1K fine-tuning column',
        args=dict(
            opt='adamw', lr=5e-4, batch_size=512, sched='cosine', epochs=30, warmup_epochs=0,
            layer_decay=0.5, weight_decay=1e-8, smoothing=0.1, aa='rand-m9-mstd0.5', model_ema=True,
            model_ema_decay=0.9999, num_classes=1000, img_size=224,
        ),
        notes=('Start from the ImageNet-22K run: --pretrained --pretrained-path <its checkpoint> '
               '(the 21841-class head is dropped).',),
    ),
    _replacement_recipe('replacement', 'ViT-B / ResNet-34', 128, 0.04,
                        "ViT-Ti/S and the max-pool ViT-S are not in the paper: ViT-B's settings."),
    _replacement_recipe('replacement_deep_resnet', 'ResNet-101 / ResNet-152', 32, 0.01,
                        'ResNet-50 is not in the paper: the settings of its bottleneck ResNets.'),
)}

# Model family (timm module name of the entrypoint) -> its recipes; the first is the variant's main config.
FAMILY_RECIPES: Dict[str, Tuple[str, ...]] = {
    'resnet_pf': ('pflayer_standard', 'pflayer_improved'),
    'vit_pf': ('deit',),
    'pit_pf': ('deit',),
    'parameternet': ('parameternet_in1k', 'parameternet_in22k', 'parameternet_in22k_ft'),
    'replace': ('replacement',),
}

# Variants whose paper gives them a recipe other than their family's.
MODEL_RECIPES: Dict[str, Tuple[str, ...]] = {
    'resnet50_replace': ('replacement_deep_resnet',),
    'resnet101_replace': ('replacement_deep_resnet',),
    'resnet152_replace': ('replacement_deep_resnet',),
}


def our_models() -> List[str]:
    """Every model that timm_pf registers."""
    import timm_pf  # noqa: F401  registers the models
    return sorted(m for family in FAMILY_RECIPES for m in timm.list_models(module=family))


def recipes_for(model_name: str) -> Tuple[Recipe, ...]:
    arch = timm.models.get_arch_name(model_name)
    family = timm.models.model_entrypoint(arch).__module__.split('.')[-1] if timm.models.is_model(arch) else None
    if family not in FAMILY_RECIPES:
        raise KeyError(f'{model_name!r} is not a timm_pf model with a training recipe')
    return tuple(RECIPES[r] for r in MODEL_RECIPES.get(arch, FAMILY_RECIPES[family]))


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_yaml_value(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {_yaml_value(v)}' for k, v in value.items()) + '}'
    if isinstance(value, str):
        return f"'{value}'"
    text = repr(value)
    if isinstance(value, float) and 'e' in text and '.' not in text:
        mantissa, exponent = text.split('e')
        text = f'{mantissa}.0e{exponent}'  # YAML 1.1 (PyYAML) reads 1e-05 as a string, 1.0e-05 as a float
    return text


def render_config(model_name: str, recipe: Recipe) -> str:
    """The YAML text of ``recipe`` for ``model_name``: a header citing the source, then train.py arguments."""
    lines = [f'# {model_name}: {recipe.name} recipe.', f'# Source: {recipe.source}.']
    lines += [f'# {note}' for note in recipe.notes]
    lines += ['# Generated by `python -m timm_pf.tools.recipes --write`; edit timm_pf/tools/recipes.py, not this file.',
              "# Usage: python train.py --config <this file> --data-dir <imagenet>   (timm's train.py)",
              'device_modules: [timm_pf]', f'model: {model_name}']
    lines += [f'{key}: {_yaml_value(value)}' for key, value in recipe.args.items()]
    return '\n'.join(lines) + '\n'


def expected_configs() -> Dict[Path, str]:
    """Relative path -> content of every generated config."""
    configs = {}
    for model_name in our_models():
        for i, recipe in enumerate(recipes_for(model_name)):
            rel = Path(f'{model_name}.yaml') if i == 0 else Path(recipe.name) / f'{model_name}.yaml'
            configs[rel] = render_config(model_name, recipe)
    return configs


class RecipeError(ValueError):
    """No shipped training config for the model or recipe asked for."""


def shipped_configs(config_dir: Path = CONFIG_DIR) -> Dict[str, Dict[str, Path]]:
    """Model -> recipe name -> its config file in ``config_dir``, the model's main recipe first.

    ``<model>.yaml`` holds the main recipe (named as in :data:`RECIPES`), ``<folder>/<model>.yaml`` the recipe
    ``<folder>``; any other file ``<folder>/<name>.yaml`` (the CPU quickstart) is the recipe ``<folder>/<name>``
    of the model it trains.
    """
    configs: Dict[str, Dict[str, Path]] = {}
    for path in sorted(config_dir.rglob('*.yaml')):
        model = yaml.safe_load(path.read_text(encoding='utf-8'))['model']
        rel = path.relative_to(config_dir).with_suffix('')
        if rel.parent == Path('.'):
            recipe = recipes_for(model)[0].name
        else:
            recipe = (rel.parent if rel.name == model else rel).as_posix()
        configs.setdefault(model, {})[recipe] = path
    return {model: dict(sorted(found.items(), key=lambda item: (item[1].parent != config_dir, item[0])))
            for model, found in sorted(configs.items())}


def find_config(model: str, recipe: Optional[str] = None, config_dir: Path = CONFIG_DIR) -> Path:
    """The shipped ``train.py`` config of ``model`` for ``recipe`` (default: the model's main recipe)."""
    configs = shipped_configs(config_dir)
    if model not in configs:
        raise RecipeError(f'no training config for {model!r}{did_you_mean(model, list(configs))}; '
                          f'`timm-pf train-config --list` shows them')
    recipes = configs[model]
    if recipe is None:
        return next(iter(recipes.values()))
    if recipe not in recipes:
        raise RecipeError(f'{model} has no recipe {recipe!r}; its recipes: {", ".join(recipes)}')
    return recipes[recipe]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Generate or check train_configs/ from the papers\' recipes.')
    parser.add_argument('--dir', type=Path, default=CONFIG_DIR)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument('--write', action='store_true')
    mode.add_argument('--check', action='store_true')
    args = parser.parse_args(argv)
    if args.write and args.dir == CONFIG_DIR and checkout_dir(TRAIN_CONFIGS) is None:
        print(f'--write regenerates train_configs/ of a source checkout (pip install -e); the copy at {CONFIG_DIR} '
              f'is part of the installed package: give --dir to write elsewhere', file=sys.stderr)
        return 2
    stale = []
    for rel, text in expected_configs().items():
        path = args.dir / rel
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(str(rel))
    if stale:
        print('out of date (run python -m timm_pf.tools.recipes --write):\n  ' + '\n  '.join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
