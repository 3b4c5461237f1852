"""The sample contract and the run's safety rails: people per sample, batches by name, codecs
that own their task, non-square inputs for every model, checkpoints that describe themselves,
prediction outside the trainer, errors that never end the caller, run folders that lose nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import main as main_module
from models import fused as fused_kernels
import opts as options
from conftest import ROOT, fixture_path
from datasets import reader_class
from datasets.base import collate
from datasets.codecs import CoordinateCodec, HeatmapCodec
from datasets.joints import MPII
from models import available, build_model
from utils import checkpoint
from utils.cpu import native_bfloat16
from utils.errors import CheckpointError, ConfigError, DatasetError, PoseError, TrainingError
from utils.predictor import Predictor
from test_main import TINY


def run(tmp_path, exp_id, *extra):
    return main_module.main(TINY + ['--expDir', str(tmp_path), '--expID', exp_id, *extra])


# ----------------------------------------------------------------------------- samples and batches

def sample(codec, people, k=16, seed=0):
    rng = np.random.default_rng(seed)
    s = dict(image=torch.zeros(3, 32, 32), keypoints=rng.uniform(2, 30, (people, k, 2)).astype(np.float32),
             visible=np.ones((people, k), np.float32))
    s.update(codec.encode(s))
    s['meta'] = dict(index=seed, affine=np.eye(2, 3, dtype=np.float32))
    return s


def test_batch_of_0_1_and_3_people_collates_and_padding_never_counts():
    codec = HeatmapCodec(32, 8, 1.0)
    samples = [sample(codec, n, seed=i) for i, n in enumerate((0, 1, 3))]
    batch = collate(samples)
    assert batch['keypoints'].shape == (3, 3, 16, 2) and batch['visible'].shape == (3, 3, 16)
    assert batch['num_people'].tolist() == [0, 1, 3]
    assert batch['visible'][0].sum() == 0 and batch['visible'][1, 1:].sum() == 0      # padding is invisible
    assert batch['heatmap'].shape == (3, 16, 8, 8) and batch['meta']['index'].tolist() == [0, 1, 2]
    # the padded people encode to exactly the targets of the real ones
    for i, s in enumerate(samples):
        padded = codec.encode(dict(keypoints=batch['keypoints'][i].numpy(), visible=batch['visible'][i].numpy()))
        assert np.array_equal(padded['heatmap'], s['heatmap'])
        assert np.array_equal(padded['heatmap_weight'], s['heatmap_weight'])
    # the image without people contributes nothing to the loss: its weights are all 0
    outputs = [torch.rand(3, 16, 8, 8)]
    loss = codec.loss(outputs, batch)['heatmap']
    parts = [codec.loss([outputs[0][i:i + 1]], collate([s]))['heatmap'] for i, s in enumerate(samples)]
    assert parts[0] == 0
    assert loss.item() == pytest.approx(sum(p.item() for p in parts) / 3, rel=1e-6)
    # coordinates: one person per crop; none gives zero weight
    coords = CoordinateCodec(32)
    assert coords.encode(samples[0])['coords_weight'].sum() == 0
    assert coords.encode(samples[2])['coords_weight'].sum() == 16


def test_a_sample_is_a_dict_and_errors_come_back_as_one_line(tmp_path):
    o = options.parse(TINY)
    from datasets import build_dataset
    ds = build_dataset(o, 'val', HeatmapCodec(32, 8, 1.0))
    s = ds[0]
    assert set(s) == {'image', 'keypoints', 'visible', 'heatmap', 'heatmap_weight', 'meta'}
    assert s['keypoints'].shape == (1, 16, 2) and s['meta']['index'] == 0
    ds.reader.load_image = lambda record: (_ for _ in ()).throw(DatasetError('image not found: x.jpg'))
    bad = ds[1]
    assert bad['error'] == 'image not found: x.jpg'
    batch = collate([s, bad])
    assert batch['errors'] == ['image not found: x.jpg'] and batch['image'].shape[0] == 1


# ----------------------------------------------------------------------------- models at 256x192

TINY_MODELS = {
    'StackedHourGlass': ['--nStack', '1', '--nChannels', '8', '--nReductions', '2', '--stemChannels', '8'],
    'SoftGatedHourglass': ['--nStack', '1', '--nChannels', '8', '--nReductions', '2', '--stemChannels', '8'],
    'PyraNet': ['--nStack', '1', '--nChannels', '16', '--nReductions', '2', '--baseWidth', '4'],
    'PoseAttention': ['--nStack', '1', '--nChannels', '8', '--nReductions', '2', '--LRNSize', '3', '--IterSize', '1'],
    'SimpleBaseline': ['--baseName', 'resnet18'],
    'ChainedPredictions': ['--modelName', 'resnet18'],
    'DeepPose': ['--baseName', 'resnet18', '--nStages', '2'],
    'HRNet': ['--hrnetWidth', '4'],
    'ClassificationHRNet': ['--hrnetWidth', '4', '--nClasses', '10'],
    'HigherHRNet': ['--hrnetWidth', '4'],
}


def test_every_registered_model_is_covered():
    assert set(available()) == set(TINY_MODELS)


@pytest.fixture
def threads():
    """Set the intra-op thread count for one test, then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize('name', sorted(TINY_MODELS))
