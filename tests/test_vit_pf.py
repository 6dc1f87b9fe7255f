"""ViT with max-pool token mixers (vit_pf.py) and the token mixers it shares with PiT (layers/token_mixers.py)."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GELU, Attention, GluMlp, Mlp, resample_abs_pos_embed
from torch import nn

from _model_checks import (
    assert_fine_tunes_at, assert_grad_checkpointing_keeps_gradients, assert_reset_classifier_works)
from _official import load_official_fixture, unfused_attention
from safetensors.torch import save_file
from timm_pf.layers.token_mixers import (
    Conv2dNhwc, EfficientTokenMixer, GridAttention, InPlaceActivation, MaxPool2dNhwc)
from timm_pf.models.vit_pf import checkpoint_filter_fn
from timm_pf.methods.stats import count_macs, count_params

# Parameter counts of the authors' vit_pf.py (vit_ti_max, vit_s_max, vit_b_max, naver-ai/PfLayer b4bb770).
AUTHORS_PARAMS = {'vit_ti_maxpool': 6_159_400, 'vit_s_maxpool': 23_819_368, 'vit_b_maxpool': 93_644_008}


@pytest.fixture(scope='module')
def official_vit():
    return load_official_fixture('vit_s_maxpool')


@pytest.fixture(scope='module')
def vit_s_official(official_vit):
    state_dict, _, _, _ = official_vit
    model = timm.create_model('vit_s_maxpool')
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return unfused_attention(model.eval())


def _tiny_vit(**kwargs) -> nn.Module:
    return timm.create_model('vit_s_maxpool', embed_dim=48, depth=4, num_heads=2, **kwargs)


# --- token mixers ------------------------------------------------------------------------------------


@pytest.mark.parametrize('inplace', [False, True], ids=['copy', 'inplace'])
@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('shape', [(2, 7, 5, 6), (1, 1, 3, 4), (3, 4, 4, 2)])
def test_max_pool_nhwc_matches_nn_maxpool2d(kernel_size, shape, inplace):
    """Both paths (index-free without autograd, pooling kernel with it) equal nn.MaxPool2d on NCHW, grads too."""
    x = torch.randn(shape, dtype=torch.float64)
    reference = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
    pool = MaxPool2dNhwc(kernel_size, inplace=inplace)

    with torch.no_grad():
        x_in = x.clone()
        fast = pool(x_in)
        assert (fast.data_ptr() == x_in.data_ptr()) == inplace
        assert inplace or torch.equal(x_in, x)
    x_ref = x.clone().requires_grad_()
    expected = reference(x_ref.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-5)

    x_grad = x.clone().requires_grad_()
    out = pool(x_grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    upstream = torch.randn(out.shape, dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, x_grad, upstream)
    (grad_ref,) = torch.autograd.grad(expected, x_ref, upstream)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-5)


def test_max_pool_nhwc_keeps_the_grid_layout():
    x = torch.randn(2, 6, 5, 16)
    with torch.no_grad():
        assert MaxPool2dNhwc()(x).is_contiguous()
    assert MaxPool2dNhwc()(x.requires_grad_()).is_contiguous()


def test_efficient_token_mixer_matches_plain_nchw_reference():
    """expand -> GELU -> 3x3 max-pool -> GELU -> proj, on a non-square grid, written the plain NCHW way."""
    mixer = EfficientTokenMixer(8).eval()
    x = torch.randn(2, 3, 5, 8)
    h = F.gelu(mixer.expand(x)).permute(0, 3, 1, 2)
    h = F.gelu(nn.MaxPool2d(3, 1, 1)(h)).permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), mixer.proj(h), rtol=0, atol=1e-5)


@pytest.mark.parametrize('act_layer', ['gelu', 'relu'])
@pytest.mark.parametrize('spatial', ['max', 'dwconv'])
def test_efficient_token_mixer_inference_path_equals_autograd_path(spatial, act_layer):
    """Without autograd the mixer activates and pools in place on its own buffers: same output, input untouched."""
    mixer = EfficientTokenMixer(8, spatial=spatial, act_layer=act_layer)
    x = torch.randn(2, 5, 4, 8)
    x_before = x.clone()
    with torch.no_grad():
        fast = mixer(x)
    assert torch.equal(x, x_before)
    x_grad = x.clone().requires_grad_()
    torch.testing.assert_close(fast, mixer(x_grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize('act, in_place', [
    (GELU(), True), (nn.GELU(), True), (nn.GELU(approximate='tanh'), True), (nn.ReLU(), True), (nn.SiLU(), False),
], ids=['timm-gelu', 'gelu', 'gelu-tanh', 'relu', 'silu'])
def test_in_place_activation(act, in_place):
    """Inference writes act(x) into x's memory where act has an in-place kernel; autograd leaves x alone."""
    wrapped = InPlaceActivation(act)
    x = torch.randn(2, 3, 16)
    expected = act(x)
    with torch.no_grad():
        x_in = x.clone()
        out = wrapped(x_in)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out.data_ptr() == x_in.data_ptr()) == in_place
    x_grad = x.clone().requires_grad_()
    out = wrapped(x_grad)
    assert out.data_ptr() != x_grad.data_ptr() and torch.equal(x_grad.detach(), x)
    out.sum().backward()
    torch.testing.assert_close(x_grad.grad, torch.autograd.grad(act(x.requires_grad_()).sum(), x)[0])


