import csv
import io
import json
import math
import shutil
import statistics
from dataclasses import replace

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from timm_pf.cli import main
from timm_pf.tools import bench
from timm_pf.tools.bench import (
    BenchInputError, BenchOptions, PeakTensorMemory, Setting, SpeedTarget, measure, paper, runner,
)
from timm_pf.tools.bench.ratio import latency_ratio, quantiles
from timm_pf.tools.cards import CARDS_DIR

SMALL_PAIR = ('resnet18', 'resnet10t')
SMALL_SETTINGS = (Setting('infer', 1, 64), Setting('infer', 2, 64), Setting('train', 2, 64))


@pytest.fixture(scope='module')
def small_result():
    jobs = [(s, list(SMALL_PAIR)) for s in SMALL_SETTINGS]
    options = BenchOptions(warmup=1, repeats=3)
    return bench.run_benchmark(jobs, [SMALL_PAIR], options, progress=False)


def _independent_macs(name: str, img_size: int) -> int:
    model = timm.create_model(name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() // 2


def test_rows_have_independently_computed_cost(small_result):
    assert [(r.model, r.setting) for r in small_result.rows] == [
        (name, s) for s in SMALL_SETTINGS for name in ('resnet10t', 'resnet18')]
    for name in SMALL_PAIR:
        params = sum(p.numel() for p in timm.create_model(name).parameters())
        macs = _independent_macs(name, 64)
        for setting in SMALL_SETTINGS:
            row = small_result.row(name, setting)
            assert row.params == params
            assert row.macs == macs


def test_ratios_are_latency_over_baseline_latency(small_result):
    for setting in SMALL_SETTINGS:
        row, base = small_result.row('resnet18', setting), small_result.row('resnet10t', setting)
        assert row.baseline == 'resnet10t' and base.baseline is None and base.latency_ratio is None
        assert len(row.latencies_ms) == len(base.latencies_ms) == 3
        assert row.latency_ms == pytest.approx(statistics.median(row.latencies_ms))
        paired = [a / b for a, b in zip(row.latencies_ms, base.latencies_ms)]
        assert row.latency_ratio == pytest.approx(statistics.median(paired))
        assert row.latency_ratio_q1 <= row.latency_ratio <= row.latency_ratio_q3
        assert 'only 3 rounds' in row.latency_ratio_unstable  # fewer than 5 rounds are never quoted
        assert row.latency_min_ms <= row.latency_q1_ms <= row.latency_ms <= row.latency_q3_ms <= row.latency_max_ms
        assert row.throughput == pytest.approx(setting.batch_size / row.latency_ms * 1e3)
        assert row.params_ratio == pytest.approx(row.params / base.params)
        assert row.macs_ratio == pytest.approx(row.macs / base.macs)
        assert row.memory_ratio == pytest.approx(row.peak_memory_mb / base.peak_memory_mb)
        weights_mb = row.params * 4 / 2 ** 20
        if setting.mode == 'train':  # gradients as large as the weights, and the activations autograd saves
            assert 2 * weights_mb < row.peak_memory_mb < 2 * weights_mb + 64
        else:
            assert weights_mb < row.peak_memory_mb < weights_mb + 64


def test_peak_memory_grows_with_batch_and_training(small_result):
    infer1, infer2, train2 = (small_result.row('resnet18', s).peak_memory_mb for s in SMALL_SETTINGS)
    assert infer1 < infer2 < train2


def test_rss_memory_in_a_fresh_process():
    setting, options = Setting('infer', 2, 64), BenchOptions(memory='rss', threads=1)
    peak = measure._peak_rss_in_fresh_process('resnet10t', setting, options)
    weights = sum(p.numel() * 4 for p in timm.create_model('resnet10t').parameters())
    assert weights < peak < weights + 512 * 2 ** 20


def test_output_formats_parse(small_result):
    lines = list(csv.DictReader(io.StringIO(bench.to_csv(small_result))))
    assert len(lines) == len(small_result.rows)
    first = small_result.rows[0]
    assert lines[0]['model'] == first.model and int(lines[0]['macs']) == first.macs
    assert float(lines[0]['latency_ms']) == pytest.approx(first.latency_ms)

    data = json.loads(bench.to_json(small_result))
    assert [r['model'] for r in data['rows']] == [r.model for r in small_result.rows]
    assert data['rows'][1]['latency_ratio'] == pytest.approx(small_result.rows[1].latency_ratio)
    assert data['environment']['torch'] == torch.__version__

    text = bench.format_report(small_result)
    markdown = bench.format_report(small_result, markdown=True)
    for out in (text, markdown):
        assert 'resnet18' in out and f'{small_result.rows[1].latency_ratio:.2f}x (unstable)' in out
    tables = [block.splitlines() for block in markdown.split('\n\n') if block.count('\n|') >= 3]
    assert len(tables) == 2 + len(SMALL_SETTINGS)  # summary, cost, then one speed table per setting
    for table in tables:
        rows = [line for line in table if line.startswith('|')]
        assert len({line.count('|') for line in rows}) == 1


def test_target_checks_use_measured_ratio(monkeypatch):
    result = _synthetic_run(monkeypatch, 'stable', repeats=9)
    setting = SYNTHETIC_SETTING
    ratio = result.row('resnet18', setting).latency_ratio
    targets = [SpeedTarget('resnet18', 'resnet10t', setting, 'latency', ratio * 1.01),
               SpeedTarget('resnet18', 'resnet10t', setting, 'latency', ratio * 0.99),
               SpeedTarget('resnet18', 'resnet10t', Setting('infer', 7, 32), 'latency', 1.0)]
    checks = bench.check_targets(result, targets)
    assert [c.status for c in checks] == ['PASS', 'FAIL']
    assert checks[0].measured == ratio


# Synthetic timings (seconds) of resnet18 (ours, 0.8x) and resnet10t (its baseline) per call: call 0 is
# the warm-up round. The steps are timed through the real rounds, rows, reports and target checks.
SYNTHETIC_SETTING = Setting('infer', 1, 32)
_BASE = 0.010


def _busy(i: int) -> float:
    return 1.0 + 0.9 * ((i * 7) % 5 > 1)  # another process slows 3 of every 5 baseline runs by 90%


SYNTHETIC_TIMINGS = {
    'stable': lambda name, i: _BASE * (0.8 * (1 + 0.01 * (i % 3)) if name == 'resnet18' else 1 + 0.01 * (i % 2)),
    'drifting': lambda name, i: _BASE * (1 + 0.2 * i) * (0.8 if name == 'resnet18' else 1.0),
    'outlier': lambda name, i: _BASE * (0.8 * (10 if i == 3 else 1) if name == 'resnet18' else 1.0),
    'busy_baseline': lambda name, i: _BASE * (0.8 if name == 'resnet18' else _busy(i)),
}


def _fake_timings(monkeypatch, case: str) -> None:
    calls = {}

    def fake_time(step):
        name = step.subject.name
        calls[name] = calls.get(name, -1) + 1
        return SYNTHETIC_TIMINGS[case](name, calls[name])

    monkeypatch.setattr(measure._Step, 'time', fake_time)


def _synthetic_run(monkeypatch, case: str, **options) -> bench.BenchResult:
    _fake_timings(monkeypatch, case)
    options = BenchOptions(**{'memory': 'off', 'time_budget': 5 * 1.8 * _BASE, 'threads': 2, 'cpu_kernels': 'build',
                              **options})
    return bench.run_benchmark([(SYNTHETIC_SETTING, list(SMALL_PAIR))], [SMALL_PAIR], options, progress=False)


@pytest.mark.parametrize('case, statistic, rounds, unstable', [
    ('stable', 'median', 5, ''),
    ('drifting', 'median', 5, ''),  # paired rounds cancel the drift
    ('outlier', 'median', 5, ''),  # one slow round moves neither the median nor the quartiles
    ('busy_baseline', 'median', 20, 'machine busy'),  # more rounds up to the cap, then flagged
    ('busy_baseline', 'min', 5, ''),  # the fastest runs of both are undisturbed
])
def test_paired_ratio_and_stability_from_synthetic_timings(monkeypatch, tmp_path, case, statistic, rounds, unstable):
    target = SpeedTarget('resnet18', 'resnet10t', SYNTHETIC_SETTING, 'latency', 1.5)
    monkeypatch.setattr(runner, 'SPEED_TARGETS', (target,))
    result = _synthetic_run(monkeypatch, case, statistic=statistic, max_repeats=20)
    row = result.row('resnet18', SYNTHETIC_SETTING)
    assert len(row.latencies_ms) == rounds
    if unstable:
        assert unstable in row.latency_ratio_unstable
        assert row.latency_ratio_q3 - row.latency_ratio_q1 > 0.1 * row.latency_ratio
    else:
        assert row.latency_ratio == pytest.approx(0.8, rel=0.02) and row.latency_ratio_unstable == ''
    [check] = result.targets
    assert check.status == ('UNSTABLE' if unstable else 'PASS')

    # every output carries the flag
    text, markdown = bench.format_report(result), bench.format_report(result, markdown=True)
    [line] = list(csv.DictReader(io.StringIO(bench.to_csv(result))))[1:]
    data = json.loads(bench.to_json(result))
    labels = []
    from matplotlib.axes import Axes
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, 'annotate', lambda ax, text, *a, **k: labels.append(text) or annotate(ax, text, *a, **k))
    bench.plot_result(result, str(tmp_path / 'p.png'))
    flags = ['(unstable)' in text, '(unstable)' in markdown, bool(line['latency_ratio_unstable']),
             bool(data['rows'][1]['latency_ratio_unstable']), 'resnet18 (unstable ratio)' in labels]
    assert flags == [bool(unstable)] * 5
    if unstable:
        assert row.latency_ratio_unstable in text and 'UNSTABLE' in text
        assert data['targets'][0]['status'] == 'UNSTABLE'