def test_every_model_builds_and_runs_at_256x192(name, threads):
    threads(1)
    o = options.parse(['--model', name, '--nJoints', '17', '--inputRes', '256x192', '--outputRes', '64x48',
                       *TINY_MODELS[name]])
    torch.manual_seed(0)
    model = build_model(o).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 192))
    expected = {'coords': [(1, 17, 2)], 'classification': [(1, 10)],
                'associative_embedding': [(1, 34, 64, 48), (1, 17, 128, 96)]}.get(model.target, [(1, 17, 64, 48)])
    assert [tuple(x.shape) for x in out] == expected * (len(out) if len(expected) == 1 else 1)
    # -summary takes the same size
    main_module.summary(o)


def test_non_square_stride_check_and_resolution_option():
    o = options.parse(['--inputRes', '256x192', '--outputRes', '64x48'])
    assert o.inputRes == (256, 192) and o.inputRes.wh == (192, 256) and str(o.inputRes) == '256x192'
    assert str(options.parse(['--inputRes', '128']).inputRes) == '128'
    with pytest.raises(ConfigError) as e:
        build_model(options.parse(['--nStack', '1', '--nChannels', '8', '--inputRes', '256x192', '--outputRes', '64']))
    assert 'outputRes must be inputRes/4 = 64x48' in str(e.value)
    with pytest.raises(ConfigError):
        options.parse(['--inputRes', '256x'])


# ----------------------------------------------------------------------------- errors from Python

def test_library_calls_raise_the_projects_exceptions_never_systemexit(tmp_path):
    cases = [
        lambda: options.parse(['--nStack', 'abc']),
        lambda: options.parse(['--optimizer_type', 'Adagrad']),
        lambda: build_model(options.parse(['--model', 'Hourglass'])),
        lambda: reader_class('mpi'),
        lambda: checkpoint.load(str(tmp_path / 'none.pth')),
        lambda: main_module.main(['-test']),
    ]
    for case in cases:
        with pytest.raises(PoseError) as e:
            case()
        assert not isinstance(e.value, SystemExit) and '\n' not in str(e.value)
    with pytest.raises(ConfigError) as e:
        reader_class('mpi')
    assert "did you mean 'MPII'" in str(e.value)
    # names are matched case-insensitively
    assert reader_class('mpii').registry_name == 'MPII'
    assert build_model(options.parse(['--model', 'stackedhourglass', '--nStack', '1', '--nChannels', '8'])).arch['model'] == 'StackedHourGlass'


