"""Replacement Learning (timm_pf.methods.replacement, timm_pf.models.replace).

Parameter counts are predicted from the architectures' shapes, gradients are checked against finite
differences, training on digits is compared with normal training, and finalized weights are loaded by
plain timm in a process that never imports timm_pf.
"""
import io
import math
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import save_for_hf
from timm.models.resnet import BasicBlock, ResNet
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

import timm_pf  # noqa: F401  registers the *_replace variants
from timm_pf.methods.replacement import finalize, is_replaced, replace_layers, replacement_report
from timm_pf.methods.stats import count_params
from timm_pf.models.replace import PLAIN_MODELS
from timm_pf.tools.data import digits_tensors

# A ViT small enough for CPU tests; 6 layers so that interval 2 replaces layers 2 and 4.
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=10)


def _replaced_layers(depth: int, interval: int):
    """Algorithm 1's F = {l : l mod k == 0}, 1-based, without the last layer (it has no successor)."""
    return [l for l in range(1, depth) if l % interval == 0]


def _attention_params(dim: int, qkv_bias: bool) -> int:
    """qkv: dim -> 3 dim, proj: dim -> dim (ViT, Dosovitskiy et al. 2021)."""
    return dim * 3 * dim + (3 * dim if qkv_bias else 0) + dim * dim + dim


# ---------------------------------------------------------------------------------------------------
# Learnable parameters
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('interval', [2, 3])
def test_vit_s_learnable_params_drop_as_predicted(interval):
    depth, dim = 12, 384  # ViT-S/16
    plain = timm.create_model('vit_small_patch16_224')
    assert (len(plain.blocks), plain.embed_dim) == (depth, dim)
    replaced = _replaced_layers(depth, interval)
    expected = count_params(plain) - len(replaced) * (_attention_params(dim, qkv_bias=True) - 2)

    model = timm.create_model('vit_s_replace', replace_interval=interval)
    assert count_params(model) == expected
    report = replacement_report(model)
    assert (report.params_before, report.params_after) == (count_params(plain), expected)
    assert report.replaced == [f'blocks.{l - 1}.attn' for l in replaced]

    # the replaced attention keeps only a_l, b_l; its MLP and norms, and every other block, are untouched
    names = {name for name, _ in model.named_parameters()}
    for l in range(1, depth + 1):
        attn = {n for n in names if n.startswith(f'blocks.{l - 1}.attn.')}
        own = {f'blocks.{l - 1}.attn.{t}' for t in ('qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias')}
        mix = {f'blocks.{l - 1}.attn.neighbour_mix.a', f'blocks.{l - 1}.attn.neighbour_mix.b'}
        assert attn == (mix if l in replaced else own)
        assert f'blocks.{l - 1}.mlp.fc1.weight' in names
    assert set(model.state_dict()) - names == set()  # no buffers, so parameters and state_dict agree


def test_resnet50_replaces_only_blocks_with_same_shaped_neighbours():
    stage_depths, widths = (3, 4, 6, 3), (64, 128, 256, 512)
    blocks = [(s, i) for s, d in enumerate(stage_depths) for i in range(d)]
    # a block has the shapes of its stage's later blocks unless it opens the stage (downsampling, new width)
    expected = []
    for l in _replaced_layers(len(blocks), 2):
        (ps, pi), (s, i), (ns, ni) = blocks[l - 2], blocks[l - 1], blocks[l]
        if ps == s == ns and pi > 0:
            expected.append((s, i))
    # bottleneck: 1x1 4w->w, 3x3 w->w, 1x1 w->4w, three BatchNorms with weight and bias
    bottleneck = {s: 17 * w * w + 12 * w for s, w in enumerate(widths)}
    model = timm.create_model('resnet50_replace')
    report = replacement_report(model)
    assert report.replaced == [f'layer{s + 1}.{i}' for s, i in expected] == ['layer2.2', 'layer3.2', 'layer3.4']
    assert report.params_before - report.params_after == sum(bottleneck[s] - 2 for s, _ in expected)
    assert report.params_before == count_params(timm.create_model('resnet50'))
    # BatchNorm statistics stay the replaced block's own buffers
    assert 'layer2.2.bn1.running_mean' in model.state_dict()
    assert 'layer2.2.bn1.weight' not in model.state_dict()


