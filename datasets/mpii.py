"""MPII Human Pose reader: 16 joints, PCKh@0.5.

Two annotation layouts are read, chosen by what is found under ``dataDir`` (json first):

* the HRNet / SimpleBaselines json, ``annot/{train,valid}.json``: a list of
  ``{image, center, scale, joints (16x2, MATLAB 1-based pixels), joints_vis (16)}`` with the raw
  MPII ``objpos`` / ``scale``. As that code does, the box is adjusted here:
  ``center[1] += 15 * scale; scale *= 1.25`` (skipped when center[0] == -1), then center and
  joints are made 0-based (- 1).
* the stacked-hourglass (pose-hg-train) h5, ``annot/{train,valid}.h5`` or ``{train,valid}.h5``:
  ``imgname, center, scale, part (Nx16x2, MATLAB 1-based, truncated to integers), visible,
  normalize``. Its writer (pose-hg-train's convert_annot.py) already applied the same
  ``+15 * scale`` / ``* 1.25`` adjustment, so it is NOT applied again (the fixture shows it:
  h5 center = json center + 15 * json scale, h5 scale = 1.25 * json scale). A joint is labelled
  when its ``part`` is not (0, 0) (this matches ``jnt_missing`` of gt_valid.mat on all 2958
  validation persons); the h5 ``visible`` field is MPII's occlusion flag and is kept as
  ``occluded`` = 1 - visible. ``normalize`` (0.6 x head-box diagonal) is the PCKh head size.

Images: ``dataDir/images/<name>``. The square box is ``scale * 200`` pixels for both training
crops and testing.

Evaluation: with ``dataDir/annot/gt_valid.mat`` present, the split the full validation set
(2958 persons, in gt_valid's order, all predicted) -> the official protocol (predictions + 1,
``metrics.mpii_official``). Otherwise PCKh@0.5 with the records' head sizes (h5 ``normalize``,
or gt_valid's head boxes when the json entries are verifiably gt_valid's first persons).
"""
import os

import numpy as np

from datasets import register_dataset
from datasets.base import Reader, check_data_dir, sample_limit
from datasets.formats import load_json, read_gt_valid
from datasets.joints import MPII
from utils.errors import DatasetError

SPLIT_FILE = {'train': 'train', 'val': 'valid', 'test': 'test'}
GT_VALID = os.path.join('annot', 'gt_valid.mat')


def _entry_error(path, i, what):
    return DatasetError(f'MPII: {path}: entry {i}: {what}')


def _read_json(path, require_joints=True):
    """-> list of dict(image, center (2,) 1-based raw, scale float, joints (16,2) 1-based, vis (16,)).

    An entry without ``joints`` is an error, except in a test split (``require_joints`` False:
    the MPII test annotations have no joints)."""
    data = load_json(path, 'annotation file')
    if not isinstance(data, list):
        raise DatasetError(f'MPII: {path}: expected a json list of persons '
                           f'{{image, center, scale, joints, joints_vis}}, found {type(data).__name__}')
    out = []
    for i, a in enumerate(data):
        if not isinstance(a, dict):
            raise _entry_error(path, i, 'not a json object')
        for key in ('image', 'center', 'scale') + (('joints',) if require_joints else ()):
            if key not in a:
                raise _entry_error(path, i, f"missing key '{key}'")
        try:
            center = np.asarray(a['center'], np.float64).reshape(2)
            scale = float(np.asarray(a['scale'], np.float64).reshape(-1)[0])
            if 'joints' in a:
                joints = np.asarray(a['joints'], np.float64).reshape(16, 2)
                vis = np.asarray(a.get('joints_vis', np.ones(16)), np.float64).reshape(16)
            else:                                   # test.json: no joints
                joints, vis = np.zeros((16, 2)), np.zeros(16)
        except (ValueError, TypeError) as exc:
            raise _entry_error(path, i, f'center must be 2 numbers, scale a number, joints '
                                        f'16x2 and joints_vis 16 numbers ({exc})') from None
        out.append(dict(image=str(a['image']), center=center, scale=scale, joints=joints,
                        visible=(vis > 0).astype(np.float64)))
    return out


