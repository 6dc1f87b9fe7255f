"""The committed model cards (hub_cards/cards/) agree with the registered models and the card data.

Cards: every pretrained tag and every Replacement Learning variant (no tag: its card describes the
finalised plain model published as timm-pf/<variant>). Cost: the parameter counts, image size and every
line outside the stats table are checked for every card (models built on the meta device: no memory, no
init). MACs and activations need a forward
pass at 224 (seconds per model on 2 cores), so they are measured for one model per family, the smallest
one: the stats code is shared by all models of a family, and a family-wide change in the layers moves the
smallest model's numbers too.
"""
import shutil
from collections import defaultdict
from pathlib import Path
from typing import List, Union

import pytest
import yaml

import timm
from _model_checks import count_params_fast
from timm_pf.tools.cards import (
    CARDS_DIR, CardError, card_names, card_path, family_of, format_stats, measure_cells, orphan_cards, parse_stats,
    render_card, stats_table,
)
from timm_pf.methods.stats import ModelStats, count_params
from timm_pf.models.replace import PLAIN_MODELS
from timm_pf.tools.hub import pf_pretrained_tags

TAGS = pf_pretrained_tags()
CARDS = card_names()


def card_problems(name: str, measure_macs: bool, cards_dir: Union[str, Path] = CARDS_DIR) -> List[str]:
    """How the committed card of ``name`` disagrees with the registered model and ``hub_cards/`` data.

    Always checks the parameter counts, the image size and every line outside the stats table; with
    ``measure_macs`` also MACs and activations (a forward pass at the pretrained size).
    """
    path = card_path(name, cards_dir)
    if not path.is_file():
        return [f'{path} is missing: run `timm-pf card --write {name}`']
    text = path.read_text(encoding='utf-8')
    cells = parse_stats(text)
    problems = [f'{name}: {row} is "{cells.get(row)}" in {path.name}, the model gives "{value}"'
                for row, value in measure_cells(name, measure_macs).items() if cells.get(row) != value]
    if text != render_card(name, stats_cells=cells, cards_dir=cards_dir):
        problems.append(f'{name}: {path.name} differs from what hub_cards/ and the pretrained cfg render')
    return problems


def _smallest_per_family():
    by_family = defaultdict(list)
    for name in CARDS:
        by_family[family_of(name)].append((count_params_fast(name), name))
    return [min(tags)[1] for _, tags in sorted(by_family.items())]


def test_there_are_cards_to_check():
    assert TAGS, 'no pretrained tags registered'
    assert set(PLAIN_MODELS) <= set(CARDS), 'every Replacement Learning variant has a card'


@pytest.mark.parametrize('name_tag', CARDS)
def test_card_matches_model_params_and_data(name_tag):
    assert card_problems(name_tag, measure_macs=False) == []


@pytest.mark.parametrize('name_tag', _smallest_per_family())
def test_card_macs_and_activations_match_model(name_tag):
    assert card_problems(name_tag, measure_macs=True) == []


def test_no_card_without_a_registered_tag():
    assert list((CARDS_DIR / 'cards').glob('*.md')), 'no committed cards'
    assert orphan_cards(CARDS) == [], 'cards of tags no longer registered: run `timm-pf card --write`'


@pytest.mark.parametrize('name_tag', CARDS)
def test_front_matter_is_what_the_hub_reads(name_tag):
    from huggingface_hub import ModelCard
    card = ModelCard.load(card_path(name_tag))
    meta = card.data.to_dict()
    assert meta['library_name'] == 'timm' and meta['pipeline_tag'] == 'image-classification'
    assert meta['license'] and meta['datasets'] and 'timm' in meta['tags']
    for heading in ('## Model details', '### Model stats', '## Architecture', '## What differs from the paper',
                    '## Results reported in the paper', '## Usage', '## Citation'):
        assert heading in card.text, heading
    model_ref = f'hf-hub:timm-pf/{name_tag}' if name_tag in PLAIN_MODELS else name_tag
    assert f"timm.create_model('{model_ref}', pretrained=True" in card.text
    assert 'features_only=True' in card.text and 'num_classes=0' in card.text


def test_stale_or_tampered_cards_are_caught(tmp_path):
    cards_dir = tmp_path / 'hub_cards'
    shutil.copytree(CARDS_DIR, cards_dir)
    name_tag = TAGS[0]
    path = card_path(name_tag, cards_dir)
    text = path.read_text(encoding='utf-8')
    params = parse_stats(text)['Parameters']
    path.write_text(text.replace(f'| Parameters | {params} |', '| Parameters | 1 (0.00 M) |'), encoding='utf-8')
    problems = card_problems(name_tag, measure_macs=False, cards_dir=cards_dir)
    assert len(problems) == 1 and 'Parameters' in problems[0]
    family_file = cards_dir / 'families' / f'{family_of(name_tag)}.yaml'
    data = yaml.safe_load(family_file.read_text(encoding='utf-8'))
    data['differences'] += '\n- one more difference\n'
    family_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding='utf-8')
    path.write_text(text, encoding='utf-8')
    problems = card_problems(name_tag, measure_macs=False, cards_dir=cards_dir)
    assert len(problems) == 1 and 'differs' in problems[0]
    path.unlink()
    assert 'missing' in card_problems(name_tag, measure_macs=False, cards_dir=cards_dir)[0]


