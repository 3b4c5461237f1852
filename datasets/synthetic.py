"""Synthetic people: the built-in default dataset, rendered procedurally on the fly.

Every person is a pure function of ``(opts.seed, split, index)``: the reader samples only the
geometry (a 3D kinematic skeleton, posed within joint-angle limits, projected orthographically)
when it builds its records, and ``load_image`` renders the pixels on demand with OpenCV drawing
calls, so nothing is stored and a record can be re-rendered anywhere (loader workers, export).

What makes it a learning problem rather than a lookup:

* pose: a kinematic tree pelvis -> hips -> knees -> ankles, pelvis -> thorax -> neck -> head,
  thorax -> shoulders -> elbows -> wrists, with per-person bone proportions and limb widths;
  hips, shoulders, spine, neck and head rotate within anatomical limits, knees and elbows bend
  one way only; a global yaw (the person faces the camera or turns away), a slight camera pitch,
  an in-plane lean, a random size and position in the frame;
* appearance: limbs are tapered capsules with a dark contour, shirt colour on torso and upper
  arms (and forearms with long sleeves), trousers on the legs (bare shins with shorts), skin on
  hands, neck and face, hair and shoes; **no joint has a mark of its own**;
* left and right: as in photographs, they follow from which way the person faces. A person
  facing the camera shows a face (eyes, nose, mouth, hair only on the top of the head) and a
  shirt front (collar, buttons); a person turned away shows the back of the head (all hair) and a
  plain shirt back. The MPII convention holds: ``r_*`` joints are the person's right, on the
  image's left when the person faces the camera;
* clutter: gradient / blob / stripe / tile backgrounds, random shapes and limb-like distractors,
  opaque occluders over the body now and then (joints under them stay labelled, as MPII labels
  occluded joints) and truncation at the image border (joints outside the image are unlabelled,
  ``visible`` 0, as in MPII; their true coordinates are kept).

Boxes and head size follow MPII. The person box is square, of side ``1.25 * max(extent, 0.8 S)``
(extent: the larger side of the joints' bounding box; S: the person's standing height), centred
on the joints' bounding box, so ``scale = side / 200`` is about body height * 1.25 / 200; before
augmentation it covers ``U(0.6, 0.9)`` of the image side. The PCKh head size is
``0.6 * diagonal`` of a head box whose height is the upper_neck -> head_top segment and whose
width is 0.75 of it, i.e. ``head_size = 0.6 * 1.25 * |head_top - upper_neck| = 0.75 * |...|``:
the median ratio (and the 10th and 90th percentiles) of the official MPII validation head boxes
(``gt_valid.mat``) to that segment is 0.75.

Command line: ``python -m datasets.synthetic --export DIR --n N [--split val]`` writes N samples
in the HRNet / SimpleBaselines MPII json layout (see ``Synthetic.export``).
"""
import argparse
import math
import mmap
import os
import sys

import cv2
import numpy as np

from datasets import register_dataset
from datasets.base import BOX_MARGIN, Reader, sample_limit
from utils.errors import PoseError
from utils.io import write_json
from datasets.joints import MPII

J = {name: i for i, name in enumerate(MPII.names)}
SPLIT_CODES = {'train': 0, 'val': 1}   # train and val draw from disjoint seed streams
HEAD_SIZE_RATIO = 0.75                 # head_size / |head_top - upper_neck|, as in MPII
FACING_PROB = 0.7                      # people facing the camera; the rest turn away

# Body frame: L = the person's left, U = up, F = forward (where the person faces).
_L, _U, _F = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)

# Bone lengths and limb radii as fractions of the standing height S (ankle to head top).
BONES = dict(thigh=0.245, shin=0.245, spine=0.31, neck=0.06, head=0.13, hip=0.085,
             shoulder=0.115, upper_arm=0.17, forearm=0.145, hand=0.075, foot=0.10)
RADII = dict(thigh=(0.050, 0.034), shin=(0.032, 0.022), upper_arm=(0.034, 0.027),
             forearm=(0.026, 0.018), hand=(0.018, 0.027), foot=(0.022, 0.022), neck=0.026,
             waist=0.10, hips=0.125, chest=0.135, chest_depth=0.07)
OUTLINE = 0.012                       # dark contour width / standing height
HEAD_HALF_WIDTH = 0.375                # head ellipse half width / head segment (MPII box w/h 0.75)

SKIN = ((255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 66), (141, 85, 36),
        (92, 58, 34))
HAIR = ((20, 16, 14), (58, 38, 24), (110, 72, 40), (190, 150, 90), (160, 160, 160), (140, 50, 20))


