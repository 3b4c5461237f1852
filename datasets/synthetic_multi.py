"""Synthetic multi-person scenes in the COCO person-keypoints layout (17 keypoints).

A scene is a pure function of ``(seed, res, max_people)`` (``render_scene``), and a dataset's
scene ``index`` of ``record_seed(opts.seed, split, index)`` (``datasets.synthetic``: train and val draw from
disjoint seed streams). The people are ``datasets.synthetic``'s: ``sample_person`` poses each one,
``render_person`` draws it, on the same cluttered backgrounds; this module lays them out, draws
them in depth order and labels them as COCO does.

Layout: 1 to ``max_people`` people (a uniform count before the hidden ones are left out, below;
about 3.2 people a scene on average for 6), standing heights (ankle to head top, the
renderer's ``k``) log-uniform in 25-95 % of the image side. Half the scenes stand on a ground
plane (the feet below a horizon by a fixed fraction of the height, so that smaller people stand
further up, as in photographs); the others place people freely. A person is often placed beside
an earlier one, so people overlap. Painter's order: the taller (nearer) a person, the later it is
drawn. A person whose silhouette is less than ``MIN_VISIBLE_FRACTION`` visible (behind nearer
people) or smaller than ``MIN_AREA`` of the image, or who has no keypoint inside the image, is
left out of the scene (not drawn, so every drawn person is annotated). Now and then small opaque
occluders lie over someone's keypoints, as in ``datasets.synthetic``.

Silhouettes: each person is drawn once into an RGBA layer whose alpha starts at 255 (the
renderer's colours leave 0 there), which gives both the premultiplied colours to composite and the
coverage; the person's mask is the coverage above one half.

Keypoints: the MPII body joints map to COCO's shoulders, elbows, wrists, hips, knees and ankles
(the same person's left and right: ``l_*`` is the person's left, on the image's right when the
person faces the camera). The face points sit where ``datasets.synthetic._head`` draws the face:
the eyes at its eye dots, the nose at the tip of its nose line, the ears on the sides of the head
ellipse, a little below eye level and behind the face (all of them also for a person turned away,
where they are projected through the head).

Visibility, COCO's v (one rule, in this order):

* v = 0 (not labelled; coordinates 0, 0, 0 in exported files): the keypoint is outside the image
  (x or y outside [0, res - 1]);
* v = 1 (labelled, not visible): the keypoint's pixel is covered by a nearer person's silhouette
  or an occluder; or it is self-occluded by the head: nose and eyes of a person whose face is not
  drawn (turned away), an ear whose outward axis points away from the camera by more than 30
  degrees (``EAR_HIDDEN``: the far ear of a head in three-quarter view or profile);
* v = 2 otherwise. Self-occlusion by the person's own limbs (a hand in front of the face, an arm
  behind the torso) is not detected: those keypoints are v = 2, as the renderer has no per-part
  masks.

Per person (``render_scene``): ``mask`` (res, res) bool, the visible silhouette (inside the
image, minus nearer people and occluders); ``bbox`` [x, y, w, h] the tight box of that mask (as
COCO's boxes, which enclose the visible segmentation); ``area`` its pixel count (COCO's area is the
segmentation's area); ``keypoints`` (17, 3) float32 (x, y, v); the export adds ``segmentation`` as
polygons (``cv2.findContours`` outer contours of the mask), ``num_keypoints`` (v > 0) and
``iscrowd`` 0.

Command line: ``python -m datasets.synthetic_multi --export DIR --n N --split train|val
[--res 256] [--seed S] [--maxPeople 6]`` writes ``DIR/annotations/person_keypoints_{split}2017.json``
and ``DIR/{split}2017/*.jpg``, which ``datasets.coco.COCOReader`` reads as it reads COCO.
"""
import argparse
import json
import math
import os
import sys
import time

import cv2
import numpy as np

from datasets.base import sample_limit
from datasets.joints import COCO
from datasets.synthetic import (HEAD_HALF_WIDTH, OUTLINE, SPLIT_CODES, _Draws, _background, _limb_distractors,
                                _random_shape, record_seed, render_person, sample_person)
