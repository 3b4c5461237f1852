"""Reader base class and the torch Dataset that joins a reader, the pipeline and a codec."""
import os

import cv2
import numpy as np
import torch.utils.data

from datasets.pipeline import Pipeline

BOX_MARGIN = 1.25
MIN_BOX_SIDE = 16.0     # pixels; guards a person whose labelled joints are (nearly) one point


def first_existing(paths, kind='file'):
    """The first path of ``paths`` that exists as a file (kind 'file') or folder ('dir'), or None."""
    check = os.path.isfile if kind == 'file' else os.path.isdir
    for p in paths:
        if check(p):
            return p
    return None


def check_data_dir(name, data_dir):
    """One-line error when the dataset root itself is missing."""
    if not os.path.isdir(data_dir):
        raise DatasetError(f'{name}: data folder {data_dir} not found; set --dataDir '
                           f'(see README, Preparing datasets)')


def sample_limit(opts, split):
    """opts.maxTrainSamples / maxValSamples for the split (0 or absent: no limit)."""
    n = getattr(opts, 'maxTrainSamples' if split == 'train' else 'maxValSamples', 0) or 0
    return int(n)


def box_from_joints(joints, visible, margin=BOX_MARGIN, min_side=MIN_BOX_SIDE):
    """Square person box around the labelled joints.

    joints (K, 2) 0-based pixels, visible (K,). Returns center (2,) float32 (middle of the
    labelled joints' extent) and scale (2,) float32 = side / 200 with side = margin x the longer
    side of the extent (at least ``min_side``), or (None, None) when no joint is labelled.
    """
    j = np.asarray(joints, np.float64)[np.asarray(visible) > 0]
    j = j[np.all(np.isfinite(j), axis=1)]
    if len(j) == 0:
        return None, None
    lo, hi = j.min(0), j.max(0)
    side = max(float((hi - lo).max()) * margin, min_side)
    center = (lo + hi) / 2.0
    return center.astype(np.float32), np.array([side, side], np.float32) / 200.0


class DatasetError(SystemExit):
    """A one-line, user-facing error about dataset files (missing folder, corrupt file, ...)."""

    def __init__(self, message):
        super().__init__(f'error: {message}')


class Reader:
    """Turns a dataset's official files into plain records; does no image work.

    A record is a dict with
      image   str, path of the image file (None for rendered data)
      center  (2,) float32, person box centre, original-image pixels, 0-based
      scale   (2,) float32, person box width and height / 200 px
      joints  (K, 2) float32, original-image pixels, 0-based
      visible (K,) float32, 1 for a labelled joint, 0 otherwise
    plus what the dataset's metric needs (head_size, torso, bbox, area, image_id, ...).

    Subclasses set ``joint_set``, fill ``self.records`` in ``__init__(opts, split)``, and may
    override ``load_image``, ``evaluate`` and ``save_predictions``.
    """
    joint_set = None

    def __init__(self, opts, split):
        self.opts = opts
        self.split = split
        self.records = []

    def __len__(self):
        return len(self.records)

    def load_image(self, record):
        """-> uint8 RGB (H, W, 3). A missing or corrupt file is a one-line error naming it."""
        path = record['image']
        if not os.path.isfile(path):
            raise DatasetError(f'image not found: {path}')
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f'corrupt or unreadable image: {path}')
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def evaluate(self, preds, scores, indices):
        """preds (N, K, 2) original pixels 0-based, scores (N, K), indices (N,) into records.

        Returns (table, headline): an ordered dict of column -> value and the number that picks
        the best checkpoint. Default: PCKh@0.5 with the records' ``head_size``.
        """
        from utils import metrics
        recs = [self.records[i] for i in indices]
        gt = np.stack([r['joints'] for r in recs])
        vis = np.stack([r['visible'] for r in recs])
        head = np.array([r['head_size'] for r in recs], np.float64)
        table = metrics.pckh_table(preds, gt, vis, head, self.joint_set)
        return table, table['Mean']

    # added to the 0-based predictions when they are written: 1.0 for datasets whose official
    # files use MATLAB's 1-based pixels (MPII, LSP)
    pred_offset = 0.0

    def save_predictions(self, preds, scores, indices, out_dir):
        """Write predictions in the dataset's official layout; return the path.

        Default: ``pred.mat`` with key ``preds`` (N, K, 2), in record order, in the frame of the
        dataset's files (0-based pixels + ``pred_offset``).
        """
        from utils import metrics
        order = np.argsort(np.asarray(indices), kind='stable')
        path = os.path.join(out_dir, 'pred.mat')
        metrics.save_pred_mat(path, np.asarray(preds, np.float64)[order] + self.pred_offset)
        return path


class PoseDataset(torch.utils.data.Dataset):
    """reader records -> pipeline -> codec. Sample i of epoch e is a pure function of
    (seed, e, i): augmentation draws from its own generator, so loader workers and resumed
    runs see the same samples."""

    def __init__(self, reader, pipeline: Pipeline, codec, seed=0):
        self.reader = reader
        self.pipeline = pipeline
        self.codec = codec
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        rec = self.reader.records[i]
        image = self.reader.load_image(rec)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        s = self.pipeline(image, rec, rng)
        target, weight = self.codec.encode(s['joints'], s['visible'])
        meta = dict(index=i, affine=s['affine'], joints=s['joints'], visible=s['visible'])
        return s['image'], target, weight, meta
