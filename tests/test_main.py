"""End to end through main.py on tiny synthetic runs: artefacts, resume equivalence, -test,
-summary, checkpoint errors, NaN guard, atomic checkpoints."""
import json
import math
import os

import pytest
import torch

import main as main_module
import opts as options
from datasets.codecs import HeatmapCodec
from models import fused
from utils import checkpoint
from utils import cpu as cpu_module
from utils.cpu import native_bfloat16
from utils import trainer as trainer_module
from utils.errors import PoseError

TINY = ['--dataset', 'Synthetic', '--nTrainSamples', '24', '--nValSamples', '8', '--syntheticRes', '64',
        '--inputRes', '32', '--outputRes', '8', '--hmGauss', '1', '--model', 'StackedHourGlass',
        '--nStack', '2', '--nChannels', '8', '--nReductions', '1', '--data_loader_size', '8',
        '--nThreads', '0', '--progress', 'false', '--visCount', '2', '--LR', '1e-3']


def run(tmp_path, exp_id, *extra):
    return main_module.main(TINY + ['--expDir', str(tmp_path), '--expID', exp_id, *extra])


def test_training_run_leaves_its_artefacts(tmp_path):
    result = run(tmp_path, 'a', '--nEpochs', '1')
    d = tmp_path / 'a'
    for name in ('config.defconf', 'log.txt', 'metrics.json', 'model_last.pth', 'model_best.pth', 'vis.png'):
        assert (d / name).is_file(), name
    history = json.loads((d / 'metrics.json').read_text())
    assert history[0]['epoch'] == 1 and 'Mean' in history[0]['val']
    assert history[0]['val_headline'] == pytest.approx(result['headline'])
    assert len(result['predictions']) == 8
    assert all(p['keypoints'].shape == (1, 16, 2) and p['scores'].shape == (1, 16) for p in result['predictions'])
    assert sorted(p['index'] for p in result['predictions']) == list(range(8))
    # the resolved config reproduces every option on its own
    again = options.parse(['-DataConfig', str(d / 'config.defconf')])
    first = options.parse(TINY + ['--expDir', str(tmp_path), '--expID', 'a', '--nEpochs', '1'])
    skip = {'DataConfig', 'ModelConfig'}
    assert {k: v for k, v in vars(again).items() if k not in skip} == {k: v for k, v in vars(first).items() if k not in skip}


def test_amp_on_a_cpu_without_hardware_bfloat16_trains_in_float32(tmp_path, monkeypatch, capfd):
    """--amp on such a CPU: one note, the step in float32 (the same weights as without --amp), the
    checkpoint keeping --amp as given; the predictor too runs float32 there."""
    monkeypatch.setitem(cpu_module._done, 'native_bfloat16', False)
    dtypes = []
    forward = trainer_module.Trainer.train_epoch

    def spy(self):
        dtypes.append(self.amp)
        return forward(self)
    monkeypatch.setattr(trainer_module.Trainer, 'train_epoch', spy)
    run(tmp_path, 'amp', '--nEpochs', '1', '--amp', '--optimizer_type', 'Adam')
    err = capfd.readouterr().err
    assert err.count('note: --amp: this CPU has no hardware bfloat16') == 1, err[-2000:]
    assert dtypes == [False]
    run(tmp_path, 'fp32', '--nEpochs', '1', '--optimizer_type', 'Adam')
    a = torch.load(tmp_path / 'amp' / 'model_last.pth', weights_only=False)
    b = torch.load(tmp_path / 'fp32' / 'model_last.pth', weights_only=False)
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    assert (a['config']['amp'], b['config']['amp']) == ('true', 'false')
    from utils.predictor import Predictor
    p = Predictor(torch.nn.Conv2d(3, 4, 1), HeatmapCodec(8, 8, 1), amp=True)
    assert p.amp_requested and not p.amp
    monkeypatch.setitem(cpu_module._done, 'native_bfloat16', True)
    assert Predictor(torch.nn.Conv2d(3, 4, 1), HeatmapCodec(8, 8, 1), amp=True).amp