from utils.errors import ConfigError, PoseError
from utils.io import atomic_write, write_text

MAX_PEOPLE = 6
HEIGHT_RANGE = (0.25, 0.95)      # standing height / image side, log-uniform
GROUND_PROB = 0.5                # scenes whose people stand on a ground plane
BESIDE_PROB = 0.4                # a person placed beside an earlier one (overlaps)
OCCLUDER_PROB = 0.25             # scenes with opaque occluders over someone's keypoints
MIN_VISIBLE_FRACTION = 0.25      # of a person's in-image silhouette, else the person is left out
MIN_AREA = 0.0015                # visible pixels / res^2 (about 100 px at 256), else left out
EAR_HIDDEN = 0.5                 # an ear is hidden when its outward axis has depth < -0.5
MARGIN = 0.3                     # drawing reaches this far (x standing height) beyond the points
MAX_ATTEMPTS = 20                # layouts tried until one keeps somebody

BODY = COCO.names[5:]            # COCO's body keypoints: the renderer's MPII joints of the same names
COCO_NAMES = tuple(n.replace('l_', 'left_', 1) if n.startswith('l_') else
                   n.replace('r_', 'right_', 1) if n.startswith('r_') else n for n in COCO.names)
COCO_SKELETON = [[a + 1, b + 1] for a, b in COCO.skeleton]   # 1-based, as in COCO's files
CATEGORY = dict(supercategory='person', id=1, name='person', keypoints=list(COCO_NAMES),
                skeleton=COCO_SKELETON)


# ------------------------------------------------------------------------------- geometry

def place_person(person, factor, shift):
    """A copy of ``person`` (``sample_person``'s dict) scaled by ``factor`` about the image origin
    and moved by ``shift`` (2,) px: every point, depth, radius and length of the drawing."""
    fx, fy = float(shift[0]), float(shift[1])
    f = float(factor)
    out = dict(person)
    out['points'] = {n: (x * f + fx, y * f + fy) for n, (x, y) in person['points'].items()}
    out['depths'] = {n: z * f for n, z in person['depths'].items()}
    out['radii'] = {n: (v[0] * f, v[1] * f) if isinstance(v, tuple) else v * f for n, v in person['radii'].items()}
    out['joints'] = person['joints'] * f + (fx, fy)
    out['center'] = person['center'] * f + (fx, fy)
    for key in ('side', 'head_size', 'k'):
        out[key] = person[key] * f
    return out


def head_frame(person):
    """The head ellipse as ``datasets.synthetic._head`` draws it.

    Returns dict: center (2,) px, axis (2,) unit neck -> top, normal (2,), half_length (along the
    axis) and half_width px, angle (degrees of the axis), outline px.
    """
    P, R = person['points'], person['radii']
    neck, top = P['upper_neck'], P['head_top']
    length = math.hypot(top[0] - neck[0], top[1] - neck[1])
    ax, ay = ((top[0] - neck[0]) / length, (top[1] - neck[1]) / length) if length > 1e-6 else (0.0, -1.0)
    hw = HEAD_HALF_WIDTH * R['head_len']
    hl = max(0.55 * length, 0.9 * hw)
    c = (neck[0] + ax * 0.5 * length, neck[1] + ay * 0.5 * length)
    return dict(center=np.array(c), axis=np.array((ax, ay)), normal=np.array((-ay, ax)), half_length=hl,
                half_width=hw, angle=math.degrees(math.atan2(ay, ax)), outline=max(1.0, OUTLINE * person['k']))


def head_left_depth(person):
    """Depth component (towards the camera, -1 .. 1) of the head's unit left axis.

    left = -(up x forward) in the image frame (x right, y down, z to the camera: a left-handed
    frame), with up the unit neck -> top axis (depths included) and forward the head's unit
    forward axis, whose image part is ``head_fwd``; the depth of a cross product needs only the
    image parts of forward.
    """
    P, Z = person['points'], person['depths']
    up = np.array([P['head_top'][0] - P['upper_neck'][0], P['head_top'][1] - P['upper_neck'][1],
                   Z['head_top'] - Z['upper_neck']])
    up /= max(float(np.linalg.norm(up)), 1e-9)
    fx, fy = person['head_fwd']
    return float(-(up[0] * fy - up[1] * fx))


