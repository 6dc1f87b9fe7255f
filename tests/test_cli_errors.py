"""Every ``timm-pf`` command exits 2 (bad input) or 1 (a failure outside the user's control) with one line that
names the problem, never a traceback; bad values and output paths are refused before any work starts."""
import os
import sys
import warnings

import numpy as np
import pytest
import torch

from timm_pf.cli import build_parser, main
from timm_pf.cli import deform_points

EXIT_HELP = "exit codes: 0 ok, 1 failure outside the user's control"


def _exit_code(argv):
    """Exit code of ``timm-pf argv``, whether argparse exits or the command returns."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


@pytest.mark.parametrize('argv, names', [
    (['digits', 'OUT', '--img-size', '0'], '--img-size'),
    (['digits', 'OUT', '--val-fraction', '0'], '--val-fraction'),
    (['digits', 'OUT', '--val-fraction', '1'], '--val-fraction'),
    (['digits', 'OUT', '--val-fraction', '1.5'], '--val-fraction'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--batch-size', '0'], '--batch-size'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--workers', '-1'], '--workers'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--crop-pct', '-1'], '--crop-pct'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--device', 'cuda'], 'no CUDA'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--num-images', '-5'], '--num-images'),
    (['rba', 'apply', '--model', 'resnet18', '--data-dir', 'D', '--span', '1:2', '--output', 'O', '--ridge', '-1'],
     '--ridge'),
    (['deform-points', '--init-std', '-1'], '--init-std'),
    (['deform-points', '--checkpoint', 'no/such/file.safetensors'], 'no such file'),
    (['bench', '--time-budget', '-1'], '--time-budget'),
    (['bench', '--time-budget', 'nan'], '--time-budget'),
    (['bench', '--time-budget', 'inf'], '--time-budget'),
    (['bench', '--models', ''], '--models'),
    (['bench', '--models', ','], '--models'),
    (['bench', '--models', 'resnet18', '--csv', 'o.csv', '--json', './o.csv'], '--csv and --json'),
    (['bench', '--models', 'resnet18', '--csv', '-', '--markdown', '-'], '--csv and --markdown'),
    (['digits', ''], 'empty path'),
    (['convert', 'ckpt.pth', '--model', 'ours_r50_max', '-o', 'OUT', '--model-kwargs', 'noequals'],
     '--model-kwargs'),
    (['convert', 'ckpt.pth', '--model', 'ours_r50_max', '-o', 'OUT', '--model-kwargs', 'layers=[1,1'],
     'not a complete Python literal'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--model-kwargs', '=3'], '--model-kwargs'),
    # a split is one folder under --data-dir: never the root itself or a path around it
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--split', ''], 'not the name of a split'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--split', '.'], 'not the name of a split'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--split', 'train/../validation'],
     'not the name of a split'),
    (['rba', 'evaluate', '--model', 'resnet18', '--data-dir', 'D', '--span', '0:1', '--val-split', ''],
     '--val-split'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--crop-pct', '1e9'], '--crop-pct'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--crop-pct', '1e-3'], '--crop-pct'),
    (['digits', 'OUT', '--seed', '4294967296'], '--seed: must be an integer >= 0 and <= 4294967295'),
    (['deform-points', '--dpi', '100000'], '--dpi'),
    (['push', 'OUT', '--repo-id', ''], '--repo-id: an empty value'),
    (['push', 'OUT', '--repo-id', 'me/x', '--branch', ''], 'is not a valid branch name'),
    (['push', 'OUT', '--repo-id', 'me/x', '--branch', 'a b..c'], 'is not a valid branch name'),
])
def test_bad_values_exit_2_naming_the_argument(argv, names, tmp_path, monkeypatch, no_cuda, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys)
    assert names in line and line.startswith('timm-pf '), line
    assert not (tmp_path / 'OUT').exists()


@pytest.mark.parametrize('argv', [
    ['bench', '--models', 'resnet18', '--json', 'a_file/out.json'],
    ['bench', '--models', 'resnet18', '--csv', 'no_folder/out.csv'],
    ['bench', '--models', 'resnet18', '--markdown', 'a_folder'],
    ['bench', '--models', 'resnet18', '--plot', 'a_file/plot.png'],
    ['convert', 'ckpt.pth', '--model', 'ours_r50_max', '-o', 'a_file'],
    ['convert', 'ckpt.pth', '--model', 'ours_r50_max', '-o', 'a_file/sub'],
    ['digits', 'a_file'],
    ['rba', 'apply', '--model', 'resnet18', '--data-dir', 'D', '--span', '1:2', '--output', 'a_file'],
    ['rba', 'analyze', '--model', 'resnet18', '--data-dir', 'D', '--output', 'a_file'],
    ['deform-points', '--output', 'a_folder'],
    ['deform-points', '--output', 'no_folder/points.png'],
])
def test_bad_output_paths_exit_2_before_any_work(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'a_folder').mkdir()
    monkeypatch.setattr('timm_pf.tools.bench.run_benchmark', lambda *a, **k: pytest.fail('measured'))
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys)
    assert any(p in line for p in ('a_file', 'a_folder', 'no_folder')), line


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='needs /proc')
@pytest.mark.parametrize('argv', [['bench', '--models', 'resnet18', '--markdown', '/proc/x.md'], ['digits', '/proc/x']])
def test_folders_that_take_no_files_are_refused_even_for_root(argv, monkeypatch, capsys):
    """/proc passes the permission-bit check as root, but no file can be created there."""
    monkeypatch.setattr('timm_pf.tools.bench.run_benchmark', lambda *a, **k: pytest.fail('measured'))
    assert _exit_code(argv) == 2
    assert 'the folder /proc is not writable' in _one_error_line(capsys)


def test_digits_refuses_a_folder_that_has_a_split(tmp_path, capsys):
    """Another seed or size written over an earlier export would mix the images of both splits."""
    pytest.importorskip('sklearn')
    (tmp_path / 'out' / 'validation').mkdir(parents=True)
    assert _exit_code(['digits', str(tmp_path / 'out'), '--img-size', '8']) == 2
    assert 'already has validation/' in _one_error_line(capsys)
    assert not (tmp_path / 'out' / 'train').exists()


@pytest.mark.parametrize('kwargs, message', [
    (['foo=1'], "unexpected keyword argument 'foo'"),
    (['num_experts=0'], 'num_experts must be >= 1'),
])
def test_convert_refuses_model_kwargs_the_model_does_not_take(kwargs, message, tmp_path, capsys):
    import safetensors.torch
    import timm
    ckpt = tmp_path / 'ghostnet.safetensors'
    safetensors.torch.save_file(timm.create_model('ghostnet_dyn').state_dict(), str(ckpt))
    assert main(['convert', str(ckpt), '--model', 'ghostnet_dyn', '--img-size', '224', '--model-kwargs', *kwargs,
                 '-o', str(tmp_path / 'out')]) == 2
    line = _one_error_line(capsys)
    assert 'cannot build ghostnet_dyn' in line and message in line, line
    assert not (tmp_path / 'out').exists()


@pytest.fixture
def images(tmp_path):
    from PIL import Image
    Image.new('RGB', (80, 60), (200, 40, 40)).save(tmp_path / 'ok.png')
    (tmp_path / 'not_an_image.png').write_text('hello')
    (tmp_path / 'empty.jpg').write_bytes(b'')
    (tmp_path / 'folder').mkdir()
    return tmp_path


@pytest.mark.parametrize('image, message', [
    ('not_an_image.png', 'not an image'),
    ('empty.jpg', 'not an image'),
    ('missing.png', 'no such file'),
    ('folder', 'is not a file'),
])
def test_deform_points_bad_images_are_named(image, message, images, capsys):
    argv = ['deform-points', '--img-size', '64', '--image', str(images / image), '--output', str(images / 'o.png')]
    assert _exit_code(argv) == 2
    assert message in _one_error_line(capsys)


def test_deform_points_needs_scikit_image_only_for_the_demo_image(images, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'skimage', None)  # as if scikit-image were not installed
    out = images / 'points.png'
    assert main(['deform-points', '--img-size', '64', '--image', str(images / 'ok.png'), '--output', str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(['deform-points', '--img-size', '64', '--output', str(out)]) == 2
    assert "pip install 'timm-pf[plot]'" in _one_error_line(capsys)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK'])
def test_deform_points_draws_any_image_mode_without_warnings(mode, images, capsys):
    from PIL import Image
    source = images / f'photo.{"jpg" if mode == "CMYK" else "png"}'
    image = Image.new('RGB', (50, 50), 'white')  # resampling white can round to just above 1
    image.paste(Image.effect_noise((25, 50), 90).convert('RGB'))
    image.convert(mode).save(source)  # square: no crop, so Pillow's read-only pixels reach torch uncopied
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert main(['deform-points', '--img-size', '64', '--image', str(source),
                     '--output', str(images / 'o.png')]) == 0
    assert capsys.readouterr().err == ''


def test_deform_points_unknown_model_is_named(images, capsys):
    assert main(['deform-points', '--model', 'no_such_model', '--output', str(images / 'o.png')]) == 2
    assert 'unknown model' in _one_error_line(capsys)


def test_unexpected_errors_are_one_line_with_exit_1(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError('something broke\nsecond line')
    monkeypatch.setattr(deform_points, 'draw_sampling_points', broken)
    assert main(['deform-points']) == 1
    line = _one_error_line(capsys)
    assert 'RuntimeError: something broke second line' in line and 'TIMM_PF_TRACEBACK=1' in line


def _all_parsers(parser):
    import argparse
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_help_lists_the_exit_codes():
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) >= 12  # timm-pf, its commands, rba's actions
    missing = [p.prog for p in parsers if EXIT_HELP not in ' '.join(p.format_help().split())]
    assert missing == []


SCRIPT = '''import argparse
parser = argparse.ArgumentParser()
parser.add_argument('--config', '-c', default='')
parser.add_argument('--device', default='cuda', type=str,
                    help="Device (accelerator) to use.")
print('device', parser.parse_args().device)
'''


@pytest.mark.parametrize('args, warns', [
    ([], True),
    (['--device', 'cuda:0'], True),
    (['--device', 'cpu'], False),
    (['--device=cpu'], False),
    (['--config', 'cpu.yaml'], False),
    (['-c', 'gpu.yaml'], True),
])
def test_run_warns_when_a_script_will_ask_for_missing_cuda(args, warns, tmp_path, monkeypatch, no_cuda, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'train.py').write_text(SCRIPT)
    (tmp_path / 'cpu.yaml').write_text('model: resnet18\ndevice: cpu\n')
    (tmp_path / 'gpu.yaml').write_text("model: resnet18\ndevice: 'cuda'\n")
    monkeypatch.setattr(sys, 'argv', list(sys.argv))  # the command sets the script's argv
    assert main(['run', 'train.py', *args]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith('device ')
    warning = [line for line in captured.err.splitlines() if 'warning' in line]
    assert len(warning) == (1 if warns else 0), captured.err
    if warns:
        assert 'train.py will ask for CUDA' in warning[0] and 'add --device cpu' in warning[0]


def test_run_does_not_warn_for_scripts_without_a_cuda_default(tmp_path, monkeypatch, no_cuda, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'other.py').write_text('print("ran")\n')
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    assert main(['run', 'other.py']) == 0
    assert capsys.readouterr().err == ''


def test_a_kernel_cache_that_cannot_be_created_names_the_variable(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    monkeypatch.setenv('TIMM_PF_KERNEL_DIR', str(blocker / 'kernels'))
    assert main(['build-kernels']) == 2
    line = _one_error_line(capsys)
    assert f'cannot create the kernel cache folder {blocker / "kernels"} (set by TIMM_PF_KERNEL_DIR)' in line


def test_run_without_a_script_names_only_the_script(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(['run'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'required: script (' in err and 'script_args' not in err


def test_run_names_the_script_its_errors_come_from(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    (tmp_path / 'fails.py').write_text('raise RuntimeError("x" * 5000)\n')
    (tmp_path / 'needs.py').write_text('import no_such_package_here\n')
    assert main(['run', 'fails.py']) == 1
    line = _one_error_line(capsys)
    assert 'fails.py failed: RuntimeError: xxx' in line and 'more characters; TIMM_PF_TRACEBACK=1' in line
    assert len(line) < 1700
    assert main(['run', 'needs.py']) == 2
    assert "needs.py needs the module 'no_such_package_here'" in _one_error_line(capsys)


def test_paths_the_system_refuses_while_parsing_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (['digits', 'a' * 300], ['deform-points', '--output', 'a' * 300 + '.png'],
                 ['bench', '--csv', 'b' * 300 + '/x.csv']):
        assert _exit_code(argv) == 2
        assert 'File name too long' in _one_error_line(capsys)


class _ClosedStdout:
    """stdout whose reader went away, as after `timm-pf ... | head -1`."""

    def write(self, text):
        raise BrokenPipeError(32, 'Broken pipe')

    def flush(self):
        pass


def test_a_closed_stdout_is_named_and_the_bench_files_are_written_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'stdout', _ClosedStdout())
    argv = ['bench', '--models', 'resnet10t:resnet14t', '--img-size', '32', '--batch-sizes', '1', '--repeats', '1',
            '--warmup', '1', '--memory', 'off', '--no-progress', '--cpu-kernels', 'off', '--csv', 'b.csv',
            '--json', 'b.json']
    assert _exit_code(argv) == 1
    assert _one_error_line(capsys) == ('timm-pf bench: error: the output was closed before everything was written '
                                       '(broken pipe)')
    assert (tmp_path / 'b.csv').read_text().count('\n') >= 2 and (tmp_path / 'b.json').stat().st_size > 0


def test_text_an_ascii_terminal_cannot_show_is_escaped(tmp_path):
    import subprocess
    env = {**os.environ, 'LC_ALL': 'C', 'LANG': 'C', 'PYTHONUTF8': '0', 'PYTHONIOENCODING': 'ascii',
           'PYTHONCOERCECLOCALE': '0'}
    out = subprocess.run([sys.executable, '-m', 'timm_pf', 'card', 'ours_r50_max.pf_in1k'], env=env, cwd=tmp_path,
                         capture_output=True)
    assert out.returncode == 0, out.stderr.decode('ascii', 'replace')
    assert b'\\xa7' in out.stdout and b'library_name: timm' in out.stdout


def test_an_interrupted_digits_export_leaves_no_split_folder(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from timm_pf.tools.data import digits_tensors
    saved, real_save = [], Image.Image.save

    def save_then_interrupt(self, path, *args, **kwargs):
        if len(saved) == 50:
            raise KeyboardInterrupt
        saved.append(path)
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, 'save', save_then_interrupt)
    assert _exit_code(['digits', str(tmp_path / 'd'), '--img-size', '16']) == 130
    assert _one_error_line(capsys) == 'timm-pf digits: error: interrupted'
    assert list((tmp_path / 'd').iterdir()) == []  # no train/ that looks complete, no staging folder left
    monkeypatch.setattr(Image.Image, 'save', real_save)
    assert _exit_code(['digits', str(tmp_path / 'd'), '--img-size', '16']) == 0
    x_tr, y_tr, x_va, _ = digits_tensors(img_size=16, normalize=False)
    train = sorted((tmp_path / 'd' / 'train').rglob('*.png'))
    assert len(train) == len(x_tr) and len(list((tmp_path / 'd' / 'validation').rglob('*.png'))) == len(x_va)
    first = next(p for p in train if p.name == '00000.png')
    pixels = torch.from_numpy(np.array(Image.open(first))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(pixels, x_tr[0], atol=1 / 255, rtol=0)
    assert first.parent.name == str(int(y_tr[0]))


@pytest.mark.parametrize('argv, message', [
    (['convert', '/dev/null', '--model', 'ours_r50_max', '-o', 'OUT'], 'checkpoint /dev/null is not a regular file'),
    (['convert', '.', '--model', 'ours_r50_max', '-o', 'OUT'], '. is a folder; convert takes a checkpoint file'),
    (['run', '.'], '. is not a script file'),
])
def test_inputs_that_exist_but_are_not_files_are_named_as_such(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(argv) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize('argv, prog', [
    (['bench', '--bogus'], 'timm-pf bench'),
    (['rba', 'analyze', '--model', 'resnet18', '--data-dir', '.', '--bogus', '1'], 'timm-pf rba analyze'),
    (['--bogus'], 'timm-pf'),
])
def test_unknown_options_point_at_the_help_of_their_command(argv, prog, capsys):
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f'{prog}: error: unrecognized arguments: --bogus') and line.endswith(f'(see {prog} --help)')


def test_run_passes_options_it_does_not_know_to_its_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    (tmp_path / 'echo.py').write_text(
        'import sys, pathlib\npathlib.Path("argv.txt").write_text(" ".join(sys.argv[1:]))\n')
    assert main(['run', 'echo.py', '--bogus', '1', '-x']) == 0
    assert (tmp_path / 'argv.txt').read_text() == '--bogus 1 -x'
