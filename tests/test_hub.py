"""Publishing and fetching weights: ``timm-pf convert`` / ``push`` and ``create_model(..., pretrained=True)``.

The Hub side is tests/hub_server.py on 127.0.0.1; the client side runs in fresh worker processes
(tests/_hub_client.py), and the ``client_*`` / ``_client_*`` functions run there.
"""
import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import timm
from _hub_client import (
    MAINTAINER_TOKEN, OUTSIDER_TOKEN, TOKENS, HubClient, client_cli, client_env, client_pull, client_upload_folder,
    tensor_digests,
)
from _official import fixtures_dir, load_official_fixture
from _model_checks import count_params_fast
from hub_server import serve_hub

import timm_pf  # noqa: F401
from timm_pf.cli import main as cli_main
from timm_pf.tools.cards import CardError, weights_provenance
from timm.models import save_for_hf
from timm_pf.models._pretrained import sha256_file
from timm_pf.tools.hub import (
    WEIGHTS_NAME, CheckpointError, load_folder_model, pf_pretrained_tags, resolve_name_tag, verify_folder,
)

ORGS = {'timm-pf': {'maintainer'}}


# ------------------------------------------------------------------------------------------ client process side
def _client_listing(repo_id: str):
    """What the Hub client reports about a repository: branches, files at main, commit titles."""
    from huggingface_hub import HfApi
    api = HfApi()
    refs = api.list_repo_refs(repo_id)
    tree = {f.path: (f.size, f.lfs.sha256 if f.lfs else None) for f in api.list_repo_tree(repo_id)}
    infos = {f.path: f.size for f in api.get_paths_info(repo_id, ['config.json', WEIGHTS_NAME])}
    commits = [c.title for c in api.list_repo_commits(repo_id)]
    return dict(branches=sorted(b.name for b in refs.branches), tree=tree, paths_info=infos, commits=commits,
                sha=api.model_info(repo_id).sha)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def hub():
    with serve_hub(TOKENS, ORGS) as (endpoint, state):
        yield endpoint, state


@pytest.fixture(scope='module')
def hub_env(hub, tmp_path_factory):
    return client_env(hub[0], tmp_path_factory.mktemp('hf_home'))


@pytest.fixture(scope='module')
def client(hub_env):
    c = HubClient(hub_env)
    assert c.endpoint == hub_env['HF_ENDPOINT']
    yield c
    c.close()


@pytest.fixture(scope='module')
def publishable_tags():
    """Our tags whose weights have a stated origin, smallest model first (keeps pushes small)."""
    def publishable(name_tag):
        try:
            return weights_provenance(name_tag) is not None
        except CardError:  # a family without card data yet cannot be pushed
            return False

    tags = [t for t in pf_pretrained_tags() if publishable(t)]
    assert len(tags) >= 2, 'need two publishable pretrained tags to test pushing'
    sizes = {t: count_params_fast(t) for t in tags}
    return sorted(tags, key=lambda t: (sizes[t], t))


@pytest.fixture(scope='module')
def weights(publishable_tags, tmp_path_factory):
    """A timm train.py checkpoint of the smallest publishable tag with distinct EMA weights, and both converted."""
    name_tag = publishable_tags[0]
    torch.manual_seed(0)
    state_dict = timm.create_model(name_tag).state_dict()
    ema = {k: v + 0.5 if v.is_floating_point() else v.clone() for k, v in state_dict.items()}
    tmp = tmp_path_factory.mktemp('weights')
    path = tmp / 'checkpoint.pth.tar'
    # laid out like timm's train.py checkpoints, which also keep the run's argparse.Namespace
    torch.save({'epoch': 3, 'arch': name_tag.split('.')[0], 'state_dict': state_dict, 'state_dict_ema': ema,
                'optimizer': {'lr': 0.1}, 'args': argparse.Namespace(model=name_tag, lr=0.1)}, path)
    folders = {}
    for kind, flag in (('ema', ['--ema']), ('plain', [])):
        folders[kind] = tmp / kind
        assert cli_main(['convert', str(path), '--model', name_tag, '-o', str(folders[kind]), *flag]) == 0
    return dict(name_tag=name_tag, path=path, folders=folders, digests=tensor_digests(state_dict),
                ema_digests=tensor_digests(ema))


@pytest.fixture(scope='module')
def published(client, hub, weights):
    """The EMA weights pushed from the training checkpoint to main of the tag's repository."""
    rc, out, err = client(client_cli, ['push', str(weights['path']), '--model', weights['name_tag'], '--ema'])
    assert rc == 0, err
    repo_id = f'timm-pf/{weights["name_tag"]}'
    return dict(weights, repo_id=repo_id, first_commit=hub[1].repos[repo_id].branches['main'])


def _push(client, folder, name_tag, *args, env=None):
    return client(client_cli, ['push', str(folder), '--model', name_tag, *args], env=env)


