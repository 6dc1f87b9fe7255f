"""Block Redundancy analysis and Redundant Blocks Approximation (timm_pf.methods.rba, ``timm-pf rba``)."""
import json
import math
import shutil
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import save_for_hf
from timm_pf.cli import main as cli_main
from timm_pf.methods import rba
from timm_pf.methods.rba.metrics import _GroupStats
from timm_pf.methods.stats import count_macs, count_params
from timm_pf.tools.data import digits_tensors, export_digits

DIGITS_SIZE = 16
TINY_VIT = dict(img_size=DIGITS_SIZE, patch_size=8, depth=6, embed_dim=64, num_heads=2, num_classes=10)


# ---------------------------------------------------------------------------------------------------
# Synthetic trunks whose blocks are exactly linear
# ---------------------------------------------------------------------------------------------------

class _PerTokenLinear(nn.Module):
    """A different affine map for every token position."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim) + 0.3 * torch.randn(num_tokens, dim, dim) / dim ** 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(num_tokens, dim))

    def forward(self, x):
        return torch.einsum('bnd,ned->bne', x, self.weight) + self.bias


class _LinearTrunk(nn.Module):
    """A model whose blocks are linear maps, declared through feature_info like timm models."""

    def __init__(self, kind: str, dim: int = 16, depth: int = 4, num_tokens: int = 10, bias: bool = False):
        super().__init__()
        blocks = []
        for _ in range(depth):
            if kind == 'per_token':
                block = _PerTokenLinear(num_tokens, dim)
            else:
                block = nn.Linear(dim, dim, bias=bias) if kind == 'tokens' else nn.Conv2d(dim, dim, 1, bias=bias)
                with torch.no_grad():
                    weight = torch.eye(dim) + 0.3 * torch.randn(dim, dim) / dim ** 0.5
                    block.weight.copy_(weight.view_as(block.weight))
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=dim, reduction=1) for i in range(depth)]

    def forward_features(self, x):
        return self.blocks(x)

    forward = forward_features


def _linear_trunk_data(kind: str, num_batches: int = 8, batch: int = 8):
    shape = (batch, 16, 5, 2) if kind == 'feature_map' else (batch, 10, 16)
    return [torch.randn(shape) for _ in range(num_batches)]


@pytest.mark.parametrize('kind, bias, per_token', [
    ('tokens', False, False),
    ('tokens', True, False),
    ('feature_map', True, False),
    ('feature_map', False, True),
    ('per_token', True, True),
])
def test_fitted_map_reproduces_exactly_linear_blocks(kind, bias, per_token):
    torch.manual_seed(0)
    model = _LinearTrunk(kind, bias=bias).eval()
    approx = rba.approximate(model, [(0, 3)], _linear_trunk_data(kind), bias=bias, per_token=per_token)
    assert [type(b).__name__ for b in approx.blocks] == ['Identity' if i in (1, 2) else type(model.blocks[i]).__name__
                                                         for i in range(3)] + ['LinearBlockApprox']
    x = _linear_trunk_data(kind, num_batches=1)[0]
    with torch.no_grad():
        expected, got = model(x), approx(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_shared_map_cannot_fit_per_token_blocks_but_per_token_map_does():
    torch.manual_seed(0)
    model = _LinearTrunk('per_token', bias=True).eval()
    data = _linear_trunk_data('per_token')
    x = _linear_trunk_data('per_token', num_batches=1)[0]
    with torch.no_grad():
        expected = model(x)
        errors = {pt: (rba.approximate(model, [(1, 2)], data, bias=True, per_token=pt)(x) - expected).abs().max()
                  for pt in (False, True)}
    assert errors[True] <= 1e-5 * expected.abs().max()
    assert errors[False] > 1e-2 * expected.abs().max()


def test_streaming_fit_matches_in_memory_least_squares():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **TINY_VIT).eval()
    images = torch.randn(48, 3, DIGITS_SIZE, DIGITS_SIZE)
    streamed = rba.fit_spans(model, [(1, 4)], images.split(5))[0]  # ragged batches
    one_batch = rba.fit_spans(model, [('blocks.1', 'blocks.4')], [images])[0]
    outputs = rba.collect_block_outputs(model, images, [1, 4])
    x, y = (outputs[f'blocks.{i}'].flatten(0, 1).double() for i in (1, 4))
    reference = torch.linalg.lstsq(x, y).solution.T  # the authors' in-memory fit
    scale = reference.abs().max()
    assert (streamed.weight.double() - reference).abs().max() <= 1e-5 * scale
    assert (one_batch.weight.double() - reference).abs().max() <= 1e-5 * scale


def test_ridge_shrinks_the_map():
    torch.manual_seed(0)
    model = _LinearTrunk('tokens').eval()
    data = _linear_trunk_data('tokens')
    plain, ridged = (rba.fit_spans(model, [(0, 2)], data, ridge=r)[0].weight for r in (0.0, 10.0))
    assert ridged.norm() < 0.5 * plain.norm()


# ---------------------------------------------------------------------------------------------------
# Finding blocks and capturing their outputs
# ---------------------------------------------------------------------------------------------------

def test_find_blocks_in_timm_families():
    vit = rba.find_blocks(timm.create_model('vit_tiny_patch16_224', **TINY_VIT))
    assert [b.name for b in vit] == [f'blocks.{i}' for i in range(6)]
    resnet = rba.find_blocks(timm.create_model('resnet18'))
    assert [b.name for b in resnet] == [f'layer{s}.{i}' for s in range(1, 5) for i in range(2)]
    pit = rba.find_blocks(timm.create_model('pit_ti_224'))
    assert [b.segment for b in pit] == ['transformers.0.blocks'] * 2 + ['transformers.1.blocks'] * 6 + \
        ['transformers.2.blocks'] * 4


def test_nhwc_blocks_of_maxpool_vit_map_their_channels():
    torch.manual_seed(0)
    model = timm.create_model('vit_ti_maxpool', img_size=32, depth=3).eval()
    images = torch.randn(4, 3, 32, 32)
    assert rba.collect_block_outputs(model, images, [0])['blocks.0'].shape == (4, 2, 2, 192)  # (B, H, W, C) grid
    approx = rba.approximate(model, [(0, 2)], [images])
    assert (approx.blocks[2].dim, approx.blocks[2].layout) == (192, 'NHWC')
    assert approx(images).shape == model(images).shape


def test_unsupported_model_and_bad_spans_give_clear_errors():
    with pytest.raises(rba.RbaError, match=r'eva02_tiny_patch14_224 .*ModuleList'):
        rba.find_blocks(timm.create_model('eva02_tiny_patch14_224'))
    with pytest.raises(rba.RbaError, match='no feature_info'):
        rba.find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    resnet = timm.create_model('resnet18')
    x = [torch.randn(2, 3, 32, 32)]
    with pytest.raises(rba.RbaError, match='crosses from layer1 into layer2'):
        rba.fit_spans(resnet, [('layer1.0', 'layer2.1')], x)
    with pytest.raises(rba.RbaError, match='must come after'):
        rba.fit_spans(resnet, [(3, 1)], x)
    with pytest.raises(rba.RbaError, match='overlap'):
        rba.fit_spans(resnet, [(4, 5), ('layer3.0', 'layer3.1'), (2, 3), (2, 3)], x)


def _tiny_vit(**kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, depth=6, embed_dim=32, num_heads=2)
    return timm.create_model('vit_tiny_patch16_224', **{**args, **kwargs}).eval()


def test_bad_arguments_of_the_python_api_are_named():
    model, images = _tiny_vit(), [torch.randn(4, 3, 32, 32)]
    with pytest.raises(rba.RbaError, match='max_images must be None or a whole number >= 1, got -5'):
        rba.analyze(model, images, max_images=-5)
    for ridge in (-1, float('nan'), float('inf')):
        with pytest.raises(rba.RbaError, match='ridge must be a finite number >= 0'):
            rba.approximate(model, [(1, 3)], images, ridge=ridge)
    with pytest.raises(rba.RbaError, match=r'a span is a \(source, target\) pair of blocks, got 1'):
        rba.approximate(model, (1, 3), images)
    with pytest.raises(rba.RbaError, match='not one tensor'):
        rba.analyze(model, images[0])
    nan_images = [torch.full((2, 3, 32, 32), float('nan'))]
    with pytest.raises(rba.RbaError, match='NaN or Inf'):
        rba.analyze(model, nan_images)
    with pytest.raises(rba.RbaError, match='NaN or Inf'):
        rba.approximate(model, [(1, 3)], nan_images)
    report = rba.analyze(model, images)
    assert len(report.spans(max_blocks=1)) == 5 and len(report.spans()) == 15
    with pytest.raises(rba.RbaError, match='max_blocks must be None or >= 1, got 0'):
        report.table(max_blocks=0)
    with pytest.raises(rba.RbaError, match='top must be None or >= 0, got -1'):
        report.table(top=-1)


def test_non_finite_block_outputs_are_named():
    model, images = _tiny_vit(), [torch.randn(4, 3, 32, 32)]
    with torch.no_grad():
        model.blocks[2].mlp.fc2.bias.fill_(float('inf'))
    with pytest.raises(rba.RbaError, match='NaN or Inf'):
        rba.analyze(model, images)
    with pytest.raises(rba.RbaError, match='NaN or Inf'):
        rba.approximate(model, [(2, 4)], images)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_maps_take_the_dtype_of_the_model(dtype):
    model = _tiny_vit().to(dtype)
    images = torch.randn(8, 3, 32, 32, dtype=dtype)
    approx = rba.approximate(model, [(1, 3)], [images])
    assert approx.blocks[3].weight.dtype == dtype
    assert approx(images[:2]).dtype == dtype


def test_approximating_again_refuses_spans_that_overlap_the_earlier_ones(tmp_path):
    model, images = _tiny_vit(), [torch.randn(8, 3, 32, 32)]
    approx = rba.approximate(model, [(1, 3)], images)
    for span in [(0, 2), (2, 4), (0, 4), (1, 3)]:
        with pytest.raises(rba.RbaError, match=r'already replaced in this model\) overlap'):
            rba.approximate(approx, [span], images)
    again = rba.approximate(approx, [(3, 5)], images)  # sharing the end block 3 is allowed
    assert [(s['source'], s['target']) for s in again.rba_spans] == [('blocks.1', 'blocks.3'), ('blocks.3', 'blocks.5')]
    # the identities left by the first span pass their input on: no span starts or ends there
    report = rba.analyze(approx, images)
    assert report.notes['removed_blocks'] == ['blocks.2']
    assert all('blocks.2' not in (r['source'], r['target']) for r in report.spans())
    assert math.isnan(report.metrics['br'][2][3]) and not math.isnan(report.metrics['br'][1][3])
    # nor is a span ranked that replaces blocks the map 1 -> 3 replaces (apply would refuse it)
    ranked = {(r['source_index'], r['target_index']) for r in report.spans()}
    assert {(0, 1), (3, 4), (3, 5)} <= ranked
    assert not {(1, 3), (0, 3), (1, 4), (0, 4)} & ranked
    report.to_json(tmp_path / 'report.json')
    reloaded = rba.RedundancyReport.from_json(tmp_path / 'report.json')
    assert ranked == {(r['source_index'], r['target_index']) for r in reloaded.spans()}


def test_a_trunk_of_one_block_is_named():
    with pytest.raises(rba.RbaError, match=r'one block per nn.Sequential \(blocks\)'):
        rba.find_blocks(_tiny_vit(depth=1))


def test_block_outputs_equal_vit_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **TINY_VIT).eval()
    x = torch.randn(3, 3, DIGITS_SIZE, DIGITS_SIZE)
    hooked = rba.collect_block_outputs(model, x)
    with torch.no_grad():
        inter = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True, return_prefix_tokens=True)
    for i, (spatial, prefix) in enumerate(inter):
        assert torch.equal(hooked[f'blocks.{i}'], torch.cat([prefix, spatial], dim=1))


# ---------------------------------------------------------------------------------------------------
# Analysis: streamed sums equal the metrics computed on all rows in memory
# ---------------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    return (t.flatten(2).transpose(1, 2) if t.ndim == 4 else t).flatten(0, 1).double()


def _reference_metrics(x: torch.Tensor, y: torch.Tensor):
    xc, yc = x - x.mean(0), y - y.mean(0)
    solution = torch.linalg.lstsq(x, y).solution
    return dict(
        br=-(x - y).square().mean(),
        cosine=F.cosine_similarity(x, y, dim=1).mean(),
        cka=(xc.T @ yc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm()),
        linear_r2=1 - (y - x @ solution).square().sum() / yc.square().sum(),
    )


@pytest.mark.parametrize('name, kwargs, size, same_shape_pairs', [
    ('vit_tiny_patch16_224', TINY_VIT, DIGITS_SIZE, 15),
    ('resnet18', dict(zero_init_last=False, num_classes=10), 32, 4),  # two blocks in each of 4 stages
])
def test_streamed_analysis_matches_in_memory_metrics(name, kwargs, size, same_shape_pairs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    images = torch.randn(20, 3, size, size)
    report = rba.analyze(model, images.split(6))
    assert report.num_images == 20
    outputs = rba.collect_block_outputs(model, images)
    names = report.block_names
    checked = 0
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            same_shape = outputs[a].shape == outputs[b].shape
            assert all(math.isnan(report.metrics[m][i][j]) != same_shape for m in ('br', 'cosine', 'cka'))
            if not same_shape or j <= i:
                continue
            ref = _reference_metrics(_rows(outputs[a]), _rows(outputs[b]))
            for m, value in ref.items():
                assert report.metrics[m][i][j] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), (m, a, b)
            checked += 1
    assert checked == same_shape_pairs


def test_report_ranks_spans_and_round_trips_json(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **TINY_VIT).eval()
    report = rba.analyze(model, [torch.randn(8, 3, DIGITS_SIZE, DIGITS_SIZE)], metrics=('br', 'cosine'))
    spans = report.spans('br')
    assert len(spans) == 15  # every (i, j), i < j, of 6 blocks
    assert [s['br'] for s in spans] == sorted((s['br'] for s in spans), reverse=True)
    block = count_params(model.blocks[1])
    assert next(s for s in spans if s['target'] == 'blocks.1')['params_removed'] == block - 64 * 64
    report.to_json(tmp_path / 'r.json')
    again = rba.RedundancyReport.from_json(tmp_path / 'r.json')
    assert again.spans('cosine') == report.spans('cosine')
    with pytest.raises(rba.RbaError, match='cannot rank by'):
        report.spans('cka')


# ---------------------------------------------------------------------------------------------------
# A tiny ViT trained on scikit-learn's digits
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits():
    return digits_tensors(DIGITS_SIZE)


@pytest.fixture(scope='module')
def trained_vit(digits):
    x_tr, y_tr, x_va, y_va = digits
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', drop_path_rate=0.1, **TINY_VIT)
    epochs, batch = 10, 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * -(-len(x_tr) // batch), pct_start=0.15)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr)).split(batch):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    # the folder export is read with timm's eval transform: no crop, ImageNet normalisation like digits_tensors
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                                crop_pct=1.0, interpolation='bilinear')
    assert _top1(model, x_va, y_va) > 85
    return model


def _top1(model, x, y) -> float:
    with torch.no_grad():
        return rba.accuracy(model(x), y)


def test_replacing_the_most_redundant_block_keeps_accuracy(trained_vit, digits):
    x_tr, y_tr, x_va, y_va = digits
    report = rba.analyze(trained_vit, x_tr[:256].split(64))
    best = report.spans('br', max_blocks=1)[0]
    span = (best['source'], best['target'])
    approx = rba.approximate(trained_vit, [span], x_tr[:512].split(128))
    j = best['target_index']

    # least squares beats the identity ("skip") on the data it was fitted on
    fitted = rba.collect_block_outputs(approx, x_tr[:512], [j])[best['target']]
    target = rba.collect_block_outputs(trained_vit, x_tr[:512], [j])[best['target']]
    skipped = rba.collect_block_outputs(trained_vit, x_tr[:512], [best['source_index']])[best['source']]
    assert F.mse_loss(fitted, target) < F.mse_loss(skipped, target)

    before, after = _top1(trained_vit, x_va, y_va), _top1(approx, x_va, y_va)
    assert after >= before - 3.0
    dim, tokens = 64, 5
    block = trained_vit.blocks[j]
    assert count_params(trained_vit) - count_params(approx) == count_params(block) - dim * dim
    size = (3, DIGITS_SIZE, DIGITS_SIZE)
    assert count_macs(trained_vit, size) - count_macs(approx, size) == \
        count_macs(block, (tokens, dim)) - tokens * dim * dim
    assert approx.forward_features(x_va[:2]).shape == trained_vit.forward_features(x_va[:2]).shape
    approx.reset_classifier(3)
    assert approx(x_va[:2]).shape == (2, 3)


@pytest.mark.parametrize('options', [dict(), dict(bias=True, per_token=True)])
def test_save_and_reload_with_timm(trained_vit, digits, tmp_path, options):
    x_tr, _, x_va, _ = digits
    approx = rba.approximate(trained_vit, [(1, 3), ('blocks.3', 'blocks.4')], x_tr[:256].split(64), **options)
    folder = rba.save_rba(approx, tmp_path / 'rba')
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'rba'
    assert config['model_args']['base_model'] == 'vit_tiny_patch16_224'
    assert [(s['source'], s['target']) for s in config['model_args']['spans']] == [
        ('blocks.1', 'blocks.3'), ('blocks.3', 'blocks.4')]
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert count_params(reloaded) == count_params(approx) < count_params(trained_vit)
    with torch.no_grad():
        assert torch.allclose(reloaded(x_va[:16]), approx(x_va[:16]), atol=1e-6)
        intermediates = reloaded.forward_intermediates(x_va[:2], intermediates_only=True)
    assert len(intermediates) == 6
    with pytest.raises(rba.RbaError, match='cannot save'):
        rba.save_rba(rba.approximate(_LinearTrunk('tokens'), [(0, 1)], _linear_trunk_data('tokens')), tmp_path / 'x')


def test_rba_architecture_without_weights_is_the_skip_baseline():
    torch.manual_seed(0)
    base = timm.create_model('vit_tiny_patch16_224', **TINY_VIT).eval()
    model = timm.create_model('rba', base_model='vit_tiny_patch16_224', spans=[(1, 3)], **TINY_VIT).eval()
    model.load_state_dict(base.state_dict(), strict=False)  # the blocks kept; the map stays the identity
    assert model.rba_spans == [dict(source='blocks.1', target='blocks.3', dim=64, layout='NLC',
                               bias=False, num_tokens=None)]
    x = torch.randn(2, 3, DIGITS_SIZE, DIGITS_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), rba.skip_spans(base, [(1, 3)])(x))
    assert count_params(model) == count_params(base) - count_params(base.blocks[2:4]) + 64 * 64
    with pytest.raises(rba.RbaError, match='needs base_model'):
        timm.create_model('rba')


_HUB_CLIENT = '''
import json, sys, torch, timm, timm_pf
from timm.models import push_to_hf_hub
from timm_pf import rba
model = rba.load_rba(sys.argv[1]).eval()
push_to_hf_hub(model, 'maintainer/rba-test', safe_serialization=True)
pulled = timm.create_model('hf-hub:maintainer/rba-test', pretrained=True).eval()
x = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    diff = (pulled(x) - model(x)).abs().max().item()
print(json.dumps(dict(diff=diff, blocks=[type(b).__name__ for b in pulled.blocks])))
'''


def test_push_to_hub_and_load_with_timm(tmp_path):
    """timm's own Hub tooling publishes and rebuilds an approximated model (against the local test Hub)."""
    import os
    import subprocess
    import sys
    from hub_server import serve_hub
    torch.manual_seed(0)
    base = timm.create_model('vit_tiny_patch16_224', **TINY_VIT).eval()
    folder = rba.save_rba(rba.approximate(base, [(2, 4)], [torch.randn(8, 3, DIGITS_SIZE, DIGITS_SIZE)]),
                          tmp_path / 'rba')
    with serve_hub({'hf_test': 'maintainer'}, {}) as (endpoint, _):
        # huggingface_hub reads its endpoint when imported: the client runs in a fresh process
        env = dict(os.environ, HF_ENDPOINT=endpoint, HF_TOKEN='hf_test', HF_HOME=str(tmp_path / 'hf'),
                   HF_HUB_DISABLE_XET='1', HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1')
        done = subprocess.run([sys.executable, '-c', _HUB_CLIENT, str(folder)], env=env, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['diff'] == 0.0
    assert result['blocks'][2:5] == ['Block', 'Identity', 'LinearBlockApprox']


def test_linear_probe_reads_the_pre_logits_features(trained_vit, digits):
    x_tr, y_tr, x_va, y_va = digits
    rows = rba.evaluate_models({'vit': trained_vit}, list(zip(x_tr.split(256), y_tr.split(256))),
                               [(x_va, y_va)], (3, DIGITS_SIZE, DIGITS_SIZE), num_classes=10)
    assert rows[0]['head_top1'] == pytest.approx(_top1(trained_vit, x_va, y_va))
    assert rows[0]['probe_top1'] > 85
    assert rows[0]['params'] == count_params(trained_vit)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp('digits'), img_size=DIGITS_SIZE)


@pytest.fixture(scope='module')
def saved_vit(trained_vit, tmp_path_factory):
    folder = tmp_path_factory.mktemp('vit')
    save_for_hf(trained_vit, folder, safe_serialization=True)
    return f'local-dir:{folder}'


def test_cli_analyze_writes_heatmap_and_table(saved_vit, digits_folder, tmp_path, capsys):
    out = tmp_path / 'analysis'
    rc = cli_main(['rba', 'analyze', '--model', saved_vit, '--data-dir', str(digits_folder), '--num-images', '96',
                   '--batch-size', '48', '--top', '3', '--output', str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert '96 images of train' in printed and '| 3 | blocks.' in printed and '| 4 |' not in printed
    assert (out / 'rba_heatmap.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = (out / 'rba_spans.md').read_text().splitlines()
    assert len(table) == 2 + 15
    report = rba.RedundancyReport.from_json(out / 'rba_metrics.json')
    assert report.num_images == 96 and set(report.metrics) == set(rba.METRICS)


@pytest.mark.parametrize('argv, message', [
    (['--model', 'no_such_model'], 'unknown model'),
    (['--model', 'eva02_tiny_patch14_224'], 'ModuleList'),
    (['--model', 'resnet18', '--metrics', 'br,mse'], 'unknown metrics'),
])
def test_cli_bad_model_or_option_exits_2(argv, message, digits_folder, tmp_path, capsys):
    rc = cli_main(['rba', 'analyze', *argv, '--data-dir', str(digits_folder), '--num-images', '4',
                   '--output', str(tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_apply_then_evaluate(saved_vit, digits_folder, tmp_path, capsys):
    folder = tmp_path / 'approx'
    assert cli_main(['rba', 'apply', '--model', saved_vit, '--data-dir', str(digits_folder), '--num-images', '256',
                     '--span', '3:4', '--output', str(folder)]) == 0
    assert 'M params' in capsys.readouterr().out
    results = tmp_path / 'results.json'
    assert cli_main(['rba', 'evaluate', '--model', saved_vit, '--data-dir', str(digits_folder), '--rba-model',
                     str(folder), '--skip-baseline', '--probe-images', '600', '--output', str(results)]) == 0
    assert '| rba |' in capsys.readouterr().out
    rows = {r['model']: r for r in json.loads(results.read_text())['results']}
    assert set(rows) == {'original', 'skip', 'rba'}
    assert rows['rba']['params'] < rows['original']['params'] and rows['rba']['macs'] < rows['original']['macs']
    assert rows['original']['head_top1'] > 85
    assert rows['rba']['head_top1'] >= rows['original']['head_top1'] - 3.0
    assert rows['rba']['probe_top1'] >= rows['original']['probe_top1'] - 3.0
    assert cli_main(['rba', 'evaluate', '--model', saved_vit, '--data-dir', str(digits_folder), '--span', '3']) == 2
    assert 'bad --span' in capsys.readouterr().err


def test_cli_apply_refuses_an_output_folder_that_holds_a_model(saved_vit, digits_folder, tmp_path, capsys):
    source = saved_vit[len('local-dir:'):]
    for output in (source, str(tmp_path)):
        if output == str(tmp_path):
            (tmp_path / 'config.json').write_text('{}')
        rc = cli_main(['rba', 'apply', '--model', saved_vit, '--data-dir', str(digits_folder), '--num-images', '8',
                       '--span', '1:3', '--output', output])
        assert rc == 2
        assert 'already holds' in capsys.readouterr().err
    assert json.loads((tmp_path / 'config.json').read_text()) == {}
    assert json.loads(open(f'{source}/config.json').read())['architecture'] == 'vit_tiny_patch16_224'


def test_cli_analyze_refuses_a_folder_with_earlier_results(saved_vit, digits_folder, tmp_path, capsys):
    (tmp_path / 'rba_heatmap.png').write_bytes(b'old')
    rc = cli_main(['rba', 'analyze', '--model', saved_vit, '--data-dir', str(digits_folder), '--num-images', '8',
                   '--no-plot', '--output', str(tmp_path)])
    assert rc == 2
    assert 'already holds rba_heatmap.png' in capsys.readouterr().err
    assert not (tmp_path / 'rba_metrics.json').exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    return err


def test_cli_checkpoints_and_folders_that_do_not_fit_or_are_corrupted_exit_2(saved_vit, digits_folder, tmp_path,
                                                                             capsys):
    source = saved_vit[len('local-dir:'):]
    common = ['--data-dir', str(digits_folder), '--num-images', '8', '--no-plot', '--output', str(tmp_path / 'out')]
    weights = f'{source}/model.safetensors'
    assert cli_main(['rba', 'analyze', '--model', 'vit_tiny_patch16_224', '--checkpoint', weights, *common]) == 2
    err = _one_line_error(capsys)
    assert 'does not fit vit_tiny_patch16_224' in err and 'shape mismatches (' in err and len(err) < 1500

    corrupted = tmp_path / 'corrupted'
    corrupted.mkdir()
    (corrupted / 'config.json').write_text(open(f'{source}/config.json').read())
    (corrupted / 'model.safetensors').write_bytes(open(weights, 'rb').read()[:1000])
    assert cli_main(['rba', 'analyze', '--model', f'local-dir:{corrupted}', *common]) == 2
    assert f'cannot read checkpoint {corrupted}/model.safetensors' in _one_line_error(capsys)
    assert cli_main(['rba', 'analyze', '--model', 'vit_tiny_patch16_224', '--model-kwargs',
                     *(f'{k}={v}' for k, v in TINY_VIT.items()), '--checkpoint', str(corrupted / 'model.safetensors'),
                     *common]) == 2
    assert 'cannot read checkpoint' in _one_line_error(capsys)

    (corrupted / 'config.json').write_text('{')
    (corrupted / 'model.safetensors').write_bytes(open(weights, 'rb').read())
    assert cli_main(['rba', 'analyze', '--model', f'local-dir:{corrupted}', *common]) == 2
    assert 'config.json cannot be read as JSON' in _one_line_error(capsys)

    other = tmp_path / 'other'  # a folder whose weights belong to a smaller model than its config.json describes
    save_for_hf(timm.create_model('vit_tiny_patch16_224', **dict(TINY_VIT, depth=2)), other, safe_serialization=True)
    config = json.loads(open(f'{source}/config.json').read())
    (other / 'config.json').write_text(json.dumps(config))
    assert cli_main(['rba', 'analyze', '--model', f'local-dir:{other}', *common]) == 2
    assert f'{other}/model.safetensors does not fit the model' in _one_line_error(capsys)


def test_cli_evaluate_checks_the_rba_model_against_the_model(saved_vit, digits_folder, tmp_path, capsys):
    approx_dir = tmp_path / 'approx'
    assert cli_main(['rba', 'apply', '--model', saved_vit, '--data-dir', str(digits_folder), '--num-images', '64',
                     '--span', '1:3', '--output', str(approx_dir)]) == 0
    common = ['--data-dir', str(digits_folder), '--probe-images', '32']
    assert cli_main(['rba', 'evaluate', '--model', saved_vit, *common,
                     '--rba-model', saved_vit[len('local-dir:'):]]) == 2
    assert 'not a model written by "rba apply"' in _one_line_error(capsys)
    untrained = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', *(f'{k}={v}' for k, v in TINY_VIT.items())]
    assert cli_main(['rba', 'evaluate', *untrained, *common, '--rba-model', str(approx_dir)]) == 2
    assert 'was not made from this --model' in _one_line_error(capsys)
    assert cli_main(['rba', 'evaluate', '--model', 'resnet18', '--model-kwargs', 'num_classes=10', *common,
                     '--rba-model', str(approx_dir)]) == 2
    assert 'was not made from this --model: they share no weights' in _one_line_error(capsys)


def test_cli_input_the_data_cannot_feed_exits_2(digits_folder, tmp_path, capsys):
    tiny = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', *(f'{k}={v}' for k, v in TINY_VIT.items())]
    common = ['--num-images', '8', '--no-plot', '--output', str(tmp_path / 'out')]
    assert cli_main(['rba', 'analyze', *tiny, 'in_chans=1', '--data-dir', str(digits_folder), *common]) == 2
    assert 'takes 1-channel images' in _one_line_error(capsys)
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    assert cli_main(['rba', 'analyze', *tiny, '--data-dir', str(tmp_path / 'empty'), *common]) == 2
    assert 'Found 0 images' in _one_line_error(capsys)


def test_cli_unknown_model_suggests_the_closest_names(digits_folder, tmp_path, capsys):
    assert cli_main(['rba', 'analyze', '--model', 'ours_r50_hybrd', '--data-dir', str(digits_folder),
                     '--output', str(tmp_path)]) == 2
    assert 'did you mean ours_r50_hybrid' in _one_line_error(capsys)


def test_the_span_table_prints_no_negative_zero():
    nan = float('nan')
    report = rba.RedundancyReport(
        model_name='m', block_names=['blocks.0', 'blocks.1'], segments=['blocks', 'blocks'], block_params=[4, 4],
        block_dims=[2, 2], num_images=1, metrics={'br': [[nan, -0.0], [nan, nan]]})
    row = report.table().splitlines()[-1]
    assert '| 0 |' in row and '-0' not in row, row


def test_cosine_of_equal_directions_is_one_to_float_precision():
    torch.manual_seed(0)
    reported = []
    for dim in (7, 64, 384, 1000):
        for _ in range(5):
            x = torch.randn(256, 1, dim) * torch.randn(1, 1, dim).exp() * 3
            stats = _GroupStats([0, 1], dim, gram=False)
            stats.update(torch.cat([x, x * 1.0001], 1))  # the same direction: cosine 1
            reported.append(stats.metrics(['cosine'])['cosine'])
    assert all((c <= 1).all() and (c > 1 - 1e-6).all() for c in reported), reported


def test_cli_evaluate_labels_the_validation_split_as_the_probe_split(saved_vit, digits_folder, tmp_path, capsys):
    """A validation split without one of the classes keeps the labels of the others (each split numbered its own
    classes, which shifted them silently), and one with a class the probe split lacks is refused."""
    data = tmp_path / 'data'
    shutil.copytree(digits_folder, data, symlinks=True)
    shutil.rmtree(data / 'validation' / '3')
    results = tmp_path / 'results.json'
    assert cli_main(['rba', 'evaluate', '--model', saved_vit, '--data-dir', str(data), '--span', '3:4',
                     '--num-images', '256', '--probe-images', '600', '--output', str(results)]) == 0
    original = next(r for r in json.loads(results.read_text())['results'] if r['model'] == 'original')
    assert original['head_top1'] > 85 and original['probe_top1'] > 80, original
    capsys.readouterr()
    shutil.move(str(data / 'train' / '7'), str(tmp_path / 'train_7'))
    assert cli_main(['rba', 'evaluate', '--model', saved_vit, '--data-dir', str(data), '--span', '3:4',
                     '--num-images', '256']) == 2
    assert 'has classes that --split train has not: 7' in capsys.readouterr().err


def test_cli_analyze_without_matplotlib_exits_2_before_the_analysis(digits_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    out = tmp_path / 'analysis'
    assert cli_main(['rba', 'analyze', '--model', 'resnet18', '--data-dir', str(digits_folder), '--num-images', '4',
                     '--output', str(out)]) == 2
    assert 'needs matplotlib' in capsys.readouterr().err and not out.exists()


def test_metrics_stay_in_their_ranges_without_negative_zero():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16)
    stats = _GroupStats([0, 1, 2], 16, gram=True)
    stats.update(torch.cat([x, x, torch.randn(64, 1, 16)], 1))  # blocks 0 and 1 equal
    metrics = stats.metrics(['br', 'cka'])
    br = metrics['br'].tolist()
    assert br[0][1] == 0 and math.copysign(1, br[0][1]) == 1 and all(math.copysign(1, br[i][i]) == 1 for i in range(3))
    assert (metrics['cka'] <= 1).all() and metrics['cka'][0, 1] == 1
