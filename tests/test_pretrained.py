"""``pretrained=True`` with another ``in_chans`` / ``num_classes``, for every family, from tests/hub_server.py.

Our builders fetch our repositories' ``model.safetensors`` and hand it to timm's ``load_pretrained``, which then
adapts the first conv and resets the classifier as for timm's own models; ``*_replace`` variants start from
timm's weights (timm's loader). The repositories hold random weights written by ``save_for_hf``.
"""
import pytest
import torch

import timm
from _hub_client import TOKENS, HubClient, client_env, client_upload_folder, tensor_digests
from hub_server import serve_hub
from timm.models import get_pretrained_cfg, save_for_hf

import timm_pf  # noqa: F401
from timm_pf.models.replace import PLAIN_MODELS

# one variant per family, named in each way timm accepts: name, the repository its weights come from
CASES = {
    'ours_r50_hybrid.pf_in1k': 'timm-pf/ours_r50_hybrid.pf_in1k',
    'ghostnet_dyn': 'timm-pf/ghostnet_dyn.in1k',
    'hf-hub:timm-pf/vit_ti_maxpool.in1k': 'timm-pf/vit_ti_maxpool.in1k',
    'pit_ti_maxpool': 'timm-pf/pit_ti_maxpool.in1k',
    'resnet34_replace': get_pretrained_cfg(PLAIN_MODELS['resnet34_replace']).hf_hub_id,
}


def client_adapted(name: str):
    """``create_model(name, pretrained=True, in_chans=1, num_classes=10)`` in the client process: its first conv
    tensors, classifier shape and the digests of everything else."""
    model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=10)
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    stem = {k: v for k, v in state_dict.items() if k.startswith(f'{cfg["first_conv"]}.')}
    return dict(stem=stem, classifier=tuple(state_dict[f'{cfg["classifier"]}.weight'].shape),
                digests=tensor_digests(state_dict), source=(cfg.get('hf_hub_id'), cfg.get('file')))


@pytest.fixture(scope='module')
def hub_with_weights(tmp_path_factory):
    """The test Hub with random weights in every repository of CASES; yields (client, uploaded state dicts)."""
    uploaded = {}
    with serve_hub(TOKENS, {'timm-pf': {'maintainer'}, 'timm': {'maintainer'}}) as (endpoint, _):
        client = HubClient(client_env(endpoint, tmp_path_factory.mktemp('hf_home')))
        try:
            for name, repo_id in CASES.items():
                source = timm.create_model(PLAIN_MODELS.get(name, repo_id.split('/')[1]))
                folder = tmp_path_factory.mktemp(repo_id.replace('/', '_'))
                save_for_hf(source, str(folder), safe_serialization=True)
                client(client_upload_folder, repo_id, str(folder))
                uploaded[name] = source.state_dict()
            yield client, uploaded
        finally:
            client.close()


@pytest.mark.parametrize('name', sorted(CASES))
def test_pretrained_adapts_first_conv_and_resets_classifier(hub_with_weights, name):
    client, uploaded = hub_with_weights
    result = client(client_adapted, name)
    source = uploaded[name]
    assert result['classifier'][0] == 10
    assert result['source'][1] is None, 'the local cache path leaked into the pretrained cfg'
    stem_weight = next(k for k in result['stem'] if k.endswith('.weight'))
    if stem_weight.replace('weight', 'routing.weight') in result['stem']:  # a dynamic stem: experts (E, O * I * k * k)
        experts = source[stem_weight]
        expected = experts.reshape(experts.shape[0], -1, 3, 9).sum(2).reshape(experts.shape[0], -1)
    else:  # timm's adapt_input_conv for one channel: the sum over the RGB channels
        expected = source[stem_weight].sum(1, keepdim=True)
    torch.testing.assert_close(result['stem'][stem_weight], expected)
    if name not in PLAIN_MODELS:  # the replaced variants mix layers after loading
        kept = {k for k in source if k in result['digests'] and k not in result['stem']
                and not k.startswith(get_pretrained_cfg(f'{CASES[name].split("/")[1]}').classifier)}
        assert len(kept) > len(source) // 2
        assert {k: result['digests'][k] for k in kept} == {k: tensor_digests(source)[k] for k in kept}