# --------------------------------------------------------------------------------------------------- push + pull
def test_push_then_pretrained_loads_bit_identical(client, hub, published):
    commit = hub[1].repos[published['repo_id']].commits[published['first_commit']]
    assert sorted(commit.files) == ['README.md', 'config.json', WEIGHTS_NAME]
    assert commit.files[WEIGHTS_NAME].lfs_sha256 is not None  # went through the LFS upload
    card = hub[1].blobs[commit.files['README.md'].blob_key].decode()
    assert card.startswith('---\n') and 'library_name: timm' in card and published['name_tag'] in card
    for name in (published['name_tag'], f'hf-hub:{published["repo_id"]}'):
        assert client(client_pull, name) == ('ok', published['ema_digests']), name


def test_default_tag_and_pinned_revision(client, hub, published):
    # a second push (the non-EMA weights) moves main; the first commit stays reachable by its hash
    rc, _, err = _push(client, published['folders']['plain'], published['name_tag'])
    assert rc == 0, err
    assert hub[1].repos[published['repo_id']].branches['main'] != published['first_commit']
    latest = client(client_pull, published['name_tag'])
    assert latest == ('ok', published['digests'])
    pinned = client(client_pull, f'hf-hub:{published["repo_id"]}@{published["first_commit"]}')
    assert pinned == ('ok', published['ema_digests'])
    arch, tag = published['name_tag'].split('.', 1)
    if timm.models.get_pretrained_cfg(arch).tag == tag:
        assert client(client_pull, arch) == latest  # pretrained=True on the bare name: the default tag


def test_push_to_branch_and_dry_run(client, hub, published):
    state = hub[1]
    before = len(state.requests)
    rc, out, err = _push(client, published['folders']['ema'], published['name_tag'], '--revision', 'dev',
                         '--dry-run', env={'HF_TOKEN': None})  # a dry run needs no token
    assert rc == 0, err
    assert 'dry run' in out and WEIGHTS_NAME in out and 'README.md' in out and 'branch dev' in out
    assert len(state.requests) == before, 'the dry run talked to the Hub'
    rc, _, err = _push(client, published['folders']['ema'], published['name_tag'], '--branch', 'dev')
    assert rc == 0, err
    repo = state.repos[published['repo_id']]
    assert 'dev' in repo.branches and repo.branches['dev'] != repo.branches['main']
    assert client(client_pull, f'hf-hub:{published["repo_id"]}@dev') == ('ok', published['ema_digests'])


def test_published_repo_as_the_hub_client_lists_it(client, hub, published):
    listing = client(_client_listing, published['repo_id'])
    repo = hub[1].repos[published['repo_id']]
    assert listing['branches'] == sorted(repo.branches) and listing['sha'] == repo.branches['main']
    assert set(listing['tree']) == {'README.md', 'config.json', WEIGHTS_NAME}
    size, lfs_sha256 = listing['tree'][WEIGHTS_NAME]
    entry = repo.commits[listing['sha']].files[WEIGHTS_NAME]
    assert lfs_sha256 == entry.lfs_sha256 == hashlib.sha256(hub[1].blobs[entry.blob_key]).hexdigest()
    assert listing['paths_info'] == {p: listing['tree'][p][0] for p in ('config.json', WEIGHTS_NAME)}
    assert listing['commits'][0].startswith('Add ') and listing['commits'][-1] == 'initial commit'


def test_private_repo_needs_the_right_token(client, hub, publishable_tags, weights, tmp_path):
    name_tag = publishable_tags[1]
    folder = weights['folders']['ema']
    if name_tag.split('.')[0] != weights['name_tag'].split('.')[0]:  # another architecture: its own weights
        source = tmp_path / 'other.safetensors'
        safetensors.torch.save_file(timm.create_model(name_tag).state_dict(), str(source))
        folder = tmp_path / 'other'
        assert cli_main(['convert', str(source), '--model', name_tag, '-o', str(folder)]) == 0
    expected = tensor_digests(safetensors.torch.load_file(str(folder / WEIGHTS_NAME)))
    rc, _, err = _push(client, folder, name_tag, '--private')
    assert rc == 0, err
    assert hub[1].repos[f'timm-pf/{name_tag}'].private
    assert client(client_pull, name_tag) == ('ok', expected)
    for token in (OUTSIDER_TOKEN, None):
        result = client(client_pull, name_tag, token=token, cache_dir=str(tmp_path / f'cache_{token}'))
        assert result[:2] == ('error', 'PretrainedWeightsError'), result
        assert f'timm-pf/{name_tag}' in result[2] and 'private' in result[2]


