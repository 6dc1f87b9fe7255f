"""PiT with max-pool token mixers (pit_pf.py)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from _model_checks import (
    assert_fine_tunes_at, assert_grad_checkpointing_keeps_gradients, assert_reset_classifier_works)
from _official import load_official_fixture, unfused_attention
from timm_pf.layers.token_mixers import EfficientTokenMixer, GridAttention
from timm_pf.models.pit_pf import checkpoint_filter_fn
from timm_pf.methods.stats import count_params

# Parameter counts of the authors' pit_pf.py (pit_ti_max, pit_s_max, pit_b_max, naver-ai/PfLayer b4bb770).
AUTHORS_PARAMS = {'pit_ti_maxpool': 5_174_504, 'pit_s_maxpool': 25_119_784, 'pit_b_maxpool': 79_005_928}


@pytest.fixture(scope='module')
def official_pit():
    return load_official_fixture('pit_s_maxpool')


@pytest.fixture(scope='module')
def pit_s_official(official_pit):
    state_dict, _, _, _ = official_pit
    model = timm.create_model('pit_s_maxpool')
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return unfused_attention(model.eval())


def _tiny_pit(**kwargs) -> nn.Module:
    return timm.create_model('pit_s_maxpool', base_dims=(8, 8, 8), heads=(2, 4, 8), depth=(2, 2, 2), **kwargs)


# --- architecture ------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(AUTHORS_PARAMS))
def test_param_count_equals_authors_code(name):
    assert count_params(timm.create_model(name, device='meta')) == AUTHORS_PARAMS[name]


def test_block_patterns_restart_in_each_stage():
    kinds = lambda m: [[type(b.attn) for b in stage.blocks] for stage in m.transformers]
    A, E = GridAttention, EfficientTokenMixer
    assert kinds(timm.create_model('pit_s_maxpool', device='meta')) == [[A, E], [A, E] * 3, [A, E] * 2]
    assert kinds(timm.create_model('pit_s_maxpool_all', device='meta')) == [[E] * 2, [E] * 6, [E] * 4]
    dwconv = timm.create_model('pit_s_dwconv', device='meta')
    widths = [144, 288, 576]
    efficient_per_stage = [1, 3, 2]
    added = sum(n * (3 * w * 25 + 3 * w) for n, w in zip(efficient_per_stage, widths))
    assert count_params(dwconv) == AUTHORS_PARAMS['pit_s_maxpool'] + added


def test_stages_pooling_and_head():
    """No class token; PiT's pooling keeps only the depthwise stride-2 conv; GAP over normalized tokens."""
    model = timm.create_model('pit_s_maxpool', device='meta')
    assert model.pos_embed.shape == (1, 144, 27, 27)
    assert isinstance(model.transformers[0].pool, nn.Identity)
    for i, (c_in, c_out) in enumerate([(144, 288), (288, 576)], start=1):
        conv = model.transformers[i].pool.conv
        assert (conv.in_channels, conv.out_channels, conv.groups, conv.stride) == (c_in, c_out, c_in, (2, 2))
    assert not any('fc' in k for k in model.state_dict() if '.pool.' in k)

    tiny = _tiny_pit(num_classes=0).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = tiny.forward_features(x)
        assert tokens.shape == (2, 7 * 7, 64)
        torch.testing.assert_close(tiny(x), tokens.mean(1))


def test_drop_path_schedule_follows_the_authors_code():
    model = timm.create_model('pit_s_maxpool', drop_path_rate=0.12, device='meta')
    rates = [getattr(b.drop_path1, 'drop_prob', 0.) for stage in model.transformers for b in stage.blocks]
    assert rates == pytest.approx([0.12 * i / 12 for i in range(12)])


@pytest.mark.parametrize('kwargs, match', [
    (dict(global_pool='token'), 'global_pool'),
    (dict(token_mixer='attention'), 'token_mixer'),
    (dict(efficient_blocks='even'), 'efficient_blocks'),
    (dict(depth=(2, 6)), 'one entry per stage'),
])
def test_unsupported_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('pit_ti_maxpool', device='meta', **kwargs)


def test_bad_inputs_get_clear_errors():
    model = _tiny_pit().eval()
    with pytest.raises(ValueError, match='3-channel'):
        model(torch.randn(1, 4, 224, 224))
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        model(torch.randn(1, 3, 160, 160))
    with pytest.raises(ValueError, match='smaller than the patch size'):
        _tiny_pit(dynamic_img_size=True)(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match='input size 8x8 is smaller than the patch size'):
        model(torch.randn(1, 3, 8, 8))
    for img_size in (1, 0, -5):
        with pytest.raises(ValueError, match=f'img_size {img_size}x{img_size} is smaller than the patch size'):
            _tiny_pit(img_size=img_size)


# --- official weights ----------------------------------------------------------------------------------


def test_official_logits(official_pit, pit_s_official):
    _, x, logits, meta = official_pit
    assert meta['official_model'] == 'pit_s_max'
    with torch.no_grad():
        out = pit_s_official(x)
    assert (out - logits).abs().max().item() < 1e-4


def test_filter_converts_official_keys_and_passes_ours_through(official_pit, pit_s_official):
    state_dict, _, _, _ = official_pit
    model = timm.create_model('pit_s_maxpool', device='meta')
    converted = checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, model)
    assert torch.equal(converted['transformers.2.pool.conv.weight'], state_dict['pools.1.conv.weight'])
    assert torch.equal(converted['transformers.1.blocks.3.attn.expand.weight'],
                       state_dict['transformers.1.blocks.3.attn.qkv.weight'])
    ours = pit_s_official.state_dict()
    assert converted.keys() == ours.keys()
    again = checkpoint_filter_fn(ours, model)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


