import subprocess
import sys

import pytest

import opts as options
from utils.errors import ConfigError
from conftest import ROOT


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_both_syntaxes_repeats_and_command_line_priority(tmp_path):
    data = write(tmp_path, 'd.defconf', 'dataset: Synthetic\nnJoints = 16\n# a comment\ninputRes: 128\ninputRes = 64\n')
    model = write(tmp_path, 'm.defconf', 'model = StackedHourGlass\nnStack: 4\nLR: 1e-4\n')
    o = options.parse(['-DataConfig', data, '-ModelConfig', model, '--LR', '1e-3'])
    assert o.inputRes == (64, 64)    # the repeated key's last value wins
    assert o.nStack == 4
    assert o.LR == 1e-3              # the command line wins over the file
    assert o.model == 'StackedHourGlass'


def test_older_framework_keys_are_accepted(tmp_path):
    keys = ['TargetType: heatmap', 'imageRes: 256', 'baseName: resnet50', 'modelName: resnet34',
            'ohKernel: 1', 'hhKernel: 1', 'baseWidth: 9', 'cardinality: 4', 'LRNSize: 1', 'IterSize: 3',
            'loadOptim: true', 'loadEpoch: false', 'dropPreLoaded: 0', 'dropMagPreLoaded: 0.1',
            'usedouble: false', 'DEBUG: 0', 'dont_pin_memory: true', 'mini_batch_count: 2', 'shuffle: false']
    cfg = write(tmp_path, 'old.defconf', '\n'.join(keys) + '\n')
    o = options.parse(['-ModelConfig', cfg])
    assert o.baseWidth == 9 and o.mini_batch_count == 2 and o.shuffle is False and o.dont_pin_memory is True


def run_main(*args):
    return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dead_keys_warn_in_one_line(tmp_path):
    cfg = write(tmp_path, 'dead.defconf', 'visdom: true\nworldCoors: 1\nheadSize: 0.6\n')
    r = run_main('-ModelConfig', cfg, '--nStack', '1', '--nChannels', '8', '-summary')
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 3 and all("no longer does anything" in w for w in warnings)
    assert any("'visdom'" in w for w in warnings)


def test_unknown_key_names_file_key_and_closest(tmp_path):
    cfg = write(tmp_path, 'bad.defconf', 'nStack: 2\nnStacks: 4\n')
    r = run_main('-ModelConfig', cfg, '-summary')
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert str(cfg) in line and "'nStacks'" in line and "'nStack'" in line


def test_out_of_range_value_is_rejected(tmp_path):
    with pytest.raises(ConfigError):
        options.parse(['--maxScale', '2'])


def test_help_lists_every_option_with_default():
    r = run_main('--help')
    assert r.returncode == 0
    parser = options.build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in r.stdout, flag
    assert '(default: 2.5e-4)' in r.stdout.replace('\n', ' ').replace('  ', ' ') or 'default: 0.00025' in r.stdout


def test_resolved_defconf_reproduces_options(tmp_path):
    o = options.parse(['--nStack', '3', '--LRSteps', '5,9', '--shuffle', 'false', '--LR', '0.01'])
    path = str(tmp_path / 'run.defconf')
    options.write_defconf(o, path)
    again = options.parse(['-DataConfig', path])
    skip = {'DataConfig', 'ModelConfig'}
    assert {k: v for k, v in vars(again).items() if k not in skip} == {k: v for k, v in vars(o).items() if k not in skip}


def test_parsed_options_survive_pickling():
    """A spawned loader worker (macOS's and Windows' default) receives the dataset, and with it
    the options, pickled: every value comes back equal and of the same type."""
    import pickle
    o = options.parse(['--inputRes', '256x192', '--outputRes', '64x48', '--LRSteps', '90,120'])
    back = pickle.loads(pickle.dumps(o))
    assert vars(back) == vars(o)
    assert type(back.inputRes) is options.Resolution and back.inputRes.wh == (192, 256)
    assert str(back.outputRes) == '64x48'