def test_push_refused_without_token_or_rights(client, hub, weights, hub_env, tmp_path):
    name_tag = weights['name_tag']
    repo_id = f'timm-pf/{name_tag}'
    commits_before = len(hub[1].repos[repo_id].commits) if repo_id in hub[1].repos else 0
    rc, _, err = _push(client, weights['folders']['plain'], name_tag, env={'HF_TOKEN': None})
    assert rc == 2 and 'no Hugging Face token' in err
    rc, _, err = _push(client, weights['folders']['plain'], name_tag, env={'HF_TOKEN': OUTSIDER_TOKEN})
    assert rc == 1 and 'refused' in err, err
    commits_after = len(hub[1].repos[repo_id].commits) if repo_id in hub[1].repos else 0
    assert commits_after == commits_before
    # the login cache ($HF_HOME/token) is a token source too
    shifted = tmp_path / 'shifted'
    shutil.copytree(weights['folders']['plain'], shifted)
    state_dict = safetensors.torch.load_file(str(shifted / WEIGHTS_NAME))
    safetensors.torch.save_file({k: v + 1 if v.is_floating_point() else v for k, v in state_dict.items()},
                                str(shifted / WEIGHTS_NAME))
    token_file = Path(hub_env['HF_HOME']) / 'token'
    token_file.write_text(MAINTAINER_TOKEN)
    try:
        rc, _, err = _push(client, shifted, name_tag, '--commit-message', 'from the login cache',
                           env={'HF_TOKEN': None})
    finally:
        token_file.unlink()
    assert rc == 0, err
    repo = hub[1].repos[repo_id]
    head = repo.commits[repo.branches['main']]
    assert head.author == 'maintainer' and head.title == 'from the login cache'


def test_push_refuses_weights_that_do_not_load_strictly(client, hub, weights, tmp_path):
    folder = tmp_path / 'broken'
    shutil.copytree(weights['folders']['plain'], folder)
    state_dict = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    dropped = sorted(state_dict)[-1]
    del state_dict[dropped]
    safetensors.torch.save_file(state_dict, str(folder / WEIGHTS_NAME))
    before = len(hub[1].requests)
    rc, _, err = _push(client, folder, weights['name_tag'])
    assert rc == 2 and dropped in err and 'missing keys' in err
    assert len(hub[1].requests) == before, 'refused weights reached the Hub'


def test_push_refuses_a_folder_converted_for_another_class_count(client, hub, weights, tmp_path):
    """A folder's own model args do not apply to ``create_model(tag, pretrained=True)``: its weights must fit
    the tag."""
    torch.manual_seed(0)
    checkpoint = tmp_path / 'ten_classes.safetensors'
    safetensors.torch.save_file(timm.create_model(weights['name_tag'], num_classes=10).state_dict(), str(checkpoint))
    folder = tmp_path / 'ten_classes'
    assert cli_main(['convert', str(checkpoint), '--model', weights['name_tag'].split('.')[0], '--num-classes', '10',
                     '--img-size', '224', '-o', str(folder)]) == 0
    assert json.loads((folder / 'config.json').read_text())['num_classes'] == 10
    before = len(hub[1].requests)
    rc, _, err = _push(client, folder, weights['name_tag'], '--dry-run')
    assert rc == 2 and 'does not fit' in err and 'pretrained=True' in err and 'num_classes=10' in err, err
    assert len(hub[1].requests) == before


# ------------------------------------------------------------------------------------------------ pull failures
@pytest.mark.parametrize('fault, message', [('corrupt', 'corrupted (sha256'), ('truncated', 'could not be fetched')])
def test_damaged_download_is_a_named_error(client, hub, published, fault, message, tmp_path):
    served = getattr(hub[1], fault)  # altered bytes, or a body cut off halfway
    served.add((published['repo_id'], WEIGHTS_NAME))
    try:
        result = client(client_pull, f'hf-hub:{published["repo_id"]}', cache_dir=str(tmp_path))
    finally:
        served.discard((published['repo_id'], WEIGHTS_NAME))
    assert result[:2] == ('error', 'PretrainedWeightsError'), result
    assert message in result[2]
    # no bad file stays in the cache: the next attempt downloads it again and succeeds
    assert client(client_pull, f'hf-hub:{published["repo_id"]}', cache_dir=str(tmp_path))[0] == 'ok'


def test_unpublished_tag_says_what_is_missing(client, hub):
    unpublished = [t for t in pf_pretrained_tags() if f'timm-pf/{t}' not in hub[1].repos]
    assert unpublished
    result = client(client_pull, unpublished[0])
    assert result[:2] == ('error', 'PretrainedWeightsError'), result
    assert unpublished[0] in result[2] and 'timm-pf push' in result[2] and 'without pretrained weights' in result[2]


def test_only_safetensors_from_our_repos_other_repos_unchanged(client, hub, weights, tmp_path):
    # one of our repos holding pickle weights only: never unpickled, the error names model.safetensors
    ours = tmp_path / 'ours'
    save_for_hf(timm.create_model(weights['name_tag']), str(ours), safe_serialization=False)
    repo_id = f'timm-pf/{weights["name_tag"].split(".")[0]}.pickle_only'
    client(client_upload_folder, repo_id, str(ours))
    result = client(client_pull, f'hf-hub:{repo_id}')
    assert result[:2] == ('error', 'PretrainedWeightsError'), result
    assert WEIGHTS_NAME in result[2] and 'only safetensors' in result[2]
    assert f'GET /{repo_id}/resolve/main/pytorch_model.bin' not in hub[1].requests
    # any other repository keeps timm's own loader (here: its pickle fallback, weights_only)
    other = timm.create_model('test_resnet', num_classes=7)
    save_for_hf(other, str(tmp_path / 'other'), safe_serialization=False)
    client(client_upload_folder, 'maintainer/test_resnet', str(tmp_path / 'other'))
    assert client(client_pull, 'hf-hub:maintainer/test_resnet') == ('ok', tensor_digests(other.state_dict()))


