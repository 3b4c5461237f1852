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
Box -> center / scale as HRNet's ``_box2cs``: center = (x + w / 2, y + h / 2), the shorter side
extended to the run's input aspect ratio (0.75 for the published 256x192), scale = (w, h) / 200
x 1.25, with the reference's float32 arithmetic (the pipeline, which extends every dataset's box
to the input's aspect, then uses it as it is). Keypoints are taken as they are in the file (COCO's
pixel frame, which is also the frame of the results file). A record also keeps image_id, bbox
(x, y, w, h), area (the crop box's area at the run's input aspect ratio: what OKS-NMS compares)
and score (1 for ground-truth boxes).

evaluate: the raw results {image_id, keypoints 17 x (x, y, score), box_score, area} go to
``metrics.coco_oks_ap`` (HRNet rescoring, OKS-NMS, pycocotools); headline = AP (0..1). When the
evaluated records are not all of them (--maxValSamples cut them short, or a subset of indices),
the ground truth is restricted to the images of those records.
"""
import contextlib
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


def box_to_center_scale(x, y, w, h, aspect_ratio, padding=PADDING):
    """HRNet's _box2cs: (x, y, w, h) box -> center (2,), scale (2,) float32 in units of 200 px,
    the shorter side extended to ``aspect_ratio`` (width / height of the input), x ``padding``.
    The same arithmetic as the reference, so the crop is theirs bit for bit."""
    center = np.zeros(2, np.float32)
    center[0] = x + w * 0.5
    center[1] = y + h * 0.5
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w * 1.0 / PIXEL_STD, h * 1.0 / PIXEL_STD], np.float32)
    return center, scale * padding


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
    bottom_up = True         # can make one record per image with all its people

    def __init__(self, opts, split, bottom_up=False):
        super().__init__(opts, split)
        self.per_image = bool(bottom_up)
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
        self.aspect_ratio = self.input_size[0] * 1.0 / self.input_size[1]
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
        if self.per_image:
            self._read_images(data['annotations'], images, image_dir, ann, limit)
        elif det_file:
            self._read_detections(det_file, images, image_dir, limit)
        else:
            self._read_ground_truth(data['annotations'], images, image_dir, ann, limit)

    def _read_images(self, annotations, images, image_dir, ann, limit):
        """Bottom-up records: one per image with all its people that have keypoints (the others
        and the crowd regions become the loss mask, as HigherHRNet's ``get_mask``); for training,
        images without any such person are left out."""
        k = COCO.num_joints
        by_image = {}
        for n, a in enumerate(annotations):
            if not isinstance(a, dict) or 'image_id' not in a:
                raise DatasetError(f'COCO: {ann}: annotations[{n}] has no image_id')
            if a.get('category_id', 1) == 1:
                by_image.setdefault(a['image_id'], []).append((n, a))
        for image_id, im in images.items():
            if limit and len(self.records) >= limit:
                self.truncated = True
                return
            people, ignore = [], []
            for n, a in by_image.get(image_id, []):
                try:
                    kp = np.asarray(a.get('keypoints', np.zeros(3 * k)), np.float64).reshape(k, 3)
                except (TypeError, ValueError) as exc:
                    raise DatasetError(f'COCO: {ann}: annotations[{n}]: keypoints must be {k} x 3 numbers ({exc})') from None
                if not np.all(np.isfinite(kp[:, 2])):
                    raise DatasetError(f'COCO: {ann}: annotations[{n}]: keypoint flags must be finite numbers')
                if a.get('iscrowd', 0) or int(a.get('num_keypoints', (kp[:, 2] > 0).sum())) == 0:
                    if 'segmentation' in a:
                        ignore.append(a['segmentation'])
                    continue
                people.append(kp)
            if self.split == 'train' and not people:
                continue
            kp = np.stack(people) if people else np.zeros((0, k, 3))
            w, h = im['width'], im['height']
            self.add(f'COCO: {ann}: image {image_id}', image=os.path.join(image_dir, im['file']),
                     center=np.array([w / 2.0, h / 2.0]), scale=np.array([w, h]) / PIXEL_STD,
                     keypoints=kp[:, :, :2], visible=(kp[:, :, 2] > 0).astype(np.float32), image_id=image_id,
                     width=int(w), height=int(h), ignore=ignore)

    def mask(self, record, height, width):
        """Bottom-up loss mask (height, width) uint8: 0 on crowd regions and on people without
        keypoints (their segmentation, through pycocotools), 1 elsewhere; None without any."""
        if not record.get('ignore'):
            return None
        from pycocotools import mask as mask_utils
        covered = np.zeros((height, width), np.float32)
        for seg in record['ignore']:
            rles = mask_utils.frPyObjects(seg, height, width)
            decoded = mask_utils.decode(rles)
            covered += decoded.reshape(height, width, -1).sum(-1)
        return (covered < 0.5).astype(np.uint8)

    def people_results(self, predictions):
        """Bottom-up results: per person {image_id, category_id, keypoints (flat K x [x, y, score]),
        score} in COCO's results layout."""
        out = []
        for p in predictions:
            image_id = self.records[int(p['index'])]['image_id']
            for kp, s, score in zip(p['keypoints'], p['scores'], p['score']):
                flat = np.concatenate([kp, s[:, None]], axis=1).reshape(-1)
                out.append(dict(image_id=image_id, category_id=1, keypoints=[round(float(v), 3) for v in flat],
                                score=float(score)))
        return out

    def evaluate_predictions(self, predictions):
        if not self.per_image:
            return super().evaluate_predictions(predictions)
        from utils import metrics
        results = self.people_results(predictions)
        if not results:                      # nobody found anywhere: nothing scores
            return {name: 0.0 for name in metrics.COCO_STATS}, 0.0
        covered = [self.records[int(p['index'])]['image_id'] for p in predictions]
        with self._ground_truth(covered) as gt_path:
            table = metrics.coco_keypoint_ap(results, gt_path)
        return table, table['AP']

    def save_all(self, predictions, out_dir):
        if not self.per_image:
            return super().save_all(predictions, out_dir)
        path = os.path.join(out_dir, 'results.json')
        write_json(path, self.people_results(predictions), indent=None)
        return path

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
                center, scale = box_to_center_scale(*box, self.aspect_ratio)
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
            center, scale = box_to_center_scale(x, y, w, h, self.aspect_ratio)
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
        covered = [self.records[int(i)]['image_id'] for i in np.asarray(indices, np.int64)]
        with self._ground_truth(covered) as gt_path:
            return self._ap(metrics, results, gt_path)

    @contextlib.contextmanager
    def _ground_truth(self, image_ids):
        """The annotation file, or, when the evaluated records are not all of them (--max*Samples,
        a subset), a temporary copy restricted to their images."""
        covered = set(image_ids)
        every = {r['image_id'] for r in self.records}
        if not self.truncated and covered == every:
            yield self.annotation_path
            return
        data = _load_json(self.annotation_path, 'annotations')
        data['images'] = [im for im in data['images'] if im['id'] in covered]
        data['annotations'] = [a for a in data['annotations'] if a['image_id'] in covered]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'gt_subset.json')
            with open(path, 'w') as f:
                json.dump(data, f)
            yield path

    @staticmethod
    def _ap(metrics, results, gt_path):
        table = metrics.coco_oks_ap(results, gt_path)
        return table, table['AP']

    def save_predictions(self, preds, scores, indices, out_dir):
        """results.json: the raw result list of ``results`` (before rescoring and OKS-NMS)."""
        path = os.path.join(out_dir, 'results.json')
        write_json(path, self.results(preds, scores, indices), indent=None)
        return path
