"""How close a training step on the CPU comes to the machine's limit.

    python bench/bench_train.py [--case paper|quickstart|all] [--rounds 5] [--steps 6] [trainer options]

For each case, in alternating rounds:

* the matrix-multiply throughput of the case's dtype (a 2048 x 2048 x 2048 ``torch.mm``), the
  machine's limit for dense compute on these threads;
* ours: the trainer's training step (forward under the run's autocast, the codec's loss,
  backward, the optimiser's step, ``zero_grad``) on the registered model, with the trainer's
  memory layout and optimiser; no data loading (one fixed batch);
* a straightforward implementation of the same network, written here: the same layers and
  parameter count in NCHW, PyTorch's default optimiser implementation, the loss written out, in
  a process of its own with PyTorch's defaults (its rounds run while this process waits);

and prints images/s, the forward+backward FLOPs per image (PyTorch's FLOP counter, ``torch.utils.
flop_counter``: convolutions and matrix multiplies), the achieved FLOP/s as a share of the
matmul throughput, and the ratio ours / straightforward.

Cases: ``paper``: the paper-shaped hourglass (2 stacks x 256 features, 128 px input, batch 8,
RMSprop, float32); ``quickstart``: the README's quick-start model as it trains
(conf/models/hourglass_quick.defconf: 2 stacks x 96 with 2 reductions, stem 32, 128 px, batch
16, Adam, bfloat16 autocast; skipped, with the reason, on a CPU without hardware bfloat16, where
PyTorch emulates it and the trainer runs ``--amp`` in float32).

As the trainer does, ours trains its bfloat16 BatchNorm-ReLU pairs, residual sums, 2x2
max-poolings and 1x1 and 3x3 convolutions through the C++ kernels (``--fusedBNReLU``,
models/fused.py; the same step with them off is measured too), steps Adam over one flat buffer
(utils/optim.py, as single-process CPU training does) and keeps freed memory in its heap
(``--keepFreedMemory``, utils/cpu.py: a setting of the process, which is why the baseline runs in
another one). On an AVX2 CPU (no AVX-512) its float32 BatchNorm-ReLU pairs and max-poolings run
through the kernels too (models.fused.DTYPES). Trainer options after the bench's own switch those off (``--fusedBNReLU false
--keepFreedMemory false``). The FLOPs are counted with the C++ kernels off (PyTorch's counter
does not see inside them; the network and its FLOPs are the same).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models  # noqa: E402
from models import fused  # noqa: E402
import opts as options  # noqa: E402
from datasets.codecs import build_codec  # noqa: E402
from utils.cpu import cache_cpu_memory, keep_freed_memory, native_bfloat16  # noqa: E402
from utils.trainer import build_optimizer, total_loss  # noqa: E402

CASES = {
    'paper': ['--model', 'StackedHourGlass', '--nStack', '2', '--nChannels', '256', '--nModules', '1',
              '--nReductions', '4', '--inputRes', '128', '--outputRes', '32', '--data_loader_size', '8',
              '--optimizer_type', 'RMSprop', '--LR', '2.5e-4', '--amp', 'false'],
    'quickstart': ['-ModelConfig', os.path.join(ROOT, 'conf', 'models', 'hourglass_quick.defconf')],
}


# ----------------------------------------------------------------------------- the baseline

class PlainResidual(nn.Module):
    """Pre-activation bottleneck, each operation its own module, NCHW."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(mid), nn.Conv2d(mid, mid, 3, padding=1)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), nn.Conv2d(mid, cout, 1)
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        return y + (x if self.proj is None else self.proj(x))


class PlainHourglass(nn.Module):
    def __init__(self, depth, c):
        super().__init__()
        self.up, self.low1, self.low3 = PlainResidual(c, c), PlainResidual(c, c), PlainResidual(c, c)
        self.low2 = PlainHourglass(depth - 1, c) if depth > 1 else PlainResidual(c, c)

    def forward(self, x):
        low = self.low3(self.low2(self.low1(F.max_pool2d(x, 2))))
        return self.up(x) + F.interpolate(low, scale_factor=2, mode='nearest')


