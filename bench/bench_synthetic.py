"""Speed of the Synthetic dataset on one core: rendering alone, and a whole training sample.

    python bench/bench_synthetic.py [--n 400] [--res 256]

Prints samples per CPU second (one thread, so per core) for ``Synthetic.load_image`` alone and for ``PoseDataset.__getitem__``
(reader + pipeline + HeatmapCodec(128, 32, 1.0)) with one torch and one OpenCV thread, and the
ratio between the two (the share of a sample's time spent rendering), both rendering every
time (``--syntheticCacheMB 0``); then a whole sample from the second epoch on, its image rendered
in the first and kept (the default cache).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import torch  # noqa: E402

import opts as options  # noqa: E402
from datasets import build_dataset  # noqa: E402
from datasets.codecs import HeatmapCodec  # noqa: E402


def rate(fn, n):
    """Samples per CPU second of this process (one thread: per core, even on a busy machine)."""
    fn(0)  # warm up
    t = time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.process_time() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=400, help='samples to time')
    p.add_argument('--res', type=int, default=256, help='syntheticRes')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    def dataset_with(cache_mb):
        opts = options.parse(['--dataset', 'Synthetic', '--nTrainSamples', str(args.n), '--syntheticRes', str(args.res),
                              '--inputRes', '128', '--outputRes', '32', '--syntheticCacheMB', str(cache_mb)])
        return build_dataset(opts, 'train', HeatmapCodec(128, 32, 1.0))

    dataset = dataset_with(0)
    reader = dataset.reader
    render = rate(lambda i: reader.load_image(reader.records[i]), args.n)
    sample = rate(lambda i: dataset[i], args.n)
    kept = dataset_with(4096)
    for i in range(args.n):             # the first epoch renders and keeps every image
        kept[i]
    kept.epoch = 1
    again = rate(lambda i: kept[i], args.n)
    print(f'Synthetic {args.res}x{args.res}, 1 core, {args.n} samples')
    print(f'  load_image (rendering)           {render:8.1f} samples/s per core')
    print(f'  PoseDataset[i] (+pipeline+codec) {sample:8.1f} samples/s per core')
    print(f'  ratio whole / render             {sample / render:8.2f}  '
          f'(rendering is {100 * sample / render:.0f} % of a sample\'s time)')
    print(f'  PoseDataset[i], images kept      {again:8.1f} samples/s per core (--syntheticCacheMB: '
          f'the second epoch on, {again / sample:.2f}x)')

if __name__ == '__main__':
    main()