@pytest.mark.parametrize('extra', [
    [], ['--LRPolicy', 'cosine', '--warmupEpochs', '0.5', '--amp', '--optimizer_type', 'Adam'],
    pytest.param(['--amp', '--optimizer_type', 'Adam', '--nChannels', '16', '--stemChannels', '32'],
                 marks=pytest.mark.skipif(not (fused.load() and native_bfloat16()), reason=(
                     f'fused kernels not built here ({fused.error()}) or no hardware bfloat16 (--amp trains in '
                     'float32 on such a CPU)')))],
    ids=['step-rmsprop', 'cosine-warmup-bf16-fused-adam', 'bf16-fused-bn-relu'])
def test_resume_equals_uninterrupted_training(tmp_path, monkeypatch, extra):
    calls = []
    if '--nChannels' in extra:      # 16 channels: the BatchNorm-ReLU pairs of 16 run fused
        real = fused.bn_relu
        monkeypatch.setattr(fused, 'bn_relu', lambda bn, x: calls.append(1) or real(bn, x))
    run(tmp_path, 'full', '--nEpochs', '2', *extra)
    assert bool(calls) == ('--nChannels' in extra)
    # the same 2-epoch run, interrupted when the second epoch starts (the cosine schedule
    # depends on nEpochs, so the interrupted run must be the same run)
    train_epoch = trainer_module.Trainer.train_epoch

    def interrupted(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self)
    monkeypatch.setattr(trainer_module.Trainer, 'train_epoch', interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 'part', '--nEpochs', '2', *extra)
    monkeypatch.setattr(trainer_module.Trainer, 'train_epoch', train_epoch)
    run(tmp_path, 'resumed', '--nEpochs', '2', '--loadModel', str(tmp_path / 'part' / 'model_last.pth'), *extra)
    full = torch.load(tmp_path / 'full' / 'model_last.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'model_last.pth', weights_only=True)
    assert full['epoch'] == resumed['epoch'] == 2
    for k, v in full['state_dict'].items():
        assert torch.equal(v, resumed['state_dict'][k]), k
    assert full['best'] == resumed['best']
    # the optimiser's running averages match too
    a, b = full['optimizer']['state'], resumed['optimizer']['state']
    key = 'exp_avg_sq' if '--optimizer_type' in extra else 'square_avg'
    assert a and all(torch.equal(a[i][key], b[i][key]) for i in a)


def test_finetune_loads_weights_alone(tmp_path):
    run(tmp_path, 'base', '--nEpochs', '1')
    run(tmp_path, 'ft', '--nEpochs', '1', '--loadModel', str(tmp_path / 'base' / 'model_last.pth'), '--finetune')
    ckpt = torch.load(tmp_path / 'ft' / 'model_last.pth', weights_only=True)
    assert ckpt['epoch'] == 1  # a new schedule: one epoch trained after loading


def test_test_mode_reproduces_recorded_score_and_writes_predictions(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    best = tmp_path / 'a' / 'model_best.pth'
    recorded = torch.load(best, weights_only=True)['headline']
    result = run(tmp_path, 't', '-test', '--loadModel', str(best))
    assert result['headline'] == pytest.approx(recorded, abs=1e-9)
    saved = json.loads((tmp_path / 't' / 'test_metrics.json').read_text())
    assert saved['headline'] == pytest.approx(recorded, abs=1e-9)
    from datasets.formats import load_pred_mat
    preds = load_pred_mat(str(tmp_path / 't' / 'pred.mat'))
    assert preds.shape == (8, 16, 2)
    flipped = run(tmp_path, 'tf', '-test', '--loadModel', str(best), '--flipTest')
    assert 0 <= flipped['headline'] <= 100


def test_checkpoint_of_another_architecture_is_one_line_error(tmp_path):
    run(tmp_path, 'a', '--nEpochs', '1')
    ckpt = str(tmp_path / 'a' / 'model_last.pth')
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'b', '-test', '--loadModel', ckpt, '--nStack', '3')
    msg = str(e.value)
    assert 'nStack 2 vs 3' in msg and ckpt in msg and '\n' not in msg
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'b', '-test', '--loadModel', ckpt, '--stemChannels', '32')
    assert 'stemChannels 128 vs 32' in str(e.value)
    state = torch.load(ckpt, weights_only=True)
    state['arch']['nJoints'] = 14
    torch.save(state, tmp_path / 'k14.pth')
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'c', '-test', '--loadModel', str(tmp_path / 'k14.pth'))
    assert 'nJoints 14 vs 16' in str(e.value)
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'd', '-test', '--loadModel', str(tmp_path / 'junk.pth'))
    assert 'not a readable checkpoint' in str(e.value)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, 'a', '--nEpochs', '1')
    last = tmp_path / 'a' / 'model_last.pth'
    before = last.read_bytes()
    monkeypatch.setattr(HeatmapCodec, 'loss', lambda self, o, batch: {'heatmap': sum(x.mean() for x in o) * float('nan')})
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'a', '--nEpochs', '2', '--loadModel', str(last))
    assert 'loss is nan at epoch 2' in str(e.value) and str(last) in str(e.value)
    assert last.read_bytes() == before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'model_last.pth')
    checkpoint.save({'x': torch.ones(2)}, path)

    def crash(obj, f):
        f.write(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        checkpoint.save({'x': torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.ones(2))
    assert os.listdir(tmp_path) == ['model_last.pth']      # the temporary file is gone


def test_summary_prints_exact_parameter_count(capsys):
    main_module.main(['--nStack', '2', '--nChannels', '16', '--inputRes', '64', '--outputRes', '16', '-summary'])
    out = capsys.readouterr().out
    from models import build_model
    model = build_model(options.parse(['--nStack', '2', '--nChannels', '16']))
    assert f'parameters: {sum(p.numel() for p in model.parameters())}\n' in out
    assert 'GFLOPs: ' in out and out.count('output ') == 2 and '(1, 16, 16, 16)' in out


def test_joint_count_and_stride_are_checked(tmp_path):
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'x', '--nJoints', '17', '--nEpochs', '1')
    assert '--nJoints 17 does not match dataset Synthetic (16 joints)' in str(e.value)
    with pytest.raises(PoseError) as e:
        run(tmp_path, 'x', '--outputRes', '16', '--nEpochs', '1')
    assert 'outputRes must be inputRes/4 = 8' in str(e.value)


def test_loader_workers_survive_several_epochs_with_drawing(tmp_path):
    # regression: OpenCV used in the main process (vis.png) once deadlocked the next epoch's
    # forked loader worker; a hang here would stop the run at the start of epoch 2
    import subprocess
    import sys
    from conftest import ROOT
    args = TINY + ['--expDir', str(tmp_path), '--expID', 'w', '--nThreads', '1', '--nEpochs', '3', '--visCount', '2']
    r = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert (tmp_path / 'w' / 'log.txt').read_text().count('| val') == 3


def test_learning_rate_policies():
    lr_at = trainer_module.lr_at
    step = options.parse(['--LR', '0.1', '--LRSteps', '2,3', '--dropMag', '0.5', '--nEpochs', '4'])
    assert [lr_at(step, e, 0.9) for e in range(4)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    cos = options.parse(['--LR', '0.1', '--LRPolicy', 'cosine', '--nEpochs', '4'])
    # a half cosine over the whole run, evaluated at every iteration
    assert lr_at(cos, 0) == pytest.approx(0.1)
    assert lr_at(cos, 1, 0.0) == pytest.approx(0.05 * (1 + 2 ** -0.5))
    assert lr_at(cos, 2, 0.0) == pytest.approx(0.05)
    assert lr_at(cos, 3, 0.5) == pytest.approx(0.05 * (1 + math.cos(math.pi * 3.5 / 4)))
    warm = options.parse(['--LR', '0.1', '--LRPolicy', 'cosine', '--nEpochs', '4', '--warmupEpochs', '0.5'])
    assert lr_at(warm, 0, 0.0) == 0.0
    assert lr_at(warm, 0, 0.25) == pytest.approx(0.5 * lr_at(cos, 0, 0.25))
    assert lr_at(warm, 0, 0.5) == pytest.approx(lr_at(cos, 0, 0.5))