class PlainStackedHourglass(nn.Module):
    """Newell et al.'s network as a first implementation would write it."""

    def __init__(self, joints, stacks, c, depth, stem):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, stem // 2, 7, 2, 3), nn.BatchNorm2d(stem // 2)
        self.r1, self.r2, self.r3 = PlainResidual(stem // 2, stem), PlainResidual(stem, stem), PlainResidual(stem, c)
        self.hgs = nn.ModuleList(PlainHourglass(depth, c) for _ in range(stacks))
        self.res = nn.ModuleList(PlainResidual(c, c) for _ in range(stacks))
        self.lin = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(stacks))
        self.lin_bn = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(stacks))
        self.score = nn.ModuleList(nn.Conv2d(c, joints, 1) for _ in range(stacks))
        self.back_f = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(stacks - 1))
        self.back_h = nn.ModuleList(nn.Conv2d(joints, c, 1) for _ in range(stacks - 1))

    def forward(self, x):
        x = self.r3(self.r2(F.max_pool2d(self.r1(F.relu(self.bn(self.conv(x)))), 2)))
        out = []
        for i, hg in enumerate(self.hgs):
            f = F.relu(self.lin_bn[i](self.lin[i](self.res[i](hg(x)))))
            h = self.score[i](f)
            out.append(h)
            if i + 1 < len(self.hgs):
                x = x + self.back_f[i](f) + self.back_h[i](h)
        return out


def plain_optimizer(opts, params):
    """PyTorch's default implementation of the run's optimiser (the per-parameter loop on the CPU)."""
    if opts.optimizer_type == 'RMSprop':
        return torch.optim.RMSprop(params, lr=opts.LR, alpha=0.99, eps=1e-8)
    if opts.optimizer_type == 'Adam':
        return torch.optim.Adam(params, lr=opts.LR)
    return torch.optim.SGD(params, lr=opts.LR, momentum=opts.momentum)


# ----------------------------------------------------------------------------- measuring