@pytest.mark.parametrize('with_safetensors', [False, True])
def test_a_weights_file_named_in_our_repos_config_is_ignored(client, hub, weights, with_safetensors, tmp_path):
    """A ``file`` key in the pretrained cfg of one of our repositories' config.json does not bring back timm's own
    loader (with its pickle fallback, and without our sha256 check): only our verified model.safetensors loads."""
    folder = tmp_path / 'repo'
    model = timm.create_model(weights['name_tag'])
    save_for_hf(model, str(folder), safe_serialization=with_safetensors)
    config = json.loads((folder / 'config.json').read_text())
    config['pretrained_cfg']['file'] = 'anything'
    (folder / 'config.json').write_text(json.dumps(config))
    repo_id = f'timm-pf/{weights["name_tag"].split(".")[0]}.cfg_names_a_file_{int(with_safetensors)}'
    client(client_upload_folder, repo_id, str(folder))
    if with_safetensors:
        hub[1].corrupt.add((repo_id, WEIGHTS_NAME))  # our download checks the sha256; timm's loader does not
        try:
            result = client(client_pull, f'hf-hub:{repo_id}', cache_dir=str(tmp_path / 'cache'))
        finally:
            hub[1].corrupt.discard((repo_id, WEIGHTS_NAME))
        assert result[:2] == ('error', 'PretrainedWeightsError') and 'corrupted (sha256' in result[2], result
        assert client(client_pull, f'hf-hub:{repo_id}') == ('ok', tensor_digests(model.state_dict()))
    else:
        result = client(client_pull, f'hf-hub:{repo_id}')
        assert result[:2] == ('error', 'PretrainedWeightsError') and 'only safetensors' in result[2], result
    assert f'GET /{repo_id}/resolve/main/pytorch_model.bin' not in hub[1].requests


def test_push_deletes_the_pickle_weights_it_replaces(client, hub, tmp_path):
    repo_id = 'maintainer/was_pickled'
    model = timm.create_model('test_resnet', num_classes=7)
    save_for_hf(model, str(tmp_path / 'pickled'), safe_serialization=False)
    client(client_upload_folder, repo_id, str(tmp_path / 'pickled'))
    save_for_hf(model, str(tmp_path / 'safe'), safe_serialization=True)
    rc, out, err = client(client_cli, ['push', str(tmp_path / 'safe'), '--repo-id', repo_id])
    assert rc == 0, err
    assert 'pytorch_model.bin' in out and 'deleted if the branch holds one' in out
    repo = hub[1].repos[repo_id]
    assert sorted(repo.commits[repo.branches['main']].files) == ['README.md', 'config.json', WEIGHTS_NAME]


def test_offline_uses_the_cache(client, hub, published, hub_env):
    online = client(client_pull, published['name_tag'])  # fills the cache
    assert online[0] == 'ok'
    offline = HubClient(dict(hub_env, HF_HUB_OFFLINE='1'))
    try:
        assert offline(client_pull, published['name_tag']) == online
        missing = next(t for t in pf_pretrained_tags() if f'timm-pf/{t}' not in hub[1].repos)
        result = offline(client_pull, missing)
    finally:
        offline.close()
    assert result[:2] == ('error', 'PretrainedWeightsError'), result
    assert 'HF_HUB_OFFLINE' in result[2] and f'hf download timm-pf/{missing} {WEIGHTS_NAME}' in result[2]


# ------------------------------------------------------------------------------------------------------ convert
def _registered_fixture() -> str:
    """The first official fixture whose model is registered (the fixtures must exist: fail, never skip)."""
    names = sorted(p.stem for p in fixtures_dir().glob('*.safetensors'))
    registered = [n for n in names if timm.is_model(n)]
    assert registered, f'no official fixture in {fixtures_dir()} matches a registered model'
    return registered[0]


