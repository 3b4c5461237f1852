"""Reader base class, the torch Dataset that joins a reader, the pipeline and a codec, and the
collate function that batches samples by field name.

Record (what a reader emits; no pixels)::

    image      str, the image file (None for rendered data)
    center     (2,) float, the box centre in original-image pixels, 0-based
    scale      (2,) float, the box width and height / 200 px (the pipeline extends it to the
               input's aspect ratio)
    keypoints  (N, K, 2) float32, original-image pixels, 0-based; N people (1 for a top-down crop,
               any N >= 0 for a whole image)
    visible    (N, K) float32, 1 for a labelled keypoint
    ...        whatever the dataset's metric needs (head_size, bbox, image_id, ...)

Sample (what ``PoseDataset[i]`` returns; a dict): what the reader's pipeline made, the codec's
targets and meta; for the pose pipeline::

    image      (3, H, W) float32 tensor, normalised
    keypoints  (N, K, 2) float32, input-crop pixels;  visible (N, K)
    <targets>  whatever the codec's ``encode`` made ('heatmap', 'heatmap_weight', ...)
    meta       {'index': record index, 'affine': (2, 3) original -> crop,
                'box': (5,) centre x, y, box width, rotation, flip of the crop}

Batch: ``collate`` stacks every field by name; the people fields (``PEOPLE_FIELDS`` and the
codec's own) are padded to the batch's largest N with zeros (visible 0, so padding never counts),
and ``num_people`` (B,) says how many are real.
"""
import os

import cv2
import numpy as np
import torch
import torch.utils.data
from torch.utils.data import default_collate

from datasets.pipeline import Pipeline
from utils.errors import DatasetError

BOX_MARGIN = 1.25
MIN_BOX_SIDE = 16.0     # pixels; guards a person whose labelled joints are (nearly) one point
PEOPLE_FIELDS = ('keypoints', 'visible')
# what a pipeline returns about the crop itself, moved into the sample's meta
META_FIELDS = ('affine', 'box', 'size', 'center', 'scale')


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


def single_person(predictions):
    """Per-record predictions of one person each -> keypoints (M, K, 2), scores (M, K), indices (M,).

    predictions: list of {'index', 'keypoints' (1, K, 2), 'scores' (1, K), ...} (a top-down
    predictor's output: one person per crop).
    """
    preds = np.stack([p['keypoints'][0] for p in predictions])
    scores = np.stack([p['scores'][0] for p in predictions])
    indices = np.array([p['index'] for p in predictions], np.int64)
    return preds, scores, indices


SPLITS = ('train', 'val')


REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}


