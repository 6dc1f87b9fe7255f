"""``timm-pf push FOLDER --repo-id ORG/NAME``: models that are not one of our pretrained tags.

An RBA model (timm_pf.rba.approximate + save_rba) and a Replacement Learning model finalised into its plain
timm architecture are pushed with the CLI to tests/hub_server.py and pulled back with
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` through the real ``huggingface_hub`` client (in a
worker process, see tests/_hub_client.py). Tiny ViTs at 32 px keep it fast.
"""
import json
import shutil

import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard

import timm
from _hub_client import (
    OUTSIDER_TOKEN, TOKENS, HubClient, client_cli, client_env, client_pull, client_upload_folder, tensor_digests,
)
from hub_server import serve_hub
from timm.models import save_for_hf

from timm_pf import rba  # the import path the README shows
from timm_pf.cli import main as cli_main
from timm_pf.methods.replacement import finalize
from timm_pf.methods.stats import count_params, model_stats
from timm_pf.tools.cards import card_path, format_stats, parse_stats
from timm_pf.tools.hub import WEIGHTS_NAME, pf_pretrained_tags, prepare_folder_push

TINY_VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10)
BASE = 'vit_tiny_patch16_224'
RBA_REPO = 'maintainer/tiny-vit-rba'
PLAIN_REPO = 'maintainer/tiny-vit-replace'


def _client_outputs(name: str, x: torch.Tensor):
    """Logits of ``create_model(name, pretrained=True)`` and the class of each block, in the client process."""
    import timm_pf  # noqa: F401  registers the 'rba' architecture
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        return model(x), [type(b).__name__ for b in model.blocks]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def hub():
    with serve_hub(TOKENS, {'timm-pf': {'maintainer'}}) as (endpoint, state):
        yield endpoint, state


@pytest.fixture(scope='module')
def client(hub, tmp_path_factory):
    c = HubClient(client_env(hub[0], tmp_path_factory.mktemp('hf_home')))
    yield c
    c.close()


@pytest.fixture(scope='module')
def base_vit():
    torch.manual_seed(0)
    return timm.create_model(BASE, **TINY_VIT).eval()


@pytest.fixture(scope='module')
def rba_model(base_vit, tmp_path_factory):
    """An RBA model (blocks 2-3 replaced by one map fitted from block 1's output) saved with save_rba."""
    torch.manual_seed(1)
    model = rba.approximate(base_vit, [(1, 3)], [torch.randn(16, 3, 32, 32) for _ in range(2)]).eval()
    folder = rba.save_rba(model, tmp_path_factory.mktemp('rba') / 'tiny_vit_rba')
    return model, folder


@pytest.fixture(scope='module')
def pushed_rba(client, hub, rba_model):
    _, folder = rba_model
    rc, out, err = client(client_cli, ['push', str(folder), '--repo-id', RBA_REPO])
    assert rc == 0, err
    assert RBA_REPO in out
    repo = hub[1].repos[RBA_REPO]
    return repo.commits[repo.branches['main']]


@pytest.fixture(scope='module')
def finalized_vit(tmp_path_factory):
    """A ViT-Ti in replacement-learning form with non-default mixes, finalised and saved with save_for_hf."""
    torch.manual_seed(2)
    model = timm.create_model('vit_ti_replace', **TINY_VIT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('neighbour_mix.a', 'neighbour_mix.b')):
                p.uniform_(0.2, 0.8)
    plain = finalize(model)
    folder = tmp_path_factory.mktemp('replace') / 'tiny_vit_replace'
    save_for_hf(plain, str(folder), safe_serialization=True)
    return plain, folder