def face_points(person):
    """(5, 2) px: nose tip, left eye, right eye, left ear, right ear (COCO's first five), where
    ``datasets.synthetic._head`` draws (or would draw) them."""
    h = head_frame(person)
    c, a, hl, hw = h['center'], h['axis'], h['half_length'], h['half_width']
    f, left = np.array(person['head_fwd']), np.array(person['head_left'])

    def at(along, lateral, forward=0.8):
        return c + f * forward * hw + a * along * hl + left * lateral * hw

    return np.stack([at(-0.27, 0.0, 1.0), at(0.07, 0.42), at(0.07, -0.42), at(-0.1, 0.95, -0.15),
                     at(-0.1, -0.95, -0.15)])


def coco_points(person):
    """(17, 2) float64 px in COCO order: the face points, then the MPII body joints."""
    P = person['points']
    body = np.array([P[n] for n in BODY])
    return np.concatenate([face_points(person), body])


def self_hidden(person):
    """(17,) bool: keypoints hidden by the person's own head (see the module docstring)."""
    hidden = np.zeros(COCO.num_joints, bool)
    if not person['face']:
        hidden[:3] = True               # nose and eyes of a person turned away
    lz = head_left_depth(person)
    hidden[3] = lz < -EAR_HIDDEN        # left ear turned away
    hidden[4] = lz > EAR_HIDDEN         # right ear turned away
    return hidden


# ------------------------------------------------------------------------------- layout

def _person_seed(seed, attempt, j):
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 77, attempt, j]).generate_state(1)[0])


def _layout(seed, res, max_people, attempt, r):
    """People (placed ``sample_person`` dicts with 'seed'), far to near (painter's order)."""
    n = r.integer(1, max_people + 1)
    ground = r.chance(GROUND_PROB)
    horizon, camera = r.u(0.15, 0.5) * res, r.u(0.75, 1.0)
    lo, hi = (math.log(v * res) for v in HEIGHT_RANGE)
    people = []
    for j in range(n):
        ps = _person_seed(seed, attempt, j)
        p = sample_person(ps, res)
        height = math.exp(r.u(lo, hi))
        f = height / p['k']
        jl, jh = p['joints'].min(0) * f, p['joints'].max(0) * f
        if people and r.chance(BESIDE_PROB):
            other = people[r.integer(0, len(people))]
            x = other['center'][0] + r.normal(0.0, 0.3) * max(height, other['k'])
        else:
            x = r.u(0.05, 0.95) * res
        if ground:
            feet = horizon + camera * height * r.u(0.95, 1.05)
            y_shift = feet - jh[1]
        else:
            y_shift = r.u(0.1, 0.9) * res - (jl[1] + jh[1]) / 2
        placed = place_person(p, f, (x - (jl[0] + jh[0]) / 2, y_shift))
        placed['seed'] = ps
        people.append(placed)
    people.sort(key=lambda q: q['k'])
    return people


# ------------------------------------------------------------------------------- drawing

def _layer(x0, y0, x1, y1, draw):
    """Draw into an RGBA region [y0:y1, x0:x1] (premultiplied RGB, alpha 255 = untouched).

    draw(canvas, offset (x0, y0)) draws in canvas pixels. Returns the layer (h, w, 4) uint8."""
    canvas = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
    canvas[..., 3] = 255
    draw(canvas, (x0, y0))
    return canvas


