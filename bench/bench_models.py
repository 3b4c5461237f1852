"""Train every registered model briefly on the synthetic data on the CPU and print one table:
model, parameters, train images/s, eval images/s, PCKh@0.5 after a fixed budget.

Every model sees the same budget (``--samples`` training images, the same seed, input and
validation people), in a reduced width that fits a laptop CPU; the numbers compare speed and early
learning under one trainer, not the papers' final accuracies.

    python bench/bench_models.py [--samples 3000] [--val 300] [--inputRes 64] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import opts as options  # noqa: E402
from datasets import build_dataset  # noqa: E402
from datasets.codecs import build_codec  # noqa: E402
from models import available, build_model, count_parameters  # noqa: E402
from utils.trainer import Trainer  # noqa: E402

# Reduced widths: the same family shape as each paper's model, small enough for a CPU.
SETTINGS = {
    'StackedHourGlass': ['--nStack', '2', '--nChannels', '64', '--nReductions', '3'],
    'PyraNet': ['--nStack', '2', '--nChannels', '64', '--nReductions', '3', '--baseWidth', '6', '--cardinality', '4'],
    'PoseAttention': ['--nStack', '2', '--nChannels', '64', '--nReductions', '3', '--LRNSize', '3', '--IterSize', '3'],
    'SoftGatedHourglass': ['--nStack', '2', '--nChannels', '64', '--nReductions', '3'],
    'SimpleBaseline': ['--baseName', 'resnet18', '--optimizer_type', 'Adam'],
    'DeepPose': ['--baseName', 'resnet18', '--nStages', '2', '--optimizer_type', 'Adam'],
    'ChainedPredictions': ['--modelName', 'resnet18', '--ohKernel', '3', '--hhKernel', '3'],
}


def bench_one(name, args, exp_dir):
    res = args.inputRes
    argv = ['--dataset', 'Synthetic', '--model', name, '--inputRes', str(res), '--outputRes', str(res // 4),
            '--hmGauss', '1', '--nTrainSamples', str(args.samples), '--nValSamples', str(args.val),
            '--nEpochs', '1', '--data_loader_size', '16', '--nThreads', '1', '--LR', '1e-3',
            '--progress', 'false', '--visCount', '0', '--expDir', exp_dir, '--expID', name] + SETTINGS.get(name, [])
    opts = options.parse(argv)
    torch.manual_seed(opts.seed)
    model = build_model(opts)
    codec = build_codec(opts, model)
    train_set = build_dataset(opts, 'train', codec)
    val_set = build_dataset(opts, 'val', codec)
    os.makedirs(os.path.join(exp_dir, name), exist_ok=True)
    trainer = Trainer(opts, model, codec, train_set, val_set, os.path.join(exp_dir, name))
    stats = trainer.train_epoch()
    start = time.time()
    result = trainer.evaluate()
    eval_ips = len(val_set) / (time.time() - start)
    params = count_parameters(model)
    return dict(model=name, params=params, train_ips=stats['images_per_s'], eval_ips=eval_ips,
                pckh=result['headline'])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--samples', type=int, default=3000, help='training images per model (the fixed budget)')
    p.add_argument('--val', type=int, default=300, help='validation people')
    p.add_argument('--inputRes', type=int, default=64)
    p.add_argument('--threads', type=int, default=2, help='torch threads')
    p.add_argument('--models', nargs='*', default=None, help='subset of registry names')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or available()
    rows = []
    with tempfile.TemporaryDirectory() as exp_dir:
        for name in names:
            rows.append(bench_one(name, args, exp_dir))
            r = rows[-1]
            print(f'  {name}: {r["train_ips"]:.1f} train img/s, {r["eval_ips"]:.1f} eval img/s, PCKh {r["pckh"]:.1f}',
                  file=sys.stderr, flush=True)
    ref = next((r for r in rows if r['model'] == 'StackedHourGlass'), rows[0])
    print(f'Synthetic, {args.inputRes}x{args.inputRes} input, {args.samples} training images per model, '
          f'{args.val} validation people, CPU with {args.threads} threads')
    print(f'| model | parameters | train img/s | eval img/s | train speed vs {ref["model"]} | PCKh@0.5 |')
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for r in rows:
        print(f'| {r["model"]} | {r["params"]:,} | {r["train_ips"]:.1f} | {r["eval_ips"]:.1f} | '
              f'{r["train_ips"] / ref["train_ips"]:.2f}x | {r["pckh"]:.1f} |')


if __name__ == '__main__':
    main()
