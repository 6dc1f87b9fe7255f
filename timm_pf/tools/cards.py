"""Model cards for the Hub repositories of timm-pf, rendered from ``hub_cards/``.

One template (``hub_cards/template.md``) for every card, one data file per model family
(``hub_cards/families/<module>.yaml``: architecture, what differs from the paper, the paper's results with
their source, citation, one line per variant), and a pretrained cfg (preprocessing, license). Three kinds of
card share that one render path and differ only in the values of a :class:`CardSpec`:

* a pretrained tag ``<model>.<tag>`` (repository ``timm-pf/<model>.<tag>``);
* a Replacement Learning variant ``<variant>`` (:data:`timm_pf.models.replace.PLAIN_MODELS`): it has no tag
  of its own; its trained weights, finalised into the plain model, are published as ``timm-pf/<variant>``;
* a model pushed from a folder in timm's ``save_for_hf`` layout to any repository (``timm-pf push FOLDER
  --repo-id ORG/NAME``), e.g. an RBA model; its card is rendered when it is pushed, not committed.

The numbers in a card's "Model stats" table are measured by :mod:`timm_pf.methods.stats` when the card is
rendered; ``timm-pf card --write`` writes the tag and variant cards to ``hub_cards/cards/`` and the tests check the
committed cards against the registered models.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import yaml
from huggingface_hub import ModelCardData
from torch import nn

import timm
from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag

from .._data import HUB_CARDS, TRAIN_CONFIGS, data_dir
from ..methods.replacement import finalize
from ..methods.stats import ModelStats, count_params, model_stats
from ..models._cfg import hub_repo_id
from ..models._registry import pf_pretrained_tags, resolve_name_tag
from ..models.replace import PLAIN_MODELS

__all__ = [
    'CARDS_DIR', 'CardError', 'CardSpec', 'family_of', 'load_family', 'results_rows', 'weights_provenance',
    'measure_cells',
    'format_stats', 'stats_table', 'parse_stats', 'card_names', 'resolve_card_name', 'render', 'render_card',
    'render_folder_card', 'card_path', 'write_cards', 'orphan_cards',
]

CARDS_DIR = data_dir(HUB_CARDS)
TRAIN_CONFIGS_DIR = data_dir(TRAIN_CONFIGS)

_FAMILY_KEYS = ('title', 'paper', 'license', 'datasets', 'tags', 'architecture', 'differences', 'results',
                'citation', 'variants')
_PART_OF = 'Part of [timm-pf](https://huggingface.co/timm-pf)'
_MADE_WITH = 'Made with [timm-pf](https://huggingface.co/timm-pf)'


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


def results_rows(family: str, cards_dir: Union[str, Path] = CARDS_DIR) -> List[Dict[str, str]]:
    """The rows of a family's results table (the paper's numbers, ``results.table``), each ``{column: cell}``."""
    lines = [line.strip() for line in load_family(family, cards_dir)['results']['table'].strip().splitlines()]
    if len(lines) < 2 or not all(line.startswith('|') and line.endswith('|') for line in lines):
        raise CardError(f'the results table of the {family} family is not a markdown table')
    header, *rows = ([cell.strip() for cell in line[1:-1].split('|')] for line in lines[:1] + lines[2:])
    return [dict(zip(header, row)) for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# Stats

_LEARNABLE_ROW = 'Learnable parameters in training'


def _create(name: str, meta: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` without weights; on the meta device (no memory, no init) if asked and possible."""
    if meta:
        try:
            with torch.device('meta'):
                return timm.create_model(name, pretrained=False, **kwargs)
        except Exception:  # model code that needs real tensors while building (e.g. data-dependent init)
            pass
    return timm.create_model(name, pretrained=False, **kwargs)


def _size(input_size: Sequence[int]) -> str:
    return f'{input_size[-2]} x {input_size[-1]}'


def _params_cell(params: int) -> str:
    return f'{params:,d} ({params / 1e6:.2f} M)'