def test_fixed_repeats_are_not_extended_and_few_rounds_are_unstable(monkeypatch):
    row = _synthetic_run(monkeypatch, 'busy_baseline', repeats=3).row('resnet18', SYNTHETIC_SETTING)
    assert len(row.latencies_ms) == 3 and 'only 3 rounds' in row.latency_ratio_unstable


def test_strict_fails_on_an_unstable_target(monkeypatch, capsys):
    target = SpeedTarget('resnet18', 'resnet10t', SYNTHETIC_SETTING, 'latency', 1.5)
    monkeypatch.setattr(runner, 'SPEED_TARGETS', (target,))
    _fake_timings(monkeypatch, 'busy_baseline')
    argv = ['bench', '--models', 'resnet18:resnet10t', '--img-size', '32', '--batch-sizes', '1', '--repeats', '8',
            '--memory', 'off', '--no-progress', '--threads', '2']
    assert main(argv) == 0
    assert 'UNSTABLE' in capsys.readouterr().out
    assert main(argv + ['--strict']) == 1


def test_peak_tensor_memory_follows_lifetimes():
    with PeakTensorMemory() as tracker:
        a = torch.ones(1000)
        b = torch.ones(1000)
        del a
        c = torch.ones(500)
    assert tracker.peak == 8000
    assert tracker.current == 6000
    del b, c
    assert tracker.current == 0


def test_peak_tensor_memory_of_a_forward_pass():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).eval()
    x = torch.randn(8, 256)
    with torch.no_grad(), PeakTensorMemory([x, *model.parameters()]) as tracker:
        model(x)
    # the first linear's output and the ReLU's output are alive together
    assert tracker.peak == 2 * 8 * 512 * 4


