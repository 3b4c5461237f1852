"""Overfit a small hourglass on the 5 real MPII validation images of ../shared/fixtures and score
it in original image pixels with the official MPII head sizes (gt_valid.mat head boxes).

Reaching ~100 PCKh@0.5 on the images it trained on proves the whole coordinate chain: the MPII
reader's 1-based -> 0-based conversion and box, the affine crop, the heatmap codec, the decoding
and the inverse transform back to the original image.

    python bench/overfit_mpii.py [--epochs 300] [--fixtures ../shared/fixtures]
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_layout(fixtures, root):
    """data/mpii layout from the fixtures: annot/{train,valid}.json (the same 5 people),
    annot/gt_valid.mat, images/."""
    mpii = os.path.join(os.path.abspath(fixtures), 'mpii')
    os.makedirs(os.path.join(root, 'annot'))
    for name in ('train.json', 'valid.json'):
        os.symlink(os.path.join(mpii, 'mpii_val5.json'), os.path.join(root, 'annot', name))
    os.symlink(os.path.join(mpii, 'gt_valid.mat'), os.path.join(root, 'annot', 'gt_valid.mat'))
    os.symlink(os.path.join(mpii, 'images'), os.path.join(root, 'images'))


def overfit(fixtures, epochs=300, exp_dir=None, quiet=True):
    """Train on the 5 images, evaluate on the same 5; returns (table, seconds)."""
    import main as main_module
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'mpii')
        make_layout(fixtures, data)
        argv = ['--dataset', 'MPII', '--dataDir', data, '--nJoints', '16', '--model', 'StackedHourGlass',
                '--nStack', '2', '--nChannels', '64', '--nReductions', '4', '--inputRes', '128', '--outputRes', '32',
                '--hmGauss', '2', '--maxScale', '0', '--maxRotate', '0', '--flipAug', 'false', '--colorJitter', '0',
                '--optimizer_type', 'Adam', '--LR', '2e-3', '--LRSteps', str(int(epochs * 0.8)),
                '--nEpochs', str(epochs), '--valInterval', str(epochs), '--data_loader_size', '5',
                '--nThreads', '0', '--progress', 'false', '--visCount', '5',
                '--expDir', exp_dir or tmp, '--expID', 'overfit_mpii']
        start = time.time()
        result = main_module.main(argv)
        return result['table'], time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--fixtures', default=os.path.join(os.path.dirname(ROOT), 'shared', 'fixtures'))
    p.add_argument('--epochs', type=int, default=300)
    p.add_argument('--expDir', default=None, help='keep the run folder (vis.png) here')
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.fixtures, 'mpii')):
        sys.exit(f'error: MPII fixtures not found under {args.fixtures}')
    table, seconds = overfit(args.fixtures, args.epochs, args.expDir)
    print(f'overfit on 5 real MPII images: PCKh@0.5 Mean {table["Mean"]:.2f} after {args.epochs} epochs, '
          f'{seconds:.0f} s')


if __name__ == '__main__':
    main()