# --------------------------------------------------------------------------------------------------------- tests
def test_rba_model_pushed_with_the_cli_loads_with_timm_from_the_hub(client, hub, rba_model, pushed_rba):
    model, _ = rba_model
    assert sorted(pushed_rba.files) == ['README.md', 'config.json', WEIGHTS_NAME]
    assert pushed_rba.files[WEIGHTS_NAME].lfs_sha256 is not None  # went through the LFS upload
    assert pushed_rba.title.startswith(f'Add rba of {BASE}')
    x = torch.randn(4, 3, 32, 32)
    downloads_before = [r for r in hub[1].requests if r.startswith(f'GET /{RBA_REPO}/resolve/')]
    pulled, blocks = client(_client_outputs, f'hf-hub:{RBA_REPO}', x)
    downloads = [r for r in hub[1].requests if r.startswith(f'GET /{RBA_REPO}/resolve/')]
    assert any(r.endswith(f'/{WEIGHTS_NAME}') for r in downloads[len(downloads_before):]), 'not pulled from the Hub'
    with torch.no_grad():
        assert torch.equal(pulled, model(x))
    assert blocks == ['Block', 'Block', 'Identity', 'LinearBlockApprox']


def test_card_on_the_hub_has_the_measured_numbers(hub, base_vit, rba_model, pushed_rba):
    model, _ = rba_model
    text = hub[1].blobs[pushed_rba.files['README.md'].blob_key].decode()
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and 'rba' in card.data.tags
    cells = parse_stats(text)
    measured, base = model_stats(model, (3, 32, 32)), model_stats(base_vit, (3, 32, 32))
    assert {row: cells[row] for row in format_stats(measured)} == format_stats(measured)
    assert cells[f'Parameters of {BASE}'] == format_stats(base)['Parameters']
    assert cells[f'MACs of {BASE}'] == format_stats(base)['MACs']
    assert measured.params < base.params and cells["Image size"] == "32 x 32"
    for fact in ('blocks after `blocks.1` up to `blocks.3` replaced by a 32x32 linear map',
                 f"timm.create_model('hf-hub:{RBA_REPO}', pretrained=True)", 'timm_pf.rba.approximate',
                 f'--repo-id {RBA_REPO}', 'import timm_pf  '):
        assert fact in text, fact
    assert '## Citation' not in text  # no card data for timm's own ViT: no paper sections


def test_weights_that_do_not_fit_their_config_are_refused(client, hub, rba_model, tmp_path):
    _, folder = rba_model
    deeper = tmp_path / 'deeper'  # config.json describes a model the weights do not fit
    shutil.copytree(folder, deeper)
    config = json.loads((deeper / 'config.json').read_text())
    config['model_args']['depth'] = 5
    (deeper / 'config.json').write_text(json.dumps(config))
    dropped = tmp_path / 'dropped'  # a tensor missing from the weights
    shutil.copytree(folder, dropped)
    state_dict = safetensors.torch.load_file(str(dropped / WEIGHTS_NAME))
    del state_dict['blocks.3.weight']
    safetensors.torch.save_file(state_dict, str(dropped / WEIGHTS_NAME))
    pickled = tmp_path / 'pickled'  # weights only as a pickle
    shutil.copytree(folder, pickled)
    torch.save(state_dict, pickled / 'pytorch_model.bin')
    (pickled / WEIGHTS_NAME).unlink()
    before = len(hub[1].requests)
    for source, expected in ((deeper, 'missing keys'), (dropped, 'blocks.3.weight'), (pickled, 'only safetensors')):
        rc, _, err = client(client_cli, ['push', str(source), '--repo-id', 'maintainer/refused'])
        assert rc == 2 and expected in err, (source.name, err)
    rc, _, err = client(client_cli, ['push', str(deeper), '--repo-id', 'maintainer/refused'])
    assert 'does not fit the model' in err and 'config.json' in err and "'depth': 5" in err
    assert len(hub[1].requests) == before, 'refused weights reached the Hub'