def test_baselines_of_the_headline_models():
    assert {m: bench.baseline_for(m) for m in bench.HEADLINE_MODELS} == {
        'ours_r50_hybrid': 'resnet50', 'ours_r50_deform_max': 'resnet50',
        'vit_s_maxpool': 'vit_small_patch16_224', 'pit_s_maxpool': 'pit_s_224',
        'parameternet_600m': 'ghostnet_600m', 'ghostnet_dyn': 'ghostnet_100'}
    assert bench.baseline_for('ours_r101_hybrid') == 'resnet101'
    assert bench.baseline_for('resnet50') is None


def test_every_variant_has_the_baseline_the_model_zoo_names():
    from timm_pf.models._registry import pf_model_names
    baselines = {m: bench.baseline_for(m) for m in pf_model_names()}
    assert {m for m, b in baselines.items() if b is None} == {'ghostnet_300m', 'ghostnet_600m', 'ghostnet_100', 'rba'} \
        & set(baselines)  # the GhostNets are baselines themselves; rba wraps any model
    assert {m: baselines[m] for m in ('vit_ti_maxpool', 'vit_b_maxpool', 'pit_ti_maxpool', 'pit_b_maxpool',
                                      'vit_ti_replace', 'vit_b_replace', 'vit_s_maxpool_replace',
                                      'resnet34_replace', 'resnet152_replace')} == {
        'vit_ti_maxpool': 'vit_tiny_patch16_224', 'vit_b_maxpool': 'vit_base_patch16_224',
        'pit_ti_maxpool': 'pit_ti_224', 'pit_b_maxpool': 'pit_b_224', 'vit_ti_replace': 'vit_tiny_patch16_224',
        'vit_b_replace': 'vit_base_patch16_224', 'vit_s_maxpool_replace': 'vit_s_maxpool',
        'resnet34_replace': 'resnet34', 'resnet152_replace': 'resnet152'}
    assert all(timm.is_model(b) for b in baselines.values() if b)


def test_a_replacement_vit_is_built_for_each_size(tmp_path, capsys):
    """The *_replace variants have no pretrained cfg of their own; their ViTs still take img_size per size."""
    assert runner._fixed_input_size('vit_ti_replace') and not runner._fixed_input_size('resnet34_replace')
    code = main(['bench', '--models', 'vit_ti_replace', '--img-size', '64', '--batch-sizes', '1', '--repeats', '1',
                 '--memory', 'off', '--no-progress', '--cpu-kernels', 'off', '--json', str(tmp_path / 'r.json')])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / 'r.json').read_text())['rows']
    assert [(r['model'], r['baseline'], r['img_size']) for r in rows] == [
        ('vit_tiny_patch16_224', None, 64), ('vit_ti_replace', 'vit_tiny_patch16_224', 64)]


def test_a_model_that_is_also_a_baseline_gets_one_row(tmp_path, capsys):
    code = main(['bench', '--models', 'resnet10t:resnet14t', 'resnet14t:resnet18', '--img-size', '32', '32',
                 '--batch-sizes', '1', '1', '--repeats', '2', '--memory', 'off', '--no-progress',
                 '--csv', str(tmp_path / 'b.csv')])
    out = capsys.readouterr().out
    assert code == 0
    rows = [(r['model'], r['batch_size'], r['img_size']) for r in csv.DictReader((tmp_path / 'b.csv').open())]
    assert sorted(rows) == sorted(set(rows)) and len(rows) == 3
    assert out.count('infer, batch 1, 32px') == 1


def test_resolve_models_globs_and_explicit_pairs():
    pattern = 'resnet1*t'
    pairs = bench.resolve_models([pattern, 'resnet18:resnet10t'])
    assert [m for m, _ in pairs[:-1]] == timm.list_models(pattern)
    assert pairs[-1] == ('resnet18', 'resnet10t')
    with pytest.raises(BenchInputError, match='matches no registered model'):
        bench.resolve_models(['no_such_model_*'])
    with pytest.raises(BenchInputError, match='did you mean resnet18'):
        bench.resolve_models(['resnet18x'])


def test_paper_latency_ratio_prefers_the_same_batch():
    ratio, basis = bench.paper_latency_ratio('ours_r50_hybrid', 'resnet50', 1, 'cuda')
    assert ratio == pytest.approx(7.3 / 8.7) and basis == 'V100'
    ratio, basis = bench.paper_latency_ratio('vit_s_maxpool', 'vit_small_patch16_224', 1, 'cuda')
    assert ratio == pytest.approx(86 / 96) and basis == 'GPU b1'
    ratio, basis = bench.paper_latency_ratio('pit_s_maxpool', 'pit_s_224', 32, 'cuda')
    assert ratio == pytest.approx(952 / 1000) and basis == 'GPU b256'


def test_paper_latency_ratio_of_the_run_device():
    ratio, basis = bench.paper_latency_ratio('ours_r50_hybrid', 'resnet50', 1, 'cpu')
    assert ratio == pytest.approx(39.8 / 45.4) and basis == 'CPU'
    assert bench.paper_latency_ratio('vit_s_maxpool', 'vit_small_patch16_224', 1, 'cpu') == (None, '')


