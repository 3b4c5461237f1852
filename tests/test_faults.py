"""Faults and bad input lose nothing and never show a traceback: runs killed at any step resume to
exactly the weights of an uninterrupted run, SIGTERM writes a resumable checkpoint, a full disk
stops the run naming the file, corrupt images are reported, impossible options are refused."""
import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main as main_module
import opts as options
from conftest import ROOT
from utils import io as io_module
from utils.errors import ConfigError, DatasetError, PoseError, StorageError, TrainingError
from test_main import TINY

# 30 samples in batches of 4: 8 steps per epoch (the last one of 2 samples)
RESUMABLE = TINY + ['--nTrainSamples', '30', '--data_loader_size', '4', '--nEpochs', '5', '--saveEvery', '1',
                    '--optimizer_type', 'Adam', '--LRPolicy', 'cosine', '--warmupEpochs', '0.5', '--visCount', '0']


def steps_done(path):
    """(epoch, iteration) of the newest checkpoint, or None while there is none."""
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 -- never half-written (atomic), but be safe while polling
        return None
    return int(ckpt['epoch']) * 8 + int((ckpt.get('position') or {}).get('iteration', 0))   # 8 steps an epoch


def start(tmp_path, exp_id, *extra):
    args = RESUMABLE + ['--expDir', str(tmp_path), '--expID', exp_id, '--loadModel', 'auto', *extra]
    return subprocess.Popen([sys.executable, 'main.py', *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_until(proc, path, step, timeout=120):
    """True once the run's checkpoint has reached ``step``; False if the run finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read()
            assert proc.returncode == 0, f'the run failed ({proc.returncode}): {err[-1500:]}'
            return False
        done = steps_done(path)
        if done is not None and done >= step:
            return True
        time.sleep(0.02)
    raise AssertionError('the run made no progress')


def same_weights(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a['epoch'] == b['epoch']
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    for i, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg'], b['optimizer']['state'][i]['exp_avg'])
    assert [h['train_loss'] for h in a['history']] == [h['train_loss'] for h in b['history']]
    assert a['best'] == b['best']


def test_sigkill_at_random_steps_and_sigterm_then_auto_resume_give_the_uninterrupted_weights(tmp_path):
    """40 steps (5 epochs of 8); the run is stopped by SIGTERM once, then killed (SIGKILL: no
    chance to save anything) three times a few random steps further on each time, mid-epoch and
    across epoch ends, and re-submitted with the same command line each time."""
    full = start(tmp_path, 'full')           # a process of its own, as the interrupted ones (the same threads)
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]
    last = str(tmp_path / 'cut' / 'model_last.pth')
    rng = random.Random(7)
    # SIGTERM (what schedulers send before preemption): a checkpoint at the current step, one line
    proc = start(tmp_path, 'cut')
    assert wait_until(proc, last, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith('error: stopped by SIGTERM in epoch') and '--loadModel auto' in lines[0]
    killed = []
    for _ in range(3):
        proc = start(tmp_path, 'cut')
        if wait_until(proc, last, steps_done(last) + rng.randint(2, 7)):
            proc.kill()
            killed.append(steps_done(last))
        proc.wait()
    assert len(killed) >= 2 and killed[-1] < 40, killed
    proc = start(tmp_path, 'cut')                                    # the same command, re-submitted
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    same_weights(tmp_path / 'full' / 'model_last.pth', last)
    assert 'resumed from' in (tmp_path / 'cut' / 'log.txt').read_text()


def test_auto_starts_fresh_when_there_is_nothing_to_resume(tmp_path):
    main_module.main(TINY + ['--expDir', str(tmp_path), '--expID', 'new', '--loadModel', 'auto', '--nEpochs', '1'])
    assert torch.load(tmp_path / 'new' / 'model_last.pth', weights_only=True)['epoch'] == 1


def disk_full(monkeypatch, fail_at):
    """os.fsync fails with ENOSPC at its ``fail_at``-th call (counted from 0): a full disk at the
    flush of that write. Returns the list of the paths that were being written."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f'/proc/self/fd/{fd}'))
        if len(calls) - 1 == fail_at:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd)
    monkeypatch.setattr(io_module.os, 'fsync', fsync)
    return calls


def test_a_full_disk_at_any_write_stops_the_run_in_one_line_and_keeps_every_previous_file(tmp_path, monkeypatch):
    args = TINY + ['--nEpochs', '2', '--expDir', str(tmp_path)]
    calls = disk_full(monkeypatch, fail_at=-1)                        # count the writes of a whole run
    main_module.main(args + ['--expID', 'count'])
    writes = [os.path.basename(p).split('.tmp')[0] for p in calls]
    assert {'config.defconf', 'log.txt', 'metrics.json', 'model_last.pth', 'model_best.pth', 'vis.png'} <= set(writes)
    for k, name in enumerate(writes):
        folder = tmp_path / f'fail{k}'
        disk_full(monkeypatch, fail_at=k)
        with pytest.raises(StorageError) as e:
            main_module.main(args + ['--expID', f'fail{k}'])
        msg = str(e.value)
        assert msg.startswith(f'cannot write {folder / name}: No space left on device') and '\n' not in msg
        assert not glob.glob(str(folder / '*.tmp*'))                 # the temporary file is gone
        monkeypatch.setattr(io_module.os, 'fsync', os.fsync)
        for p in folder.iterdir():               # every file written before, or its previous version, is whole
            if p.suffix == '.pth':
                torch.load(p, weights_only=True)
            elif p.suffix == '.json':
                json.loads(p.read_text())
            elif p.name == 'log.txt':
                assert p.read_text().endswith('\n')


def test_expdir_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(PoseError) as e:
        main_module.main(TINY + ['--expDir', str(tmp_path / 'file'), '--expID', 'a', '--nEpochs', '1'])
    assert 'file' in str(e.value) and '\n' not in str(e.value)


# ----------------------------------------------------------------------------- bad images

def mpii_with(tmp_path, damage):
    """The MPII fixture layout with its first image damaged by ``damage(bytes) -> bytes``."""
    import shutil
    from conftest import fixture_path
    from test_contract import mpii_layout
    entries = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    root = mpii_layout(tmp_path, entries, entries, broken_image=entries[0]['image'])
    data = open(fixture_path('mpii', 'images', entries[0]['image']), 'rb').read()
    (root / 'images' / entries[0]['image']).write_bytes(damage(data))
    return root, entries


MPII_ARGS = ['--dataset', 'MPII', '--nJoints', '16', '--inputRes', '32', '--outputRes', '8', '--hmGauss', '1',
             '--nStack', '1', '--nChannels', '8', '--nReductions', '1', '--data_loader_size', '2', '--nThreads', '0',
             '--progress', 'false', '--visCount', '0', '--nEpochs', '1']


def test_a_truncated_jpeg_is_named_in_evaluation_and_skipped_in_training(tmp_path, capsys):
    root, entries = mpii_with(tmp_path, lambda data: data[:len(data) // 2])
    bad = str(root / 'images' / entries[0]['image'])
    from datasets.base import read_image
    with pytest.raises(DatasetError) as e:
        read_image(bad)
    assert str(e.value) == f'truncated image: {bad} (the JPEG ends before its end-of-image marker)'
    # training skips it with a warning naming it; evaluating it is an error naming it
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_ARGS + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'a'])
    assert f'truncated image: {bad}' in str(e.value)
    err = capsys.readouterr().err
    assert err.count('warning: skipped a training sample: truncated image') == 1
    # --checkData lists it, before any training
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_ARGS + ['--dataDir', str(root), '--checkData'])
    out = capsys.readouterr().out
    assert f'truncated image: {bad}' in out and '2 of ' in str(e.value)      # train and val list it