def test_a_variant_without_card_data_is_named(tmp_path):
    cards_dir = tmp_path / 'hub_cards'
    shutil.copytree(CARDS_DIR, cards_dir)
    name_tag = TAGS[0]
    arch = name_tag.split('.')[0]
    family_file = cards_dir / 'families' / f'{family_of(name_tag)}.yaml'
    data = yaml.safe_load(family_file.read_text(encoding='utf-8'))
    del data['variants'][arch]
    family_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding='utf-8')
    stats = ModelStats(params=1, macs=1, activations=1, input_size=(3, 224, 224))
    with pytest.raises(CardError, match=arch):
        render_card(name_tag, stats=stats, cards_dir=cards_dir)
    family_file.unlink()
    with pytest.raises(CardError, match='no card data'):
        render_card(name_tag, stats=stats, cards_dir=cards_dir)


def test_stats_cells_round_trip():
    stats = ModelStats(params=14_232_232, macs=2_239_000_123, activations=9_740_001, input_size=(3, 256, 192))
    cells = format_stats(stats)
    assert parse_stats(stats_table(cells)) == cells
    with pytest.raises(CardError, match='MACs'):
        parse_stats(stats_table({k: v for k, v in cells.items() if k != 'MACs'}))
    assert cells['Parameters'] == '14,232,232 (14.23 M)' and cells['Image size'] == '256 x 192'


@pytest.mark.parametrize('variant', ['vit_ti_replace', 'resnet34_replace'])
def test_replace_variant_card_counts_and_provenance(variant):
    """The stats of a variant's card: the plain timm model it publishes, and its training form's learnable
    parameters; the provenance names the plain model's weights, the recipe, finalize and the push."""
    text = card_path(variant).read_text(encoding='utf-8')
    cells = parse_stats(text)
    plain = PLAIN_MODELS[variant]
    plain_params = count_params(timm.create_model(plain, pretrained=False))
    learnable = count_params(timm.create_model(variant, pretrained=False, replace_interval=2))
    assert cells['Parameters'].startswith(f'{plain_params:,d} ')
    assert cells['Learnable parameters in training'].startswith(f'{learnable:,d} ') and learnable < plain_params
    plain_cfg = timm.models.get_pretrained_cfg(plain)
    for fact in (f'{plain}.{plain_cfg.tag}', 'trained from scratch', f'train_configs/{variant}.yaml',
                 'timm_pf.replacement.finalize', f'--repo-id timm-pf/{variant}', 'arXiv:2410.01239'):
        assert fact in text, fact


def test_stale_variant_card_is_caught(tmp_path):
    cards_dir = tmp_path / 'hub_cards'
    shutil.copytree(CARDS_DIR, cards_dir)
    path = card_path('vit_ti_replace', cards_dir)
    text = path.read_text(encoding='utf-8')
    learnable = parse_stats(text)['Learnable parameters in training']
    path.write_text(text.replace(f'| Learnable parameters in training | {learnable} |',
                                 '| Learnable parameters in training | 1 (0.00 M) |'), encoding='utf-8')
    problems = card_problems('vit_ti_replace', measure_macs=False, cards_dir=cards_dir)
    assert len(problems) == 1 and 'Learnable parameters in training' in problems[0]
    with pytest.raises(CardError, match='no pretrained tags'):
        render_card('vit_ti_replace.in1k', stats_cells={}, cards_dir=cards_dir)


def test_a_folder_card_leaves_out_the_notes_of_the_tag_the_model_was_built_from(tmp_path):
    """save_for_hf copies the registered tag's notes ("no released weights ...") into any folder made from
    that model; they describe the tag's weights, not the folder's."""
    from timm.models import save_for_hf
    from timm_pf.tools.cards import render_folder_card
    from timm_pf.tools.hub import load_folder_model
    model = timm.create_model('pit_ti_maxpool', num_classes=10)
    tag_notes = model.pretrained_cfg['notes']
    save_for_hf(model, tmp_path / 'plain', safe_serialization=True)
    card = render_folder_card(*load_folder_model(tmp_path / 'plain'), 'me/pit10')
    assert tag_notes and not any(note in card for note in tag_notes)
    model.pretrained_cfg = dict(model.pretrained_cfg, notes=('fine-tuned on my 10 classes',))
    save_for_hf(model, tmp_path / 'own', safe_serialization=True)
    assert 'fine-tuned on my 10 classes' in render_folder_card(*load_folder_model(tmp_path / 'own'), 'me/pit10')


def test_write_regenerates_a_checkout_and_leaves_an_installed_package_alone(monkeypatch, tmp_path, capsys):
    import timm_pf._data as data
    from timm_pf.cli import main
    from timm_pf.tools import recipes
    if (Path(recipes.__file__).parents[2] / '.git').exists():  # a source checkout links the repository's folders
        assert data.checkout_dir(data.HUB_CARDS) == (Path(recipes.__file__).parents[2] / 'hub_cards').resolve()
    installed = {}
    for name in (data.HUB_CARDS, data.TRAIN_CONFIGS):  # as a wheel installs them: real folders, copies
        installed[name] = tmp_path / name
        shutil.copytree(data.data_dir(name), installed[name])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*')}
    monkeypatch.setattr(data, 'data_dir', installed.__getitem__)
    assert data.checkout_dir(data.HUB_CARDS) is None
    assert main(['card', '--write']) == 2
    assert 'part of the installed package' in capsys.readouterr().err
    monkeypatch.setattr(recipes, 'CONFIG_DIR', installed[data.TRAIN_CONFIGS])
    assert recipes.main(['--write', '--dir', str(installed[data.TRAIN_CONFIGS])]) == 2
    assert 'give --dir to write elsewhere' in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*')} == before
    assert recipes.main(['--write', '--dir', str(tmp_path / 'mine')]) == 0  # a folder of the user's own
    assert any((tmp_path / 'mine').rglob('*.yaml'))