def test_dry_run_uploads_nothing_and_tokens_are_checked(client, hub, rba_model):
    _, folder = rba_model
    before = len(hub[1].requests)
    rc, out, err = client(client_cli, ['push', str(folder), '--repo-id', 'maintainer/dry', '--revision', 'dev',
                                       '--private', '--dry-run'], env={'HF_TOKEN': None})  # needs no token
    assert rc == 0, err
    assert 'dry run' in out and 'branch dev, private' in out
    assert all(name in out for name in (WEIGHTS_NAME, 'config.json', 'README.md'))
    assert len(hub[1].requests) == before and 'maintainer/dry' not in hub[1].repos
    rc, _, err = client(client_cli, ['push', str(folder), '--repo-id', 'maintainer/dry'], env={'HF_TOKEN': None})
    assert rc == 2 and 'no Hugging Face token' in err and 'maintainer' in err
    rc, _, err = client(client_cli, ['push', str(folder), '--repo-id', 'maintainer/dry'],
                        env={'HF_TOKEN': OUTSIDER_TOKEN})
    assert rc == 1 and 'refused' in err
    assert 'maintainer/dry' not in hub[1].repos


def test_finalised_model_to_a_private_branch_with_its_own_card(client, hub, finalized_vit, tmp_path):
    plain, folder = finalized_vit
    own_card = tmp_path / 'card.md'
    own_card.write_text('---\nlicense: apache-2.0\n---\n\n# A ViT-Ti trained with Replacement Learning\n')
    rc, _, err = client(client_cli, ['push', str(folder), '--repo-id', PLAIN_REPO, '--private', '--revision', 'dev',
                                     '--commit-message', 'finalised vit_ti_replace', '--card', str(own_card)])
    assert rc == 0, err
    repo = hub[1].repos[PLAIN_REPO]
    assert repo.private and 'dev' in repo.branches
    head = repo.commits[repo.branches['dev']]
    assert head.title == 'finalised vit_ti_replace' and head.author == 'maintainer'
    assert hub[1].blobs[head.files['README.md'].blob_key].decode() == own_card.read_text()
    x = torch.randn(2, 3, 32, 32)
    pulled, _ = client(_client_outputs, f'hf-hub:{PLAIN_REPO}@dev', x)
    with torch.no_grad():
        assert torch.equal(pulled, plain(x))
    assert json.loads(hub[1].blobs[head.files['config.json'].blob_key])['architecture'] == BASE
    # without --card: a card with the measured parameter count of the plain model
    rc, _, err = client(client_cli, ['push', str(folder), '--repo-id', PLAIN_REPO])
    assert rc == 0, err
    card = hub[1].blobs[repo.commits[repo.branches['main']].files['README.md'].blob_key].decode()
    assert parse_stats(card)['Parameters'].startswith(f'{count_params(plain):,d} ')


def test_replace_variant_repo_takes_its_finalised_plain_model_and_committed_card(rba_model, finalized_vit,
                                                                                 tmp_path, capsys):
    full = tmp_path / 'full'
    save_for_hf(finalize(timm.create_model('vit_ti_replace')), str(full), safe_serialization=True)
    plan = prepare_folder_push(full, 'timm-pf/vit_ti_replace', tmp_path / 'staged')
    assert (plan.folder / 'README.md').read_text() == card_path('vit_ti_replace').read_text()
    assert tensor_digests(safetensors.torch.load_file(str(plan.folder / WEIGHTS_NAME))) == \
        tensor_digests(safetensors.torch.load_file(str(full / WEIGHTS_NAME)))
    for folder, expected in ((rba_model[1], 'holds a rba'), (finalized_vit[1], 'parameters')):
        rc = cli_main(['push', str(folder), '--repo-id', 'timm-pf/vit_ti_replace', '--dry-run'])
        assert rc == 2 and expected in capsys.readouterr().err


def test_finalised_variant_in_our_org_loads_through_timms_own_loader(client, finalized_vit, tmp_path):
    """A finalised variant is a timm architecture: importing timm_pf changes nothing in how timm loads it (its
    safetensors, else its pickle with weights_only=True); our builders handle only our architectures."""
    pickle_only = tmp_path / 'pickle_only'
    save_for_hf(finalized_vit[0], str(pickle_only), safe_serialization=False)
    client(client_upload_folder, 'timm-pf/vit_ti_replace', str(pickle_only))
    assert client(client_pull, 'hf-hub:timm-pf/vit_ti_replace') == ('ok', tensor_digests(finalized_vit[0].state_dict()))