def test_paper_values_only_beside_inference_at_the_paper_size(monkeypatch):
    reports = {'resnet18': bench.PaperReport('test', 11.7, 1.8, (bench.ReportedSpeed(6.0, 'ms', 'V100'),
                                                                  bench.ReportedSpeed(30.0, 'ms', 'CPU'))),
               'resnet10t': bench.PaperReport('test', 5.4, 1.1, (bench.ReportedSpeed(4.0, 'ms', 'V100'),
                                                                  bench.ReportedSpeed(20.0, 'ms', 'CPU')))}
    monkeypatch.setattr(paper, 'PAPER_REPORTS', reports)
    monkeypatch.setattr(runner, 'PAPER_REPORTS', reports)
    _fake_timings(monkeypatch, 'stable')
    settings = [Setting('infer', 1, 224), Setting('train', 2, 224), Setting('infer', 1, 64)]
    options = BenchOptions(repeats=2, memory='off')
    result = bench.run_benchmark([(s, list(SMALL_PAIR)) for s in settings], [SMALL_PAIR], options, progress=False)
    infer, train, small = (result.row('resnet18', s) for s in settings)
    assert (infer.paper_latency_ratio, infer.paper_latency_ratio_basis) == (1.5, 'CPU')
    assert train.paper_latency_ratio is None and train.paper_params_m == 11.7
    assert (small.paper_latency_ratio, small.paper_params_m, small.paper_gmacs, small.paper_speeds) == (
        None, None, None, '')
    lines = {(r['model'], r['mode'], r['img_size']): r for r in csv.DictReader(io.StringIO(bench.to_csv(result)))}
    assert lines['resnet18', 'infer', '64']['paper_params_m'] == lines['resnet18', 'infer', '64']['paper_gmacs'] == ''
    assert lines['resnet18', 'infer', '224']['paper_latency_ratio'] == '1.5'
    assert [r['paper_latency_ratio'] for r in json.loads(bench.to_json(result))['rows']] == [None, 1.5, None, None,
                                                                                             None, None]
    text = bench.format_report(result)
    assert text.count('1.50x (CPU)') == 1 and 'V100' not in text.split('== infer, batch 1, 224px')[1].split('==')[0]


def test_rss_memory_of_a_model_built_for_the_image_size(tmp_path, capsys):
    code = main(['bench', '--models', 'vit_ti_maxpool', '--img-size', '64', '--batch-sizes', '1', '--repeats', '1',
                 '--memory', 'rss', '--no-progress', '--cpu-kernels', 'off', '--json', str(tmp_path / 'r.json')])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / 'r.json').read_text())['rows']
    for row in rows:
        weights_mb = sum(p.numel() * 4 for p in timm.create_model(row['model'], img_size=64).parameters()) / 2 ** 20
        assert weights_mb < row['peak_memory_mb'] < weights_mb + 512


def test_paper_numbers_are_read_from_the_card_tables(tmp_path):
    assert [str(s) for s in bench.PAPER_REPORTS['resnet50'].speeds] == ['8.7 ms V100', '45.4 ms CPU']
    cards_dir = tmp_path / 'hub_cards'
    shutil.copytree(CARDS_DIR, cards_dir)
    family = cards_dir / 'families' / 'parameternet.yaml'
    text = family.read_text(encoding='utf-8')
    family.write_text(text.replace('| ParameterNet-600M | ImageNet-1K | 34.5M | 599M |',
                                   '| ParameterNet-600M | ImageNet-1K | 35.5M | 1.2G |'), encoding='utf-8')
    reports = paper._paper_reports(cards_dir)
    assert (reports['parameternet_600m'].params_m, reports['parameternet_600m'].gmacs) == (35.5, 1.2)
    assert {k: v for k, v in reports.items() if k != 'parameternet_600m'} == {
        k: v for k, v in bench.PAPER_REPORTS.items() if k != 'parameternet_600m'}
    family.write_text(text.replace('| GhostNet-600M |', '| GhostNet 600M |'), encoding='utf-8')
    with pytest.raises(ValueError, match="no row 'GhostNet-600M' \\(for ghostnet_600m\\)"):
        paper._paper_reports(cards_dir)
    family.write_text(text.replace('| 19.8M | 579M |', '| 19.8 | 579M |', 1), encoding='utf-8')
    with pytest.raises(ValueError, match="cell '19.8' of column 'Params' is not a count"):
        paper._paper_reports(cards_dir)


def test_targets_preset_settings():
    torch_targets = [t for t in bench.SPEED_TARGETS if t.runtime == 'torch']
    jobs = dict(bench.target_settings(torch_targets))
    assert set(jobs) == {Setting('infer', 1, 224), Setting('infer', 16, 224), Setting('infer', 32, 224),
                         Setting('train', 16, 128), Setting('train', 32, 128), Setting('infer', 1, 512),
                         Setting('infer', 1, 1024), Setting('infer', 1, 448), Setting('infer', 1, 672)}
    for target in torch_targets:
        assert {target.model, target.baseline} <= set(jobs[target.setting])
    assert set(jobs[Setting('infer', 16, 224)]) == {'resnet50', 'ours_r50_hybrid', 'ours_r50_deform_max'}
    assert set(jobs[Setting('infer', 1, 672)]) == {'pit_s_224', 'pit_s_maxpool'}
    onnx_jobs = dict(bench.target_settings([t for t in bench.SPEED_TARGETS if t.runtime == 'onnxruntime']))
    assert set(onnx_jobs) == {Setting('infer', 1, 224), Setting('infer', 8, 224)}
    assert set(onnx_jobs[Setting('infer', 8, 224)]) == {
        'ghostnet_600m', 'parameternet_600m', 'ghostnet_100', 'ghostnet_dyn', 'resnet50', 'ours_r50_deform_max',
        'ours_r50_max', 'ours_r50_hybrid'}