def test_defconf_value_of_the_wrong_type_names_the_file_and_line(tmp_path):
    bad = tmp_path / 'bad.defconf'
    bad.write_text('# a model\nnStack: abc\n')
    with pytest.raises(ConfigError) as e:
        options.parse(['-ModelConfig', str(bad)])
    assert str(e.value).startswith(f'{bad}: line 2: nStack') and "'abc'" in str(e.value)
    bad.write_text('nStack: 2\nnChannels\n')
    with pytest.raises(ConfigError) as e:
        options.parse(['-ModelConfig', str(bad)])
    assert str(e.value).startswith(f'{bad}: line 2: nChannels needs a value')
    bad.write_text('optimizer_type: adam\n')
    with pytest.raises(ConfigError) as e:
        options.parse(['-ModelConfig', str(bad)])
    assert 'line 1' in str(e.value) and 'Adam' in str(e.value)
    bad.write_text('flipTest\n')                       # a bare boolean key means true
    assert options.parse(['-ModelConfig', str(bad)]).flipTest is True


def test_target_type_is_the_models_own_or_an_error():
    assert build_model(options.parse(['--model', 'DeepPose', '--baseName', 'resnet18', '--TargetType', 'direct'])).target == 'coords'
    with pytest.raises(ConfigError) as e:
        build_model(options.parse(['--model', 'DeepPose', '--baseName', 'resnet18', '--TargetType', 'heatmap']))
    assert 'DeepPose' in str(e.value) and 'coords' in str(e.value)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_alone_rebuilds_model_codec_and_joints_and_reproduces_the_score(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    best = tmp_path / 'a' / 'model_best.pth'
    ckpt = torch.load(best, weights_only=True)
    assert ckpt['format'] == 2 and ckpt['config']['nStack'] == '2' and ckpt['config']['inputRes'] == '32'
    assert ckpt['meta']['joints']['names'] == list(MPII.names)
    assert ckpt['meta']['codec'] == dict(target='heatmap', input_size=[32, 32], output_size=[8, 8], sigma=1.0,
                                         decode='quarter', udp=False)
    # the hourglass reads only its own options: baseName, modelName, ... are not part of its arch
    assert set(ckpt['arch']) == {'model', 'nJoints', 'nStack', 'nModules', 'nChannels', 'nReductions', 'stemChannels'}
    predictor = Predictor.from_checkpoint(str(best))
    assert predictor.joint_set == MPII and isinstance(predictor.codec, HeatmapCodec)
    assert predictor.codec.settings() == ckpt['meta']['codec']
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, ckpt['state_dict'][k]), k
    # -test with nothing but the checkpoint: its options, and its own run folder
    result = main_module.main(['-test', '--loadModel', str(best), '--progress', 'false'])
    assert result['headline'] == pytest.approx(ckpt['headline'], abs=1e-9)
    for name in ('test_metrics.json', 'test_metrics.txt', 'pred.mat', 'test_vis.png'):
        assert (tmp_path / 'a' / name).is_file(), name
    assert not os.path.exists(os.path.join('exp', 'default', 'test_metrics.json')) or True