_STATS_ROWS = (
    ('Parameters', lambda s: _params_cell(s.params)),
    ('MACs', lambda s: f'{s.macs / 1e9:.3f} G'),
    ('Activations', lambda s: f'{s.activations / 1e6:.2f} M'),
    ('Image size', lambda s: _size(s.input_size)),
)
_FAST_ROWS = ('Parameters', 'Image size')  # known without a forward pass


def format_stats(stats: ModelStats) -> Dict[str, str]:
    """The "Model stats" table cells of a card, by row name."""
    return {row: fmt(stats) for row, fmt in _STATS_ROWS}


def _fast_cells(model: nn.Module) -> Dict[str, str]:
    """The :data:`_FAST_ROWS` cells of ``model`` (its pretrained cfg's image size)."""
    stats = ModelStats(params=count_params(model), macs=0, activations=0,
                       input_size=model.pretrained_cfg['input_size'])
    return {row: cell for row, cell in format_stats(stats).items() if row in _FAST_ROWS}


def _insert_after(cells: Dict[str, str], row: str, extra: Dict[str, str]) -> Dict[str, str]:
    out = {}
    for k, v in cells.items():
        out[k] = v
        if k == row:
            out.update(extra)
    return out


def measure_cells(name: str, measure_macs: bool = True) -> Dict[str, str]:
    """The stats-table cells of the card ``name`` (a tag or a Replacement Learning variant).

    A variant's table shows its finalised plain model (what is published) and the learnable parameters of
    its training form with the recipe's model kwargs. Without ``measure_macs`` only the rows that need no
    forward pass, on models built on the meta device.
    """
    arch = split_model_name_tag(name)[0]
    extra = {}
    if arch in PLAIN_MODELS:
        training = _create(arch, meta=not measure_macs, **_recipe_model_kwargs(arch))
        extra[_LEARNABLE_ROW] = _params_cell(count_params(training))
        model = finalize(training)
    else:
        model = _create(name, meta=not measure_macs)
    cells = format_stats(model_stats(model.eval())) if measure_macs else _fast_cells(model)
    return _insert_after(cells, 'Parameters', extra)


_STATS_HEADER = '| Stat | Value |\n|---|---|\n'


def stats_table(cells: Dict[str, str]) -> str:
    """The "Model stats" table of a card."""
    return _STATS_HEADER + '\n'.join(f'| {k} | {v} |' for k, v in cells.items())


def parse_stats(card_text: str) -> Dict[str, str]:
    """The "Model stats" table cells written in a card, by row name (the inverse of :func:`stats_table`)."""
    m = re.search(rf'^{re.escape(_STATS_HEADER)}((?:\|.*\|(?:\n|$))+)', card_text, flags=re.MULTILINE)
    if m is None:
        raise CardError('card has no "Model stats" table')
    cells = dict(re.findall(r'^\| (.+?) \| (.+?) \|$', m.group(1), flags=re.MULTILINE))
    missing = [row for row, _ in _STATS_ROWS if row not in cells]
    if missing:
        raise CardError(f'card has no "{missing[0]}" row in its stats table')
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Provenance of tag weights

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


# ---------------------------------------------------------------------------------------------------------------
# What each card shows

def card_names() -> List[str]:
    """Every committed card: each pretrained tag of our models and each Replacement Learning variant."""
    return pf_pretrained_tags() + sorted(PLAIN_MODELS)


def resolve_card_name(name: str) -> str:
    """``'model'`` / ``'model.tag'`` -> the card's name (the default tag if none given; a variant as is)."""
    arch, tag = split_model_name_tag(name)
    if arch in PLAIN_MODELS:
        if tag:
            raise CardError(f'{arch} has no pretrained tags (pretrained=True starts from the weights of '
                            f'{PLAIN_MODELS[arch]}); its card is named {arch}')
        return arch
    return resolve_name_tag(name)