def record_seed(seed, split, index):
    """One 32-bit integer per (seed, split, index); train and val never share a stream."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, SPLIT_CODES[split], int(index)])
    return int(ss.generate_state(1)[0])


class _Draws:
    """Scalar random numbers drawn in one batch from ``default_rng([seed, stream])`` (a numpy
    call per scalar would cost more than the drawing itself)."""

    def __init__(self, seed, stream, n=128):
        self.rng = np.random.default_rng([seed, stream])
        self.values = self.rng.random(n).tolist()
        self.i = 0

    def u(self, lo=0.0, hi=1.0):
        if self.i >= len(self.values):
            self.values += self.rng.random(64).tolist()
        v = self.values[self.i]
        self.i += 1
        return lo + (hi - lo) * v

    def chance(self, p):
        return self.u() < p

    def integer(self, lo, hi):
        """Uniform integer in [lo, hi)."""
        return min(hi - 1, lo + int(self.u() * (hi - lo)))

    def normal(self, mu=0.0, sd=1.0):
        u1, u2 = max(self.u(), 1e-12), self.u()
        return mu + sd * math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)

    def colour(self, lo=0, hi=255):
        return (self.u(lo, hi), self.u(lo, hi), self.u(lo, hi))


# ------------------------------------------------------------------ small 3D vector algebra
# Plain tuples: a person is ~25 points, where numpy's per-call overhead would dominate.

def _rot(axis, degrees):
    """3x3 rotation (tuple of rows) by ``degrees`` about the unit vector ``axis`` (Rodrigues)."""
    a = math.radians(degrees)
    x, y, z = axis
    c, s = math.cos(a), math.sin(a)
    t = 1.0 - c
    return ((t * x * x + c, t * x * y - s * z, t * x * z + s * y),
            (t * x * y + s * z, t * y * y + c, t * y * z - s * x),
            (t * x * z - s * y, t * y * z + s * x, t * z * z + c))


def _mm(a, b):
    return tuple(tuple(a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j] for j in range(3))
                 for i in range(3))


def _mv(m, v):
    return (m[0][0] * v[0] + m[0][1] * v[1] + m[0][2] * v[2],
            m[1][0] * v[0] + m[1][1] * v[1] + m[1][2] * v[2],
            m[2][0] * v[0] + m[2][1] * v[1] + m[2][2] * v[2])


def _comb(*terms):
    """sum of coefficient * vector over (coefficient, vector) pairs."""
    return tuple(sum(c * v[i] for c, v in terms) for i in range(3))


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _unit(v, fallback):
    n = math.sqrt(_dot(v, v))
    return (v[0] / n, v[1] / n, v[2] / n) if n > 1e-6 else fallback


def _bend(d, reference, degrees, fallback):
    """Unit direction ``degrees`` away from unit ``d`` towards ``reference`` (a one-way hinge)."""
    r = _dot(reference, d)
    b = _unit(_comb((1.0, reference), (-r, d)), fallback)
    a = math.radians(degrees)
    return _comb((math.cos(a), d), (math.sin(a), b))


# ------------------------------------------------------------------------------- geometry

def sample_person(seed, res):
    """Geometry of one person (no pixels), a pure function of ``seed`` and ``res``.

    Returns a dict: joints (16, 2) float64 image pixels, visible (16,), center (2,) and side
    (the square person box, px), head_size, facing (the body faces the camera), and for drawing:
    points / depths (name -> (x, y) px / depth px, larger is nearer the camera) of the joints,
    hands and toes, radii (name -> px), face (the face is visible), front (the chest is
    visible), head_fwd / head_left (the
    head's forward and left axes projected on the image), k (pixels per standing height).
    """
    r = _Draws(seed, 0)
    u = r.u
    bone = {name: v * u(0.92, 1.08) for name, v in BONES.items()}
    build = u(0.85, 1.3)  # slim ... stocky: scales every limb radius

    pts = {'pelvis': (0.0, 0.0, 0.0)}  # body frame, pelvis at the origin, unit = standing height
    # torso: twist about the spine, then a forward and a sideways bend
    fwd_bend = u(10, 45) if r.chance(0.2) else u(-12, 20)
    r_torso = _mm(_mm(_rot(_L, fwd_bend), _rot(_F, u(-15, 15))), _rot(_U, u(-30, 30)))
    pts['thorax'] = _mv(r_torso, (0.0, bone['spine'], 0.0))
    r_neck = _mm(_mm(r_torso, _rot(_L, u(-10, 20))), _rot(_F, u(-12, 12)))
    pts['upper_neck'] = _comb((1.0, pts['thorax']), (bone['neck'], _mv(r_neck, _U)))
    r_head = _mm(_mm(_mm(r_neck, _rot(_L, u(-15, 25))), _rot(_F, u(-15, 15))), _rot(_U, u(-35, 35)))
    pts['head_top'] = _comb((1.0, pts['upper_neck']), (bone['head'], _mv(r_head, _U)))
    head_fwd, head_left = _mv(r_head, _F), _mv(r_head, _L)

    for side, s in (('l', 1.0), ('r', -1.0)):
        # leg: hip flexion f (forwards), abduction a (outwards), knee flexion (backwards only)
        hip = (s * bone['hip'], 0.0, 0.0)
        if r.chance(0.2):
            f, a, kf = u(30, 110), u(-5, 40), u(0, 130)       # sitting, kicking, kneeling
        else:
            f, a = u(-25, 35), u(-8, 30)
            kf = u(0, 10) + (u(0, 60) if r.chance(0.7) else 0.0)
        fr, ar = math.radians(f), math.radians(a)
        d_thigh = (s * math.cos(fr) * math.sin(ar), -math.cos(fr) * math.cos(ar), math.sin(fr))
        back = (0.0, -math.sin(fr), -math.cos(fr))  # backwards, perpendicular to the thigh
        knee = _comb((1.0, hip), (bone['thigh'], d_thigh))
        d_shin = _bend(d_thigh, _mv(_rot(d_thigh, u(-15, 15)), back), kf, (0.0, -1.0, 0.0))
        ankle = _comb((1.0, knee), (bone['shin'], d_shin))
        d_foot = _unit(_comb((1.0, _F), (0.15 - d_shin[2], d_shin)), _F)  # forwards, across the shin
        pts[f'{side}_hip'], pts[f'{side}_knee'], pts[f'{side}_ankle'] = hip, knee, ankle
        pts[f'{side}_toe'] = _comb((1.0, ankle), (bone['foot'], d_foot))

        # arm: elevation t from hanging down, azimuth p (0 out, 90 forwards, 180 across the chest)
        shoulder = _comb((1.0, pts['thorax']), (1.0, _mv(r_torso, (s * bone['shoulder'], -0.015, 0.0))))
        # as for the legs, everyday poses are the most frequent and the whole range stays
        # possible: arms mostly hang or reach moderately, a third are raised up to overhead,
        # and the elbow folds past 90 degrees in about one arm out of six
        t = u(0, 65) if r.chance(0.65) else u(0, 165)
        tr, pr = math.radians(t), math.radians(u(-30, 110))
        d_upper = _mv(r_torso, (s * math.sin(tr) * math.cos(pr), -math.cos(tr), math.sin(tr) * math.sin(pr)))
        elbow = _comb((1.0, shoulder), (bone['upper_arm'], d_upper))
        g = math.radians(u(-30, 90))  # humeral rotation: the elbow bends forwards ... inwards
        ref = _mv(r_torso, (-s * math.sin(g), 0.3 * math.cos(g), math.cos(g)))
        d_fore = _bend(d_upper, ref, u(0, 95) if r.chance(0.7) else u(0, 145), _mv(r_torso, _U))
        wrist = _comb((1.0, elbow), (bone['forearm'], d_fore))
        pts[f'{side}_shoulder'], pts[f'{side}_elbow'], pts[f'{side}_wrist'] = shoulder, elbow, wrist
        pts[f'{side}_hand'] = _comb((1.0, wrist), (bone['hand'], d_fore))

    # camera: the person faces it or turns away, seen from slightly above or below; then an
    # in-plane lean. Image x = the body's rotated L axis, image y = -U, depth = F (to the camera).
    facing = r.chance(FACING_PROB)
    yaw = u(-55, 55) + (0.0 if facing else 180.0)
    cam = _mm(_rot(_L, u(-10, 10)), _rot(_U, yaw))
    lean = math.radians(max(-25.0, min(25.0, r.normal(0.0, 10.0))))
    cl, sl = math.cos(lean), math.sin(lean)

    def project(p):
        x, y, z = _mv(cam, p)
        return (cl * x + sl * y, sl * x - cl * y), z

    names = list(pts)
    proj = [project(pts[n]) for n in names]
    xy = np.array([p[0] for p in proj])
    depth = np.array([p[1] for p in proj])
    jidx = [names.index(n) for n in MPII.names]
    joints_u = xy[jidx]

    # the square box: 1.25 x the person's extent (at least 0.8 standing heights), centred on
    # the joints; it covers 60-90 % of the image side, sometimes pushed over the border
    lo, hi = joints_u.min(0), joints_u.max(0)
    side_u = BOX_MARGIN * max(float((hi - lo).max()), 0.8)
    side = u(0.6, 0.9) * res
    k = side / side_u
    center = np.array([u(side / 2, res - side / 2), u(side / 2, res - side / 2)])
    if r.chance(0.2):  # truncation, most often at the bottom as in photographs
        ang = r.normal(math.pi / 2, 0.8)
        center += u(0.15, 0.45) * side * np.array([math.cos(ang), math.sin(ang)])
    xy = (xy - (lo + hi) / 2) * k + center
    depth = depth * k
    joints = xy[jidx]
    visible = ((joints >= 0) & (joints <= res - 1)).all(1).astype(np.float32)
    head_size = HEAD_SIZE_RATIO * float(np.linalg.norm(joints[J['head_top']] - joints[J['upper_neck']]))

    def project_axis(v):
        x, y, z = _mv(cam, v)
        return (cl * x + sl * y, sl * x - cl * y), z

    (hf, hfz), (hl, _) = project_axis(head_fwd), project_axis(head_left)
    _, torso_z = project_axis(_mv(r_torso, _F))
    radii = {n: (v[0] * build * k, v[1] * build * k) if isinstance(v, tuple) else v * build * k
             for n, v in RADII.items()}
    radii['head_len'] = bone['head'] * k
    xy_list, depth_list = xy.tolist(), depth.tolist()
    return dict(joints=joints, visible=visible, center=center, side=side, head_size=head_size,
                facing=facing, points=dict(zip(names, map(tuple, xy_list))),
                depths=dict(zip(names, depth_list)), radii=radii, face=hfz > 0.05, front=torso_z > 0.0,
                head_fwd=hf, head_left=hl, k=k)


# ------------------------------------------------------------------------------- rendering

_SHIFT = 4            # cv2 fractional bits: coordinates are drawn with 1/16 pixel precision
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA
_ARC = np.linspace(-np.pi / 2, np.pi / 2, 9)     # half circle, for capsule ends
_HALF = np.stack([np.cos(_ARC), np.sin(_ARC)], 1)  # its unit vectors, facing +x


def _fix(p):
    return int(round(p[0] * _ONE)), int(round(p[1] * _ONE))


def _colour(c, f=1.0):
    return (min(255, max(0, int(c[0] * f))), min(255, max(0, int(c[1] * f))), min(255, max(0, int(c[2] * f))))


def _capsule_polygon(a, b, ra, rb):
    """Vertices (N, 2) int32 (fixed point) of a tapered capsule: half discs at a and b, joined."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    norm = math.hypot(dx, dy)
    c, s = (dx / norm, dy / norm) if norm > 0 else (1.0, 0.0)
    half = _HALF @ np.array([[c, s], [-s, c]])      # the half circle turned to face a -> b
    pts = np.empty((2 * len(_ARC), 2))
    pts[:len(_ARC)] = (b[0], b[1])
    pts[:len(_ARC)] += rb * half
    pts[len(_ARC):] = (a[0], a[1])
    pts[len(_ARC):] -= ra * half
    return (pts * _ONE + 0.5).astype(np.int32)


def _capsule(img, a, b, ra, rb, colour, outline=0.0, dark=None):
    """A limb from a (radius ra) to b (radius rb) in ``colour``, with a ``dark`` contour."""
    if outline > 0:
        cv2.fillConvexPoly(img, _capsule_polygon(a, b, ra + outline, rb + outline), dark, _AA, _SHIFT)
    cv2.fillConvexPoly(img, _capsule_polygon(a, b, ra, rb), colour, _AA, _SHIFT)


def _fill(res, colour):
    img = np.empty((res, res, 3), np.uint8)
    cv2.rectangle(img, (0, 0), (res, res), colour, -1)
    return img


def _background(r, res):
    """Cluttered textured background: gradient, blobs, stripes or tiles, then random shapes."""
    kind = r.integer(0, 4)
    if kind == 0:      # smooth gradient
        img = cv2.resize(r.rng.integers(0, 256, (2, 2, 3), dtype=np.uint8), (res, res),
                         interpolation=cv2.INTER_LINEAR)
    elif kind == 1:    # soft blobs
        n = r.integer(3, 7)
        img = cv2.resize(r.rng.integers(0, 256, (n, n, 3), dtype=np.uint8), (res, res),
                         interpolation=cv2.INTER_LINEAR)
    elif kind == 2:    # stripes at a random angle
        img = _fill(res, _colour(r.colour()))
        col = _colour(r.colour())
        period = r.u(0.04, 0.15) * res
        width = max(1, int(period * r.u(0.2, 0.6)))
        ang = r.u(0, math.pi)
        dx, dy, nx, ny = math.cos(ang) * res, math.sin(ang) * res, -math.sin(ang), math.cos(ang)
        t = -0.75 * res
        while t < 0.75 * res:
            cx, cy = res / 2 + nx * t, res / 2 + ny * t
            cv2.line(img, _fix((cx - dx, cy - dy)), _fix((cx + dx, cy + dy)), col, width, _AA, _SHIFT)
            t += period
    else:              # tiles, floor or wall like
        n = r.integer(3, 10)
        img = cv2.resize(r.rng.integers(0, 256, (n, n, 3), dtype=np.uint8), (res, res),
                         interpolation=cv2.INTER_NEAREST)
    if r.chance(0.3):  # a floor: the lower part darker and tinted
        y = int(r.u(0.4, 0.9) * res)
        img[y:] = cv2.add(cv2.convertScaleAbs(img[y:], alpha=r.u(0.3, 0.7)), _colour(r.colour(0, 120)) + (0,))
    for _ in range(r.integer(2, 9)):
        _random_shape(img, r, res, r.u(0.03, 0.25) * res)
    return img


def _limb_distractors(img, r, res, k, outline):
    """Capsules of skin or clothing colours and limb sizes, lying about like stray limbs."""
    for _ in range(r.integer(0, 3)):
        a = (r.u(0, res), r.u(0, res))
        b = (a[0] + r.u(-0.3, 0.3) * k, a[1] + r.u(-0.3, 0.3) * k)
        rad = r.u(0.02, 0.05) * k
        col = SKIN[r.integer(0, len(SKIN))] if r.chance(0.5) else r.colour()
        _capsule(img, a, b, rad, rad * 0.8, _colour(col), outline, _colour(col, 0.45))


def _random_shape(img, r, res, size, center=None):
    """A random opaque rectangle, ellipse, triangle or thick line of a random colour."""
    c = (r.u(0, res), r.u(0, res)) if center is None else center
    col = _colour(r.colour())
    kind = r.integer(0, 4)
    if kind == 0:
        ang = r.u(0, math.pi)
        w, h = size * r.u(0.4, 1.0), size * r.u(0.4, 1.0)
        dx, dy = math.cos(ang), math.sin(ang)
        pts = [(c[0] + sx * dx * w - sy * dy * h, c[1] + sx * dy * w + sy * dx * h)
               for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
        cv2.fillConvexPoly(img, np.array([_fix(p) for p in pts], np.int32), col, _AA, _SHIFT)
    elif kind == 1:
        axes = (max(1, int(size * r.u(0.4, 1.0) * _ONE)), max(1, int(size * r.u(0.4, 1.0) * _ONE)))
        cv2.ellipse(img, _fix(c), axes, r.u(0, 180), 0, 360, col, -1, _AA, _SHIFT)
    elif kind == 2:
        pts = [_fix((c[0] + r.u(-size, size), c[1] + r.u(-size, size))) for _ in range(3)]
        cv2.fillConvexPoly(img, np.array(pts, np.int32), col, _AA, _SHIFT)
    else:
        a = (c[0] + r.u(-size, size), c[1] + r.u(-size, size))
        b = (c[0] + r.u(-size, size), c[1] + r.u(-size, size))
        cv2.line(img, _fix(a), _fix(b), col, max(1, int(size * r.u(0.05, 0.2))), _AA, _SHIFT)


def _appearance(r):
    skin = SKIN[r.integer(0, len(SKIN))]
    f = r.u(0.9, 1.1)
    shirt = r.colour()
    hair = HAIR[r.integer(0, len(HAIR))]
    h = r.u(0.8, 1.2)
    return dict(skin=tuple(v * f for v in skin), shirt=shirt, trousers=r.colour(0, 200),
                hair=tuple(v * h for v in hair), shoes=r.colour(0, 120),
                buttons=tuple(v * 0.5 + r.u(0, 120) for v in shirt),
                long_sleeves=r.chance(0.4), shorts=r.chance(0.25))


def render_person(img, person, r):
    """Draw ``person`` (from ``sample_person``) on ``img`` in painter's order (far parts first)."""
    P, Z, R = person['points'], person['depths'], person['radii']
    k = person['k']
    look = _appearance(r)
    outline = max(1.0, OUTLINE * k)
    zs = list(Z.values())
    z0, zr = sum(zs) / len(zs), max(max(zs) - min(zs), 1e-3)

    def shade(z):  # nearer parts a little brighter: a depth cue, like real lighting
        return 0.85 + 0.25 * max(-0.5, min(0.5, (z - z0) / zr))

    parts = []  # (sort depth, draw function, arguments)
    for s in ('l', 'r'):
        for a, b, radii, col, bias in (
                ('hip', 'knee', R['thigh'], look['trousers'], 0.0),
                ('knee', 'ankle', R['shin'], look['skin'] if look['shorts'] else look['trousers'], 0.0),
                ('ankle', 'toe', R['foot'], look['shoes'], 0.0),
                ('shoulder', 'elbow', R['upper_arm'], look['shirt'], 0.04),  # arms at the sides
                ('elbow', 'wrist', R['forearm'], look['shirt'] if look['long_sleeves'] else look['skin'], 0.04),
                ('wrist', 'hand', R['hand'], look['skin'], 0.04)):
            a, b = f'{s}_{a}', f'{s}_{b}'
            z = (Z[a] + Z[b]) / 2
            f = shade(z)
            parts.append((z + bias * k, _capsule, (img, P[a], P[b], radii[0], radii[1], _colour(col, f),
                                                   outline, _colour(col, 0.45 * f))))
    z_torso = (Z['pelvis'] + Z['thorax']) / 2
    parts.append((z_torso, _torso, (img, person, look, shade(z_torso), outline)))
    z_head = max((Z['upper_neck'] + Z['head_top']) / 2, z_torso + 1e-3)
    parts.append((z_head, _head, (img, person, look, outline)))
    parts.sort(key=lambda p: p[0])
    for _, draw, args in parts:
        draw(*args)


def _torso(img, person, look, f, outline):
    P, Z, R = person['points'], person['depths'], person['radii']
    (tx, ty), (px, py) = P['thorax'], P['pelvis']
    spine = max(math.hypot(tx - px, ty - py), 1e-6)
    ax, ay = (tx - px) / spine, (ty - py) / spine
    nx, ny = -ay, ax
    # projected half width: the lateral half axis foreshortened by the turn, plus the depth axis
    (lx, ly), (rx, ry) = P['l_shoulder'], P['r_shoulder']
    hs = math.hypot(lx - rx, ly - ry) / 2
    hz = (Z['l_shoulder'] - Z['r_shoulder']) / 2
    turn = hs / max(math.hypot(hs, hz), 1e-6)       # |cos(yaw)| of the shoulders
    depth_part = R['chest_depth'] * math.sqrt(max(0.0, 1 - turn * turn))

    def at(along, width):   # a point on the spine line, shifted sideways
        return (px + ax * along * spine + nx * width, py + ay * along * spine + ny * width)

    wc, ww, wh = (R[n] * turn + depth_part for n in ('chest', 'waist', 'hips'))
    shirt, trousers = look['shirt'], look['trousers']
    outline_px = max(1, int(round(outline)))
    top, mid, bottom = 1.03, 0.45, -0.15
    poly = [at(top, wc), at(mid, ww), at(0, wh), at(bottom, 0.9 * wh), at(bottom, -0.9 * wh),
            at(0, -wh), at(mid, -ww), at(top, -wc)]
    pts = np.array([_fix(p) for p in poly], np.int32)
    cv2.fillPoly(img, [pts], _colour(shirt, f), _AA, _SHIFT)
    cv2.polylines(img, [pts], True, _colour(shirt, 0.45 * f), outline_px, _AA, _SHIFT)
    bw = (ww + wh) / 2
    belt = 0.12
    poly = [at(belt, bw), at(0, wh), at(bottom, 0.9 * wh), at(bottom, -0.9 * wh), at(0, -wh), at(belt, -bw)]
    pts = np.array([_fix(p) for p in poly], np.int32)
    cv2.fillConvexPoly(img, pts, _colour(trousers, f), _AA, _SHIFT)
    cv2.polylines(img, [pts], True, _colour(trousers, 0.45 * f), outline_px, _AA, _SHIFT)
    if person['front']:  # the shirt's front: a collar opening and buttons
        cw = 0.35 * wc
        collar = [at(top, cw), at(top, -cw), at(top - 0.22, 0)]
        cv2.fillConvexPoly(img, np.array([_fix(p) for p in collar], np.int32), _colour(look['skin']), _AA, _SHIFT)
        button = _colour(look['buttons'])
        rb = max(1, int(0.05 * wc * _ONE))
        for along in (0.68, 0.5, 0.32):
            cv2.circle(img, _fix(at(along, 0)), rb, button, -1, _AA, _SHIFT)


def _head(img, person, look, outline):
    P, R = person['points'], person['radii']
    neck, top = P['upper_neck'], P['head_top']
    skin = look['skin']
    _capsule(img, P['thorax'], neck, R['neck'], R['neck'], _colour(skin, 0.9), outline, _colour(skin, 0.4))
    length = math.hypot(top[0] - neck[0], top[1] - neck[1])
    ax, ay = ((top[0] - neck[0]) / length, (top[1] - neck[1]) / length) if length > 1e-6 else (0.0, -1.0)
    nx, ny = -ay, ax
    hw = HEAD_HALF_WIDTH * R['head_len']             # half width
    hl = max(0.55 * length, 0.9 * hw)                # half length along the neck -> top axis
    c = (neck[0] + ax * 0.5 * length, neck[1] + ay * 0.5 * length)
    ang = math.degrees(math.atan2(ay, ax))
    axes = (max(1, int((hl + outline) * _ONE)), max(1, int((hw + outline) * _ONE)))
    cv2.ellipse(img, _fix(c), axes, ang, 0, 360, _colour(look['hair'], 0.4), -1, _AA, _SHIFT)
    axes = (max(1, int(hl * _ONE)), max(1, int(hw * _ONE)))
    if not person['face']:   # the back of the head: all hair
        cv2.ellipse(img, _fix(c), axes, ang, 0, 360, _colour(look['hair']), -1, _AA, _SHIFT)
        return
    cv2.ellipse(img, _fix(c), axes, ang, 0, 360, _colour(skin), -1, _AA, _SHIFT)
    # hair on the top of the head, pushed away from the side the face turns to
    fx, fy = person['head_fwd']
    turn = fx * nx + fy * ny
    hc = (c[0] + ax * 0.25 * hl - nx * turn * 0.3 * hw, c[1] + ay * 0.25 * hl - ny * turn * 0.3 * hw)
    cv2.ellipse(img, _fix(hc), (axes[0] * 3 // 4, axes[1]), ang, -95, 95, _colour(look['hair']), -1, _AA, _SHIFT)
    # the face: eyes, nose and mouth on the side of the head that faces the camera
    lx, ly = person['head_left']

    def at(along, lateral, forward=0.8):   # a point on the face
        return (c[0] + fx * forward * hw + ax * along * hl + lx * lateral * hw,
                c[1] + fy * forward * hw + ay * along * hl + ly * lateral * hw)

    dark = _colour(look['hair'], 0.3)
    r_eye = max(1, int(0.13 * hw * _ONE))
    cv2.circle(img, _fix(at(0.07, 0.42)), r_eye, dark, -1, _AA, _SHIFT)
    cv2.circle(img, _fix(at(0.07, -0.42)), r_eye, dark, -1, _AA, _SHIFT)
    cv2.line(img, _fix(at(0.0, 0)), _fix(at(-0.27, 0, 1.0)), _colour(skin, 0.6), max(1, int(0.12 * hw)), _AA, _SHIFT)
    cv2.line(img, _fix(at(-0.5, 0.25)), _fix(at(-0.5, -0.25)), (150, 40, 40), max(1, int(0.1 * hw)), _AA, _SHIFT)


def _shared_cache(size, res):
    """-> (images (size, res, res, 3) uint8, rendered (size,) bool) in one anonymous shared
    mapping: the loader workers, forked after it is made, fill and read the same images as the main
    process (a worker renders an image once, every later epoch's worker reads it). Untouched
    pages cost no memory; each image is written before its flag, and two processes never render
    the same index at once (an epoch gives every index to one worker)."""
    pixels = size * res * res * 3
    if size == 0:
        return np.zeros((0, res, res, 3), np.uint8), np.zeros(0, bool)
    block = mmap.mmap(-1, pixels + size)
    images = np.frombuffer(block, np.uint8, pixels).reshape(size, res, res, 3)
    return images, np.frombuffer(block, np.bool_, size, offset=pixels)


def render(seed, res, person=None):
    """The RGB uint8 (res, res, 3) image of the person with this seed (see ``sample_person``)."""
    person = person or sample_person(seed, res)
    r = _Draws(seed, 1)
    img = _background(r, res)
    k = person['k']
    outline = max(1.0, OUTLINE * k)
    _limb_distractors(img, r, res, k, outline)
    # the scene behind the person is a little less contrasted than the person (depth of field,
    # lighting): clutter stays, but the figure stands out from it as in most photographs
    alpha = r.u(0.45, 0.85)
    img = cv2.convertScaleAbs(img, alpha=alpha, beta=(1 - alpha) * r.u(60, 200))
    render_person(img, person, r)
    if r.chance(0.2):                   # occluders in front of the person
        for _ in range(r.integer(1, 3)):
            x, y = person['joints'][r.integer(0, len(person['joints']))]
            _random_shape(img, r, res, r.u(0.06, 0.16) * k, (x + r.normal(0, 0.05 * k), y + r.normal(0, 0.05 * k)))
    return img


# -------------------------------------------------------------------------------------- reader

@register_dataset('Synthetic')
class Synthetic(Reader):
    """Procedurally rendered single people in the MPII joint layout (16 joints, MPII order).

    ``opts.nTrainSamples`` / ``opts.nValSamples`` people for 'train' / 'val' (disjoint seed
    streams derived from ``opts.seed``), cut to ``opts.maxTrainSamples`` / ``maxValSamples``
    when non-zero; images are ``opts.syntheticRes`` pixels square. A record holds, besides the
    Reader fields (image None, center (2,), scale (2,), keypoints (1, 16, 2), visible (1, 16)):
    head_size (float, PCKh normaliser), seed (int, what ``load_image`` renders from), facing
    (bool, the person faces the camera), index, and person (``sample_person``'s dict).
    """
    joint_set = MPII

    def __init__(self, opts, split):
        super().__init__(opts, split)
        if split not in SPLIT_CODES:
            raise ValueError(f'Synthetic: unknown split {split!r} (train or val)')
        train = split == 'train'
        n = int(opts.nTrainSamples if train else opts.nValSamples)
        cap = sample_limit(opts, split)
        if cap > 0:
            n = min(n, cap)
        self.res = int(getattr(opts, 'syntheticRes', 256))
        seed = int(getattr(opts, 'seed', 0))
        self.records = [self.make_record(record_seed(seed, split, i), self.res, i) for i in range(n)]
        # rendered images kept for the next epochs in one array of as many as --syntheticCacheMB
        # holds, filled as they come, in memory shared with the loader workers (_shared_cache):
        # whichever process renders an image, the main one (--nThreads 0, as the quick start
        # trains) or a worker, every later epoch's processes read it. One block, not an array
        # per image: thousands of kept 200 KB arrays would make every later large allocation a
        # fresh mmap (glibc), costing more system time than the rendering saved.
        per_image = self.res * self.res * 3
        self.cache_size = min(n, (int(getattr(opts, 'syntheticCacheMB', 0)) << 20) // per_image)
        self._cache, self._cached = _shared_cache(self.cache_size, self.res)

    def __getstate__(self):
        # a spawned worker (not forked) cannot share the mapping: it starts a cache of its own
        state = dict(self.__dict__)
        state['_cache'] = state['_cached'] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache, self._cached = _shared_cache(self.cache_size, self.res)

    @staticmethod
    def make_record(seed, res, index=0):
        p = sample_person(seed, res)
        side = np.float32(p['side'] / 200.0)
        return dict(image=None, seed=seed, index=index, center=p['center'].astype(np.float32),
                    scale=np.array([side, side], np.float32), keypoints=p['joints'].astype(np.float32)[None],
                    visible=p['visible'].astype(np.float32)[None], head_size=float(p['head_size']),
                    facing=bool(p['facing']), person=p)

    def load_image(self, record):
        """-> uint8 RGB (res, res, 3), rendered from the record's seed (deterministic); the
        person's geometry kept in the record (``person``) spares drawing it again every epoch, and
        the image itself is kept (read-only) while ``--syntheticCacheMB`` allows: the same pixels,
        rendered once."""
        i = record['index']
        if i >= self.cache_size or record is not self.records[i]:
            return render(record['seed'], self.res, record.get('person'))
        if not self._cached[i]:
            self._cache[i] = render(record['seed'], self.res, record.get('person'))
            self._cached[i] = True
        image = self._cache[i]
        image.flags.writeable = False       # a view: the pipeline reads it, never writes into it
        return image

    def export(self, out_dir, n):
        """Write the first ``n`` records in the HRNet / SimpleBaselines MPII json layout.

        out_dir/images/<name>.jpg and out_dir/annot/train.json (split 'train') or valid.json
        (split 'val'): a list of {image, center [x, y], scale, joints 16 x [x, y] 1-based,
        joints_vis 16 ints}. Center and scale are written so that the HRNet loader's correction
        (c[1] += 15 s; s *= 1.25; c -= 1; joints -= 1) gives back the record's center and scale.
        Returns the json path.
        """
        os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
        os.makedirs(os.path.join(out_dir, 'annot'), exist_ok=True)
        entries = []
        for rec in self.records[:int(n)]:
            name = f'synthetic_{self.split}_{rec["index"]:06d}.jpg'
            rgb = self.load_image(rec)
            cv2.imwrite(os.path.join(out_dir, 'images', name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            s = float(rec['scale'][0]) / 1.25
            cx, cy = (float(v) + 1.0 for v in rec['center'])
            entries.append(dict(image=name, center=[cx, cy - 15.0 * s], scale=s,
                                joints=[[float(x) + 1.0, float(y) + 1.0] for x, y in rec['keypoints'][0]],
                                joints_vis=[int(v > 0) for v in rec['visible'][0]]))
        path = os.path.join(out_dir, 'annot', 'train.json' if self.split == 'train' else 'valid.json')
        write_json(path, entries, indent=None)
        return path


def main(argv=None):
    import opts as options
    parser = argparse.ArgumentParser(description='Write Synthetic people in the MPII json layout '
                                     '(images/*.jpg, annot/train.json or annot/valid.json).')
    parser.add_argument('--export', required=True, metavar='DIR', help='output folder')
    parser.add_argument('--n', type=int, default=100, help='number of people to write')
    parser.add_argument('--split', default='train', choices=sorted(SPLIT_CODES))
    args, rest = parser.parse_known_args(argv)
    opts = options.parse(rest)  # any framework option: --seed, --syntheticRes, ...
    if args.split == 'train':
        opts.nTrainSamples, opts.maxTrainSamples = max(args.n, 1), 0
    else:
        opts.nValSamples, opts.maxValSamples = max(args.n, 1), 0
    path = Synthetic(opts, args.split).export(args.export, args.n)
    print(f'wrote {args.n} {args.split} people to {args.export} ({path})')


if __name__ == '__main__':
    try:
        main()
    except PoseError as exc:
        sys.exit(f'error: {exc}')