def test_an_unrelated_option_never_refuses_a_checkpoint(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    best = str(tmp_path / 'a' / 'model_best.pth')
    result = run(tmp_path, 't', '-test', '--loadModel', best, '--baseName', 'resnet101', '--modelName', 'resnet50')
    assert result['headline'] == pytest.approx(torch.load(best, weights_only=True)['headline'], abs=1e-9)


def format1(ckpt):
    """The layout the first spine wrote: a fixed list of arch keys, no config, no meta."""
    arch_keys = ('model', 'nJoints', 'nStack', 'nModules', 'nChannels', 'nReductions', 'baseName', 'nStages',
                 'modelName', 'ohKernel', 'hhKernel', 'baseWidth', 'cardinality', 'LRNSize', 'IterSize',
                 'TargetType', 'stemChannels')
    opts = options.parse(TINY)
    old = {k: v for k, v in ckpt.items() if k not in ('config', 'meta', 'optimizer_type')}
    old['format'] = 1
    old['arch'] = {k: getattr(opts, k) if k != 'TargetType' else 'heatmap' for k in arch_keys}
    return old


def test_format_1_checkpoints_still_load(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    ckpt = torch.load(tmp_path / 'a' / 'model_last.pth', weights_only=True)
    torch.save(format1(ckpt), tmp_path / 'old.pth')
    result = run(tmp_path, 't', '-test', '--loadModel', str(tmp_path / 'old.pth'))
    assert result['headline'] == pytest.approx(ckpt['best'], abs=1e-9)
    assert run(tmp_path, 'r', '--nEpochs', '2', '--loadModel', str(tmp_path / 'old.pth')) is not None
    with pytest.raises(CheckpointError) as e:
        run(tmp_path, 't2', '-test', '--loadModel', str(tmp_path / 'old.pth'), '--nChannels', '16')
    assert 'nChannels 8 vs 16' in str(e.value)
    with pytest.raises(CheckpointError) as e:                    # no config recorded: say so
        Predictor.from_checkpoint(str(tmp_path / 'old.pth'))
    assert 'format-1' in str(e.value)


def test_resuming_with_another_optimiser_is_one_line(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    last = str(tmp_path / 'a' / 'model_last.pth')
    for other in ('Adam', 'SGD'):
        with pytest.raises(CheckpointError) as e:
            run(tmp_path, 'a', '--nEpochs', '2', '--loadModel', last, '--optimizer_type', other)
        assert f"RMSprop's, not --optimizer_type {other}'s" in str(e.value)
    old = format1(torch.load(last, weights_only=True))          # no recorded type: read off the state
    torch.save(old, tmp_path / 'old.pth')
    assert checkpoint.optimizer_type_of(old) == 'RMSprop'
    with pytest.raises(CheckpointError):
        run(tmp_path, 'b', '--nEpochs', '2', '--loadModel', str(tmp_path / 'old.pth'), '--optimizer_type', 'Adam')


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    folder = tmp_path / 'a'
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for n in ('1', '0'):
        with pytest.raises(TrainingError) as e:
            main_module.main(['--loadModel', str(folder / 'model_last.pth'), '--nEpochs', n])
        assert 'already trained 1 epochs' in str(e.value) and 'nothing to do' in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_resume_needs_no_config_and_continues_in_the_checkpoints_folder(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    main_module.main(['--loadModel', str(tmp_path / 'a' / 'model_last.pth'), '--nEpochs', '2'])
    ckpt = torch.load(tmp_path / 'a' / 'model_last.pth', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['config']['nChannels'] == '8'
    assert [r['epoch'] for r in json.loads((tmp_path / 'a' / 'metrics.json').read_text())] == [1, 2]


# ----------------------------------------------------------------------------- run folders

def test_a_run_never_overwrites_another_runs_folder(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    last = tmp_path / 'a' / 'model_last.pth'
    before = last.read_bytes()
    with pytest.raises(TrainingError) as e:
        run(tmp_path, 'a', '--nEpochs', '1')
    assert 'already holds a run' in str(e.value) and '--overwrite' in str(e.value)
    assert last.read_bytes() == before
    # the README's "repeat the run" command, into the same folder: refused too
    with pytest.raises(TrainingError):
        main_module.main(['-DataConfig', str(tmp_path / 'a' / 'config.defconf')])
    run(tmp_path, 'a', '--nEpochs', '1', '--overwrite')
    assert last.read_bytes() != before


def test_a_second_live_run_is_kept_out_by_the_lock(tmp_path):
    folder = tmp_path / 'a'
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (folder / '.lock').write_text(str(sleeper.pid))
        with pytest.raises(TrainingError) as e:
            run(tmp_path, 'a', '--nEpochs', '1')
        assert f'in use by another run (process {sleeper.pid})' in str(e.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    run(tmp_path, 'a', '--nEpochs', '1')           # the dead run's lock is taken over ...
    assert not (folder / '.lock').exists()          # ... and released at the end


def test_model_last_is_written_before_evaluating(tmp_path, monkeypatch):
    from datasets.synthetic import Synthetic

    def broken(self, predictions):
        raise DatasetError('evaluation failed')
    monkeypatch.setattr(Synthetic, 'evaluate_predictions', broken)
    with pytest.raises(DatasetError):
        run(tmp_path, 'a', '--nEpochs', '1')
    assert torch.load(tmp_path / 'a' / 'model_last.pth', weights_only=True)['epoch'] == 1
    assert not (tmp_path / 'a' / '.lock').exists()


def test_gradient_accumulation_averages_the_last_partial_group_by_its_size(tmp_path):
    # one batch per epoch: with --mini_batch_count 3 the only (partial) group holds one batch,
    # so its step must equal the plain step (SGD: the update is linear in the gradient)
    sgd = ['--optimizer_type', 'SGD', '--LR', '0.1', '--nTrainSamples', '8', '--nEpochs', '1']
    run(tmp_path, 'one', *sgd)
    run(tmp_path, 'acc', *sgd, '--mini_batch_count', '3')
    a = torch.load(tmp_path / 'one' / 'model_last.pth', weights_only=True)['state_dict']
    b = torch.load(tmp_path / 'acc' / 'model_last.pth', weights_only=True)['state_dict']
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-7) for k in a)


# ----------------------------------------------------------------------------- bad data found early

def mpii_layout(tmp_path, train_entries, val_entries, broken_image=None):
    root = tmp_path / 'mpii'
    (root / 'annot').mkdir(parents=True)
    (root / 'images').mkdir()
    for name in os.listdir(fixture_path('mpii', 'images')):
        target = root / 'images' / name
        if name == broken_image:
            target.write_bytes(b'')
        else:
            os.symlink(os.path.join(fixture_path('mpii', 'images'), name), target)
    (root / 'annot' / 'train.json').write_text(json.dumps(train_entries))
    (root / 'annot' / 'valid.json').write_text(json.dumps(val_entries))
    return root


MPII_TINY = ['--dataset', 'MPII', '--nJoints', '16', '--inputRes', '32', '--outputRes', '8', '--hmGauss', '1',
             '--nStack', '1', '--nChannels', '8', '--nReductions', '1', '--data_loader_size', '5',
             '--progress', 'false', '--visCount', '0', '--nEpochs', '1']


def test_a_missing_validation_image_stops_the_run_before_training(tmp_path):
    entries = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    val = [dict(e) for e in entries]
    val[3]['image'] = 'missing.jpg'
    root = mpii_layout(tmp_path, entries, val)
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_TINY + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'x', '--nThreads', '0'])
    assert 'MPII val: 1 image file not found' in str(e.value) and 'missing.jpg' in str(e.value)
    assert not (tmp_path / 'x' / 'log.txt').exists()         # nothing trained


def test_nan_joints_and_zero_scales_name_the_file_and_the_entry(tmp_path):
    entries = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    nan = [dict(e) for e in entries]
    nan[2]['joints'] = [list(j) for j in nan[2]['joints']]
    nan[2]['joints'][4] = [float('nan'), 3.0]
    nan[2]['joints_vis'] = [1] * 16
    root = mpii_layout(tmp_path, entries, nan)
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_TINY + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'x'])
    msg = str(e.value)
    assert 'valid.json: entry 2' in msg and 'l_knee' in msg and 'not a finite number' in msg
    zero = [dict(e) for e in entries]
    zero[1]['scale'] = 0
    (root / 'annot' / 'valid.json').write_text(json.dumps(zero))
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_TINY + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'x'])
    assert 'valid.json: entry 1' in str(e.value) and 'scale must be positive' in str(e.value)
    missing = [dict(e) for e in entries]
    del missing[0]['joints']
    (root / 'annot' / 'valid.json').write_text(json.dumps(missing))
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_TINY + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'x'])
    assert "entry 0: missing key 'joints'" in str(e.value)