def read_image(path, reduce=1):
    """An image file -> uint8 RGB (H, W, 3), the stored pixels whatever the EXIF orientation says
    (the annotations are in the stored frame, as the reference loaders read them).

    reduce: 2, 4 or 8 to decode the image that many times smaller (a JPEG in libjpeg's DCT
    domain, which skips most of the decoding work; other formats are decoded and then averaged
    over reduce x reduce blocks): pixel (u, v) covers the original's block at reduce * (u, v).

    A missing file, one that does not decode, and a JPEG or PNG cut short (which the decoders
    would fill in silently, with only a libjpeg warning on stderr) are ``DatasetError`` naming it.
    """
    if not os.path.isfile(path):
        raise DatasetError(f'image not found: {path}')
    data = np.fromfile(path, np.uint8)
    if data.size == 0:
        raise DatasetError(f'corrupt or unreadable image: {path} (empty file)')
    head, tail = data[:8].tobytes(), data[-64:].tobytes().rstrip(b'\0\r\n ')
    if head[:2] == b'\xff\xd8' and not tail.endswith(b'\xff\xd9'):
        raise DatasetError(f'truncated image: {path} (the JPEG ends before its end-of-image marker)')
    if head == b'\x89PNG\r\n\x1a\n' and b'IEND' not in tail:
        raise DatasetError(f'truncated image: {path} (the PNG ends before its IEND chunk)')
    img = cv2.imdecode(data, REDUCED[reduce] | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DatasetError(f'corrupt or unreadable image: {path}')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class Reader:
    """Turns a dataset's official files into plain records (see the module docstring); does no
    image work.

    Subclasses set ``joint_set``, fill ``self.records`` with ``self.add(where, ...)`` in
    ``__init__(opts, split)``, and may override ``load_image``, ``evaluate`` and
    ``save_predictions`` (top-down: arrays of one person per record) or
    ``evaluate_predictions`` / ``save_all`` (any number of people per record).
    """
    joint_set = None
    splits = SPLITS          # the splits this reader can read ('test': without ground truth)
    # added to the 0-based predictions when they are written: 1.0 for datasets whose official
    # files use MATLAB's 1-based pixels (MPII, LSP)
    pred_offset = 0.0

    def __init__(self, opts, split):
        self.opts = opts
        self.split = split
        self.records = []

    def __len__(self):
        return len(self.records)

    def add(self, where, image, center, scale, keypoints, visible, **fields):
        """Append one record after checking it: a non-finite or non-positive box, or a non-finite
        labelled keypoint, is a ``DatasetError`` naming ``where`` (the file and the entry).

        keypoints (K, 2) or (N, K, 2), visible (K,) or (N, K); stored as (N, K, 2) / (N, K).
        """
        k = self.joint_set.num_joints
        kp = np.asarray(keypoints, np.float32).reshape(-1, k, 2)
        vis = np.asarray(visible, np.float32).reshape(-1, k)
        # centre and scale keep their precision (float64 for MPII, float32 for COCO: the reference
        # code's), so the crop's affine is the reference's bit for bit
        center = np.asarray(center).reshape(2)
        scale = np.asarray(scale).reshape(-1)
        scale = np.repeat(scale, 2) if scale.size == 1 else scale.reshape(2)
        if kp.shape[0] != vis.shape[0]:
            raise DatasetError(f'{where}: {kp.shape[0]} people with keypoints but {vis.shape[0]} with visibility')
        if not np.all(np.isfinite(center)):
            raise DatasetError(f'{where}: the person box centre is not finite ({center.tolist()})')
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise DatasetError(f'{where}: the person box scale must be positive, got {scale.tolist()}')
        bad = (vis > 0) & ~np.all(np.isfinite(kp), axis=-1)
        if bad.any():
            person, joint = (int(v[0]) for v in np.nonzero(bad))
            raise DatasetError(f'{where}: labelled keypoint {self.joint_set.names[joint]} '
                               f'{"of person " + str(person) + " " if len(kp) > 1 else ""}is not a finite number')
        kp[vis == 0] = 0.0
        self.records.append(dict(image=image, center=center, scale=scale, keypoints=kp, visible=vis, **fields))

    def pipeline(self, opts, train):
        """The pixel pipeline of this dataset's samples: the shared pose pipeline (one affine warp
        of the person box), with the run's augmentation when ``train``."""
        half_body = (opts.halfBodyProb, opts.halfBodyJoints, self.joint_set.upper_body) if opts.halfBodyProb > 0 else None
        return Pipeline(opts.inputRes.wh, self.joint_set.flip_permutation(), train=train,
                        max_scale=opts.maxScale, max_rotate=opts.maxRotate, max_translate=opts.maxTranslate,
                        flip=opts.flipAug, color_jitter=opts.colorJitter, half_body=half_body, udp=opts.udp,
                        reduced_decode=opts.reducedDecode)

    def mask(self, record, height, width):
        """The loss mask of a whole-image record (height, width) uint8, 1 where the loss counts, or
        None (everywhere): what a bottom-up reader marks as not annotated."""
        return None

    def missing_images(self):
        """The image files of the records that do not exist (checked before a run starts)."""
        paths = {r['image'] for r in self.records if r.get('image') is not None}
        return sorted(p for p in paths if not os.path.isfile(p))

    def load_image(self, record):
        """-> uint8 RGB (H, W, 3). A missing, corrupt or truncated file is a one-line error naming it."""
        return read_image(record['image'])

    def load_image_reduced(self, record, reduce):
        """-> (image, the factor it was decoded smaller by): ``reduce`` for an image file, 1 for
        a reader that makes its images itself (``load_image`` overridden)."""
        if reduce == 1 or type(self).load_image is not Reader.load_image:
            return self.load_image(record), 1
        return read_image(record['image'], reduce), reduce

    # ------------------------------------------------------------------ evaluation
    def evaluate_predictions(self, predictions):
        """predictions: the predictor's list of {'index', 'keypoints' (N, K, 2) original pixels,
        'scores' (N, K), 'score' (N,), ...}. -> (table, headline). Top-down readers get one person
        per record and use ``evaluate``."""
        return self.evaluate(*self._arrays(predictions))

    def save_all(self, predictions, out_dir):
        """Write ``predictions`` in the dataset's official layout; return the path."""
        return self.save_predictions(*self._arrays(predictions), out_dir)

    @staticmethod
    def _arrays(predictions):
        preds, scores, indices = single_person(predictions)
        return preds, scores, indices

    def evaluate(self, preds, scores, indices):
        """preds (M, K, 2) original pixels 0-based, scores (M, K), indices (M,) into records.

        Returns (table, headline): an ordered dict of column -> value and the number that picks
        the best checkpoint. Default: PCKh@0.5 with the records' ``head_size``.
        """
        from utils import metrics
        recs = [self.records[i] for i in indices]
        gt = np.stack([r['keypoints'][0] for r in recs])
        vis = np.stack([r['visible'][0] for r in recs])
        head = np.array([r['head_size'] for r in recs], np.float64)
        table = metrics.pckh_table(preds, gt, vis, head, self.joint_set)
        return table, table['Mean']

    def save_predictions(self, preds, scores, indices, out_dir):
        """Default: ``pred.mat`` with key ``preds`` (M, K, 2), in record order, in the frame of the
        dataset's files (0-based pixels + ``pred_offset``)."""
        from datasets.formats import save_pred_mat
        order = np.argsort(np.asarray(indices), kind='stable')
        path = os.path.join(out_dir, 'pred.mat')
        save_pred_mat(path, np.asarray(preds, np.float64)[order] + self.pred_offset)
        return path


class PoseDataset(torch.utils.data.Dataset):
    """reader records -> pipeline -> codec. Sample i of epoch e is a pure function of
    (seed, e, i): augmentation draws from its own generator, so loader workers and resumed
    runs see the same samples.

    A ``DatasetError`` while making a sample (a missing or corrupt image) does not end a loader
    worker: the sample comes back as ``{'error': message}`` and ``collate`` hands it to the
    main process, which reports it in one line.
    """

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
        rng = np.random.default_rng([self.seed, self.epoch, i])
        plan = self.pipeline.plan(rec, rng) if hasattr(self.pipeline, 'plan') else None
        try:
            if plan is not None and plan['reduce'] > 1:
                image, reduced = self.reader.load_image_reduced(rec, plan['reduce'])
            else:
                image, reduced = self.reader.load_image(rec), 1
        except DatasetError as exc:
            return {'error': str(exc), 'meta': {'index': i}}
        if getattr(self.pipeline, 'train', False):
            mask = self.reader.mask(rec, *image.shape[:2])      # bottom-up: regions the loss skips
            if mask is not None:
                rec = dict(rec, mask=mask)
        if plan is None:
            sample = self.pipeline(image, rec, rng)
        else:
            sample = self.pipeline(image, rec, plan=plan, reduced=reduced)
        meta = dict(index=i)
        for key in META_FIELDS:                       # how the crop was made: meta, not a target
            if key in sample:
                meta[key] = sample.pop(key)
        sample.update(self.codec.encode(sample))
        sample = {k: v for k, v in sample.items() if v is not None}      # a field the codec consumed
        sample['meta'] = meta
        return sample

    def collate(self, samples):
        return collate(samples, PEOPLE_FIELDS + tuple(getattr(self.codec, 'people_fields', ())))


def _stack(values):
    """Tensors, arrays and numbers stacked as torch's default collate does (into shared memory in a
    loader worker); anything else kept as a list."""
    if isinstance(values[0], (torch.Tensor, np.ndarray, bool, int, float, np.integer, np.floating)):
        return default_collate(values)
    return list(values)


def _pad_people(values):
    """Arrays (N_i, ...) -> one tensor (B, max N, ...) zero-padded."""
    arrays = [np.asarray(v) for v in values]
    n = max(a.shape[0] for a in arrays)
    out = np.zeros((len(arrays), n) + arrays[0].shape[1:], arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return torch.from_numpy(out)


def collate(samples, people_fields=PEOPLE_FIELDS):
    """Samples (dicts) -> one batch (dict), field by field (see the module docstring).

    Samples that came back as ``{'error': ...}`` are left out; their messages are in
    ``batch['errors']`` (absent when there is none).
    """
    errors = [s['error'] for s in samples if 'error' in s]
    samples = [s for s in samples if 'error' not in s]
    batch = {}
    if samples:
        for key in samples[0]:
            values = [s[key] for s in samples]
            if key == 'meta':
                batch['meta'] = {k: _stack([v[k] for v in values]) for k in values[0]}
            elif key in people_fields:
                batch[key] = _pad_people(values)
            else:
                batch[key] = _stack(values)
        if 'keypoints' in samples[0]:
            batch['num_people'] = torch.tensor([len(s['keypoints']) for s in samples])
    if errors:
        batch['errors'] = errors
    return batch