def matmul_rate(dtype, n=2048, reps=8):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def make_step(model, optimizer, loss_fn, images, amp_dtype):
    def step():
        with torch.autocast('cpu', dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(images)
        loss = loss_fn([o.float() for o in out])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def unfused(step):
    def run():
        fused.set_enabled(False)
        try:
            return step()
        finally:
            fused.set_enabled(True)
    return run


def step_rate(step, batch, steps):
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def flops_per_image(model, images, amp_dtype, loss_fn):
    with FlopCounterMode(display=False) as counter:
        with torch.autocast('cpu', dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(images)
        loss_fn([o.float() for o in out]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def setup(name, extra):
    """The case's options, a fixed batch (images NCHW, heatmap targets) and the autocast dtype."""
    opts = options.parse(CASES[name] + extra)
    b, (w, h), (ow, oh) = opts.data_loader_size, opts.inputRes.wh, opts.outputRes.wh
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, h, w, generator=g)
    batch = {'heatmap': torch.rand(b, opts.nJoints, oh, ow, generator=g), 'heatmap_weight': torch.ones(b, opts.nJoints)}
    return opts, images, batch, (torch.bfloat16 if opts.amp else None)


def baseline_worker(name, extra):
    """The straightforward side, in its own process with PyTorch's defaults: one line per round."""
    opts, images, batch, amp_dtype = setup(name, extra)
    torch.manual_seed(0)
    plain = PlainStackedHourglass(opts.nJoints, opts.nStack, opts.nChannels, opts.nReductions, opts.stemChannels).train()

    def plain_loss(out):
        return sum(((o - batch['heatmap']) ** 2).mean() for o in out)

    flops = flops_per_image(plain, images, amp_dtype, plain_loss)
    step = make_step(plain, plain_optimizer(opts, plain.parameters()), plain_loss, images, amp_dtype)
    print(f'ready {models.count_parameters(plain)} {flops}', flush=True)
    for line in sys.stdin:
        if not line.startswith('round'):
            break
        print(step_rate(step, images.shape[0], int(line.split()[1])), flush=True)


class Baseline:
    """The worker process of ``baseline_worker``; ``round(steps)`` runs one round there while
    this process waits (the two never compute at the same time)."""

    def __init__(self, name, extra):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--baseline-worker', name, *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != 'ready':
            raise SystemExit(f'the baseline process for {name} did not start (exit code {self.proc.poll()})')
        self.params, self.flops = int(ready[1]), float(ready[2])

    def round(self, steps):
        self.proc.stdin.write(f'round {steps}\n')
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.write('quit\n')
        self.proc.stdin.close()
        self.proc.wait()


def run_case(name, args):
    opts, images, batch, amp_dtype = setup(name, args.extra)
    if amp_dtype == torch.bfloat16 and not native_bfloat16():
        # PyTorch emulates bfloat16 there: the 2048^3 matmul alone ran for more than 20 minutes on
        # such a machine, and the trainer runs float32 (utils/trainer.py)
        print(f'{name}: skipped: this CPU has no hardware bfloat16 (AVX-512 or AMX), where the trainer runs '
              f'--amp in float32 and a bfloat16 matmul is emulated; the paper case measures float32', flush=True)
        return
    keep = opts.keepFreedMemory and keep_freed_memory()      # as the trainer does; this process only
    fused.set_enabled(opts.fusedBNReLU)
    with_fused = opts.fusedBNReLU and opts.channelsLast and fused.load()
    # the trainer's caching allocator where it runs the kernels (bfloat16 autocast); undone below
    cached = keep and with_fused and (amp_dtype or torch.float32) in fused.DTYPES and cache_cpu_memory()
    torch.manual_seed(0)
    ours = models.build_model(opts)
    codec = build_codec(opts, ours)
    n_ours = models.count_parameters(ours)
    dtype = amp_dtype or torch.float32
    b, (w, h) = opts.data_loader_size, opts.inputRes.wh

    def our_loss(out):
        return total_loss(codec.loss(out, batch))

    fmt = torch.channels_last if opts.channelsLast else torch.contiguous_format
    ours = ours.to(memory_format=fmt).train()
    our_images = images.contiguous(memory_format=fmt)
    flops = unfused(lambda: flops_per_image(ours, our_images, amp_dtype, our_loss))()
    our_step = make_step(ours, build_optimizer(opts, ours.parameters(), flat=True), our_loss, our_images, amp_dtype)
    steps = {'ours': our_step}
    # the same step with the modules unfused: what the kernels gain, in this run (where they run
    # this dtype: bfloat16, and float32 on AVX2)
    with_fused = with_fused and (amp_dtype or torch.float32) in fused.DTYPES
    if with_fused:
        steps['unfused'] = unfused(our_step)
    baseline = Baseline(name, args.extra)
    if baseline.params != n_ours:
        raise SystemExit(f'baseline has {baseline.params} parameters, ours {n_ours}: not the same network')
    rates = {'matmul': [], 'plain': [], **{k: [] for k in steps}}
    try:
        for _ in range(args.rounds):
            rates['matmul'].append(matmul_rate(dtype))
            for key, step in steps.items():
                rates[key].append(step_rate(step, b, args.steps))
            rates['plain'].append(baseline.round(args.steps))
    finally:
        baseline.close()
        if cached:
            cache_cpu_memory(0)
    med = {k: statistics.median(v) for k, v in rates.items()}
    dname = str(dtype).replace('torch.', '')
    print(f'{name}: {opts.model} {opts.nStack} stacks x {opts.nChannels}, {opts.nReductions} reductions, '
          f'stem {opts.stemChannels}, input {h}x{w}, '
          f'batch {b}, {opts.optimizer_type}, {dname}{" autocast" if amp_dtype else ""}, {n_ours:,} parameters, '
          f'{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps')
    print(f'  ours: C++ kernels {"on" if with_fused else "off"}, keep freed memory {("on, caching allocator" if cached else "on") if keep else "off"}; '
          f'the straightforward one in its own process with PyTorch\'s defaults')
    print(f'  matmul 2048^3 {dname:9s}        {med["matmul"] / 1e9:8.1f} GFLOP/s')
    print(f'  forward+backward FLOPs per image {flops / 1e9:8.3f} GFLOP (the baseline: {baseline.flops / 1e9:.3f})')
    lines = [('ours', 'ours (the trainer\'s step)'), ('plain', 'straightforward NCHW')]
    if with_fused:
        lines.insert(1, ('unfused', 'ours, C++ kernels off'))
    for key, label in lines:
        achieved = med[key] * flops
        print(f'  {label:30s} {med[key]:7.1f} img/s  {achieved / 1e9:7.1f} GFLOP/s  '
              f'{100 * achieved / med["matmul"]:5.1f} % of matmul  (rounds: {", ".join(f"{x:.1f}" for x in rates[key])})')
    print(f'  ratio ours / straightforward   {med["ours"] / med["plain"]:7.2f}x')
    if with_fused:
        paired = statistics.median(x / y for x, y in zip(rates['ours'], rates['unfused']))
        print(f'  ratio kernels on / off         {paired:7.2f}x (median of the rounds\' ratios)')
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--case', choices=sorted(CASES) + ['all'], default='all')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=6, help='training steps per round and side')
    p.add_argument('--baseline-worker', default=None, help=argparse.SUPPRESS)
    args, extra = p.parse_known_args(argv)
    args.extra = extra      # trainer options (--fusedBNReLU false, --keepFreedMemory false, ...)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker, extra)
    for name in (sorted(CASES) if args.case == 'all' else [args.case]):
        run_case(name, args)


if __name__ == '__main__':
    main()