def test_report_names_the_layers_kept_and_why():
    report = replace_layers(timm.create_model('resnet50'), interval=2)
    assert report.interval == 2 and report.num_layers == 16
    assert report.skipped['layer4.2'].startswith('last layer')
    assert 'layer1.0' in report.skipped['layer1.1']
    assert 'layer2.0' in str(report) and '25,557,032 -> 23,042,606' in str(report)


def test_maxpool_vit_layers_are_its_attention_blocks():
    # vit_s_maxpool alternates attention (even blocks) and max-pool mixers (odd blocks): the layers of
    # Algorithm 1 are the attention blocks 0, 2, .., 10; interval 2 replaces the 2nd and 4th of them.
    model = timm.create_model('vit_s_maxpool_replace', img_size=32)
    plain = timm.create_model('vit_s_maxpool', img_size=32)
    report = replacement_report(model)
    assert report.replaced == ['blocks.2.attn', 'blocks.6.attn']
    assert report.params_before - report.params_after == 2 * (_attention_params(384, qkv_bias=True) - 2)
    assert report.params_before == count_params(plain)
    mix = model.blocks[2].attn.neighbour_mix
    assert mix.neighbours == (model.blocks[0].attn, model.blocks[4].attn)
    assert not is_replaced(model.blocks[1]) and not is_replaced(model.blocks[3])


# ---------------------------------------------------------------------------------------------------
# The mix and its gradients
# ---------------------------------------------------------------------------------------------------

def test_replaced_weights_are_the_mix_of_the_neighbours():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **TINY_VIT)
    replace_layers(model, interval=2, init=(0.3, -1.7))
    prev_attn, attn, next_attn = model.blocks[0].attn, model.blocks[1].attn, model.blocks[2].attn
    for name in ('qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias'):
        linear, tensor = name.split('.')
        expected = 0.3 * prev_attn.get_parameter(name) - 1.7 * next_attn.get_parameter(name)
        torch.testing.assert_close(getattr(attn.get_submodule(linear), tensor), expected)


def test_gradients_of_a_b_and_neighbours_match_finite_differences():
    torch.manual_seed(0)
    model = timm.create_model(
        'vit_tiny_patch16_224', img_size=8, patch_size=4, embed_dim=8, depth=3, num_heads=2, num_classes=3)
    replace_layers(model, interval=2, init=(0.7, 0.4))
    model = model.double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])

    def loss():
        return F.cross_entropy(model(x), y)

    loss().backward()
    mix = model.blocks[1].attn.neighbour_mix
    checks = [(mix.a, ()), (mix.b, ()),
              (model.blocks[0].attn.qkv.weight, (5, 3)), (model.blocks[2].attn.proj.weight, (1, 6)),
              (model.blocks[2].attn.qkv.bias, (17,))]
    eps = 1e-6
    for param, idx in checks:
        assert param.grad is not None
        with torch.no_grad():
            orig = param[idx].clone()
            param[idx] = orig + eps
            up = loss()
            param[idx] = orig - eps
            down = loss()
            param[idx] = orig
        fd = (up - down) / (2 * eps)
        torch.testing.assert_close(param.grad[idx], fd, rtol=1e-6, atol=1e-9)
        assert fd.abs() > 1e-6  # a real gradient, not 0 == 0


# ---------------------------------------------------------------------------------------------------
# Training on digits: replacement learning vs normal training
# ---------------------------------------------------------------------------------------------------

# 2x2 tokens of 8x8 pixels, global average pooling: a ViT that learns digits in ~230 steps on a CPU.
DIGITS_VIT = dict(img_size=16, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10,
                  global_pool='avg', class_token=False)