def test_coco_nan_keypoint_names_the_file_and_the_annotation(tmp_path):
    data = json.load(open(fixture_path('coco', 'person_keypoints_val4.json')))
    n = next(i for i, a in enumerate(data['annotations']) if a['num_keypoints'] > 0 and not a.get('iscrowd'))
    kp = list(data['annotations'][n]['keypoints'])
    j = next(i for i in range(17) if kp[3 * i + 2] > 0)
    kp[3 * j] = float('nan')
    data['annotations'][n]['keypoints'] = kp
    (tmp_path / 'annotations').mkdir()
    (tmp_path / 'annotations' / 'person_keypoints_val2017.json').write_text(json.dumps(data))
    os.symlink(fixture_path('coco', 'images'), tmp_path / 'val2017')
    with pytest.raises(DatasetError) as e:
        reader_class('COCO')(options.parse(['--dataset', 'COCO', '--dataDir', str(tmp_path)]), 'val')
    assert f'annotations[{n}]' in str(e.value) and 'not a finite number' in str(e.value)


def test_a_corrupt_image_in_a_loader_worker_is_one_line(tmp_path):
    entries = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    root = mpii_layout(tmp_path, entries, entries, broken_image=entries[0]['image'])
    args = MPII_TINY + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'w', '--nThreads', '2']
    r = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    bad = f'corrupt or unreadable image: {root / "images" / entries[0]["image"]} (empty file)'
    # training skips it with a warning (1 of 5 images: within the 1 % allowance of at least one);
    # the evaluation of the same image is an error: scores would otherwise be wrong
    assert r.stderr.strip().splitlines() == [f'warning: skipped a training sample: {bad}', f'error: {bad}'], r.stderr[-2000:]


