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
import math
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


def _is_id(v):
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _number(obj, key, where, default=None):
    """obj[key] as a finite float (``default`` when absent); else a DatasetError naming where."""
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DatasetError(f'{where}: {key} must be a finite number, got {v!r}'[:200])
    return float(v)


def _integer(obj, key, where, default=None):
    v = _number(obj, key, where, default)
    if v != int(v):
        raise DatasetError(f'{where}: {key} must be an integer, got {v!r}')
    return int(v)


def _numbers(obj, key, n, where):
    """obj[key] as n finite floats; else a DatasetError naming where."""
    v = obj.get(key)
    if not isinstance(v, list) or len(v) != n or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                     or not math.isfinite(x) for x in v):
        raise DatasetError(f'{where}: {key} must be {n} finite numbers, got {v!r}'[:200])
    return [float(x) for x in v]


def _segmentation(v, where):
    """A COCO segmentation: polygons (a list of lists of numbers) or an RLE {counts, size}."""
    if isinstance(v, list) and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and
                                   all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                       for x in p) for p in v):
        return v
    if isinstance(v, dict) and isinstance(v.get('size'), list) and len(v['size']) == 2 and \
            isinstance(v.get('counts'), (list, str)):
        return v
    raise DatasetError(f'{where}: segmentation must be polygons or an RLE {{counts, size}}'[:200])


def _annotation(a, where, k):
    """One person annotation, checked: dict(id, image_id, category_id, iscrowd, keypoints (k, 3),
    num_keypoints, bbox (4 floats or None), area, segmentation or None). Anything malformed is a
    DatasetError naming ``where``."""
    if not isinstance(a, dict) or not _is_id(a.get('image_id')):
        raise DatasetError(f'{where}: needs an object with an integer or text image_id')
    category = _integer(a, 'category_id', where, 1)
    crowd = _integer(a, 'iscrowd', where, 0)
    kp = a.get('keypoints', [0] * (3 * k))
    if not isinstance(kp, list) or len(kp) != 3 * k or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                            for x in kp):
        raise DatasetError(f'{where}: keypoints must be {k} x 3 numbers'[:200])
    kp = np.asarray(kp, np.float64).reshape(k, 3)
    if not np.all(np.isfinite(kp[:, 2])) or np.any(kp[:, 2] < 0):
        raise DatasetError(f'{where}: keypoint flags must be 0, 1 or 2')
    labelled = kp[:, 2] > 0
    if not np.all(np.isfinite(kp[labelled, :2])):
        raise DatasetError(f'{where}: labelled keypoint {COCO.names[int(np.flatnonzero(labelled & ~np.all(np.isfinite(kp[:, :2]), 1))[0])]} '
                           f'is not a finite number')
    num = _integer(a, 'num_keypoints', where, int(labelled.sum()))
    bbox = _numbers(a, 'bbox', 4, where) if 'bbox' in a else None
    area = _number(a, 'area', where, 1.0)
    seg = _segmentation(a['segmentation'], where) if a.get('segmentation') is not None else None
    return dict(id=a.get('id'), image_id=a['image_id'], category_id=category, iscrowd=bool(crowd), keypoints=kp,
                num_keypoints=num, bbox=bbox, area=area, segmentation=seg)


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
            where = f'COCO: {ann}: images[{n}]'
            if not isinstance(im, dict) or not _is_id(im.get('id')):
                raise DatasetError(f'{where}: needs an object with an integer or text id')
            width, height = _number(im, 'width', where), _number(im, 'height', where)
            if width <= 0 or height <= 0:
                raise DatasetError(f'{where}: width and height must be positive')
            name = im.get('file_name', '%012d.jpg' % int(im['id']) if isinstance(im['id'], int) else str(im['id']))
            if not isinstance(name, str) or not name:
                raise DatasetError(f'{where}: file_name must be a file name')
            images[im['id']] = dict(file=name, width=width, height=height)
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
        by_image = self._by_image(annotations, ann)
        for image_id, im in images.items():
            if limit and len(self.records) >= limit:
                self.truncated = True
                return
            people, ignore = [], []
            for n, a in by_image.get(image_id, []):
                if a['iscrowd'] or a['num_keypoints'] == 0:
                    if a['segmentation'] is not None:
                        ignore.append(a['segmentation'])
                    continue
                people.append(a['keypoints'])
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
            try:
                decoded = mask_utils.decode(mask_utils.frPyObjects(seg, height, width))
            except Exception as exc:  # noqa: BLE001 -- pycocotools' own errors on a malformed segmentation
                raise DatasetError(f'COCO: {self.annotation_path}: image {record["image_id"]}: a segmentation '
                                   f'pycocotools cannot decode ({type(exc).__name__}: {exc})') from None
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

    def _by_image(self, annotations, ann):
        """{image_id: [(n, parsed annotation)]} of the person annotations (``_annotation``)."""
        by_image = {}
        for n, a in enumerate(annotations):
            parsed = _annotation(a, f'COCO: {ann}: annotations[{n}]', COCO.num_joints)
            if parsed['category_id'] == 1:
                by_image.setdefault(parsed['image_id'], []).append((n, parsed))
        return by_image

    def _read_ground_truth(self, annotations, images, image_dir, ann, limit):
        by_image = self._by_image(annotations, ann)
        for image_id, im in images.items():
            for n, a in by_image.get(image_id, []):
                if limit and len(self.records) >= limit:
                    self.truncated = True
                    return
                kp = a['keypoints']
                if a['iscrowd'] or a['num_keypoints'] <= 0 or kp[:, 2].max() <= 0 or a['bbox'] is None:
                    continue
                box = clean_box(a['bbox'], im['width'], im['height'])
                if box is None or a['area'] <= 0:
                    continue
                center, scale = box_to_center_scale(*box, self.aspect_ratio)
                vis = (kp[:, 2] > 0).astype(np.float32)
                self.add(f'COCO: {ann}: annotations[{n}]', image=os.path.join(image_dir, im['file']),
                         center=center, scale=scale, keypoints=kp[:, :2], visible=vis,
                         image_id=image_id, ann_id=a['id'], bbox=np.array(box, np.float32), score=1.0,
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
            where = f'COCO: {path}: detection {n}'
            if not isinstance(d, dict) or not _is_id(d.get('image_id')):
                raise DatasetError(f'{where}: needs an object with image_id, bbox (4 numbers) and score')
            if _integer(d, 'category_id', where, 1) != 1:
                continue
            score = _number(d, 'score', where)
            x, y, w, h = _numbers(d, 'bbox', 4, where)
            image_id = d['image_id']
            if score < threshold or w <= 0 or h <= 0:
                continue
            center, scale = box_to_center_scale(x, y, w, h, self.aspect_ratio)
            if image_id not in images and not isinstance(image_id, int):
                raise DatasetError(f'{where}: image_id {image_id!r} is not an image of the annotation file')
            name = images[image_id]['file'] if image_id in images else '%012d.jpg' % image_id
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