@pytest.mark.parametrize('name', ['vit_s_maxpool', 'pit_s_maxpool'])
def test_mlp_activation_runs_in_place_in_inference(name):
    """Every block's MLP activates fc1's output in its own memory without autograd, with the same output."""
    model = timm.create_model(name, embed_dim=48, depth=2, num_heads=2) if name.startswith('vit') else \
        timm.create_model(name, base_dims=(8, 8, 8), depth=(2, 2, 2), heads=(1, 2, 2))
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert mlps and all(isinstance(m.act, InPlaceActivation) for m in mlps)
    same_buffer = []

    def record(module, args, out):
        same_buffer.append(args[0].data_ptr() == out.data_ptr())

    hooks = [m.act.register_forward_hook(record) for m in mlps]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fast = model.eval()(x)
    assert same_buffer == [True] * len(mlps)
    same_buffer.clear()
    torch.testing.assert_close(fast, model(x), rtol=0, atol=1e-6)
    assert same_buffer == [False] * len(mlps)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize('name', ['vit_s_maxpool', 'pit_s_maxpool'])
@pytest.mark.parametrize('where', ['module', 'global'])
def test_forward_hooks_see_what_their_layer_returned(name, where):
    """A hook that keeps a layer's output (activation statistics, quantisation calibration) sees it unactivated
    in inference too: the in-place activations leave hooked outputs alone."""
    model = timm.create_model(name, embed_dim=48, depth=2, num_heads=2, img_size=64) if name.startswith('vit') \
        else timm.create_model(name, base_dims=(8, 8, 8), depth=(2, 2, 2), heads=(1, 2, 2), img_size=64)
    model.eval()
    layers = {n: m for n, m in model.named_modules() if n.endswith(('mlp.fc1', 'attn.expand', 'attn.spatial'))}
    assert {n.rsplit('.', 1)[-1] for n in layers} == {'fc1', 'expand', 'spatial'}
    seen = {}

    def keep(module, args, out):
        seen[module] = (args[0].clone(), out)

    if where == 'module':
        handles = [m.register_forward_hook(keep) for m in layers.values()]
    else:
        handles = [torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: keep(m, a, o) if m in layers.values() else None)]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(layers.values())
    with torch.no_grad():
        for module, (inp, kept) in seen.items():
            assert torch.equal(kept, module(inp)), [n for n, m in layers.items() if m is module]
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)