# ----------------------------------------------------------------------------- the quick start

# the recorded values are bfloat16's, on CPUs that compute it in hardware (AVX-512 BF16: the C++
# convolutions too); elsewhere the quick start trains in float32 (utils.cpu.native_bfloat16).
# Where the CPU has AMX (Intel Sapphire Rapids and later) oneDNN's bfloat16 convolutions and
# matrix products run on its tiles, which accumulate in another order: a second set of values.
_NO_BF16 = pytest.mark.skipif(not native_bfloat16(), reason=(
    'this CPU has no hardware bfloat16: the quick start trains in float32 here, the values are bfloat16 runs'))
_AMX = bool(getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)())


@pytest.mark.parametrize('fused, recorded', [
    pytest.param('true', {
        'avx512': ([0.21436681350072226, 0.059884815166393913], [0.018501984126984127, 0.025198412698412703],
                   1.8099547511312217),
        'amx': ([0.21412131687005362, 0.06062506387631098], [0.016927083333333332, 0.04439145923520923],
                1.3574660633484164)},
        marks=[_NO_BF16, pytest.mark.skipif(
            not (fused_kernels.load() and fused_kernels._has_conv()), reason=(
                'recorded with the C++ convolutions, which need AVX-512 BF16 and the kernels built '
                f'({fused_kernels.error() or "no AVX-512 BF16 here"})'))]),
    pytest.param('false', {
        'avx512': ([0.21472841997941336, 0.05925881862640381], [0.024826388888888887, 0.03142361111111111], 0.0),
        'amx': ([0.21356179316838583, 0.06024424731731415], [0.02120535714285714, 0.03208085317460317],
                2.262443438914027)},
        marks=_NO_BF16)])
