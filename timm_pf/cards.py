"""Model cards for the Hub repositories of our pretrained tags, rendered from ``hub_cards/``.

One template (``hub_cards/template.md``) for every card, one data file per model family
(``hub_cards/families/<module>.yaml``: architecture, what differs from the paper, the paper's results with
their source, citation, one line per variant), and the pretrained cfg of the tag (preprocessing, license,
origin of the weights). The numbers in a card's "Model stats" table are measured by :mod:`timm_pf.stats`
when the card is rendered; ``timm-pf card --write`` writes every card to ``hub_cards/cards/`` and the tests
check the committed cards against the registered models.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Callable, Dict, List, Optional, Union

import torch
import yaml
from huggingface_hub import ModelCardData

import timm
from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag

from .stats import ModelStats, count_params, model_stats

__all__ = [
    'CARDS_DIR', 'CardError', 'family_of', 'load_family', 'weights_provenance', 'measure_stats', 'count_params_fast',
    'format_stats', 'parse_stats', 'render_card', 'card_path', 'card_problems', 'write_cards', 'orphan_cards',
]

CARDS_DIR = Path(__file__).resolve().parents[1] / 'hub_cards'
TRAIN_CONFIGS_DIR = Path(__file__).resolve().parents[1] / 'train_configs'

_FAMILY_KEYS = ('title', 'paper', 'license', 'datasets', 'tags', 'architecture', 'differences', 'results',
                'citation', 'variants')


class CardError(ValueError):
    """The card data in ``hub_cards/`` is missing or incomplete for a model."""


def family_of(name: str) -> str:
    """Family of a model: the short name of the module that registers it (``'resnet_pf'``)."""
    return model_entrypoint(split_model_name_tag(name)[0]).__module__.rsplit('.', 1)[-1]


def load_family(family: str, cards_dir: Union[str, Path] = CARDS_DIR) -> Dict:
    """The data of ``hub_cards/families/<family>.yaml``, checked for every key the template needs."""
    path = Path(cards_dir) / 'families' / f'{family}.yaml'
    if not path.is_file():
        raise CardError(f'no card data for the {family} family: write {path} (see {Path(cards_dir) / "README.md"})')
    data = yaml.safe_load(path.read_text(encoding='utf-8'))
    missing = [k for k in _FAMILY_KEYS if k not in data]
    if missing:
        raise CardError(f'{path} lacks {", ".join(missing)}')
    return data


# ---------------------------------------------------------------------------------------------------------------
# Stats

def measure_stats(name_tag: str) -> ModelStats:
    """Params, MACs and activations of ``name_tag`` at its pretrained cfg's input size (CPU, float32)."""
    model = timm.create_model(name_tag, pretrained=False).eval()
    return model_stats(model)