def test_other_mlp_layers_keep_their_activation():
    model = _tiny_vit(mlp_layer=GluMlp, device='meta')
    assert all(isinstance(b.mlp, GluMlp) and not isinstance(b.mlp.act, InPlaceActivation) for b in model.blocks)


def test_efficient_token_mixer_options():
    assert isinstance(EfficientTokenMixer(4, act_layer='relu').act, nn.ReLU)
    conv = EfficientTokenMixer(4, spatial='dwconv').spatial
    assert isinstance(conv, Conv2dNhwc) and conv.kernel_size == (5, 5) and conv.groups == 12
    with pytest.raises(ValueError, match='unknown spatial operation'):
        EfficientTokenMixer(4, spatial='avg-ish')
    with pytest.raises(ValueError, match='odd'):
        EfficientTokenMixer(4, kernel_size=4)
    with pytest.raises(ValueError, match=r'\(B, H, W, C\)'):
        EfficientTokenMixer(4)(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match='attn_mask'):
        EfficientTokenMixer(4)(torch.randn(1, 3, 3, 4), attn_mask=torch.ones(9, 9, dtype=torch.bool))


def test_grid_attention_equals_timm_attention_on_the_flattened_grid():
    attn = GridAttention(8, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 3, 4, 8)
    with torch.no_grad():
        out = attn(x)
        expected = Attention.forward(attn, x.reshape(2, 12, 8)).reshape(2, 3, 4, 8)
    torch.testing.assert_close(out, expected)


# --- architecture ------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(AUTHORS_PARAMS))
def test_param_count_equals_authors_code(name):
    assert count_params(timm.create_model(name, device='meta')) == AUTHORS_PARAMS[name]


def test_block_patterns():
    kinds = lambda m: [type(b.attn) for b in m.blocks]
    alternate = kinds(timm.create_model('vit_s_maxpool', device='meta'))
    assert alternate == [GridAttention, EfficientTokenMixer] * 6  # odd-indexed blocks are efficient
    assert kinds(timm.create_model('vit_s_maxpool_all', device='meta')) == [EfficientTokenMixer] * 12
    dwconv = timm.create_model('vit_s_dwconv', device='meta')
    assert kinds(dwconv) == alternate
    conv = dwconv.blocks[1].attn.spatial
    assert conv.kernel_size == (5, 5) and conv.groups == conv.in_channels == 3 * 384
    # dw-conv adds exactly a 5x5 depthwise conv with bias over 3d channels in each of the 6 efficient blocks
    assert count_params(dwconv) == AUTHORS_PARAMS['vit_s_maxpool'] + 6 * (3 * 384 * 25 + 3 * 384)
    relu = timm.create_model('vit_s_maxpool', mixer_act_layer='relu', device='meta')
    assert isinstance(relu.blocks[1].attn.act, nn.ReLU)


def test_macs_equal_the_architecture_formula():
    """ViT-S/16 at 224: patch embedding, 6 attention + 6 efficient blocks over 196 tokens, head."""
    n, d = 196, 384
    mlp = 2 * n * d * 4 * d
    attention = n * d * 3 * d + 2 * n * n * d + n * d * d
    efficient = 2 * n * d * 3 * d
    expected = n * 3 * 16 * 16 * d + 6 * (attention + mlp) + 6 * (efficient + mlp) + d * 1000
    assert math.isclose(count_macs(timm.create_model('vit_s_maxpool').eval(), (3, 224, 224)), expected, rel_tol=1e-3)


def test_no_class_token_and_norm_before_average_pooling():
    model = _tiny_vit(num_classes=0).eval()
    assert model.cls_token is None and model.pos_embed.shape == (1, 196, 48)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 196, 48)
        torch.testing.assert_close(model(x), tokens.mean(1))