def test_convert_authors_checkpoint_reproduces_their_logits(tmp_path):
    name = _registered_fixture()
    official, images, logits, _ = load_official_fixture(name)
    checkpoint = tmp_path / 'authors.pth'  # as a DataParallel training script saves it
    torch.save({'model': {f'module.{k}': v for k, v in official.items()}, 'epoch': 299}, checkpoint)
    folder = tmp_path / 'converted'
    assert cli_main(['convert', str(checkpoint), '--model', name, '--img-size', '224', '-o', str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', WEIGHTS_NAME]
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        assert (model(images) - logits).abs().max().item() < 1e-4


def test_convert_picks_ema_weights_on_request(weights):
    # the fixture converted one train.py checkpoint twice: with --ema and without
    for kind, expected in (('ema', weights['ema_digests']), ('plain', weights['digests'])):
        assert tensor_digests(safetensors.torch.load_file(str(weights['folders'][kind] / WEIGHTS_NAME))) == expected


def test_convert_rejects_bad_checkpoints(weights, tmp_path, capsys):
    name_tag = weights['name_tag']
    with torch.serialization.safe_globals([argparse.Namespace]):
        state_dict = torch.load(weights['path'], weights_only=True)['state_dict']
    classifier = timm.models.get_pretrained_cfg(name_tag).classifier
    cases = {}
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(weights['path'].read_bytes()[:4096])
    cases['cannot read'] = [str(truncated)]
    no_ema = tmp_path / 'no_ema.pth'
    torch.save({'state_dict': state_dict}, no_ema)
    cases['no EMA weights'] = [str(no_ema), '--ema']
    wrong_head = tmp_path / 'wrong_head.pth'
    torch.save(dict(state_dict, **{f'{classifier}.weight': state_dict[f'{classifier}.weight'][:10],
                                   f'{classifier}.bias': state_dict[f'{classifier}.bias'][:10]}), wrong_head)
    cases['--num-classes 10'] = [str(wrong_head)]
    extra = tmp_path / 'extra.pth'
    torch.save(dict(state_dict, **{'head.extra.weight': torch.zeros(3)}), extra)
    cases['head.extra.weight'] = [str(extra)]
    nan = tmp_path / 'nan.safetensors'
    poisoned = next(k for k, v in state_dict.items() if v.is_floating_point())
    safetensors.torch.save_file(dict(state_dict, **{poisoned: torch.full_like(state_dict[poisoned], float('nan'))}),
                                str(nan))
    cases['non-finite'] = [str(nan)]
    for expected, args in cases.items():
        rc = cli_main(['convert', *args, '--model', name_tag, '-o', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, (expected, err)
    assert not (tmp_path / 'out' / WEIGHTS_NAME).exists()
    assert cli_main(['convert', str(no_ema), '--model', 'resnet50', '-o', str(tmp_path / 'out')]) == 2
    assert 'not a timm-pf model' in capsys.readouterr().err
    assert cli_main(['convert', str(no_ema), '--model', f'{name_tag.split(".")[0]}.no_such_tag',
                     '-o', str(tmp_path / 'out')]) == 2
    assert 'no pretrained tag' in capsys.readouterr().err


def test_folders_with_non_finite_weights_are_refused(weights, tmp_path):
    """A converted folder whose weights were corrupted afterwards fails when read, for tag and folder pushes."""
    folder = tmp_path / 'poisoned'
    shutil.copytree(weights['folders']['plain'], folder)
    state_dict = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    poisoned = next(k for k, v in state_dict.items() if v.is_floating_point())
    state_dict[poisoned] = torch.full_like(state_dict[poisoned], float('inf'))
    safetensors.torch.save_file(state_dict, str(folder / WEIGHTS_NAME))
    for check in (lambda: verify_folder(folder, weights['name_tag']), lambda: load_folder_model(folder)):
        with pytest.raises(CheckpointError, match=f'non-finite values .* in {poisoned}'):
            check()


HELP_OPTIONS = {
    'convert': ('--model', '--ema', '--num-classes', '--output'),
    'push': ('--model', '--repo-id', '--card', '--ema', '--revision', '--private', '--dry-run', '--commit-message'),
    'card': ('--write', '--check'),
}


@pytest.mark.parametrize('command', sorted(HELP_OPTIONS))
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, '--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: timm-pf {command}')
    assert [o for o in HELP_OPTIONS[command] if o not in out] == []


def test_timm_loader_untouched_our_repos_recognised():
    from timm.models import _builder, _hub
    from timm_pf.tools import hub
    assert _builder.load_state_dict_from_hf is _hub.load_state_dict_from_hf  # import timm_pf patches nothing
    assert hub.is_pf_repo('timm-pf/ours_x.tag@abc') and not hub.is_pf_repo('timm/resnet50.a1_in1k')
    assert hub.is_pf_repo(timm.models.get_pretrained_cfg(pf_pretrained_tags()[0]).hf_hub_id)


class _Payload:
    """Unpickling this would call os.getcwd: what a malicious .pth does with os.system."""

    def __reduce__(self):
        return os.getcwd, ()


def test_convert_never_unpickles_code(weights, tmp_path, capsys):
    state_dict = safetensors.torch.load_file(str(weights['folders']['plain'] / WEIGHTS_NAME))
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': state_dict, 'payload': _Payload()}, evil)
    rc = cli_main(['convert', str(evil), '--model', weights['name_tag'], '-o', str(tmp_path / 'out')])
    assert rc == 2
    err = capsys.readouterr().err
    # named as what it is, without torch's advice to load it with weights_only=False
    assert 'holds Python objects besides tensors, which are never unpickled' in err and 'False' not in err, err
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------- named errors, without waiting
def _client_create(name: str):
    """``timm_pf.tools.hub.create_model(name, pretrained=True)`` (the CLI's way): 'ok' or (type, message, s)."""
    import time
    from timm_pf.tools.hub import create_model
    start = time.monotonic()
    try:
        create_model(name, pretrained=True)
        return 'ok'
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start


def test_every_way_of_naming_a_missing_model_gives_one_error(client, hub):
    missing = next(t for t in pf_pretrained_tags() if f'timm-pf/{t}' not in hub[1].repos)
    arch = missing.split('.')[0]
    names = [f'{missing}', f'hf-hub:timm-pf/{missing}']
    if timm.models.get_pretrained_cfg(arch).tag == missing.split('.', 1)[1]:
        names.append(arch)
    results = {name: client(_client_create, name) for name in names}
    messages = {r[1] for r in results.values()}
    assert all(r[0] == 'PretrainedWeightsError' for r in results.values()), results
    assert len(messages) == 1 and f'timm-pf/{missing}' in messages.pop()


def test_bad_revision_named_with_hf_hub_gives_the_revision_error(client, published):
    result = client(_client_create, f'hf-hub:{published["repo_id"]}@no-such-branch')
    assert result[0] == 'PretrainedWeightsError' and "Revision 'no-such-branch' does not exist" in result[1]
    rc, _, err = client(client_cli, ['deform-points', '--model', f'hf-hub:{published["repo_id"]}@no-such-branch',
                                     '--pretrained'])
    assert rc == 2 and "Revision 'no-such-branch' does not exist" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize('env', [{'HF_ENDPOINT': 'http://127.0.0.1:1'}, {'HF_HUB_OFFLINE': '1'}])
def test_offline_or_refused_fails_at_once_with_the_named_error(hub_env, published, env, tmp_path):
    offline = HubClient(dict(hub_env, HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / 'hub'), **env))
    try:
        for name in (published['name_tag'], f'hf-hub:{published["repo_id"]}',
                     f'hf-hub:{published["repo_id"]}@{published["first_commit"]}'):
            kind, message, seconds = offline(_client_create, name)
            assert kind == 'PretrainedWeightsError' and 'not in the local cache' in message, message
            assert seconds < 5, f'{name}: {seconds:.1f} s: retried instead of failing at once'
        rc, _, err = offline(client_cli, ['push', str(published['folders']['plain']), '--model',
                                          published['name_tag']])
    finally:
        offline.close()
    assert rc == 1 and 'cannot reach the Hub' in err and len(err.splitlines()) == 1, err


def test_convert_without_a_tag_describes_the_checkpoint(tmp_path, capsys):
    """A model trained on other data (here a scaled-down R50 on 10 classes at 32 px, as the digits quickstart
    trains it) is described by its checkpoint, not by our ImageNet tag."""
    import json
    kwargs = dict(layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], stem_width=16)
    state_dict = timm.create_model('ours_r50_hybrid', num_classes=10, **kwargs).state_dict()
    trained = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': state_dict, 'args': argparse.Namespace(model='ours_r50_hybrid', img_size=32,
                                                                     input_size=None, mean=None, std=None)}, trained)
    bare = tmp_path / 'bare.safetensors'
    safetensors.torch.save_file(state_dict, str(bare))
    model_kwargs = ['--model-kwargs', 'layers=[1,1,1,1]', 'channels=[16,32,64,128]', 'stem_width=16']

    def convert(source, *extra):
        out = tmp_path / f'out_{len(list(tmp_path.iterdir()))}'
        rc = cli_main(['convert', str(source), '--model', 'ours_r50_hybrid', *model_kwargs, *extra, '-o', str(out)])
        return rc, out

    for source, extra, size in ((trained, [], 32), (bare, ['--img-size', '40'], 40)):
        rc, out = convert(source, *extra)
        assert rc == 0, capsys.readouterr().err
        assert f'10 classes, {size} px' in capsys.readouterr().out
        config = json.loads((out / 'config.json').read_text())
        cfg = config['pretrained_cfg']
        assert config['num_classes'] == cfg['num_classes'] == 10 and cfg['input_size'] == [3, size, size]
        assert not {'tag', 'notes', 'hf_hub_id', 'license', 'paper_ids'} & set(cfg), cfg
        model = timm.create_model(f'local-dir:{out}', pretrained=True)
        assert model.pretrained_cfg['input_size'] == (3, size, size) and not model.pretrained_cfg.get('notes')
    rc, out = convert(bare)  # no train.py arguments and no --img-size: nothing says what it was trained at
    assert rc == 2 and '--img-size' in capsys.readouterr().err and not out.exists()