@pytest.mark.parametrize('argv, message', [
    (['--repo-id', 'no-namespace'], 'ORG/NAME'),
    (['--repo-id', 'maintainer/bad name'], 'not a valid Hub repository id'),
    (['--repo-id', 'maintainer/x', '--ema'], '--ema and --num-classes'),
    (['--repo-id', f'timm-pf/{pf_pretrained_tags()[0]}'], f'-m {pf_pretrained_tags()[0]}'),
    (['--repo-id', 'maintainer/x', '--card', 'no-such-card.md'], 'argument --card: no such file'),
])
def test_bad_options_exit_2_with_a_clear_message(rba_model, argv, message, capsys):
    try:
        rc = cli_main(['push', str(rba_model[1]), '--dry-run', *argv])
    except SystemExit as e:  # refused while parsing
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_model_and_repo_id_are_mutually_exclusive(rba_model, capsys):
    for argv in (['-m', pf_pretrained_tags()[0], '--repo-id', 'maintainer/x'], []):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(['push', str(rba_model[1]), '--dry-run', *argv])
        assert exit_info.value.code == 2
        assert '-m/--model' in capsys.readouterr().err


def test_a_file_is_not_a_folder(rba_model, capsys):
    assert cli_main(['push', str(rba_model[1] / WEIGHTS_NAME), '--repo-id', 'maintainer/x', '--dry-run']) == 2
    assert "save_for_hf layout" in capsys.readouterr().err


def _client_anonymous_listing(repo_id: str):
    """What a client without a token sees of a repository: its files, or the error type."""
    from huggingface_hub import HfApi
    try:
        return sorted(f.path for f in HfApi(token=False).list_repo_tree(repo_id))
    except Exception as e:
        return type(e).__name__


def test_private_makes_an_existing_public_repo_private(client, hub, rba_model, tmp_path):
    _, folder = rba_model
    repo_id = 'maintainer/made-private'
    rc, out, err = client(client_cli, ['push', str(folder), '--repo-id', repo_id])
    assert rc == 0, err
    assert 'the repository is public' in out
    assert WEIGHTS_NAME in client(_client_anonymous_listing, repo_id)
    rc, out, err = client(client_cli, ['push', str(folder), '--repo-id', repo_id, '--private'])
    assert rc == 0, err
    assert hub[1].repos[repo_id].private and 'the repository is private' in out
    assert client(_client_anonymous_listing, repo_id) == 'RepositoryNotFoundError'
    result = client(client_pull, f'hf-hub:{repo_id}', token=None, cache_dir=str(tmp_path / 'anonymous'))
    assert result[0] == 'error', result
    # pushing again without --private leaves it private, and says so
    rc, out, err = client(client_cli, ['push', str(folder), '--repo-id', repo_id])
    assert rc == 0 and hub[1].repos[repo_id].private and 'the repository is private' in out, err


def test_private_refused_by_the_hub_uploads_nothing(client, hub, rba_model):
    _, folder = rba_model
    repo_id = 'maintainer/stays-public'
    assert client(client_cli, ['push', str(folder), '--repo-id', repo_id])[0] == 0
    commits = len(hub[1].repos[repo_id].commits)
    hub[1].frozen_settings.add(repo_id)
    try:
        rc, out, err = client(client_cli, ['push', str(folder), '--repo-id', repo_id, '--private'])
    finally:
        hub[1].frozen_settings.discard(repo_id)
    assert rc == 1 and 'refused' in err and repo_id in err, err
    assert not hub[1].repos[repo_id].private and len(hub[1].repos[repo_id].commits) == commits
    assert WEIGHTS_NAME in client(_client_anonymous_listing, repo_id)
