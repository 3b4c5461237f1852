"""torchrun on the CPU (gloo, 2 processes): training, sharded evaluation equal to one process's,
rank 0 alone writing, resuming, a rank that dies, a restart, and two nodes simulated on one
machine."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from datasets.formats import load_pred_mat
from test_main import TINY

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, extra=(), timeout=240):
    cmd = TORCHRUN + ['--standalone', '--nproc_per_node', str(nproc), *extra, 'main.py', *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def ours(stderr):
    """stderr lines of the workers (not the launcher's log lines or report)."""
    return [l for l in stderr.splitlines() if l.startswith(('error:', 'warning:'))]


def test_two_processes_train_rank_0_alone_writes_and_evaluation_equals_one_process(tmp_path):
    args = TINY + ['--nValSamples', '10', '--data_loader_size', '4', '--expDir', str(tmp_path)]
    r = torchrun(*args, '--expID', 'ddp', '--nEpochs', '2')
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / 'ddp'
    log = (folder / 'log.txt').read_text()
    assert log.count('epoch 1:') == 1 and log.count('epoch 2:') == 1                 # one writer
    assert not list(folder.glob('*.tmp*')) and (folder / 'model_best.pth').is_file()
    ckpt = torch.load(folder / 'model_last.pth', weights_only=True)
    assert ckpt['epoch'] == 2 and len(ckpt['history']) == 2
    # -test sharded over 2 ranks (batches 0, 2, ... and 1, 3, ...) == one process, exactly
    best = str(folder / 'model_best.pth')
    r = torchrun(*args, '-test', '--loadModel', best, '--expID', 'sharded')
    assert r.returncode == 0, r.stderr[-3000:]
    single = subprocess.run([sys.executable, 'main.py', *args, '-test', '--loadModel', best, '--expID', 'single'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_pred_mat(str(tmp_path / 'sharded' / 'pred.mat')), load_pred_mat(str(tmp_path / 'single' / 'pred.mat'))
    assert a.shape == (10, 16, 2) and np.array_equal(a, b)
    # the sharded evaluation during training scored rank 0's weights and BatchNorm statistics
    during = max(r['val_headline'] for r in json.loads((folder / 'metrics.json').read_text()))
    assert during == json.loads((tmp_path / 'single' / 'test_metrics.json').read_text())['headline']
    # resuming under DDP: the same command re-submitted with --loadModel auto goes on
    r = torchrun(*args, '--expID', 'ddp', '--nEpochs', '3', '--loadModel', 'auto')
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(folder / 'model_last.pth', weights_only=True)['epoch'] == 3
    assert 'resumed from' in (folder / 'log.txt').read_text()


def worker(exp_id, rank):
    """pid of the main.py worker of the run ``exp_id`` whose global RANK is ``rank``."""
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace').split('\0')
            env = open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace').split('\0')
        except OSError:
            continue
        if ('main.py' in cmd and 'torch.distributed.run' not in cmd and f'RANK={rank}' in env
                and any(a == '--expID' and b == exp_id for a, b in zip(cmd, cmd[1:]))):
            return int(pid)
    return None


def long_run(tmp_path, exp_id):
    return TINY + ['--nTrainSamples', '2000', '--data_loader_size', '4', '--nEpochs', '2', '--saveEvery', '5',
                   '--visCount', '0', '--expDir', str(tmp_path), '--expID', exp_id, '--loadModel', 'auto']


def kill_rank_1_after_first_checkpoint(tmp_path, exp_id, procs):
    """SIGKILL the worker of global rank 1 once the run has saved a checkpoint; the time it was killed."""
    last = tmp_path / exp_id / 'model_last.pth'
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    time.sleep(0.5)
    pid = worker(exp_id, 1)
    assert pid is not None and all(p.poll() is None for p in procs)
    os.kill(pid, signal.SIGKILL)
    return time.time()


def launch_and_kill_rank_1(tmp_path, exp_id, restarts):
    """A long enough run on one node; rank 1 SIGKILLed once its first checkpoints exist."""
    cmd = TORCHRUN + ['--standalone', '--nproc_per_node', '2', '--max-restarts', str(restarts), 'main.py',
                      *long_run(tmp_path, exp_id)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    killed = kill_rank_1_after_first_checkpoint(tmp_path, exp_id, [proc])
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err, time.time() - killed


def test_a_dead_rank_stops_the_others_in_bounded_time_with_one_line_and_a_restart_finishes(tmp_path):
    code, out, err, seconds = launch_and_kill_rank_1(tmp_path, 'dead', restarts=0)
    assert code != 0 and seconds < 60, (seconds, err[-2000:])
    lines = ours(err)
    assert len(lines) == 1 and lines[0].startswith('error: rank 0: rank 1 of 2 stopped'), err[-3000:]
    assert '[rank0]:' not in err                                  # no traceback from our processes
    # torchrun --max-restarts 1 with --loadModel auto: the restarted ranks resume and finish
    code, out, err, _ = launch_and_kill_rank_1(tmp_path, 'restart', restarts=1)
    assert code == 0, err[-3000:]
    ckpt = torch.load(tmp_path / 'restart' / 'model_last.pth', weights_only=True)
    assert ckpt['epoch'] == 2 and 'resumed from' in (tmp_path / 'restart' / 'log.txt').read_text()


def test_two_nodes_simulated_on_one_machine_and_a_restart_across_nodes(tmp_path):
    """Two torchrun agents (one process each) meeting at 127.0.0.1: they train together; the worker
    of node 1 is killed, both agents restart their workers (--max-restarts 1), which resume from
    the last checkpoint and finish."""
    port = free_port()
    nodes = [subprocess.Popen(TORCHRUN + ['--nnodes', '2', '--node_rank', str(rank), '--nproc_per_node', '1',
                                          '--max-restarts', '1', '--master_addr', '127.0.0.1',
                                          '--master_port', str(port), 'main.py', *long_run(tmp_path, 'nodes')],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    kill_rank_1_after_first_checkpoint(tmp_path, 'nodes', nodes)
    results = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [r[1][-2000:] for r in results]
    log = (tmp_path / 'nodes' / 'log.txt').read_text()
    assert log.count('epoch 2:') == 1 and 'resumed from' in log
    assert torch.load(tmp_path / 'nodes' / 'model_last.pth', weights_only=True)['epoch'] == 2


def test_sync_batchnorm_on_the_cpu_is_one_line(tmp_path):
    r = torchrun(*TINY, '--syncBN', '--nEpochs', '1', '--expDir', str(tmp_path), '--expID', 'sbn')
    assert r.returncode != 0
    assert set(ours(r.stderr)) == {"error: --syncBN needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only (on the "
                                   "CPU each rank keeps its own BatchNorm statistics: drop --syncBN)"}


def test_close_ends_the_heartbeat_before_leaving():
    """``Dist.close`` waits for the heartbeat thread, even one inside a slow store call: a store
    call still running while the process exits aborted it now and then ('terminate called
    without an active exception')."""
    import threading
    from utils import distributed

    class SlowStore:
        def __init__(self):
            self.calls, self.inside = 0, threading.Event()

        def set(self, key, value):
            self.calls += 1
            self.inside.set()
            time.sleep(0.5)

    store = SlowStore()
    d = distributed.Dist(0, 1, store)
    d.start_beat()
    assert store.inside.wait(5)
    started = time.time()
    d.close()
    assert not d.beat.is_alive() and store.calls == 1
    assert time.time() - started >= 0.3         # it waited for the store call to return