def test_push_of_a_checkpoint_for_another_class_count_is_refused(client, hub, weights, tmp_path):
    """Converted on the way with --num-classes, the weights still have to fit ``create_model(tag)``."""
    checkpoint = tmp_path / 'ten_classes.safetensors'
    safetensors.torch.save_file(timm.create_model(weights['name_tag'], num_classes=10).state_dict(), str(checkpoint))
    before = len(hub[1].requests)
    rc, _, err = _push(client, checkpoint, weights['name_tag'], '--num-classes', '10', '--dry-run')
    assert rc == 2 and 'describes its own model' in err and '--num-classes 10' in err, err
    assert len(hub[1].requests) == before


def _listed_sha256(out: str, fname: str) -> str:
    return next(line.split('sha256 ')[1].strip() for line in out.splitlines() if line.strip().startswith(fname))


def test_push_uploads_the_tags_own_config(client, hub, weights, tmp_path):
    """A folder's config.json (edited, or of another conversion) is not what name.tag builds: the tag's is pushed."""
    plain = weights['folders']['plain']
    folder = tmp_path / 'edited'
    shutil.copytree(plain, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'] = {'bogus_kw': 1}
    config['pretrained_cfg']['mean'] = [0, 0, 0]
    (folder / 'config.json').write_text(json.dumps(config))
    rc, out, err = _push(client, folder, weights['name_tag'], '--dry-run')
    assert rc == 0, err
    assert _listed_sha256(out, 'config.json') == sha256_file(plain / 'config.json')
    assert _listed_sha256(out, WEIGHTS_NAME) == sha256_file(plain / WEIGHTS_NAME)


def test_push_of_a_folder_refuses_checkpoint_options(client, hub, weights):
    for option in (['--ema'], ['--num-classes', '10']):
        rc, _, err = _push(client, weights['folders']['plain'], weights['name_tag'], *option, '--dry-run')
        assert rc == 2 and 'pushed as it is' in err, err


def test_convert_refuses_to_resample_or_misdescribe_a_fixed_size_model(tmp_path, capsys):
    """A ViT/PiT checkpoint of another image size is refused, not resampled by the family filter, and an
    --img-size the model is not built for is named before anything is written."""
    tag = 'pit_ti_maxpool.in1k'
    small = tmp_path / 'pit160.safetensors'
    safetensors.torch.save_file(timm.create_model(tag, img_size=160).state_dict(), str(small))
    out = tmp_path / 'out'
    assert cli_main(['convert', str(small), '--model', tag, '-o', str(out)]) == 2
    assert 'pos_embed' in capsys.readouterr().err and not out.exists()
    full = tmp_path / 'pit224.safetensors'
    safetensors.torch.save_file(timm.create_model(tag).state_dict(), str(full))
    assert cli_main(['convert', str(full), '--model', tag.split('.')[0], '--img-size', '160', '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'built for 224 px, not 160' in err and '--model-kwargs img_size=160' in err and not out.exists()
    assert cli_main(['convert', str(small), '--model', tag.split('.')[0], '--img-size', '160',
                     '--model-kwargs', 'img_size=160', '-o', str(out)]) == 0
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.pretrained_cfg['input_size'] == (3, 160, 160)
    assert sorted(p.name for p in out.iterdir()) == ['config.json', WEIGHTS_NAME]


def test_corrupted_cache_offline_says_to_fetch_again_online(client, hub, published, hub_env, tmp_path):
    assert client(client_pull, published['name_tag'], cache_dir=str(tmp_path))[0] == 'ok'
    blob = next(p for p in tmp_path.rglob('*') if p.is_file() and p.parent.name == 'blobs' and
                p.stat().st_size > 1 << 16)
    blob.write_bytes(blob.read_bytes()[:-1] + b'x')
    offline = HubClient(dict(hub_env, HF_HUB_OFFLINE='1'))
    try:
        result = offline(client_pull, published['name_tag'], cache_dir=str(tmp_path))
    finally:
        offline.close()
    assert result[:2] == ('error', 'PretrainedWeightsError'), result
    assert 'corrupted' in result[2] and 'fetch it again with network access (HF_HUB_OFFLINE is set now)' in result[2]
    assert not blob.exists()


def test_convert_with_a_tag_refuses_another_model_of_the_family(weights, tmp_path, capsys):
    """A tag's config.json describes the tag's model: weights of a model built otherwise convert without a tag."""
    tag = 'ours_r50_hybrid.pf_in1k'
    kwargs = ['layers=[1,1,1,1]', 'channels=[16,32,64,128]', 'stem_width=16']
    small = tmp_path / 'small.safetensors'
    safetensors.torch.save_file(timm.create_model('ours_r50_hybrid', num_classes=10, **{
        'layers': [1, 1, 1, 1], 'channels': [16, 32, 64, 128], 'stem_width': 16}).state_dict(), str(small))
    out = tmp_path / 'out'
    assert cli_main(['convert', str(small), '--model', tag, '--model-kwargs', *kwargs, '--num-classes', '10',
                     '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'describes its own model' in err and '--model ours_r50_hybrid' in err and not out.exists()
    assert cli_main(['convert', str(small), '--model', 'ours_r50_hybrid', '--model-kwargs', *kwargs,
                     '--num-classes', '10', '--img-size', '32', '-o', str(out)]) == 0


def _small_r50_hybrid(path: Path, **extra) -> list:
    """A 10-class scaled-down ours_r50_hybrid saved to ``path`` (with ``extra`` entries, e.g. train.py ``args``);
    returns the --model-kwargs that build it."""
    state_dict = timm.create_model('ours_r50_hybrid', num_classes=10, layers=[1, 1, 1, 1], channels=[16, 32, 64, 128],
                                   stem_width=16).state_dict()
    torch.save(dict(state_dict=state_dict, **extra), path)
    return ['--model-kwargs', 'layers=[1,1,1,1]', 'channels=[16,32,64,128]', 'stem_width=16']


def test_convert_takes_only_the_models_own_kwargs(tmp_path, capsys):
    """num_classes in --model-kwargs is the class count (config.json's), and timm.create_model's own arguments are
    refused: config.json records the model kwargs, which ``local-dir:`` passes to create_model again."""
    checkpoint = tmp_path / 'plain.pth'
    model_kwargs = _small_r50_hybrid(checkpoint)
    out = tmp_path / 'out'

    def convert(*extra):
        return cli_main(['convert', str(checkpoint), '--model', 'ours_r50_hybrid', '--img-size', '32', *model_kwargs,
                         *extra, '-o', str(out)])

    assert convert('num_classes=5') == 2
    err = capsys.readouterr().err
    assert 'the checkpoint has 10 classes and the model 5' in err and 'num_classes=10' in err, err
    assert not out.exists()
    assert convert('num_classes=10', '--num-classes', '5') == 2
    assert 'num_classes=10 disagrees with --num-classes 5' in capsys.readouterr().err and not out.exists()
    for kwarg in (f'checkpoint_path={checkpoint}', 'pretrained_cfg_overlay={"num_classes":5}', 'pretrained=True'):
        assert convert(kwarg) == 2, kwarg
        err = capsys.readouterr().err
        assert kwarg.split('=')[0] in err and 'timm.create_model' in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert convert('num_classes=10') == 0
    assert timm.create_model(f'local-dir:{out}', pretrained=True).num_classes == 10


def test_convert_records_a_non_square_train_size(tmp_path, capsys):
    """train.py's input_size (C, H, W) is what it trained at, before img_size; a non-square one stays so."""
    trained = tmp_path / 'last.pth.tar'
    model_kwargs = _small_r50_hybrid(trained, args=argparse.Namespace(img_size=None, input_size=[3, 48, 40]))
    out = tmp_path / 'out'
    assert cli_main(['convert', str(trained), '--model', 'ours_r50_hybrid', *model_kwargs, '-o', str(out)]) == 0
    assert '48x40 px from its train.py arguments' in capsys.readouterr().out
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 48, 40]
    assert timm.create_model(f'local-dir:{out}', pretrained=True).pretrained_cfg['input_size'] == (3, 48, 40)


def test_convert_with_a_tag_refuses_another_image_size(tmp_path, capsys):
    """config.json of a tag describes the tag's image size: --img-size is for the bare model name."""
    tag = 'ours_r50_hybrid.pf_in1k'
    size = timm.models.get_pretrained_cfg(tag).input_size[-1]
    checkpoint = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(timm.create_model(tag).state_dict(), str(checkpoint))
    out = tmp_path / 'out'
    assert cli_main(['convert', str(checkpoint), '--model', tag, '--img-size', str(size - 64), '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert f'--img-size {size - 64}' in err and '--model ours_r50_hybrid)' in err and not out.exists(), err
    assert cli_main(['convert', str(checkpoint), '--model', tag, '--img-size', str(size), '-o', str(out)]) == 0


def test_push_refuses_a_folder_converted_for_another_tag(client, hub, tmp_path):
    """-m without a tag pushes to the default tag: a folder whose config.json describes another tag is refused."""
    default = resolve_name_tag('ours_r50_hybrid')
    other = next(t for t in pf_pretrained_tags(['ours_r50_hybrid']) if t != default)
    checkpoint = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(timm.create_model(other).state_dict(), str(checkpoint))
    folder = tmp_path / 'converted'
    assert cli_main(['convert', str(checkpoint), '--model', other, '-o', str(folder)]) == 0
    before = len(hub[1].requests)
    for target in ('ours_r50_hybrid', default):
        rc, _, err = _push(client, folder, target, '--dry-run')
        assert rc == 2 and other in err and default in err and len(err.splitlines()) == 1, err
    assert len(hub[1].requests) == before


def test_class_count_mismatch_names_the_model_named(client, hub, weights, tmp_path, capsys):
    """With a tag the hint for another class count points at the bare model name, and without one the error
    names the model given, not its default tag."""
    name_tag = weights['name_tag']
    arch = name_tag.split('.')[0]
    size = str(timm.models.get_pretrained_cfg(name_tag).input_size[-1])
    checkpoint = tmp_path / 'ten_classes.safetensors'
    safetensors.torch.save_file(timm.create_model(name_tag, num_classes=10).state_dict(), str(checkpoint))
    out = tmp_path / 'out'
    hint = f'(--model {arch} --num-classes 10)'
    assert cli_main(['convert', str(checkpoint), '--model', name_tag, '-o', str(out)]) == 2
    assert hint in capsys.readouterr().err
    rc, _, err = _push(client, checkpoint, name_tag, '--dry-run')
    assert rc == 2 and hint in err, err
    assert cli_main(['convert', str(checkpoint), '--model', arch, '--num-classes', '100', '--img-size', size,
                     '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert f'does not fit {arch}: the checkpoint has 10 classes and the model 100' in err, err
    assert not out.exists()
    assert cli_main(['convert', str(checkpoint), '--model', arch, '--num-classes', '10', '--img-size', size,
                     '-o', str(out)]) == 0


def test_convert_of_a_replacement_training_form_says_to_finalize_first(tmp_path, capsys):
    checkpoint = tmp_path / 'r34.safetensors'
    safetensors.torch.save_file({'x': torch.zeros(1)}, str(checkpoint))
    assert cli_main(['convert', str(checkpoint), '--model', 'resnet34_replace', '-o', str(tmp_path / 'out')]) == 2
    assert 'timm_pf.replacement.finalize(model)' in capsys.readouterr().err