def _variant_summary(family: Dict, arch: str, cards_dir: Union[str, Path]) -> str:
    variant = (family['variants'] or {}).get(arch)
    if not variant or not variant.get('summary'):
        raise CardError(f'{arch}: add a one-line "summary" under variants.{arch} in '
                        f'{Path(cards_dir) / "families" / (family_of(arch) + ".yaml")}')
    return variant['summary'].strip()


def _recipe(variant: str) -> str:
    recipe = f'train_configs/{variant}.yaml'
    if not (TRAIN_CONFIGS_DIR.parent / recipe).is_file():
        raise CardError(f'{variant}: its recipe {recipe} does not exist (`python -m timm_pf.tools.recipes --write`)')
    return recipe


def _recipe_model_kwargs(variant: str) -> Dict[str, Any]:
    """The model kwargs the recipe trains ``variant`` with (e.g. ``replace_interval``)."""
    recipe = yaml.safe_load((TRAIN_CONFIGS_DIR.parent / _recipe(variant)).read_text(encoding='utf-8'))
    return dict(recipe.get('model_kwargs') or {})


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


@dataclass
class CardSpec:
    """What one card shows. Tag, variant and pushed-folder cards differ only in these values."""
    name: str  # the title; a committed card's file and the repository are named after it
    model_ref: str  # what the usage snippets pass to timm.create_model
    hub_repo: str  # the repository of the weights
    model_architecture: str  # the "Architecture" line (markdown)
    summary: str
    provenance: str  # the "Weights" line: where the weights come from
    data_cfg: Dict[str, Any]  # a pretrained cfg: num_classes, input_size, interpolation, crop_pct, mean, std...
    stats_cells: Dict[str, str]
    family: Optional[Dict] = None  # hub_cards/families data; None leaves out the paper's sections
    datasets: Sequence[str] = ()
    notes: Sequence[str] = ()
    hub_link: str = _PART_OF
    extra_tags: Sequence[str] = ()


def _tag_spec(name_tag: str, stats_cells: Dict[str, str], cards_dir: Union[str, Path]) -> CardSpec:
    arch, tag = split_model_name_tag(name_tag)
    cfg = get_pretrained_cfg(name_tag)
    name_tag = f'{arch}.{tag or cfg.tag}'
    family = load_family(family_of(arch), cards_dir)
    return CardSpec(
        name=name_tag,
        model_ref=name_tag,
        hub_repo=hub_repo_id(name_tag),
        model_architecture=f'`{arch}`',
        summary=_variant_summary(family, arch, cards_dir),
        provenance=(weights_provenance(name_tag, cards_dir)
                    or 'not published yet; timm-pf will train them (recipes in `train_configs/`).'),
        data_cfg=cfg.to_dict(),
        stats_cells=stats_cells,
        family=family,
        datasets=family['datasets'],
        notes=cfg.notes or (),
    )


def _variant_spec(variant: str, stats_cells: Dict[str, str], cards_dir: Union[str, Path]) -> CardSpec:
    family = load_family(family_of(variant), cards_dir)
    plain = PLAIN_MODELS[variant]
    plain_cfg = get_pretrained_cfg(plain)
    repo_id = hub_repo_id(variant)
    recipe = _recipe(variant)
    kwargs = _kwargs_text(_recipe_model_kwargs(variant))
    return CardSpec(
        name=variant,
        model_ref=f'hf-hub:{repo_id}',
        hub_repo=repo_id,
        model_architecture=f'`{plain}` (trained as `{variant}`{", " + kwargs if kwargs else ""})',
        summary=_variant_summary(family, variant, cards_dir),
        provenance=(f"trained from scratch in replacement-learning form, as the paper trains (supplement A.1), by "
                    f"timm's `train.py --config {recipe}`, baked back into a plain `{plain}` by "
                    f"`timm_pf.replacement.finalize` and published with `timm-pf push <folder> --repo-id {repo_id}`. "
                    f"Preprocessing is that of `{plain}.{plain_cfg.tag}`."),
        data_cfg=plain_cfg.to_dict(),
        stats_cells=stats_cells,
        family=family,
        datasets=family['datasets'],
    )


