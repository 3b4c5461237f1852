"""COCO person keypoints reader: 17 joints, OKS AP.

Layout under ``dataDir`` (see README, Preparing datasets)::

    annotations/person_keypoints_{train,val}2017.json
    images/{train,val}2017/*.jpg        (or {train,val}2017/*.jpg directly under dataDir)

Records (as the HRNet / SimpleBaselines COCO reader):
  * ground-truth boxes: every person annotation with at least one labelled keypoint
    (num_keypoints > 0), not iscrowd, category 1, whose box, cleaned as HRNet does
    (x1 = max(0, x), y1 = max(0, y), x2 = min(W - 1, x1 + max(0, w - 1)), same for y), has
    width and height > 0 and area > 0;
  * with ``--detFile`` (validation only): one record per detection of category 1 with
    score >= ``--detThreshold``; joints 0 and visible 0, ``score`` = the detection score.
Box -> center / scale: center = (x + w / 2, y + h / 2); scale = (w, h) / 200 * 1.25. The pipeline
extends the shorter side to the input's aspect ratio (HRNet's ``_box2cs``: 256x192 for the
published recipe), as for every dataset. Keypoints are taken as they are in the file (COCO's
pixel frame, which is also the frame of the results file). A record also keeps image_id, bbox
(x, y, w, h), area (the crop box's area at the run's input aspect ratio: what OKS-NMS compares)
and score (1 for ground-truth boxes).

evaluate: the raw results {image_id, keypoints 17 x (x, y, score), box_score, area} go to
``metrics.coco_oks_ap`` (HRNet rescoring, OKS-NMS, pycocotools); headline = AP (0..1). When the
evaluated records are not all of them (--maxValSamples cut them short, or a subset of indices),
the ground truth is restricted to the images of those records.
"""
import json
import os
import tempfile

import numpy as np

from datasets import register_dataset
from datasets.base import Reader, check_data_dir, first_existing, sample_limit
from datasets.formats import load_json
from datasets.joints import COCO
from datasets.pipeline import crop_box
from utils.errors import DatasetError
from utils.io import write_json

PADDING = 1.25
PIXEL_STD = 200.0


def box_to_center_scale(x, y, w, h, padding=PADDING):
    """HRNet's _box2cs without the aspect ratio (the pipeline applies it): (x, y, w, h) box ->
    center (2,), scale (2,) = padded (w, h) in units of 200 px."""
    center = np.array([x + w * 0.5, y + h * 0.5], np.float32)
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], np.float32) * padding
    return center, scale