def count_params_fast(name_tag: str) -> int:
    """Parameter count of ``name_tag``, built on the meta device (no memory, no init) when the model allows."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name_tag, pretrained=False)
    except Exception:  # model code that needs real tensors while building (e.g. data-dependent init)
        model = timm.create_model(name_tag, pretrained=False)
    return count_params(model)


_STATS_ROWS = (
    ('Parameters', lambda s: f'{s.params:,d} ({s.params / 1e6:.2f} M)'),
    ('MACs', lambda s: f'{s.macs / 1e9:.3f} G'),
    ('Activations', lambda s: f'{s.activations / 1e6:.2f} M'),
    ('Image size', lambda s: f'{s.input_size[-2]} x {s.input_size[-1]}'),
)


def format_stats(stats: ModelStats) -> Dict[str, str]:
    """The "Model stats" table cells of a card, by row name."""
    return {row: fmt(stats) for row, fmt in _STATS_ROWS}


def parse_stats(card_text: str) -> Dict[str, str]:
    """The "Model stats" table cells written in a card, by row name (the inverse of :func:`format_stats`)."""
    cells = {}
    for row, _ in _STATS_ROWS:
        m = re.search(rf'^\| {re.escape(row)} \| (.+?) \|$', card_text, flags=re.MULTILINE)
        if m is None:
            raise CardError(f'card has no "{row}" row in its stats table')
        cells[row] = m.group(1)
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Rendering

def weights_provenance(name_tag: str, cards_dir: Union[str, Path] = CARDS_DIR) -> Optional[str]:
    """Where the published weights of ``name_tag`` come from, or None when nothing says so.

    From the family file's ``variants.<model>``: ``converted: {tag: authors' checkpoint URL}`` (converted from
    the authors' release) or ``trained: {tag: train_configs/... recipe}``; otherwise a
    ``train_configs/<model>.<tag>.yaml`` or ``train_configs/<model>.yaml`` recipe means timm-pf trains it.
    """
    arch, tag = split_model_name_tag(name_tag)
    tag = tag or get_pretrained_cfg(arch).tag
    family = family_of(arch)
    variant = (load_family(family, cards_dir)['variants'] or {}).get(arch) or {}
    checkpoint_url = (variant.get('converted') or {}).get(tag)
    if checkpoint_url:
        return (f"converted from the authors' release ({checkpoint_url}) with `timm-pf convert`: their keys "
                f"mapped by the family's checkpoint filter, then loaded strictly.")
    recipe = (variant.get('trained') or {}).get(tag)
    if recipe and not (TRAIN_CONFIGS_DIR.parent / recipe).is_file():
        raise CardError(f'{name_tag}: the recipe {recipe} named in hub_cards/families/{family}.yaml does not exist')
    if not recipe:
        recipe = next((f'train_configs/{f}' for f in (f'{arch}.{tag}.yaml', f'{arch}.yaml')
                       if (TRAIN_CONFIGS_DIR / f).is_file()), None)
    if recipe:
        return f"trained by timm-pf with timm's `train.py` and the recipe `{recipe}`."
    return None


def _front_matter(family: Dict, cfg) -> str:
    data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=cfg.license or family['license'],
        tags=['image-classification', 'timm', 'timm-pf', *family['tags']],
        datasets=list(family['datasets']),
    )
    return f'---\n{data.to_yaml()}\n---'


def _join(values) -> str:
    return ', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)


def render_card(name_tag: str, stats: Optional[ModelStats] = None, cards_dir: Union[str, Path] = CARDS_DIR,
                stats_cells: Optional[Dict[str, str]] = None) -> str:
    """Markdown card (with YAML front matter) of one pretrained tag.

    The stats table shows ``stats``, or ``stats_cells`` as already formatted (see :func:`parse_stats`), or
    stats measured now.
    """
    arch, tag = split_model_name_tag(name_tag)
    cfg = get_pretrained_cfg(name_tag)
    tag = tag or cfg.tag
    family = load_family(family_of(arch), cards_dir)
    variant = (family['variants'] or {}).get(arch)
    if not variant or not variant.get('summary'):
        raise CardError(f'{arch}: add a one-line "summary" under variants.{arch} in '
                        f'{Path(cards_dir) / "families" / (family_of(arch) + ".yaml")}')
    if stats_cells is None:
        stats_cells = format_stats(stats if stats is not None else measure_stats(f'{arch}.{tag}'))
    stats_table = '\n'.join(['| Stat | Value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in stats_cells.items()])
    paper = family['paper']
    notes = '\n'.join(f'  - {n}' for n in (cfg.notes or ()))
    template = Template((Path(cards_dir) / 'template.md').read_text(encoding='utf-8'))
    return template.substitute(
        front_matter=_front_matter(family, cfg),
        name_tag=f'{arch}.{tag}',
        arch=arch,
        summary=variant['summary'].strip(),
        family_title=family['title'],
        paper_title=paper['title'],
        paper_authors=paper['authors'],
        paper_venue=paper['venue'],
        paper_url=paper['url'],
        paper_code=paper['code'],
        provenance=(weights_provenance(f'{arch}.{tag}', cards_dir)
                    or 'not published yet; timm-pf will train them (recipes in `train_configs/`).'),
        dataset=', '.join(family['datasets']),
        num_classes=cfg.num_classes,
        input_size=f'{cfg.input_size[-2]} x {cfg.input_size[-1]}',
        test_input_size=(f'{cfg.test_input_size[-2]} x {cfg.test_input_size[-1]}'
                         if cfg.test_input_size else f'{cfg.input_size[-2]} x {cfg.input_size[-1]}'),
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        mean=_join(cfg.mean),
        std=_join(cfg.std),
        notes=notes or '  - none',
        stats_table=stats_table,
        architecture=family['architecture'].strip(),
        differences=family['differences'].strip(),
        results_table=family['results']['table'].strip(),
        results_source=family['results']['source'].strip(),
        citation=family['citation'].strip(),
    )


def card_path(name_tag: str, cards_dir: Union[str, Path] = CARDS_DIR) -> Path:
    """Where the generated card of ``name_tag`` is committed."""
    return Path(cards_dir) / 'cards' / f'{name_tag}.md'


def card_problems(name_tag: str, measure_macs: bool, cards_dir: Union[str, Path] = CARDS_DIR) -> List[str]:
    """How the committed card of ``name_tag`` disagrees with the registered model and ``hub_cards/`` data.

    Always checks the parameter count, the image size and every line outside the stats table; with
    ``measure_macs`` also MACs and activations (a forward pass at the pretrained size).
    """
    path = card_path(name_tag, cards_dir)
    if not path.is_file():
        return [f'{path} is missing: run `timm-pf card --write {name_tag}`']
    text = path.read_text(encoding='utf-8')
    cells = parse_stats(text)
    if measure_macs:
        expected = format_stats(measure_stats(name_tag))
    else:
        input_size = get_pretrained_cfg(name_tag).input_size
        measured = format_stats(ModelStats(params=count_params_fast(name_tag), macs=0, activations=0,
                                           input_size=input_size))
        expected = {row: measured[row] for row in ('Parameters', 'Image size')}
    problems = [f'{name_tag}: {row} is "{cells[row]}" in {path.name}, the model gives "{value}"'
                for row, value in expected.items() if cells[row] != value]
    if text != render_card(name_tag, stats_cells=cells, cards_dir=cards_dir):
        problems.append(f'{name_tag}: {path.name} differs from what hub_cards/ and the pretrained cfg render')
    return problems


@dataclass
class CardStatus:
    name_tag: str
    path: Path
    up_to_date: bool


def _log(message: str) -> None:
    print(message, flush=True)


def write_cards(name_tags: List[str], cards_dir: Union[str, Path] = CARDS_DIR, check_only: bool = False,
                log: Callable[[str], None] = _log) -> List[CardStatus]:
    """Render the cards of ``name_tags``; write the ones that changed unless ``check_only``."""
    statuses = []
    for name_tag in name_tags:
        path = card_path(name_tag, cards_dir)
        text = render_card(name_tag, cards_dir=cards_dir)
        old = path.read_text(encoding='utf-8') if path.is_file() else None
        up_to_date = old == text
        if not up_to_date and not check_only:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding='utf-8')
        log(f'{"ok     " if up_to_date else ("stale  " if check_only else "written")} {path}')
        statuses.append(CardStatus(name_tag, path, up_to_date))
    return statuses


def orphan_cards(name_tags: List[str], cards_dir: Union[str, Path] = CARDS_DIR) -> List[Path]:
    """Committed cards whose tag is not in ``name_tags`` (e.g. a removed or renamed tag)."""
    keep = {card_path(t, cards_dir) for t in name_tags}
    return sorted(p for p in (Path(cards_dir) / 'cards').glob('*.md') if p not in keep)