EPOCHS, BATCH, LR = 10, 64, 3e-3


def _train_on_digits(interval):
    """AdamW with weight decay 1e-4 and a cosine schedule (supplement A.1), stepped per update as train.py
    does, after a one-epoch warm-up. Returns (validation accuracy, learnable parameters, seconds)."""
    torch.set_flush_denormal(True)
    x_tr, y_tr, x_va, y_va = digits_tensors(DIGITS_VIT['img_size'])
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **DIGITS_VIT)
    if interval:
        replace_layers(model, interval=interval)
    opt = create_optimizer_v2(model, 'adamw', lr=LR, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / BATCH)
    sched = CosineLRScheduler(opt, t_initial=EPOCHS * steps_per_epoch, warmup_t=steps_per_epoch,
                              warmup_lr_init=LR / 25, t_in_epochs=False)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    step = 0
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x_tr), generator=generator).split(BATCH):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_va).argmax(1) == y_va).float().mean().item()
    return accuracy, count_params(model), seconds


def test_training_on_digits_matches_normal_training(record_property):
    normal_acc, normal_params, normal_s = _train_on_digits(interval=None)
    replaced_acc, replaced_params, replaced_s = _train_on_digits(interval=2)
    for key, value in dict(normal_acc=normal_acc, replaced_acc=replaced_acc, normal_params=normal_params,
                           replaced_params=replaced_params, normal_s=normal_s, replaced_s=replaced_s).items():
        record_property(key, value)
    print(f'digits val accuracy: normal {normal_acc:.3f} ({normal_params} params, {normal_s:.1f}s), '
          f'replacement learning {replaced_acc:.3f} ({replaced_params} params, {replaced_s:.1f}s)')
    # layers 2 and 4 of 6 replaced
    assert replaced_params == normal_params - 2 * (_attention_params(DIGITS_VIT['embed_dim'], True) - 2)
    # Both learn (chance is 0.10) ...
    assert normal_acc > 0.85 and replaced_acc > 0.85
    # ... and replacement learning is within 0.04 of normal training: at ~0.95 accuracy the 360 validation
    # images give a binomial standard error of ~0.012 per run, ~0.016 for the difference of two runs, so
    # 0.04 allows ~2.5 standard errors (the runs differ in their training trajectories, not only in noise).
    assert replaced_acc >= normal_acc - 0.04


# ---------------------------------------------------------------------------------------------------
# timm integration: optimizer factory, EMA, checkpoints
# ---------------------------------------------------------------------------------------------------

def _tiny_replaced():
    return timm.create_model('vit_ti_replace', **TINY_VIT)


def test_optimizer_factory_sees_a_b_without_weight_decay_and_updates_neighbours():
    torch.manual_seed(0)
    model = _tiny_replaced()
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=1e-4)
    in_opt = [p for group in opt.param_groups for p in group['params']]
    assert len(in_opt) == len(set(map(id, in_opt))) == len(list(model.parameters()))
    mix = model.blocks[1].attn.neighbour_mix
    decay_of = {id(p): group['weight_decay'] for group in opt.param_groups for p in group['params']}
    assert decay_of[id(mix.a)] == decay_of[id(mix.b)] == 0.0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == 1e-4

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mixed_before = model.blocks[1].attn.qkv.weight.detach().clone()
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4)).backward()
    opt.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {'blocks.1.attn.neighbour_mix.a', 'blocks.1.attn.neighbour_mix.b',
            'blocks.0.attn.qkv.weight', 'blocks.2.attn.qkv.weight'} <= changed
    assert not torch.equal(model.blocks[1].attn.qkv.weight, mixed_before)  # follows a, b and the neighbours