def _read_h5(path):
    """-> dict of arrays: imgname (list of str), center (N,2), scale (N,), part (N,16,2), ..."""
    import h5py
    try:
        f = h5py.File(path, 'r')
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f'MPII: {path}: not a readable HDF5 file ({type(exc).__name__})') from None
    with f:
        missing = [k for k in ('imgname', 'center', 'scale', 'part') if k not in f]
        if missing:
            raise DatasetError(f'MPII: {path}: missing dataset(s) {", ".join(missing)} '
                               f'(expected the pose-hg-train layout: imgname, center, scale, part, '
                               f'visible, normalize)')
        a = {k: f[k][()] for k in ('imgname', 'center', 'scale', 'part', 'visible', 'normalize') if k in f}
    n = len(a['imgname']) if np.ndim(a['imgname']) else 0
    shapes = dict(center=(n, 2), scale=(n,), part=(n, 16, 2), visible=(n, 16), normalize=(n,))
    for k, shape in shapes.items():
        if k in a and np.shape(a[k]) != shape:
            raise DatasetError(f'MPII: {path}: {k} has shape {np.shape(a[k])}, expected {shape}')
        if k in a:
            try:
                a[k] = np.asarray(a[k], np.float64)
            except (TypeError, ValueError):
                raise DatasetError(f'MPII: {path}: {k} is not numeric ({np.asarray(a[k]).dtype})') from None
    names = np.asarray(a['imgname']).reshape(-1)
    if names.dtype.kind not in 'SUO':
        raise DatasetError(f'MPII: {path}: imgname must hold image file names, found {names.dtype}')
    a['imgname'] = [x.decode(errors='replace') if isinstance(x, bytes) else str(x) for x in names]
    return a


def _load_gt_valid(path):
    """-> pos (N,16,2) 1-based, labelled (N,16) bool, head_size (N,), or None if the file is absent."""
    if not os.path.isfile(path):
        return None
    try:
        pos, visible, head = read_gt_valid(path)
    except DatasetError as exc:
        raise DatasetError(f'MPII: {exc}') from None
    return pos, visible > 0, head


def _misalignment(joints_1based, labelled, gt):
    """None when annotation entry i is gt_valid person i for every entry (median distance of the
    joints labelled in both < 2 px; gt_valid zeroes a few coordinates, hence the median), else
    what differs, in words."""
    pos, gt_lab, _ = gt
    m = len(joints_1based)
    if m == 0:
        return 'the annotation file has no persons'
    if m > len(pos):
        return f'the annotation file has {m} persons, gt_valid.mat {len(pos)}'
    both = labelled & gt_lab[:m]
    d = np.linalg.norm(joints_1based - pos[:m], axis=-1)
    d = np.where(both, d, np.nan)
    has = both.any(axis=1)
    if not has.any():
        return 'no person has a joint labelled in both files'
    med = np.full(m, np.nan)
    with np.errstate(all='ignore'):
        med[has] = np.nanmedian(d[has], axis=1)
    wrong = np.flatnonzero(has & ~(med < 2.0))
    if len(wrong):
        i = int(wrong[0])
        return (f'{len(wrong)} of its {m} persons are not gt_valid.mat\'s persons in the same order '
                f'(entry {i}: its joints are {med[i]:.0f} px from gt_valid person {i})')
    return None