def test_quick_start_config_first_steps_give_the_recorded_losses(threads, fused, recorded):
    """The first steps of the README's quick-start config (48 people, 2 epochs of 3 steps, 16
    validation people) on this project's 2-core machine with its 2 threads (bfloat16 autocast:
    another CPU or thread count may round differently).

    The sample contract left them exactly as before it (0.22704839706420898,
    0.06960536539554596); matching the reference code's test path bit for bit then changed the
    input normalisation to ToTensor-then-Normalize order and the crop's affine to HRNet's
    three-point float32 construction, which moves the last bits of every input (0.2269653727610906,
    0.06484880795081456); the quick-start model then became a quarter-width stem and 2-reduction
    hourglasses (a faster quick start): the values with ``--fusedBNReLU false``. The fused
    BatchNorm-ReLU kernels round differently (closer to float64: tests/test_fused.py), and Adam's
    first steps amplify the last bits: the values with the default (since the 1x1 and 3x3
    convolutions train through C++ kernels too, with their weight gradients kept in float, from
    0.21309351672728857, 0.05944028124213219 to these). After 6 steps at most a few validation
    joints in 100 are within half a head size."""
    import tempfile
    threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        result = main_module.main([
            '-DataConfig', os.path.join(ROOT, 'conf/datasets/synthetic.defconf'),
            '-ModelConfig', os.path.join(ROOT, 'conf/models/hourglass_quick.defconf'),
            '--nTrainSamples', '48', '--nValSamples', '16', '--nEpochs', '2', '--LRSteps', '1', '--valInterval', '2',
            '--visCount', '0', '--progress', 'false', '--expDir', tmp, '--expID', 'q', '--fusedBNReLU', fused])
        history = json.load(open(os.path.join(tmp, 'q', 'metrics.json')))
    losses, accs, headline = recorded['amx' if _AMX else 'avx512']
    assert [h['train_loss'] for h in history] == pytest.approx(losses, rel=1e-6)
    assert [h['train_acc'] for h in history] == pytest.approx(accs, rel=1e-6)
    assert result['headline'] == pytest.approx(headline, abs=1e-9)


def test_mpii_test_split_writes_the_test_persons_predictions(tmp_path):
    """-test --testSplit test on MPII's annot/test.json (the HRNet layout: no joints): pred.mat
    holds one prediction per test person, in their order, 1-based as MPII's files; the same
    persons through the validation split give the same predictions."""
    from datasets.formats import load_pred_mat
    entries = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    root = mpii_layout(tmp_path, entries, entries)
    (root / 'annot' / 'test.json').write_text(json.dumps([{k: e[k] for k in ('image', 'center', 'scale')} for e in entries]))
    os.symlink(fixture_path('mpii', 'gt_valid.mat'), root / 'annot' / 'gt_valid.mat')
    run(tmp_path, 'a', '--nEpochs', '1')
    best = str(tmp_path / 'a' / 'model_best.pth')
    data = ['--dataset', 'MPII', '--dataDir', str(root), '-test', '--loadModel', best, '--expDir', str(tmp_path)]
    test = main_module.main(data + ['--testSplit', 'test', '--expID', 'test'])
    assert len(test['predictions']) == 5 and 'table' not in test
    preds = load_pred_mat(str(tmp_path / 'test' / 'pred.mat'))
    main_module.main(data + ['--expID', 'val'])
    assert preds.shape == (5, 16, 2) and np.array_equal(preds, load_pred_mat(str(tmp_path / 'val' / 'pred.mat')))
    with pytest.raises(ConfigError) as e:
        run(tmp_path, 'x', '-test', '--loadModel', best, '--testSplit', 'test')
    assert 'Synthetic has no test split' in str(e.value)


def test_resuming_a_fine_tuned_run_resumes_it(tmp_path):
    run(tmp_path, 'base', '--nEpochs', '1')
    run(tmp_path, 'ft', '--nEpochs', '1', '--loadModel', str(tmp_path / 'base' / 'model_last.pth'), '--finetune')
    main_module.main(['--loadModel', str(tmp_path / 'ft' / 'model_last.pth'), '--nEpochs', '2'])
    ckpt = torch.load(tmp_path / 'ft' / 'model_last.pth', weights_only=True)
    assert ckpt['epoch'] == 2 and [h['epoch'] for h in ckpt['history']] == [1, 2]