def test_cli_list_shows_every_preset_and_the_targets_of_both_runtimes(capsys):
    assert main(['bench', '--list']) == 0
    out = capsys.readouterr().out
    scaling = out.split('pairs of --preset scaling (batch 1, 224 384 512 768 1024 px')[1].split('targets')[0]
    assert all(f'{model:<20} vs {baseline}' in scaling for model, baseline in bench.SCALING_PAIRS)
    torch_part, onnx_part = out.split(f'targets (--preset targets; {bench.TARGET_CONDITIONS}):')[1].split(
        f'targets (--preset targets --runtime onnxruntime; {bench.TARGET_CONDITIONS}):')
    for line in ('vit_s_maxpool latency <= 1.05x vit_small_patch16_224, infer b1 224px',
                 'vit_s_maxpool latency <= 0.78x vit_small_patch16_224, infer b1 1024px',
                 'pit_s_maxpool latency <= 0.75x pit_s_224, infer b1 672px',
                 'parameternet_600m latency <= 1.10x ghostnet_600m, infer b1 224px\n'):
        assert line in torch_part
    assert 'ours_r50_deform_max latency <= 1.10x resnet50, infer b8 224px, ONNX Runtime' in onnx_part
    assert 'ONNX Runtime' not in torch_part


def test_targets_are_checked_in_their_own_runtime_and_a_fail_fails_strict(monkeypatch, capsys):
    setting = SYNTHETIC_SETTING
    targets = (SpeedTarget('resnet18', 'resnet10t', setting, 'latency', 0.5),
               SpeedTarget('resnet18', 'resnet10t', setting, 'latency', 0.5, runtime='onnxruntime'))
    monkeypatch.setattr(runner, 'SPEED_TARGETS', targets)
    _fake_timings(monkeypatch, 'stable')
    argv = ['bench', '--models', 'resnet18:resnet10t', '--img-size', '32', '--batch-sizes', '1', '--repeats', '8',
            '--memory', 'off', '--no-progress', '--threads', '2', '--json', '-']
    assert main(argv) == 0  # without --strict a failed target is reported, not an error
    out = capsys.readouterr()
    [check] = json.loads(out.out)['targets']  # the ONNX Runtime target is not checked in a PyTorch run
    assert check['status'] == 'FAIL' and check['runtime'] == 'torch'
    assert main(argv + ['--strict']) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the report, then one line
    assert err[-1] == ('timm-pf bench: error: 1 of 1 targets not passed: '
                       'resnet18 latency <= 0.50x resnet10t, infer b1 32px (FAIL)')


@pytest.mark.parametrize('options, deviations', [
    ({'threads': 1, 'amp': True}, '--threads 1, --amp'),
    ({'channels_last': True, 'cpu_kernels': 'off'}, '--channels-last, --cpu-kernels off'),
])
def test_targets_get_no_verdict_outside_their_conditions(monkeypatch, options, deviations):
    target = SpeedTarget('resnet18', 'resnet10t', SYNTHETIC_SETTING, 'latency', 1.5)
    monkeypatch.setattr(runner, 'SPEED_TARGETS', (target,))
    result = _synthetic_run(monkeypatch, 'stable', repeats=9, **options)
    [check] = result.targets
    assert check.status == 'n/c' and check.deviations == deviations
    assert f'this run used {deviations}' in bench.format_report(result)
    assert json.loads(bench.to_json(result))['targets'][0]['status'] == 'n/c'


def test_strict_counts_an_unmeasured_or_incomparable_target_as_not_passed(monkeypatch, capsys):
    setting = Setting('train', 2, 32)
    monkeypatch.setattr(runner, 'SPEED_TARGETS', (SpeedTarget('resnet18', 'resnet10t', setting, 'memory', 9.0),))
    _fake_timings(monkeypatch, 'stable')
    argv = ['bench', '--models', 'resnet18:resnet10t', '--img-size', '32', '--batch-sizes', '2', '--train',
            '--repeats', '2', '--no-progress', '--threads', '2', '--strict']
    assert main(argv + ['--memory', 'tensors']) == 0
    assert main(argv + ['--memory', 'off']) == 1
    assert 'resnet10t, train b2 32px (n/a)' in capsys.readouterr().err
    assert main(argv + ['--memory', 'tensors', '--threads', '1']) == 1  # the last --threads wins
    assert 'resnet10t, train b2 32px (n/c)' in capsys.readouterr().err