def _front_matter(spec: CardSpec) -> str:
    family = spec.family or {}
    data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=spec.data_cfg.get('license') or family.get('license'),
        tags=['image-classification', 'timm', 'timm-pf', *family.get('tags', ()), *spec.extra_tags],
        datasets=list(spec.datasets) or None,
    )
    return f'---\n{data.to_yaml()}\n---'


def _join(values) -> str:
    return ', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)


# ``<!-- if NAME -->`` ... ``<!-- end NAME -->`` lines of the template: kept when the card has NAME
_OPTIONAL_BLOCK = re.compile(r'^<!-- if (\w+) -->\n(.*?)^<!-- end \1 -->\n', flags=re.MULTILINE | re.DOTALL)


def render(spec: CardSpec, cards_dir: Union[str, Path] = CARDS_DIR) -> str:
    """Markdown card (with YAML front matter) of ``spec``, from ``hub_cards/template.md``."""
    cfg = spec.data_cfg
    fields = dict(
        front_matter=_front_matter(spec),
        name=spec.name,
        model_ref=spec.model_ref,
        hub_repo=spec.hub_repo,
        model_architecture=spec.model_architecture,
        summary=spec.summary,
        provenance=spec.provenance,
        dataset=', '.join(spec.datasets) or 'not stated',
        num_classes=cfg['num_classes'],
        input_size=_size(cfg['input_size']),
        test_input_size=_size(cfg.get('test_input_size') or cfg['input_size']),
        interpolation=cfg['interpolation'],
        crop_pct=cfg['crop_pct'],
        mean=_join(cfg['mean']),
        std=_join(cfg['std']),
        notes='\n'.join(f'  - {n}' for n in spec.notes) or '  - none',
        stats_table=stats_table(spec.stats_cells),
    )
    family = spec.family
    if family:
        paper = family['paper']
        fields.update(
            hub_link=spec.hub_link,
            family_title=family['title'],
            paper_title=paper['title'],
            paper_authors=paper['authors'],
            paper_venue=paper['venue'],
            paper_url=paper['url'],
            paper_code=paper['code'],
            architecture=family['architecture'].strip(),
            differences=family['differences'].strip(),
            results_table=family['results']['table'].strip(),
            results_source=family['results']['source'].strip(),
            citation=family['citation'].strip(),
        )
    blocks = {'paper': bool(family)}
    text = (Path(cards_dir) / 'template.md').read_text(encoding='utf-8')
    text = _OPTIONAL_BLOCK.sub(lambda m: m.group(2) if blocks[m.group(1)] else '', text)
    return Template(text).substitute(fields)


def render_card(name: str, stats: Optional[ModelStats] = None, cards_dir: Union[str, Path] = CARDS_DIR,
                stats_cells: Optional[Dict[str, str]] = None) -> str:
    """Card of a pretrained tag (``model[.tag]``) or of a Replacement Learning variant.

    The stats table shows ``stats``, or ``stats_cells`` as already formatted (see :func:`parse_stats`), or
    stats measured now (:func:`measure_cells`).
    """
    if stats_cells is None:
        stats_cells = format_stats(stats) if stats is not None else measure_cells(name)
    if split_model_name_tag(name)[0] in PLAIN_MODELS:
        return render(_variant_spec(resolve_card_name(name), stats_cells, cards_dir), cards_dir)
    return render(_tag_spec(name, stats_cells, cards_dir), cards_dir)


def _family_if_any(arch: str, cards_dir: Union[str, Path]) -> Optional[Dict]:
    """Card data of the family of ``arch`` if it is one of our models that has some."""
    if not model_entrypoint(arch).__module__.startswith('timm_pf.models.'):
        return None
    path = Path(cards_dir) / 'families' / f'{family_of(arch)}.yaml'
    return load_family(family_of(arch), cards_dir) if path.is_file() else None


