"""Speed of a full training sample on the real MPII fixture images, one thread, against the
reference procedure of the HRNet / SimpleBaselines ``JointsDataset`` written here from its
description.

    python bench/bench_loader.py [--rounds 5] [--n 200] [--fixtures ../shared/fixtures]

Both sides make the same training sample of the same 5 people with the same augmentation (scale
factor 0.25, rotation 30 with probability 0.6, horizontal flip, no colour jitter, input 256,
heatmaps 64 with sigma 2):

* reference: the whole JPEG decoded (``cv2.imread``, BGR -> RGB), the whole image mirrored for a
  flip, HRNet's three-point affine, one ``cv2.warpAffine``, each joint moved by the affine in a
  Python loop, ToTensor then Normalize in torch, and per joint a (6 sigma + 1)^2 Gaussian computed
  with ``np.exp`` and pasted into a zeroed (16, 64, 64) target;
* the same with the mirror folded into the affine (the same crop, without copying the whole
  mirrored image first): a stronger baseline than the reference code itself;
* ours: ``PoseDataset.__getitem__`` of the MPII reader with its training pipeline and heatmap
  codec (``datasets.build_dataset``), with the whole image decoded (``--reducedDecode false``)
  and with the defaults (the JPEG decoded 2, 4 or 8 times smaller where the crop shrinks the
  person that much).

Prints samples per CPU second of this process (``time.process_time``: one thread, so per core
even on a busy machine) for both, measured in alternating rounds, and the ratio of the medians.
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class Reference:
    """The JointsDataset procedure for MPII records (0-based joints, centre, scale in 200 px)."""

    def __init__(self, records, flip_pairs, input_size=256, heatmap_size=64, sigma=2, scale_factor=0.25,
                 rotation_factor=30, seed=0, fold_flip=False):
        self.records, self.flip_pairs, self.fold_flip = records, flip_pairs, fold_flip
        self.input_size, self.heatmap_size, self.sigma = input_size, heatmap_size, sigma
        self.sf, self.rf = scale_factor, rotation_factor
        self.rng = np.random.RandomState(seed)

    @staticmethod
    def affine(center, scale, rot, size):
        """Source -> crop from three corresponding points (the crop's centre, a point above it,
        and the point at a right angle to both), as the reference's get_affine_transform."""
        src_w = scale[0] * 200.0
        a = np.deg2rad(rot)
        sn, cs = np.sin(a), np.cos(a)
        up = np.array([-src_w * 0.5 * sn, -src_w * 0.5 * cs])        # (0, -w/2) rotated by rot
        src = np.zeros((3, 2), np.float32)
        dst = np.zeros((3, 2), np.float32)
        src[0], src[1] = center, center + up
        dst[0], dst[1] = (size * 0.5, size * 0.5), (size * 0.5, size * 0.5 - size * 0.5)
        for pts in (src, dst):
            d = pts[0] - pts[1]
            pts[2] = pts[1] + np.array([-d[1], d[0]], np.float32)
        return cv2.getAffineTransform(src, dst)

    def target(self, joints, vis):
        k, hm, s = len(joints), self.heatmap_size, self.sigma
        target = np.zeros((k, hm, hm), np.float32)
        weight = vis.astype(np.float32).copy()
        radius = s * 3
        stride = self.input_size / hm
        for j in range(k):
            mx, my = int(joints[j, 0] / stride + 0.5), int(joints[j, 1] / stride + 0.5)
            ul, br = (mx - radius, my - radius), (mx + radius + 1, my + radius + 1)
            if ul[0] >= hm or ul[1] >= hm or br[0] < 0 or br[1] < 0:
                weight[j] = 0
                continue
            size = 2 * radius + 1
            x = np.arange(0, size, 1, np.float32)
            y = x[:, None]
            g = np.exp(-((x - radius) ** 2 + (y - radius) ** 2) / (2 * s ** 2))
            gx, gy = (max(0, -ul[0]), min(br[0], hm) - ul[0]), (max(0, -ul[1]), min(br[1], hm) - ul[1])
            ix, iy = (max(0, ul[0]), min(br[0], hm)), (max(0, ul[1]), min(br[1], hm))
            if weight[j] > 0.5:
                target[j, iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
        return target, weight

    def __call__(self, i):
        rec = self.records[i % len(self.records)]
        img = cv2.imread(rec['image'], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        joints = rec['keypoints'][0].astype(np.float64).copy()
        vis = rec['visible'][0].copy()
        c = np.array(rec['center'], np.float64).copy()
        s = np.array(rec['scale'], np.float64).reshape(-1)[[0, -1]]
        s = s * np.clip(self.rng.randn() * self.sf + 1, 1 - self.sf, 1 + self.sf)
        r = np.clip(self.rng.randn() * self.rf, -self.rf * 2, self.rf * 2) if self.rng.rand() <= 0.6 else 0
        flip = self.rng.rand() <= 0.5
        w = img.shape[1]
        if flip:
            if not self.fold_flip:
                img = img[:, ::-1, :]
            joints[:, 0] = w - joints[:, 0] - 1
            for a, b in self.flip_pairs:
                joints[[a, b]], vis[[a, b]] = joints[[b, a]], vis[[b, a]]
            c[0] = w - c[0] - 1
        m = self.affine(c, s, r, self.input_size)
        if flip and self.fold_flip:     # the same crop: sample the unflipped image at x -> w - 1 - x
            m = m @ np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])
        crop = cv2.warpAffine(img, m, (self.input_size, self.input_size), flags=cv2.INTER_LINEAR)
        for j in range(len(joints)):
            if vis[j] > 0:
                joints[j] = m @ np.array([joints[j, 0], joints[j, 1], 1.0])
        x = torch.from_numpy(crop.transpose(2, 0, 1).copy()).float().div(255)
        x = x.sub(MEAN).div(STD)
        target, weight = self.target(joints, vis)
        return x, torch.from_numpy(target), torch.from_numpy(weight)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--fixtures', default=os.path.join(os.path.dirname(ROOT), 'shared', 'fixtures'))
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--n', type=int, default=200, help='samples per round and side')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    from bench_synthetic import rate
    from overfit import make_layout
    import opts as options
    from datasets import build_dataset
    from datasets.codecs import HeatmapCodec
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, 'mpii')
        make_layout(args.fixtures, 'mpii', root)
        sides = [('reference JointsDataset procedure', None), ('reference, mirror in the affine', None),
                 ('ours, --reducedDecode false', 'false'), ('ours (PoseDataset, defaults)', 'true')]
        fns = []
        for name, reduced in sides:
            if reduced is None:
                continue
            opts = options.parse(['--dataset', 'MPII', '--dataDir', root, '--inputRes', '256', '--outputRes', '64',
                                  '--hmGauss', '2', '--maxScale', '0.25', '--maxRotate', '30', '--colorJitter', '0',
                                  '--reducedDecode', reduced])
            fns.append(sample_fn(build_dataset(opts, 'train', HeatmapCodec(256, 64, 2.0))))
        records = fns[0].dataset.reader.records
        flip_pairs = fns[0].dataset.reader.joint_set.flip_pairs
        fns = [Reference(records, flip_pairs), Reference(records, flip_pairs, fold_flip=True)] + fns
        rates = [[] for _ in fns]
        for _ in range(args.rounds):
            for fn, r in zip(fns, rates):
                r.append(rate(fn, args.n))
        med = [float(np.median(r)) for r in rates]
        print(f'MPII fixture ({len(records)} people, 1 thread), training sample 256 -> 64, sigma 2, '
              f'{args.rounds} rounds x {args.n} samples, alternating')
        for (name, _), m, r in zip(sides, med, rates):
            print(f'  {name:36s} {m:7.1f} samples/s per core  (rounds: {", ".join(f"{x:.0f}" for x in r)})')
        for i, (name, _) in enumerate(sides[2:], 2):
            print(f'  ratio {name} / reference: {med[i] / med[0]:.2f}x, / mirror in the affine: {med[i] / med[1]:.2f}x')


def sample_fn(dataset):
    """i -> the dataset's training sample of record i % n, epoch i // n (new augmentation)."""
    n = len(dataset)

    def sample(i):
        dataset.epoch = i // n
        return dataset[i % n]
    sample.dataset = dataset
    return sample


if __name__ == '__main__':
    main()