def test_filter_errors_name_the_problem(pit_s_official):
    ours = pit_s_official.state_dict()
    model = timm.create_model('pit_s_maxpool', device='meta')
    cases = [
        ({**ours, 'cls_token': torch.zeros(1, 1, 144)}, 'class token'),
        ({**ours, 'blocks.0.norm1.weight': torch.ones(384)}, 'ViT'),
        ({k: v for k, v in ours.items() if not k.startswith('transformers.2.pool.')},
         r'missing keys \(\d+\): transformers.2.pool'),
        ({**ours, 'transformers.1.pool.fc.weight': torch.zeros(288, 144)},
         r'unexpected keys \(1\): transformers.1.pool.fc'),
        ({**ours, 'pos_embed': torch.zeros(1, 96, 27, 27)}, 'pos_embed'),
        ({**ours, 'head.bias': torch.full((1000,), float('inf'))}, 'NaN or Inf'),
    ]
    for state_dict, match in cases:
        with pytest.raises(ValueError, match=match):
            checkpoint_filter_fn(state_dict, model)
    with pytest.raises(ValueError, match='self-attention in the checkpoint but an efficient token mixer'):
        checkpoint_filter_fn(ours, timm.create_model('pit_s_maxpool_all', device='meta'))
    with pytest.raises(ValueError, match=r'pos_embed of shape \(1, 144, 27, 27\) does not fit'):
        checkpoint_filter_fn(ours, timm.create_model('pit_ti_maxpool', device='meta'))


def test_pretrained_loading_adapts_classes(official_pit, tmp_path):
    state_dict, _, _, _ = official_pit
    path = tmp_path / 'pit_s_max_official.safetensors'
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    model = timm.create_model(
        'pit_s_maxpool', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10)
    assert model.head.weight.shape == (10, 576)
    torch.testing.assert_close(model.transformers[1].pool.conv.weight, state_dict['pools.0.conv.weight'])


def test_finetune_at_384_resamples_the_position_embedding(official_pit, pit_s_official):
    state_dict, x, _, _ = official_pit
    converted = checkpoint_filter_fn(state_dict, timm.create_model('pit_s_maxpool', img_size=384, device='meta'))
    # the authors' forward resamples the same way when the grid differs (bicubic, no antialiasing)
    expected = F.interpolate(state_dict['pos_embed'], size=(47, 47), mode='bicubic', align_corners=False)
    torch.testing.assert_close(converted['pos_embed'], expected)
    assert_fine_tunes_at('pit_s_maxpool', converted, pit_s_official, x, 384)


def test_dynamic_img_size_on_non_square_inputs():
    torch.manual_seed(0)
    fixed = _tiny_pit().eval()
    dynamic = _tiny_pit(dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))
        _, maps = dynamic.forward_intermediates(torch.randn(2, 3, 64, 96))
    # patch grid (64-16)/8+1 = 7 by (96-16)/8+1 = 11, then two stride-2 poolings
    assert [m.shape for m in maps] == [(2, 16, 7, 11), (2, 32, 4, 6), (2, 64, 2, 3)]


# --- timm features -------------------------------------------------------------------------------------


def test_forward_intermediates():
    model = _tiny_pit(img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, indices=1, output_fmt='NLC', intermediates_only=True, norm=True)
        features = model.forward_features(x)
    assert [m.shape for m in maps] == [(2, 16, 7, 7), (2, 32, 4, 4), (2, 64, 2, 2)]
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(tokens[0], features)  # last stage, normalized, as tokens


def test_features_only():
    model = timm.create_model('pit_ti_maxpool', img_size=96, features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256] and model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 96))
    assert [f.shape for f in feats] == [(1, 64, 11, 11), (1, 128, 6, 6), (1, 256, 3, 3)]
    pruned = timm.create_model('pit_ti_maxpool', img_size=96, features_only=True, out_indices=(1,)).eval()
    assert len(pruned.model.transformers) == 2


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    assert_grad_checkpointing_keeps_gradients(_tiny_pit(img_size=64, num_classes=5).train(), torch.randn(2, 3, 64, 64))


def test_reset_classifier():
    model = _tiny_pit(img_size=64).eval()
    assert_reset_classifier_works(model, torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(0, global_pool='token')


def test_pretrained_cfgs():
    cfg = timm.models.get_pretrained_cfg('pit_s_maxpool')
    assert cfg.tag == 'pf_in1k' and cfg.hf_hub_id == 'timm-pf/pit_s_maxpool.pf_in1k'
    assert not cfg.url
    assert cfg.paper_ids == 'arXiv:2202.02777' and cfg.origin_url == 'https://github.com/naver-ai/PfLayer'
    assert cfg.first_conv == 'patch_embed.conv' and cfg.classifier == 'head'
    assert any('drive.google.com' in n for n in cfg.notes) and any('Table 6' in n for n in cfg.notes)
    for name in ('pit_ti_maxpool', 'pit_b_maxpool', 'pit_s_dwconv', 'pit_s_maxpool_all'):
        cfg = timm.models.get_pretrained_cfg(name)
        # no released weights: the tag names where weights trained with train_configs/ will be published
        assert cfg.tag == 'in1k' and cfg.hf_hub_id == f'timm-pf/{name}.in1k' and not cfg.url, name