@pytest.mark.parametrize('kwargs, match', [
    (dict(class_token=True), 'class_token'),
    (dict(reg_tokens=4), 'reg_tokens'),
    (dict(global_pool='token'), 'global_pool'),
    (dict(token_mixer='attention'), 'token_mixer'),
    (dict(efficient_blocks='even'), 'efficient_blocks'),
])
def test_unsupported_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('vit_ti_maxpool', **kwargs)


def test_bad_inputs_get_clear_errors():
    model = _tiny_vit().eval()
    with pytest.raises(ValueError, match='3-channel'):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        model(torch.randn(1, 3, 160, 160))
    dynamic = _tiny_vit(dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        dynamic(torch.randn(1, 3, 72, 64))
    with pytest.raises(ValueError, match='attn_mask'):
        model(torch.randn(1, 3, 224, 224), attn_mask=torch.ones(196, 196, dtype=torch.bool))
    # below one patch the error says so, instead of advising an img_size that cannot be built
    with pytest.raises(ValueError, match='input size 8x8 is smaller than the patch size 16x16'):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match='img_size 8x8 is smaller than the patch size 16x16'):
        _tiny_vit(img_size=8)
    padded = _tiny_vit(dynamic_img_size=True, dynamic_img_pad=True).eval()
    assert padded(torch.randn(1, 3, 8, 8)).shape == (1, padded.num_classes)


# --- official weights ----------------------------------------------------------------------------------


def test_official_logits(official_vit, vit_s_official):
    _, x, logits, meta = official_vit
    assert meta['official_model'] == 'vit_s_max'
    with torch.no_grad():
        out = vit_s_official(x)
    assert (out - logits).abs().max().item() < 1e-4


def test_filter_unwraps_prefixed_checkpoints_and_passes_ours_through(official_vit, vit_s_official):
    state_dict, _, _, _ = official_vit
    model = timm.create_model('vit_s_maxpool', device='meta')
    wrapped = {'model': {f'module.{k}': v for k, v in state_dict.items()}, 'epoch': 300}
    converted = checkpoint_filter_fn(wrapped, model)
    ours = vit_s_official.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    again = checkpoint_filter_fn({'state_dict': ours}, model)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


def test_filter_errors_name_the_problem(vit_s_official):
    ours = vit_s_official.state_dict()
    model = timm.create_model('vit_s_maxpool', device='meta')
    cases = [
        ({**ours, 'cls_token': torch.zeros(1, 1, 384)}, 'class token'),
        ({**ours, 'transformers.0.blocks.0.norm1.weight': torch.ones(144)}, 'PiT'),
        ({k: v for k, v in ours.items() if k != 'blocks.3.mlp.fc1.weight'},
         r'missing keys \(1\): blocks.3.mlp.fc1.weight'),
        ({**ours, 'blocks.0.mlp.fc1.weight': torch.zeros(1536, 192)},
         r'shape mismatches \(1\): blocks.0.mlp.fc1.weight'),
        ({**ours, 'norm.weight': torch.full((384,), float('nan'))}, 'NaN'),
        ({**ours, 'norm.weight': [1.0] * 384}, 'not a tensor'),
    ]
    for state_dict, match in cases:
        with pytest.raises(ValueError, match=match):
            checkpoint_filter_fn(state_dict, model)
    with pytest.raises(ValueError, match='self-attention in the checkpoint but an efficient token mixer'):
        checkpoint_filter_fn(ours, timm.create_model('vit_s_maxpool_all', device='meta'))


def test_pretrained_loading_adapts_classes_and_channels(official_vit, tmp_path):
    """timm's loader runs the filter on an official-format file, then drops the head and adapts the stem."""
    state_dict, _, _, _ = official_vit
    path = tmp_path / 'vit_s_max_official.safetensors'
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    model = timm.create_model(
        'vit_s_maxpool', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10, in_chans=1)
    assert model.head.weight.shape == (10, 384)
    torch.testing.assert_close(model.blocks[1].attn.expand.weight, state_dict['blocks.1.attn.qkv.weight'])
    stem = state_dict['patch_embed.proj.weight']
    torch.testing.assert_close(model.patch_embed.proj.weight, stem.sum(1, keepdim=True))