def _region(points, reach, res):
    """Integer box (x0, y0, x1, y1) around the (N, 2) points +- reach, clipped to the image,
    or None when nothing of it is inside."""
    lo, hi = points.min(0) - reach, points.max(0) + reach
    x0, y0 = max(0, int(math.floor(lo[0]))), max(0, int(math.floor(lo[1])))
    x1, y1 = min(res, int(math.ceil(hi[0])) + 1), min(res, int(math.ceil(hi[1])) + 1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _person_layer(person, res):
    """-> (layer, box) of the person drawn alone, or (None, None) when it is outside the image."""
    pts = np.array(list(person['points'].values()))
    box = _region(pts, MARGIN * person['k'] + 2.0, res)
    if box is None:
        return None, None

    def draw(canvas, offset):
        render_person(canvas, place_person(person, 1.0, (-offset[0], -offset[1])), _Draws(person['seed'], 1))

    return _layer(*box, draw), box


def _composite(img, layer, box):
    """Draw an RGBA ``layer`` (from ``_layer``) over ``img`` (res, res, 3) uint8 in place."""
    x0, y0, x1, y1 = box
    view = img[y0:y1, x0:x1]
    keep = cv2.cvtColor(layer[..., 3], cv2.COLOR_GRAY2RGB)
    view[...] = cv2.add(cv2.cvtColor(layer, cv2.COLOR_RGBA2RGB), cv2.multiply(view, keep, scale=1.0 / 255.0))


def _full_mask(layer, box, res):
    mask = np.zeros((res, res), bool)
    if layer is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = layer[..., 3] < 128
    return mask


def _inside(points, res):
    return np.all((points >= 0) & (points <= res - 1), axis=1)


def _select(people, masks, res):
    """Indices (far to near) of the people kept: enough of them visible behind the nearer kept
    ones, and some keypoint inside the image."""
    cover = np.zeros((res, res), bool)
    keep = []
    min_area = MIN_AREA * res * res
    for i in reversed(range(len(people))):
        full = int(masks[i].sum())
        seen = int(np.count_nonzero(masks[i] & ~cover))
        if full >= min_area and seen >= max(min_area, MIN_VISIBLE_FRACTION * full) \
                and _inside(coco_points(people[i]), res).any():
            keep.append(i)
            cover |= masks[i]
    return keep[::-1]


def _occluders(img, people, res, r):
    """Opaque random shapes over some keypoints of some people, drawn on ``img``; -> mask (res, res)."""
    mask = np.zeros((res, res), bool)
    if not people or not r.chance(OCCLUDER_PROB):
        return mask
    for _ in range(r.integer(1, 3)):
        p = people[r.integer(0, len(people))]
        pts = coco_points(p)
        x, y = pts[r.integer(0, len(pts))]
        k = p['k']
        centre = (x + r.normal(0, 0.05 * k), y + r.normal(0, 0.05 * k))
        size = r.u(0.06, 0.16) * k
        box = _region(np.array([centre]), 1.5 * size + 2.0, res)
        if box is None:
            continue
        layer = _layer(*box, lambda canvas, o: _random_shape(canvas, r, res, size,
                                                             (centre[0] - o[0], centre[1] - o[1])))
        _composite(img, layer, box)
        mask |= _full_mask(layer, box, res)
    return mask


# ------------------------------------------------------------------------------- scenes

def _check(res, max_people):
    if int(res) < 32:
        raise ConfigError(f'synthetic_multi: image side {res} too small (at least 32 px)')
    if int(max_people) < 1:
        raise ConfigError(f'synthetic_multi: max_people must be at least 1, got {max_people}')


def _scene_people(seed, res, max_people):
    """-> (people far to near, their RGBA layers, boxes, full masks), at least one person."""
    r = _Draws(seed, 10)
    for attempt in range(MAX_ATTEMPTS):
        people = _layout(seed, res, max_people, attempt, r)
        drawn = [_person_layer(p, res) for p in people]
        masks = [_full_mask(layer, box, res) for layer, box in drawn]
        keep = _select(people, masks, res)
        if keep:
            return ([people[i] for i in keep], [drawn[i][0] for i in keep], [drawn[i][1] for i in keep],
                    [masks[i] for i in keep])
    # practically unreachable: one person in the middle of the image
    p = sample_person(_person_seed(seed, MAX_ATTEMPTS, 0), res)
    p = place_person(p, 1.0, (res / 2 - p['center'][0], res / 2 - p['center'][1]))
    p['seed'] = _person_seed(seed, MAX_ATTEMPTS, 0)
    layer, box = _person_layer(p, res)
    return [p], [layer], [box], [_full_mask(layer, box, res)]


def _label(person, full, cover, res):
    """One person's record from its full mask and the cover of what lies in front of it."""
    pts = coco_points(person)
    inside = _inside(pts, res)
    ij = np.clip(np.rint(pts).astype(np.int64), 0, res - 1)
    covered = cover[ij[:, 1], ij[:, 0]]
    v = np.where(inside, np.where(covered | self_hidden(person), 1, 2), 0)
    mask = full & ~cover
    area = np.count_nonzero(mask)
    if area:
        ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        bbox = [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]
    else:   # everything hidden by occluders: the labelled keypoints' extent
        lo, hi = pts[inside].min(0), pts[inside].max(0)
        bbox = [float(lo[0]), float(lo[1]), float(hi[0] - lo[0] + 1), float(hi[1] - lo[1] + 1)]
    h = head_frame(person)
    return dict(keypoints=np.concatenate([pts, v[:, None]], 1).astype(np.float32), bbox=bbox,
                area=float(area), mask=mask, num_keypoints=int((v > 0).sum()), height=float(person['k']),
                facing=bool(person['facing']), face=bool(person['face']), seed=int(person['seed']),
                head=dict(center=h['center'], half_length=h['half_length'], half_width=h['half_width'],
                          angle=h['angle'], outline=h['outline']))


def render_scene(seed, res=256, max_people=MAX_PEOPLE):
    """One scene, a pure function of ``(seed, res, max_people)``.

    Returns (image (res, res, 3) uint8 RGB, people): a list, far to near (drawing order), of dicts
    with keypoints (17, 3) float32 (x, y px 0-based, v in {0, 1, 2}, COCO's order and visibility:
    see the module docstring; coordinates are kept for v = 0), bbox [x, y, w, h] (the visible
    mask's tight box), area (visible pixels), mask (res, res) bool (the visible silhouette),
    num_keypoints (v > 0), height (standing height px), facing (the body faces the camera), face
    (the face is drawn), seed (the person's ``sample_person`` seed) and head (the drawn head
    ellipse: center (2,), half_length, half_width, angle degrees, outline px).
    """
    seed, res, max_people = int(seed) & 0xFFFFFFFF, int(res), int(max_people)
    _check(res, max_people)
    people, layers, boxes, masks = _scene_people(seed, res, max_people)
    r = _Draws(seed, 11)
    img = _background(r, res)
    k = float(np.median([p['k'] for p in people]))
    _limb_distractors(img, r, res, k, max(1.0, OUTLINE * k))
    alpha = r.u(0.45, 0.85)          # the scene behind the people a little less contrasted
    img = cv2.convertScaleAbs(img, alpha=alpha, beta=(1 - alpha) * r.u(60, 200))
    for layer, box in zip(layers, boxes):
        _composite(img, layer, box)
    cover = _occluders(img, people, res, _Draws(seed, 12))
    out = [None] * len(people)
    for i in reversed(range(len(people))):      # nearest first: the cover grows backwards
        out[i] = _label(people[i], masks[i], cover, res)
        cover = cover | masks[i]
    return img, out


# ------------------------------------------------------------------------------- COCO files

def mask_polygons(mask):
    """COCO polygons [[x1, y1, x2, y2, ...], ...] of a bool mask's outer contours (3+ points)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    if not polys and mask.any():        # a sliver: its pixel boxes
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        polys = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return polys


def coco_annotation(person, ann_id, image_id):
    """A COCO person annotation of one ``render_scene`` person; v = 0 keypoints written as 0, 0, 0."""
    kp = person['keypoints'].astype(np.float64)
    flat = []
    for x, y, v in kp:
        flat += [round(float(x), 2), round(float(y), 2), int(v)] if v > 0 else [0, 0, 0]
    return dict(id=int(ann_id), image_id=int(image_id), category_id=1, iscrowd=0, keypoints=flat,
                num_keypoints=int((kp[:, 2] > 0).sum()), bbox=[float(v) for v in person['bbox']],
                area=float(person['area']), segmentation=mask_polygons(person['mask']))


def _split_code(split):
    if split not in SPLIT_CODES:
        raise ConfigError(f'synthetic_multi: unknown split {split!r} (train or val)')
    return SPLIT_CODES[split]


def export(out_dir, n, split='train', res=256, seed=0, max_people=MAX_PEOPLE, quality=95):
    """Write scenes 0 .. n-1 of ``split`` as a COCO person-keypoints dataset.

    out_dir/annotations/person_keypoints_{split}2017.json and out_dir/{split}2017/<id>.jpg, image
    id = index + 1, file name '%012d.jpg' % id. Returns (json path, number of people).
    """
    _split_code(split)
    n = int(n)
    if n < 1:
        raise ConfigError(f'synthetic_multi: --n must be at least 1, got {n}')
    _check(res, max_people)
    year = f'{split}2017'
    image_dir = os.path.join(out_dir, year)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(n):
        image_id = index + 1
        scene_seed = record_seed(seed, split, index)
        img, people = render_scene(scene_seed, res, max_people)
        name = '%012d.jpg' % image_id
        ok, buf = cv2.imencode('.jpg', cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise PoseError(f'synthetic_multi: cannot encode image {name}')
        atomic_write(os.path.join(image_dir, name), lambda f: f.write(buf.tobytes()), binary=True)
        images.append(dict(id=image_id, file_name=name, width=res, height=res, synthetic_seed=scene_seed))
        for p in people:
            annotations.append(coco_annotation(p, len(annotations) + 1, image_id))
    data = dict(info=dict(description='posekit synthetic multi-person scenes (datasets.synthetic_multi)',
                          split=split, seed=int(seed), res=int(res), max_people=int(max_people)),
                licenses=[], images=images, annotations=annotations, categories=[CATEGORY])
    path = os.path.join(out_dir, 'annotations', f'person_keypoints_{year}.json')
    write_text(path, json.dumps(data, separators=(',', ':')))     # plain numbers and lists already
    return path, len(annotations)


class SyntheticScenes:
    """The scenes of one split from the framework's options (not a registered reader):
    ``opts.nTrainSamples`` / ``nValSamples`` scenes (cut to ``maxTrainSamples`` / ``maxValSamples``
    when non-zero) of ``opts.syntheticRes`` px, scene i from ``record_seed(opts.seed, split, i)``.
    ``scene(i)`` -> ``render_scene``'s (image, people)."""

    def __init__(self, opts, split, max_people=MAX_PEOPLE):
        _split_code(split)
        self.split = split
        self.res = int(getattr(opts, 'syntheticRes', 256))
        self.seed = int(getattr(opts, 'seed', 0))
        self.max_people = int(max_people)
        _check(self.res, self.max_people)
        self.n = int(opts.nTrainSamples if split == 'train' else opts.nValSamples)
        cap = sample_limit(opts, split)
        if cap > 0:
            self.n = min(self.n, cap)

    def __len__(self):
        return self.n

    def scene_seed(self, index):
        return record_seed(self.seed, self.split, index)

    def scene(self, index):
        return render_scene(self.scene_seed(index), self.res, self.max_people)

    def export(self, out_dir, n=None):
        return export(out_dir, self.n if n is None else n, self.split, self.res, self.seed, self.max_people)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write synthetic multi-person scenes as a COCO person-keypoints '
                                     'dataset (annotations/person_keypoints_{split}2017.json, {split}2017/*.jpg).')
    parser.add_argument('--export', required=True, metavar='DIR', help='output folder (the COCO --dataDir)')
    parser.add_argument('--n', type=int, default=100, help='number of scenes (images) to write')
    parser.add_argument('--split', default='train', choices=sorted(SPLIT_CODES))
    parser.add_argument('--res', type=int, default=256, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed (scene i of a split is the same for a seed)')
    parser.add_argument('--maxPeople', type=int, default=MAX_PEOPLE, help='at most this many people per scene')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path, people = export(args.export, args.n, args.split, args.res, args.seed, args.maxPeople)
    took = time.perf_counter() - start
    print(f'wrote {args.n} {args.split} scenes ({people} people) to {args.export} ({path}) in {took:.1f} s, '
          f'{args.n / max(took, 1e-9):.0f} scenes/s')


if __name__ == '__main__':
    try:
        main()
    except PoseError as exc:
        sys.exit(f'error: {exc}')