def test_more_than_one_percent_unreadable_training_images_stops_the_run(tmp_path):
    root, entries = mpii_with(tmp_path, lambda data: b'')
    # 2 of 5 training images broken (the same image twice in the list): more than 1 % of 10
    many = entries * 2
    (root / 'annot' / 'train.json').write_text(json.dumps(many))
    with pytest.raises(DatasetError) as e:
        main_module.main(MPII_ARGS + ['--dataDir', str(root), '--expDir', str(tmp_path), '--expID', 'b'])
    assert 'training images could not be read, more than 1 %' in str(e.value)


# ----------------------------------------------------------------------------- options

def test_impossible_options_are_refused_before_any_work(tmp_path):
    from models import build_model
    with pytest.raises(ConfigError) as e:
        build_model(options.parse(['--inputRes', '16', '--outputRes', '4']))
    assert 'is too small for StackedHourGlass' in str(e.value)
    with pytest.raises(ConfigError) as e:
        main_module.main(TINY + ['--hmGauss', '1e9', '--expDir', str(tmp_path), '--expID', 'g', '--nEpochs', '1'])
    assert str(e.value).startswith('--hmGauss 1e+09: a Gaussian of this sigma does not fit the 8x8 heatmap')
    assert not (tmp_path / 'g' / 'log.txt').exists()
    with pytest.raises(ConfigError):
        main_module.main(TINY + ['--dataset', 'Synthetc', '--expDir', str(tmp_path), '--expID', 'h'])
    # names match case-insensitively
    result = main_module.main(TINY + ['--dataset', 'synthetic', '--model', 'stackedhourglass', '--nEpochs', '1',
                                      '--expDir', str(tmp_path), '--expID', 'i'])
    assert result['headline'] >= 0


def test_a_last_batch_of_one_sample_is_dropped(tmp_path):
    from utils.trainer import steps_per_epoch
    o = options.parse(TINY + ['--nTrainSamples', '25', '--data_loader_size', '8'])
    assert steps_per_epoch(o, 25) == 3 and steps_per_epoch(o, 26) == 4
    # at 64 px the deepest hourglass level is 1x1: a batch of one would crash BatchNorm
    main_module.main(TINY + ['--nTrainSamples', '17', '--data_loader_size', '8', '--inputRes', '64', '--outputRes', '16',
                             '--nReductions', '4', '--nEpochs', '1', '--expDir', str(tmp_path), '--expID', 'one'])


def test_warmup_epoch_logs_its_learning_rate_and_changed_schedule_is_named(tmp_path, capsys):
    warm = TINY + ['--LRPolicy', 'cosine', '--warmupEpochs', '1', '--nEpochs', '2', '--expDir', str(tmp_path)]
    main_module.main(warm + ['--expID', 'w', '--nEpochs', '1'])
    history = json.load(open(tmp_path / 'w' / 'metrics.json'))
    assert history[0]['lr'] > 0 and 'lr 0,' not in (tmp_path / 'w' / 'log.txt').read_text()
    capsys.readouterr()
    main_module.main(['--loadModel', str(tmp_path / 'w' / 'model_last.pth'), '--nEpochs', '3'])
    err = capsys.readouterr().err
    assert 'warning: resuming with another schedule (--nEpochs 1 -> 3)' in err