def test_cli_writes_every_format(tmp_path, capsys):
    csv_path, md_path, png_path = tmp_path / 'b.csv', tmp_path / 'b.md', tmp_path / 'b.png'
    code = main(['bench', '--models', 'resnet18:resnet10t', '--img-size', '32', '--batch-sizes', '1',
                 '--repeats', '2', '--no-progress', '--json', '-', '--csv', str(csv_path),
                 '--markdown', str(md_path), '--plot', str(png_path)])
    out = capsys.readouterr()
    assert code == 0
    data = json.loads(out.out)
    assert [r['model'] for r in data['rows']] == ['resnet10t', 'resnet18']
    assert 'resnet18' in out.err  # the table goes to stderr when stdout carries JSON
    assert len(list(csv.DictReader(csv_path.open()))) == 2
    assert md_path.read_text().count('| resnet18 |') == 3  # summary, cost, speed
    assert png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('argv, message', [
    (['--models', 'no_such_model'], 'unknown model'),
    (['--models', 'no_such_*'], 'matches no registered model'),
    (['--models', 'resnet18:no_such_base'], 'unknown model'),
    (['--models', 'resnet18', '--batch-sizes', '0'], 'must be positive'),
    (['--preset', 'targets', '--batch-sizes', '4'], 'fixes the settings'),
    (['--preset', 'targets', '--models', 'ours_r50_max', '--threads', '1', '--amp', '--cpu-kernels', 'off'],
     'drop --threads 1, --amp, --cpu-kernels off'),
    (['--preset', 'targets', '--models', 'ours_r50_max', '--channels-last', '--compile'],
     'drop --channels-last, --compile'),
    (['--models', 'resnet18:resnet10t', 'resnet18:resnet14t'], 'a model has one baseline per run'),
    (['--models', 'ours_r50_max', 'ours_r50_max:resnet18'], 'ours_r50_max is paired with resnet50 and resnet18'),
    (['--models', 'resnet18:resnet18'], 'pairs resnet18 with itself'),
    (['--models', 'local-dir:some_folder'], 'not local-dir: or hf-hub: sources'),
    (['--models', 'resnet18', '--amp', '--dtype', 'float16'], 'drop --dtype float16 or --amp'),
    (['--models', 'resnet18', '--threads', '100000'], '--threads must be between 1 and'),
    (['--models', 'resnet18:resnet10t', '--train', '--batch-sizes', '1', '--img-size', '32', '--repeats', '1',
      '--memory', 'off'], 'a BatchNorm layer gets one value per channel'),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert main(['bench', '--no-progress', *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('command, path, message', [
    (['bench', '--models', 'resnet18', '--plot'], 'out.xyz', 'name the format with a suffix'),
    (['bench', '--models', 'resnet18', '--plot'], 'noext', 'name the format with a suffix'),
    (['bench', '--models', 'resnet18', '--plot'], '-', 'not to stdout'),
    (['deform-points', '--output'], 'out.xyz', 'name the format with a suffix'),
])
def test_a_figure_path_without_a_format_is_refused_while_parsing(command, path, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, path])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert main(['bench', '--models', 'resnet18', '--device', 'cuda', '--no-progress']) == 2
    assert 'CUDA is not available' in capsys.readouterr().err


@pytest.mark.parametrize('package, argv, message', [
    ('matplotlib', ['--plot', 'x.png'], "timm-pf[plot]"),
    ('onnxruntime', ['--runtime', 'onnxruntime'], "needs onnxruntime: pip install 'timm-pf[onnx]'"),
])
def test_cli_missing_extra_exits_2(package, argv, message, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == package else find_spec(name, *a))
    assert main(['bench', '--models', 'resnet18', '--no-progress', *argv]) == 2
    assert message in capsys.readouterr().err


def test_plot_result_names_the_extra_when_matplotlib_is_missing(small_result, monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(ImportError, match=r'timm-pf\[plot\]'):
        bench.plot_result(small_result, str(tmp_path / 'x.png'))


def test_quantiles_of_one_run():
    assert quantiles([3.0]) == (3.0, 3.0, 3.0)
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert not math.isnan(quantiles([1.0, 2.0])[1])


def test_count_macs_of_a_model_passing_parameter_views_to_submodules():
    # PiT hands its expanded class token (a view of a parameter) to a submodule
    from timm_pf.methods.stats import _EXTRA_FLOP_FORMULAS, count_macs
    model = timm.create_model('pit_s_224')
    macs = count_macs(model)
    assert all(p.requires_grad for p in model.parameters())
    frozen = timm.create_model('pit_s_224').eval().requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        frozen(torch.randn(1, 3, 224, 224))
    assert macs == counter.get_total_flops() // 2


def test_statistic_min_ratio():
    options = BenchOptions(repeats=3, statistic='min', memory='off')
    result = bench.run_benchmark([(Setting('infer', 1, 32), list(SMALL_PAIR))], [SMALL_PAIR], options, progress=False)
    row, base = result.rows[1], result.rows[0]
    assert row.latency_ratio == pytest.approx(min(row.latencies_ms) / min(base.latencies_ms))
    assert row.latency_ratio_q1 <= row.latency_ratio <= row.latency_ratio_q3
    assert row.peak_memory_mb is None and row.memory_ratio is None


def test_header_names_the_cpu_and_its_vector_extensions(small_result, tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nmodel name\t: Test CPU 9000\n'
                       'flags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile amx_bf16\n\n'
                       'processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n')
    assert runner._cpuinfo(str(cpuinfo)) == ('Test CPU 9000', ['sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'amx_tile',
                                                                'amx_bf16'])
    arm = tmp_path / 'cpuinfo_arm'
    arm.write_text('processor\t: 0\nFeatures\t: fp asimd asimdhp sve bf16\n')
    assert runner._cpuinfo(str(arm))[1] == ['asimd', 'asimdhp', 'sve', 'bf16']
    name, extensions = runner._cpuinfo()
    header = bench.format_report(small_result).splitlines()[0]
    assert f'{name} ({" ".join(extensions)})' in header


SWEEP_PAIRS = [('vit_tiny_patch16_224', 'vit_small_patch16_224'), SMALL_PAIR]


def test_resolution_sweep_builds_each_size_and_reports_the_ratio_per_size(monkeypatch, tmp_path):
    names = [n for pair in SWEEP_PAIRS for n in pair]
    jobs = [(Setting('infer', 1, size), names) for size in (32, 64)]
    result = bench.run_benchmark(jobs, SWEEP_PAIRS, BenchOptions(repeats=2), progress=False)
    assert [(r.model, r.img_size) for r in result.rows] == [(n, s) for s in (32, 64) for n in (
        'vit_small_patch16_224', 'vit_tiny_patch16_224', 'resnet10t', 'resnet18')]
    vit32, vit64 = (result.row('vit_tiny_patch16_224', Setting('infer', 1, size)) for size in (32, 64))
    for row in (vit32, vit64):  # the ViTs are built for each size: the position embedding has (size / 16)^2 tokens
        model = timm.create_model('vit_tiny_patch16_224', img_size=row.img_size)
        assert row.params == sum(p.numel() for p in model.parameters())
    assert vit64.params - vit32.params == (16 - 4) * 192 and vit64.macs > 3 * vit32.macs
    sweep = bench.ratio_vs_resolution(result)
    assert [(p['model'], p['baseline']) for p in sweep] == SWEEP_PAIRS
    for pair in sweep:
        assert [s['img_size'] for s in pair['sizes']] == [32, 64]
        for point in pair['sizes']:
            row = result.row(pair['model'], Setting('infer', 1, point['img_size']))
            assert point['latency_ratio'] == row.latency_ratio and point['memory_ratio'] == row.memory_ratio

    text, markdown = bench.format_report(result), bench.format_report(result, markdown=True)
    for out in (text, markdown):
        for size in (32, 64):  # the cost of each size, where the papers' 224 px figures do not apply
            cost = out.split(f'Model cost per image at {size}px (the papers report 224px)')[1].split('\n\n')[0]
            vit = next(line for line in cost.splitlines() if line.lstrip('| ').startswith('vit_tiny'))
            assert f'{result.row("vit_tiny_patch16_224", Setting("infer", 1, size)).macs / 1e9:.3f}' in vit
        assert 'MACs 32px' in out.split('Summary')[1].split('\n\n')[0]
        table = out.split('Ratio vs resolution')[1].split('\n\n')[0]
        assert 'latency 32px' in table and 'memory 64px' in table
        vit = next(line for line in table.splitlines() if line.lstrip('| ').startswith('vit_tiny'))
        for size in (32, 64):
            assert f'{result.row("vit_tiny_patch16_224", Setting("infer", 1, size)).latency_ratio:.2f}x' in vit
    assert json.loads(bench.to_json(result))['ratio_vs_resolution'] == json.loads(json.dumps(sweep))
    lines = list(csv.DictReader(io.StringIO(bench.to_csv(result))))
    assert sorted(int(line['img_size']) for line in lines if line['model'] == 'resnet18') == [32, 64]

    titles = []
    from matplotlib.axes import Axes
    set_title = Axes.set_title
    monkeypatch.setattr(Axes, 'set_title', lambda ax, t, *a, **k: titles.append(t) or set_title(ax, t, *a, **k))
    bench.plot_result(result, str(tmp_path / 'sweep.png'))
    assert sum('ratio vs image size' in t for t in titles) == 2  # latency and memory panels


def test_one_size_has_no_resolution_table(small_result):
    assert bench.ratio_vs_resolution(small_result) == []
    assert 'Ratio vs resolution' not in bench.format_report(small_result)


@pytest.mark.parametrize('sizes, messages', [
    (['0', '64'], ['--img-size must be positive, got 0']),
    (['36', '64'], ['pit_ti_224 needs a multiple of 8, at least 16', 'got 36',
                    'vit_tiny_patch16_224 needs a multiple of 16, at least 16']),
    (['40'], ['vit_tiny_patch16_224 needs a multiple of 16']),
])
def test_cli_sizes_a_model_cannot_take_exit_2(sizes, messages, capsys):
    argv = ['bench', '--models', 'pit_ti_224:vit_tiny_patch16_224', '--img-size', *sizes, '--repeats', '1',
            '--no-progress']
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(m in err for m in messages)
    if sizes == ['40']:
        assert 'pit_ti_224' not in err  # (40 - 16) is a multiple of PiT's stride 8


def test_scaling_preset_plan():
    from timm_pf.cli.bench import _plan
    from timm_pf.cli import build_parser
    jobs, pairs = _plan(build_parser().parse_args(['bench', '--preset', 'scaling']))
    assert pairs == list(bench.SCALING_PAIRS)
    assert [s for s, _ in jobs] == [Setting('infer', 1, size) for size in (224, 384, 512, 768, 1024)]
    assert all(set(names) == {n for p in pairs for n in p} for _, names in jobs)
    jobs, pairs = _plan(build_parser().parse_args(['bench', '--preset', 'scaling', '--models', 'pit*',
                                                   '--img-size', '224', '448']))
    assert pairs == [('pit_s_maxpool', 'pit_s_224')] and [s.img_size for s, _ in jobs] == [224, 448]


class _TinyNet(nn.Module):
    """A conv net small enough to export in seconds; ``cummax`` has no ONNX translation."""

    def __init__(self, width: int, unexportable: bool = False):
        super().__init__()
        self.num_classes, self.unexportable = 10, unexportable
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return torch.cummax(x, dim=1)[0] if self.unexportable else self.head(x)


def _register_tiny(name: str, width: int, unexportable: bool = False) -> None:
    if timm.is_model(name):
        return

    def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        return _TinyNet(width, unexportable)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    timm.models.register_model(entrypoint)


TINY_OURS, TINY_BASE, TINY_BROKEN = 'bench_tiny_narrow', 'bench_tiny_wide', 'bench_tiny_unexportable'
for _name, _width, _broken in ((TINY_OURS, 8, False), (TINY_BASE, 32, False), (TINY_BROKEN, 8, True)):
    _register_tiny(_name, _width, _broken)
TINY_PAIRS = [(TINY_OURS, TINY_BASE), (TINY_BROKEN, TINY_BASE)]


def _onnx_run(monkeypatch, export=None, pairs=TINY_PAIRS, sizes=(32, 48), batch_sizes=(1, 3)):
    from timm_pf.tools.bench import onnxrt
    pytest.importorskip('onnxruntime')
    exports = []
    real_export = onnxrt.export_onnx

    def counted_export(model, x, path):
        exports.append(path)
        (export or real_export)(model, x, path)

    monkeypatch.setattr(onnxrt, 'export_onnx', counted_export)
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    jobs = [(Setting('infer', bs, size), names) for size in sizes for bs in batch_sizes]
    options = BenchOptions(runtime='onnxruntime', repeats=5, threads=2)  # the targets' conditions
    return bench.run_benchmark(jobs, pairs, options, progress=False), exports


def test_onnxruntime_sweep_exports_once_per_size_and_reports_a_failed_export(monkeypatch):
    from timm_pf.tools.bench import onnxrt
    sessions = []
    run = onnxrt.OnnxModel.__init__
    monkeypatch.setattr(onnxrt.OnnxModel, '__init__', lambda self, *a: run(self, *a) or sessions.append(self))
    result, exports = _onnx_run(monkeypatch)
    assert len(exports) == 3 * 2  # each model once per size; the batch axis is dynamic
    for size in (32, 48):
        for bs in (1, 3):
            setting = Setting('infer', bs, size)
            ours, base, broken = (result.row(n, setting) for n in (TINY_OURS, TINY_BASE, TINY_BROKEN))
            assert ours.error == base.error == '' and len(ours.latencies_ms) == len(base.latencies_ms) == 5
            paired = [a / b for a, b in zip(ours.latencies_ms, base.latencies_ms)]
            assert ours.latency_ratio == pytest.approx(statistics.median(paired))
            assert ours.peak_memory_mb is None  # ONNX Runtime allocates outside PyTorch
            assert broken.error.startswith('export failed') and 'cummax' in broken.error
            assert broken.latencies_ms == [] and broken.latency_ratio is None
    # the timed sessions are ONNX Runtime's, and they match PyTorch on a batch size they were not exported with
    session = next(s for s in sessions if s.subject.name == TINY_OURS and s.session is not None)
    assert session.mismatch(torch.randn(5, 3, 32, 32)) == ''
    # the paired sessions alternate, so neither may spin-wait on the cores after its run
    config = session.session.get_session_options().get_session_config_entry('session.intra_op.allow_spinning')
    assert config == '0'
    sweep = bench.ratio_vs_resolution(result)
    assert sorted((p['model'], p['batch_size']) for p in sweep) == [(n, bs) for n in (TINY_OURS, TINY_BROKEN)
                                                                     for bs in (1, 3)]
    assert all(p['sizes'][0]['latency_ratio'] is None for p in sweep if p['model'] == TINY_BROKEN)
    text = bench.format_report(result)
    assert 'ONNX Runtime' in text and 'Not timed' in text and f'{TINY_BROKEN}, infer b1 32px: export failed' in text
    report = json.loads(bench.to_json(result))
    assert report['rows'][2]['error'] == result.rows[2].error
    assert report['options']['runtime'] == 'onnxruntime'
    assert report['options']['memory'] == 'not measured in ONNX Runtime'
    assert report['options']['cpu_kernels'] == 'not used by ONNX Runtime'
    target = SpeedTarget(TINY_BROKEN, TINY_BASE, Setting('infer', 1, 32), 'latency', 1.0, runtime='onnxruntime')
    [check] = bench.check_targets(result, [target, replace(target, runtime='torch')])  # only its own runtime
    assert check.status == 'ERROR' and 'export failed' in check.error


def test_onnxruntime_parity_check_catches_a_wrong_export(monkeypatch):
    import onnx
    from onnx import numpy_helper
    from timm_pf.tools.bench import onnxrt
    real_export = onnxrt.export_onnx

    def wrong_export(model, x, path):  # the head's bias shifted by 0.01 after a correct export
        real_export(model, x, path)
        graph = onnx.load(path)
        for init in graph.graph.initializer:
            if init.name.startswith('head') and init.name.endswith('bias') and model.head.out_features == 10:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.01, init.name))
        onnx.save(graph, path)

    result, _ = _onnx_run(monkeypatch, wrong_export, pairs=[(TINY_OURS, TINY_BASE)], sizes=(32,), batch_sizes=(2,))
    for name in (TINY_OURS, TINY_BASE):
        row = result.row(name, Setting('infer', 2, 32))
        assert 'ONNX Runtime output differs from PyTorch by 0.01' in row.error and row.latencies_ms == []


@pytest.mark.parametrize('argv, message', [
    (['--runtime', 'tensorrt'], "unknown runtime 'tensorrt'; choose one of torch, onnxruntime"),
    (['--runtime', 'onnxruntime', '--train'], 'times inference only'),
    (['--runtime', 'onnxruntime', '--dtype', 'bfloat16', '--compile'], 'drop --dtype bfloat16, --compile'),
])
def test_cli_bad_runtime_exits_2(argv, message, capsys):
    assert main(['bench', '--models', 'resnet18:resnet10t', '--img-size', '32', '--no-progress', *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_stats_restore_the_training_mode_when_the_forward_fails():
    from timm_pf.methods.stats import count_activations, count_macs
    model = timm.create_model('resnet18').train()
    for count in (count_macs, count_activations):
        with pytest.raises(RuntimeError):
            count(model, (5, 32, 32))  # 5 channels into a 3-channel stem
        assert model.training and all(p.requires_grad for p in model.parameters())


def test_model_stats_measure_a_vit_at_the_size_it_was_built_for():
    from timm_pf.methods.stats import model_stats
    for name in ('vit_ti_maxpool', 'pit_ti_maxpool'):
        stats = model_stats(timm.create_model(name, img_size=96))
        assert stats.input_size == (3, 96, 96)
    resnet = timm.create_model('resnet10t')
    assert model_stats(resnet).input_size == tuple(resnet.pretrained_cfg['input_size'])


@pytest.mark.parametrize('statistic, advice', [('median', True), ('min', False)])
def test_an_unstable_ratio_suggests_the_other_statistic_only(statistic, advice):
    latencies = [1.0, 1.5, 2.0, 1.1, 3.0, 1.4, 4.0, 1.2]  # scattered against a steady baseline
    ratio = latency_ratio(latencies, [1.0] * len(latencies), statistic)
    assert 'machine busy' in ratio.unstable and ('--statistic min' in ratio.unstable) == advice


def test_plot_titles_say_how_the_models_ran(monkeypatch, tmp_path):
    pytest.importorskip('matplotlib')
    from matplotlib.axes import Axes
    result = _synthetic_run(monkeypatch, 'stable', amp=True, channels_last=True)
    titles = []
    set_title = Axes.set_title

    def record(ax, label, *args, **kwargs):
        titles.append(label)
        return set_title(ax, label, *args, **kwargs)

    monkeypatch.setattr(Axes, 'set_title', record)
    bench.plot_result(result, str(tmp_path / 'bench.png'))
    assert titles and all('amp channels_last' in title for title in titles), titles