def _span_note(span: Dict[str, Any]) -> str:
    dim = span['dim']
    kind = f'{span["num_tokens"]} per-token {dim}x{dim} linear maps' if span.get('num_tokens') else \
        f'a {dim}x{dim} linear map'
    bias = ' with bias' if span.get('bias') else ''
    return f'blocks after `{span["source"]}` up to `{span["target"]}` replaced by {kind}{bias} ({span["layout"]})'


def _own_notes(cfg: Dict[str, Any]) -> Sequence[str]:
    """The notes of a folder's pretrained cfg, unless they are those of the registered tag the model was built
    from (timm's ``save_for_hf`` copies them; they describe that tag's weights, not the folder's)."""
    notes = cfg.get('notes') or ()
    try:
        registered = timm.models.get_pretrained_cfg(f'{cfg["architecture"]}.{cfg.get("tag") or ""}'.rstrip('.'))
    except Exception:  # no such tag registered
        registered = None
    return () if registered is not None and tuple(registered.notes or ()) == tuple(notes) else notes


def render_folder_card(model: nn.Module, model_args: Dict[str, Any], repo_id: str,
                       cards_dir: Union[str, Path] = CARDS_DIR) -> str:
    """Card of a model pushed from a folder in timm's ``save_for_hf`` layout to ``repo_id``.

    ``model`` is the model rebuilt from the folder's ``config.json`` (``model_args`` are its model args).
    An RBA model (architecture ``rba``) also gets its base model's numbers, measured at the same image size,
    and its approximated spans; a model of one of our families gets the family's paper sections.
    """
    cfg = dict(model.pretrained_cfg)
    arch = cfg['architecture']
    stats = model_stats(model.eval())
    cells = format_stats(stats)
    args = {k: v for k, v in model_args.items() if k not in ('base_model', 'spans')}
    how = f'`timm-pf push <folder> --repo-id {repo_id}`'
    if arch == 'rba':
        base_name = model_args['base_model']
        base = timm.create_model(base_name, pretrained=False, **args).eval()
        base_cells = format_stats(model_stats(base, stats.input_size))
        cells.update({f'{row} of {base_name}': base_cells[row] for row, _ in _STATS_ROWS if row != 'Image size'})
        spans = model_args['spans']
        n_spans = f'{len(spans)} span{"s" if len(spans) != 1 else ""}'
        spec = dict(
            model_architecture=f'`rba`: `{base_name}`{" with " + _kwargs_text(args) if args else ""}, '
                               f'{n_spans} of blocks replaced (listed under Notes)',
            summary=(f'`{base_name}` with {n_spans} of blocks replaced by linear maps fitted in closed '
                     f'form: Redundant Blocks Approximation (RBA), from "Detecting and Approximating Redundant '
                     f'Computational Blocks in Neural Networks" (ICLR 2025 submission).'),
            provenance=(f'approximated from a `{base_name}` with `timm_pf.rba.approximate`, saved with '
                        f'`timm_pf.rba.save_rba` and published with {how}.'),
            notes=[_span_note(s) for s in spans],
            family=_family_if_any(base_name, cards_dir),
            extra_tags=('rba',),
        )
    else:
        spec = dict(
            model_architecture=f'`{arch}`{" with " + _kwargs_text(args) if args else ""}',
            summary=f"`{arch}` weights in timm's format.",
            provenance=(f"a folder in timm's `save_for_hf` layout published with {how}; the folder does not "
                        f"record how the weights were trained (`--card FILE` publishes a card that does)."),
            notes=_own_notes(cfg),
            family=_family_if_any(arch, cards_dir),
        )
    return render(CardSpec(name=repo_id, model_ref=f'hf-hub:{repo_id}', hub_repo=repo_id, data_cfg=cfg,
                           stats_cells=cells, hub_link=_MADE_WITH, **spec), cards_dir)


def card_path(name: str, cards_dir: Union[str, Path] = CARDS_DIR) -> Path:
    """Where the generated card of ``name`` (a tag or a variant) is committed."""
    return Path(cards_dir) / 'cards' / f'{name}.md'


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