def test_ema_copy_mixes_its_own_neighbours():
    torch.manual_seed(0)
    model = _tiny_replaced()
    ema = ModelEmaV3(model, decay=0.5)
    ema_mix = ema.module.blocks[1].attn.neighbour_mix
    assert ema_mix is not model.blocks[1].attn.neighbour_mix
    assert ema_mix.neighbours == (ema.module.blocks[0].attn, ema.module.blocks[2].attn)
    with torch.no_grad():
        model.blocks[1].attn.neighbour_mix.a.fill_(1.5)
        model.blocks[0].attn.qkv.weight.mul_(3)
    ema.update(model)
    assert ema_mix.a.item() == pytest.approx(1.0)  # 0.5 * 0.5 + 0.5 * 1.5
    expected = ema_mix.a * ema.module.blocks[0].attn.qkv.weight + ema_mix.b * ema.module.blocks[2].attn.qkv.weight
    torch.testing.assert_close(ema.module.blocks[1].attn.qkv.weight, expected)


def test_checkpoint_round_trip_resumes_model_and_optimizer():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    model = _tiny_replaced()
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=1e-4)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    buffer = io.BytesIO()  # through bytes as in a real checkpoint (state dicts share the live tensors)
    torch.save({'state_dict': model.state_dict(), 'optimizer': opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = _tiny_replaced()
    resumed.load_state_dict(checkpoint['state_dict'], strict=True)
    resumed_opt = create_optimizer_v2(resumed, 'adamw', lr=1e-2, weight_decay=1e-4)
    resumed_opt.load_state_dict(checkpoint['optimizer'])
    for m, o in ((model, opt), (resumed, resumed_opt)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    model.eval()
    resumed.eval()
    torch.testing.assert_close(resumed(x), model(x), rtol=0, atol=0)

    # a plain checkpoint is no replaced model's: strict loading names the offending keys
    with pytest.raises(RuntimeError, match='blocks.1.attn.qkv.weight'):
        _tiny_replaced().load_state_dict(timm.create_model('vit_tiny_patch16_224', **TINY_VIT).state_dict())


# ---------------------------------------------------------------------------------------------------
# finalize: back to the plain architecture
# ---------------------------------------------------------------------------------------------------

# ResNet with the 64-channel stem's width in stage 1 (no downsampling block there) and a 2nd stage of 4
# blocks: interval 2 replaces layer1.1 (l=2) and layer2.2 (l=6), keeps layer2.0 and layer3.0 (downsampling).
TINY_RESNET = 'ResNet(BasicBlock, layers=(3, 4, 1, 1), channels=(64, 16, 16, 16), num_classes=5)'
PLAIN_BUILDERS = {'vit': f'timm.create_model("vit_tiny_patch16_224", **{TINY_VIT!r})', 'resnet': TINY_RESNET}


def _plain(kind):
    return eval(PLAIN_BUILDERS[kind], {'timm': timm, 'ResNet': ResNet, 'BasicBlock': BasicBlock})


def _build(kind):
    model = _plain(kind)
    report = replace_layers(model, interval=2)
    assert report.replaced == (['blocks.1.attn', 'blocks.3.attn'] if kind == 'vit' else ['layer1.1', 'layer2.2'])
    return model


@pytest.mark.parametrize('kind', ['vit', 'resnet'])
def test_finalize_gives_the_plain_model_with_equal_outputs(kind, tmp_path):
    torch.manual_seed(0)
    model = _build(kind)
    with torch.no_grad():  # move away from the initial values and from zero-initialised BN weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randn(8, 3, 16, 16))  # BatchNorm statistics of a replaced block, kept as its buffers
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        finalize(model)
        got = model(x)
    assert torch.equal(got, expected)
    assert not is_replaced(model)
    plain = _plain(kind)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(type(a) is type(b) for a, b in zip(model.modules(), plain.modules()))
    assert all(p.requires_grad for p in model.parameters())

    weights, io_file = tmp_path / 'model.safetensors', tmp_path / 'io.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    save_file({'x': x, 'y': expected}, str(io_file))
    script = f'''
import sys, timm, torch
from safetensors.torch import load_file
from timm.models.resnet import BasicBlock, ResNet
torch.set_num_threads({torch.get_num_threads()})
model = {PLAIN_BUILDERS[kind]}
model.load_state_dict(load_file({str(weights)!r}), strict=True)
io = load_file({str(io_file)!r})
with torch.no_grad():
    y = model.eval()(io['x'])
assert 'timm_pf' not in sys.modules
torch.testing.assert_close(y, io['y'], rtol=0, atol=1e-6)
'''
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_variant_finalizes_to_its_plain_model():
    assert sorted(PLAIN_MODELS) == sorted(timm.list_models(module='replace'))
    for variant, plain_name in PLAIN_MODELS.items():
        torch.manual_seed(0)
        model = finalize(timm.create_model(variant))
        plain = timm.create_model(plain_name)
        shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (model, plain)]
        assert shapes[0] == shapes[1]
        assert count_params(model) == count_params(plain)


def test_finalized_variant_saves_a_config_that_builds_the_plain_model(tmp_path):
    """save_for_hf's config.json of a finalised variant (created with an explicit interval) rebuilds it."""
    torch.manual_seed(0)
    model = finalize(timm.create_model('vit_ti_replace', replace_interval=3, **TINY_VIT)).eval()
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_finalized_ema_copy_is_plain():
    model = _tiny_replaced()
    ema = ModelEmaV3(model, decay=0.9)
    finalize(ema.module)
    assert list(ema.module.state_dict()) == list(timm.create_model('vit_tiny_patch16_224', **TINY_VIT).state_dict())
    assert is_replaced(model)  # the training model is untouched


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('interval', [1, 0, -2, 2.0, True])
def test_bad_interval_is_rejected(interval):
    with pytest.raises(ValueError, match='interval must be an integer >= 2'):
        replace_layers(timm.create_model('vit_tiny_patch16_224', **TINY_VIT), interval=interval)


@pytest.mark.parametrize('init', [(float('nan'), 0.5), (0.5, float('inf')), (1, 2, 3), 0.5, ('a', 'b'), (True, 0.5)])
def test_bad_init_is_rejected(init):
    model = timm.create_model('vit_tiny_patch16_224', **TINY_VIT)
    with pytest.raises(ValueError, match='init must be two finite numbers'):
        replace_layers(model, init=init)
    assert not is_replaced(model)


def test_interval_that_selects_nothing_is_rejected():
    # 6 layers: interval 6 selects only the last layer, which has no successor
    with pytest.raises(ValueError, match='(?s)selects no replaceable layer.*last layer'):
        replace_layers(timm.create_model('vit_tiny_patch16_224', **TINY_VIT), interval=6)
    # max-pool mixers only: no attention layer at all, and no residual block either
    with pytest.raises(TypeError, match='multi-head attention layers of ViTs and the residual blocks of ResNets'):
        replace_layers(timm.create_model('vit_s_maxpool_all', img_size=32), interval=2)


def test_misuse_is_reported():
    model = _tiny_replaced()
    with pytest.raises(ValueError, match='already in replacement-learning form'):
        replace_layers(model, interval=3)
    with pytest.raises(RuntimeError, match='computed from its neighbours and cannot be assigned'):
        model.blocks[1].attn.qkv.weight = torch.zeros(96, 32)
    with pytest.raises(ValueError, match='not in replacement-learning form'):
        finalize(timm.create_model('vit_tiny_patch16_224', **TINY_VIT))
    with pytest.raises(ValueError, match='not in replacement-learning form'):
        replacement_report(nn.Linear(2, 2))


def test_scripting_the_training_form_says_to_finalize_first():
    with pytest.raises(RuntimeError, match=r'finalize\(model\)'):
        torch.jit.script(_tiny_replaced())
    scripted = torch.jit.script(finalize(_tiny_replaced()).eval())  # the plain model scripts
    assert scripted(torch.randn(1, 3, 16, 16)).shape == (1, TINY_VIT['num_classes'])