def test_finetune_at_384_resamples_the_position_embedding(official_vit, vit_s_official):
    state_dict, x, _, _ = official_vit
    converted = checkpoint_filter_fn(state_dict, timm.create_model('vit_s_maxpool', img_size=384, device='meta'))
    expected = resample_abs_pos_embed(state_dict['pos_embed'], new_size=(24, 24), num_prefix_tokens=0)
    torch.testing.assert_close(converted['pos_embed'], expected)
    assert_fine_tunes_at('vit_s_maxpool', converted, vit_s_official, x, 384)


def test_dynamic_img_size_on_non_square_inputs():
    torch.manual_seed(0)
    fixed = _tiny_vit().eval()
    dynamic = _tiny_vit(dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))
        tokens = dynamic.forward_features(torch.randn(2, 3, 64, 96))
    assert tokens.shape == (2, 4 * 6, 48)


def test_set_input_size_resamples_in_place():
    model = _tiny_vit().eval()
    before = model.pos_embed.detach().clone()
    model.set_input_size(img_size=(96, 128))
    expected = resample_abs_pos_embed(before, new_size=(6, 8), old_size=(14, 14), num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 1000)


# --- timm features -------------------------------------------------------------------------------------


def test_forward_intermediates():
    model = _tiny_vit(img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[1, 3])
        tokens = model.forward_intermediates(x, indices=2, output_fmt='NLC', intermediates_only=True)
        as_dict = model.forward_intermediates(x, indices=1, output_dict=True)
        features = model.forward_features(x)
    assert [m.shape for m in maps] == [(2, 48, 4, 4)] * 2
    torch.testing.assert_close(final, features)
    assert [t.shape for t in tokens] == [(2, 16, 48)] * 2
    torch.testing.assert_close(tokens[1], maps[1].flatten(2).transpose(1, 2))  # both hold block 3
    torch.testing.assert_close(as_dict['image_features'], features)
    torch.testing.assert_close(as_dict['image_intermediates'][0], maps[1])


def test_features_only():
    model = timm.create_model('vit_ti_maxpool', img_size=64, features_only=True, out_indices=(5, 11)).eval()
    assert model.feature_info.channels() == [192, 192] and model.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [(1, 192, 4, 4)] * 2


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    assert_grad_checkpointing_keeps_gradients(_tiny_vit(img_size=64, num_classes=5).train(), torch.randn(2, 3, 64, 64))


def test_reset_classifier():
    assert_reset_classifier_works(_tiny_vit(img_size=64).eval(), torch.randn(2, 3, 64, 64))


def test_pretrained_cfgs():
    cfg = timm.models.get_pretrained_cfg('vit_s_maxpool')
    assert cfg.tag == 'pf_in1k' and cfg.hf_hub_id == 'timm-pf/vit_s_maxpool.pf_in1k'
    assert not cfg.url
    assert cfg.paper_ids == 'arXiv:2202.02777' and cfg.origin_url == 'https://github.com/naver-ai/PfLayer'
    assert cfg.first_conv == 'patch_embed.proj' and cfg.classifier == 'head'
    assert cfg.crop_pct == 0.875 and cfg.interpolation == 'bicubic'
    assert any('drive.google.com' in n for n in cfg.notes) and any('Table 6' in n for n in cfg.notes)
    for name in ('vit_ti_maxpool', 'vit_b_maxpool', 'vit_s_dwconv', 'vit_s_maxpool_all'):
        cfg = timm.models.get_pretrained_cfg(name)
        # no released weights: the tag names where weights trained with train_configs/ will be published
        assert cfg.tag == 'in1k' and cfg.hf_hub_id == f'timm-pf/{name}.in1k' and not cfg.url, name