@register_dataset('MPII')
class MPIIReader(Reader):
    joint_set = MPII
    splits = ('train', 'val', 'test')
    pred_offset = 1.0  # pred.mat in the 1-based frame of the official files

    def __init__(self, opts, split):
        super().__init__(opts, split)
        root = opts.dataDir
        check_data_dir('MPII', root)
        name = SPLIT_FILE[split]
        candidates = [os.path.join(root, 'annot', f'{name}.json'), os.path.join(root, 'annot', f'{name}.h5'),
                      os.path.join(root, f'{name}.h5')]
        if split == 'test':             # the MPII test persons: the HRNet json layout, without joints
            candidates = candidates[:1]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise DatasetError(f'MPII: expected annot/{name}.json, annot/{name}.h5 or {name}.h5 under '
                               f'{root} (see README, Preparing datasets)')
        image_dir = os.path.join(root, 'images')
        if not os.path.isdir(image_dir):
            raise DatasetError(f'MPII: expected the images in {image_dir} (see README, Preparing datasets)')
        self.annotation_path = path
        self.layout = 'json' if path.endswith('.json') else 'h5'

        if self.layout == 'json':
            entries = _read_json(path, require_joints=split != 'test')
            centers = np.array([e['center'] for e in entries]).reshape(-1, 2)
            scales = np.array([e['scale'] for e in entries], np.float64)
            adjust = centers[:, 0] != -1                 # HRNet: no adjustment for a missing box
            centers[adjust, 1] += 15.0 * scales[adjust]
            scales[adjust] *= 1.25
            joints_1 = np.array([e['joints'] for e in entries]).reshape(-1, 16, 2)
            labelled = np.array([e['visible'] for e in entries]).reshape(-1, 16) > 0
            names = [e['image'] for e in entries]
            head = np.full(len(entries), np.nan)
            occluded = np.zeros((len(entries), 16))
        else:
            a = _read_h5(path)
            centers = np.asarray(a['center'], np.float64).copy()   # already adjusted by its writer
            scales = np.asarray(a['scale'], np.float64).copy()
            joints_1 = np.asarray(a['part'], np.float64)
            labelled = (joints_1 > 0).any(axis=-1)
            names = a['imgname']
            head = np.asarray(a['normalize'], np.float64) if 'normalize' in a else np.full(len(names), np.nan)
            occluded = ((np.asarray(a['visible']) == 0) & labelled) if 'visible' in a else np.zeros(labelled.shape)

        # gt_valid.mat: the official protocol, and head sizes for json entries
        self.gt_valid_path = None
        self.gt_valid_problem = None        # why a present gt_valid.mat could not be used
        gt = _load_gt_valid(os.path.join(root, GT_VALID)) if split == 'val' else None
        if gt is not None:
            self.gt_valid_problem = _misalignment(joints_1, labelled, gt)
        if gt is not None and self.gt_valid_problem is None:
            self.gt_valid_path = os.path.join(root, GT_VALID)
            self.num_gt_valid = len(gt[0])
            missing_head = ~(np.isfinite(head) & (head > 0))
            head[missing_head] = gt[2][:len(head)][missing_head]
        self.num_entries = len(names)

        limit = sample_limit(opts, split)
        n = min(limit, len(names)) if limit else len(names)
        for i in range(n):
            lab = labelled[i].astype(np.float32)
            j = np.where(lab[:, None] > 0, joints_1[i] - 1.0, 0.0)   # 1-based -> 0-based
            s = float(scales[i])
            self.add(f'MPII: {path}: entry {i}', image=os.path.join(image_dir, names[i]),
                     center=centers[i] - 1.0, scale=np.array([s, s]),       # float64, as HRNet's
                     keypoints=j, visible=lab, occluded=np.asarray(occluded[i], np.float32)[None],
                     head_size=float(head[i]), annot_index=i)

    def _official(self, indices):
        """True when predictions cover the whole gt_valid set in its order."""
        return (self.gt_valid_path is not None and self.num_entries == self.num_gt_valid
                and len(self.records) == self.num_entries and len(indices) == len(self.records)
                and np.array_equal(np.sort(indices), np.arange(len(self.records))))

    def evaluate(self, preds, scores, indices):
        """PCKh@0.5: the official gt_valid.mat protocol on the full validation set, else the
        records' head sizes. Returns (table, table['Mean'])."""
        from utils import metrics
        preds = np.asarray(preds, np.float64)
        indices = np.asarray(indices, np.int64)
        if self._official(indices):
            full = np.zeros((len(self.records), 16, 2))
            full[indices] = preds
            table = metrics.mpii_official(full + 1.0, self.gt_valid_path)    # 1-based, as pred.mat
            return table, table['Mean']
        recs = [self.records[int(i)] for i in indices]
        head = np.array([r['head_size'] for r in recs], np.float64)
        if not np.all(np.isfinite(head) & (head > 0)):
            gt_path = os.path.join(self.opts.dataDir, GT_VALID)
            if self.gt_valid_problem:
                why = f'{gt_path} is there but cannot give them: {self.gt_valid_problem}'
            else:
                why = (f'the json layout takes them from the official {gt_path} (validation split only), '
                       f"the h5 layout from its 'normalize' field")
            raise DatasetError(f'MPII: cannot evaluate {self.annotation_path}: no head sizes; {why} '
                               f'(see README, Preparing datasets)')
        gt = np.stack([r['keypoints'][0] for r in recs])
        vis = np.stack([r['visible'][0] for r in recs])
        table = metrics.pckh_table(preds, gt, vis, head, MPII)
        return table, table['Mean']