def clean_box(bbox, width, height):
    """HRNet's box cleaning: clip to the image. -> (x, y, w, h) or None when empty."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 > x1 and y2 > y1:
        return [x1, y1, x2 - x1, y2 - y1]
    return None


def _load_json(path, what):
    try:
        return load_json(path, what)
    except DatasetError as exc:
        raise DatasetError(f'COCO: {exc}') from None


@register_dataset('COCO')
class COCOReader(Reader):
    joint_set = COCO

    def __init__(self, opts, split):
        super().__init__(opts, split)
        root = opts.dataDir
        check_data_dir('COCO', root)
        year = f'{split}2017'
        ann = os.path.join(root, 'annotations', f'person_keypoints_{year}.json')
        if not os.path.isfile(ann):
            raise DatasetError(f'COCO: expected annotations/person_keypoints_{year}.json under {root} '
                               f'(see README, Preparing datasets)')
        image_dir = first_existing([os.path.join(root, 'images', year), os.path.join(root, year)], 'dir')
        if image_dir is None:
            raise DatasetError(f'COCO: expected the images in images/{year}/ or {year}/ under {root} '
                               f'(see README, Preparing datasets)')
        self.annotation_path = ann
        self.input_size = tuple(opts.inputRes.wh)       # (W, H): the crop boxes' aspect ratio
        data = _load_json(ann, 'annotations')
        if not isinstance(data, dict) or not isinstance(data.get('images'), list) \
                or not isinstance(data.get('annotations'), list):
            raise DatasetError(f"COCO: {ann}: not a COCO annotation file (expected an object with "
                               f"'images' and 'annotations' lists)")
        images = {}
        for n, im in enumerate(data['images']):
            try:
                images[im['id']] = dict(file=im.get('file_name', '%012d.jpg' % int(im['id'])),
                                        width=float(im['width']), height=float(im['height']))
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f'COCO: {ann}: images[{n}] needs id, width and height ({exc!r})') from None
        limit = sample_limit(opts, split)
        det_file = getattr(opts, 'detFile', None) if split == 'val' else None
        self.use_detections = bool(det_file)
        self.truncated = False           # set when --max*Samples cut the records short
        if det_file:
            self._read_detections(det_file, images, image_dir, limit)
        else:
            self._read_ground_truth(data['annotations'], images, image_dir, ann, limit)

    def _read_ground_truth(self, annotations, images, image_dir, ann, limit):
        k = COCO.num_joints
        by_image = {}
        for n, a in enumerate(annotations):
            try:
                by_image.setdefault(a['image_id'], []).append((n, a))
            except (KeyError, TypeError):
                raise DatasetError(f'COCO: {ann}: annotations[{n}] has no image_id') from None
        for image_id, im in images.items():
            for n, a in by_image.get(image_id, []):
                if limit and len(self.records) >= limit:
                    self.truncated = True
                    return
                if a.get('category_id', 1) != 1 or a.get('iscrowd', 0):
                    continue
                try:
                    kp = np.asarray(a['keypoints'], np.float64).reshape(k, 3)
                    num = int(a.get('num_keypoints', int((kp[:, 2] > 0).sum())))
                    box = clean_box(a['bbox'], im['width'], im['height'])
                    area = float(a.get('area', 1.0))
                    finite = np.all(np.isfinite(np.asarray(a['bbox'], np.float64))) and np.all(np.isfinite(kp[:, 2]))
                except (KeyError, TypeError, ValueError) as exc:
                    raise DatasetError(f'COCO: {ann}: annotations[{n}]: needs bbox (4 numbers) and '
                                       f'keypoints ({k} x 3 numbers) ({type(exc).__name__}: {exc})') from None
                if not finite:
                    raise DatasetError(f'COCO: {ann}: annotations[{n}]: bbox and keypoint flags must be '
                                       f'finite numbers')
                if num <= 0 or kp[:, 2].max() <= 0 or box is None or area <= 0:
                    continue
                center, scale = box_to_center_scale(*box)
                vis = (kp[:, 2] > 0).astype(np.float32)
                self.add(f'COCO: {ann}: annotations[{n}]', image=os.path.join(image_dir, im['file']),
                         center=center, scale=scale, keypoints=kp[:, :2], visible=vis,
                         image_id=image_id, ann_id=a.get('id'), bbox=np.array(box, np.float32), score=1.0,
                         area=float(np.prod(crop_box(scale, self.input_size))))

    def _read_detections(self, det_file, images, image_dir, limit):
        path = det_file
        if not os.path.isfile(path) and not os.path.isabs(path):
            path = first_existing([os.path.join(self.opts.dataDir, det_file)]) or det_file
        if not os.path.isfile(path):
            raise DatasetError(f'COCO: detection file {det_file} not found (--detFile: a json list of '
                               f'{{image_id, category_id, bbox, score}})')
        dets = _load_json(path, 'detections')
        if not isinstance(dets, list):
            raise DatasetError(f'COCO: {path}: expected a json list of detections '
                               f'{{image_id, category_id, bbox, score}}, found {type(dets).__name__}')
        k = COCO.num_joints
        threshold = float(getattr(self.opts, 'detThreshold', 0.0) or 0.0)
        for n, d in enumerate(dets):
            if limit and len(self.records) >= limit:
                self.truncated = True
                break
            try:
                if d.get('category_id', 1) != 1:
                    continue
                score = float(d['score'])
                x, y, w, h = (float(v) for v in d['bbox'])
                image_id = d['image_id']
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise DatasetError(f'COCO: {path}: detection {n}: needs image_id, bbox (4 numbers) '
                                   f'and score ({type(exc).__name__}: {exc})') from None
            if not (np.isfinite(score) and np.all(np.isfinite([x, y, w, h]))):
                raise DatasetError(f'COCO: {path}: detection {n}: score and bbox must be finite numbers')
            if score < threshold or w <= 0 or h <= 0:
                continue
            center, scale = box_to_center_scale(x, y, w, h)
            name = images[image_id]['file'] if image_id in images else '%012d.jpg' % int(image_id)
            self.add(f'COCO: {path}: detection {n}', image=os.path.join(image_dir, name), center=center,
                     scale=scale, keypoints=np.zeros((k, 2), np.float32), visible=np.zeros(k, np.float32),
                     image_id=image_id, bbox=np.array([x, y, w, h], np.float32), score=score,
                     area=float(np.prod(crop_box(scale, self.input_size))))

    def results(self, preds, scores, indices):
        """Raw result list: {image_id, category_id, keypoints (flat 17 x [x, y, score]), box_score, area}."""
        preds = np.asarray(preds, np.float64)
        scores = np.asarray(scores, np.float64).reshape(preds.shape[:2])
        out = []
        for p, s, i in zip(preds, scores, np.asarray(indices)):
            r = self.records[int(i)]
            kp = np.concatenate([p, s[:, None]], axis=1)
            out.append(dict(image_id=r['image_id'], category_id=1,
                            keypoints=[round(float(v), 3) for v in kp.reshape(-1)],
                            box_score=float(r['score']), area=float(r['area'])))
        return out

    def evaluate(self, preds, scores, indices):
        """OKS AP through pycocotools on the annotation file; headline = AP (0..1)."""
        from utils import metrics
        results = self.results(preds, scores, indices)
        indices = np.asarray(indices, np.int64)
        if not self.truncated and np.array_equal(np.unique(indices), np.arange(len(self.records))):
            return self._ap(metrics, results, self.annotation_path)
        covered = {self.records[int(i)]['image_id'] for i in indices}
        # a subset of the images: restrict the ground truth to them
        data = _load_json(self.annotation_path, 'annotations')
        data['images'] = [im for im in data['images'] if im['id'] in covered]
        data['annotations'] = [a for a in data['annotations'] if a['image_id'] in covered]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'gt_subset.json')
            with open(path, 'w') as f:
                json.dump(data, f)
            return self._ap(metrics, results, path)

    @staticmethod
    def _ap(metrics, results, gt_path):
        table = metrics.coco_oks_ap(results, gt_path)
        return table, table['AP']

    def save_predictions(self, preds, scores, indices, out_dir):
        """results.json: the raw result list of ``results`` (before rescoring and OKS-NMS)."""
        path = os.path.join(out_dir, 'results.json')
        write_json(path, self.results(preds, scores, indices), indent=None)
        return path
