"""The one pixel pipeline shared by every dataset.

decode (by the reader) -> one affine warp (scale, rotation, translation and flip folded into a
single 2x3 matrix) -> colour jitter -> normalisation. Keypoints go through the same matrix, so
they land exactly where their pixels land: cv2.warpAffine samples dst(p) = src(M^-1 p) with pixel
centres at integer coordinates, and a point p of the source lands at M p.

Box convention (HRNet / SimpleBaselines): a record's ``center`` (2,) and ``scale`` (2,) give a
person box of ``scale * 200`` pixels (width, height). The pipeline extends the box's shorter side
to the input's aspect ratio (``crop_box``, as HRNet's ``_box2cs`` does for COCO), the same way
for every dataset, and maps its width onto the input width. Sizes passed to this module are
(width, height), OpenCV's order.
"""
import cv2
import numpy as np
import torch

MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet RGB, as the ResNet backbones expect
STD = np.array([0.229, 0.224, 0.225], np.float32)


def affine_matrix(center, box_width, input_size, rotation=0.0, flip=False, shift=(0.0, 0.0)):
    """2x3 matrix from original-image pixels to input-crop pixels.

    center: (2,) box centre in the original image; box_width: source pixels mapped onto the
    input width; input_size: (W, H); rotation: degrees, counter-clockwise in the image;
    flip: mirror the crop about its vertical centre line; shift: (2,) source pixels added to
    the centre (translation augmentation).

    The matrix maps the centre onto (W / 2, H / 2) and the box width onto W. It is solved from
    three point pairs in float32 by ``cv2.getAffineTransform``, exactly as the HRNet /
    SimpleBaselines ``get_affine_transform`` does (the centre, the point half a box width above
    it turned by the rotation, and a third point at a right angle), so the same box gives the
    reference code's crop pixel for pixel.
    """
    w, h = input_size
    a = np.pi * rotation / 180.0
    up = np.array([0.5 * box_width * np.sin(a), -0.5 * box_width * np.cos(a)])    # turned 'up' vector
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = np.asarray(center) + np.asarray(shift)
    src[1] = np.asarray(center) + up + np.asarray(shift)
    dst[0] = [w * 0.5, h * 0.5]
    dst[1] = np.array([w * 0.5, h * 0.5]) + np.array([0, w * -0.5], np.float32)
    src[2], dst[2] = _right_angle(src[0], src[1]), _right_angle(dst[0], dst[1])
    m = cv2.getAffineTransform(src, dst)
    if flip:
        m = np.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0, 0, 1]])
    return m


def heatmap_to_original(points, box, output_size):
    """Heatmap coordinates (..., 2) -> original-image pixels, as HRNet's ``transform_preds``: the
    inverse of the box's affine at the heatmap's size (W, H), solved from the same three points
    in float32 (``affine_matrix``'s construction with source and destination swapped).
    box: (5,) centre x, y, box width, rotation, flip (0 or 1) as the pipeline records it."""
    cx, cy, width, rotation, flip = (float(v) for v in box)
    w, h = output_size
    a = np.pi * rotation / 180.0
    up = np.array([0.5 * width * np.sin(a), -0.5 * width * np.cos(a)])
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = [cx, cy]
    src[1] = np.array([cx, cy]) + up
    dst[0] = [w * 0.5, h * 0.5]
    dst[1] = np.array([w * 0.5, h * 0.5]) + np.array([0, w * -0.5], np.float32)
    src[2], dst[2] = _right_angle(src[0], src[1]), _right_angle(dst[0], dst[1])
    inverse = cv2.getAffineTransform(dst, src)
    p = np.asarray(points, np.float64)
    if flip:
        p = p.copy()
        p[..., 0] = w - p[..., 0]
    return transform_points(p, inverse)


def _right_angle(a, b):
    """The point c with c - b = (a - b) turned by 90 degrees (the third point of the affine)."""
    d = a - b
    return b + np.array([-d[1], d[0]], np.float32)


def udp_affine_matrix(center, box_size, input_size, rotation=0.0, flip=False, shift=(0.0, 0.0)):
    """The affine of unbiased data processing (UDP, Huang et al. 2020), in pixel-size units.

    The box (box_size = (width, height) source pixels around ``center``) is mapped onto the span
    from the first to the last pixel centre of the input: scale (W - 1) / width along x and
    (H - 1) / height along y, the centre onto ((W - 1) / 2, (H - 1) / 2), and a flip mirrors
    x -> W - 1 - x, so a mirrored crop is exactly the crop of the mirrored image. Arguments as
    ``affine_matrix``.
    """
    w, h = input_size
    sx, sy = (w - 1.0) / float(box_size[0]), (h - 1.0) / float(box_size[1])
    a = np.deg2rad(rotation)
    cos, sin = np.cos(a), np.sin(a)
    cx, cy = float(center[0]) + shift[0], float(center[1]) + shift[1]
    m = np.array([[cos * sx, sin * sx, 0.0], [-sin * sy, cos * sy, 0.0]], np.float64)
    m[:, 2] = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) - m[:, :2] @ np.array([cx, cy])
    if flip:
        m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0, 0, 1]])
    return m


def half_body_box(keypoints, visible, upper_body, input_size, rng):
    """HRNet's half-body augmentation: the box of the upper or the lower body of one person.

    keypoints (K, 2), visible (K,); upper_body: joint indices of the upper body. The upper body
    is chosen when ``rng.normal() < 0.5`` and it has more than 2 labelled joints, else the lower
    body if it has more than 2, else the upper. Returns (center (2,), scale (2,) = 1.5 x the
    extent of the chosen joints, extended to the input's aspect ratio, / 200), or (None, None)
    when fewer than 2 joints are chosen.
    """
    labelled = np.asarray(visible) > 0
    upper_mask = np.zeros(len(labelled), bool)
    upper_mask[list(upper_body)] = True
    upper, lower = keypoints[labelled & upper_mask], keypoints[labelled & ~upper_mask]
    if rng.normal() < 0.5 and len(upper) > 2:
        chosen = upper
    else:
        chosen = lower if len(lower) > 2 else upper
    if len(chosen) < 2:
        return None, None
    chosen = np.asarray(chosen, np.float32)
    center = chosen.mean(axis=0)
    w, h = (chosen.max(axis=0) - chosen.min(axis=0)).tolist()
    aspect = input_size[0] / float(input_size[1])
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    return center, np.array([w / 200.0, h / 200.0], np.float32) * 1.5


def invert_affine(m):
    """Inverse of a 2x3 affine matrix."""
    full = np.vstack([np.asarray(m, np.float64), [0, 0, 1]])
    return np.linalg.inv(full)[:2]


def transform_points(points, m):
    """points (..., 2) -> M applied, same shape."""
    p = np.asarray(points, np.float64)
    return p @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]


def to_original(coords, affines):
    """Crop coordinates (B, ..., 2) and their affines (B, 2, 3) -> original-image pixels, same
    shape, float32 (each image's points through the inverse of its own affine)."""
    return np.stack([transform_points(np.reshape(c, (-1, 2)), invert_affine(m)).reshape(np.shape(c))
                     for c, m in zip(coords, affines)]).astype(np.float32)


def crop_box(scale, input_size):
    """The box the crop covers, in source pixels: ``scale * 200`` (width, height) with the shorter
    side extended to the aspect ratio of ``input_size`` (W, H). -> (width, height) floats.

    A box already at that aspect ratio (within float32 rounding: COCO's reader makes its boxes
    as HRNet's ``_box2cs`` does, at the run's aspect) is used as it is, in its own precision, so
    its width is the reference code's ``scale[0] * 200`` exactly."""
    s = np.asarray(scale).reshape(-1)
    w, h = s[0] * 200, s[-1] * 200              # in the scale's own dtype, as the reference code
    aspect = input_size[0] / float(input_size[1])
    if abs(float(w) - aspect * float(h)) <= 1e-6 * float(w):
        return float(w), float(h)
    w, h = float(w), float(h)
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    return w, h


def normalize(image, gain=None):
    """uint8 or float RGB (H, W, 3) -> float32 tensor (3, H, W) with ImageNet mean/std.

    Bit for bit what torchvision's ToTensor then Normalize give (x / 255, then (x - mean) / std,
    all in float32), so a crop makes exactly the reference code's input tensor. ``gain``: float32
    per-channel colour gains applied first, ``clip(x * gain, 0, 255)`` in float32 (the same values
    as on the whole (H, W, 3) image, without its float copies)."""
    image = np.asarray(image)
    x = np.empty(image.shape[-1:] + image.shape[:-1], np.float32)
    for c in range(x.shape[0]):     # one channel plane at a time, in place: 3x faster than
        plane = x[c]                 # broadcasting over (H, W, 3) and transposing afterwards
        plane[...] = image[..., c]
        if gain is not None:
            plane *= gain[c]
            np.clip(plane, 0, 255, out=plane)
        plane /= np.float32(255.0)
        plane -= MEAN[c]
        plane /= STD[c]
    return torch.from_numpy(x)


def denormalize(tensor):
    """Inverse of ``normalize``: (3, H, W) tensor -> uint8 RGB (H, W, 3)."""
    x = tensor.detach().cpu().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


class Pipeline:
    """Record + decoded image -> (image tensor, keypoints in the crop, visibility, affine).

    input_size: int (a square) or (W, H).

    Training draws, per sample, a scale factor ``clip(1 + N(0, max_scale), 1 -/+ max_scale)``,
    a rotation ``clip(N(0, max_rotate), +/- 2 max_rotate)`` with probability ``rotate_prob``, a
    centre shift uniform in ``+/- max_translate`` box widths, a horizontal flip with probability
    1/2 (joints swapped with ``flip_perm``) and a per-channel colour gain in ``1 +/- color_jitter``;
    with ``half_body`` = (probability, min_joints, upper_body ids), a person with more than
    min_joints labelled joints is cropped to its upper or lower body with that probability
    (``half_body_box``). Evaluation uses none of them. ``udp``: the affine of ``udp_affine_matrix``
    instead of ``affine_matrix``.
    """

    def __init__(self, input_size, flip_perm, train=False, max_scale=0.25, max_rotate=30.0,
                 max_translate=0.0, flip=True, color_jitter=0.2, rotate_prob=0.6, half_body=None, udp=False,
                 reduced_decode=False):
        self.input_size = (int(input_size), int(input_size)) if np.isscalar(input_size) else tuple(input_size)
        self.flip_perm = np.asarray(flip_perm)
        self.train = train
        self.max_scale = max_scale
        self.max_rotate = max_rotate
        self.max_translate = max_translate
        self.flip = flip
        self.color_jitter = color_jitter
        self.rotate_prob = rotate_prob
        self.half_body = half_body if half_body and half_body[0] > 0 else None
        self.udp = bool(udp)
        self.reduced_decode = bool(reduced_decode) and self.train

    def sample_params(self, rng):
        if not self.train:
            return dict(scale=1.0, rotation=0.0, shift=(0.0, 0.0), flip=False, gain=None)
        s = float(np.clip(1.0 + rng.normal() * self.max_scale, 1.0 - self.max_scale, 1.0 + self.max_scale))
        r = 0.0
        if self.max_rotate > 0 and rng.random() < self.rotate_prob:
            r = float(np.clip(rng.normal() * self.max_rotate, -2 * self.max_rotate, 2 * self.max_rotate))
        t = tuple(rng.uniform(-self.max_translate, self.max_translate, 2)) if self.max_translate > 0 else (0.0, 0.0)
        f = bool(self.flip and rng.random() < 0.5)
        g = rng.uniform(1 - self.color_jitter, 1 + self.color_jitter, 3).astype(np.float32) if self.color_jitter > 0 else None
        return dict(scale=s, rotation=r, shift=t, flip=f, gain=g)

    def plan(self, record, rng):
        """What the crop of ``record`` will be, drawn before the image is read: the augmentation,
        the box, the affine (original pixels -> crop) and ``reduce``, the factor (1, 2, 4 or 8) by
        which the image may be decoded smaller (``reduced_decode``, training only: the largest
        power of two by which the crop shrinks the box, so that no detail the crop keeps is lost)."""
        p = self.sample_params(rng)
        center, scale = record['center'], record['scale']
        if self.train and self.half_body is not None:
            center, scale = self._half_body(record, rng, center, scale)
        box_w, box_h = (v * p['scale'] for v in crop_box(scale, self.input_size))
        shift = (p['shift'][0] * box_w, p['shift'][1] * box_w)
        if self.udp:
            m = udp_affine_matrix(center, (box_w, box_h), self.input_size, p['rotation'], p['flip'], shift)
        else:
            m = affine_matrix(center, box_w, self.input_size, p['rotation'], p['flip'], shift)
        reduce = 1
        if self.reduced_decode:
            shrink = box_w / self.input_size[0]
            while reduce < 8 and shrink >= 2 * reduce:
                reduce *= 2
        # the box as the reference decoders rebuild their inverse transform from it: centre x, y,
        # width, rotation and whether the crop is mirrored
        box = np.array([center[0] + shift[0], center[1] + shift[1], box_w, p['rotation'], float(p['flip'])])
        return dict(p, m=m, box=box, reduce=reduce)

    def __call__(self, image, record, rng=None, plan=None, reduced=1):
        """image: uint8 RGB (H, W, 3), decoded ``reduced`` times smaller than the original (its
        pixel (u, v) covering the original's reduced x reduced block, centred at
        reduced * (u, v) + (reduced - 1) / 2); record: dict with center, scale, keypoints (N, K, 2),
        visible (N, K); plan: ``plan(record, rng)``'s result, drawn now when not given.

        Returns dict(image=(3, h, w) float32 tensor, keypoints=(N, K, 2) crop pixels,
        visible=(N, K), affine=(2, 3) original -> crop, box). Every person goes through the same
        matrix; a flip also swaps each person's left and right keypoints.
        """
        if plan is None:
            plan = self.plan(record, rng if rng is not None else np.random.default_rng())
        m = plan['m']
        warp = m
        if reduced != 1:            # the affine of the reduced frame: original = reduced * u + (reduced - 1) / 2
            warp = np.concatenate([m[:, :2] * reduced, m[:, :2] @ np.full((2, 1), (reduced - 1) / 2.0) + m[:, 2:]], 1)
        crop = cv2.warpAffine(image, warp, self.input_size, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        keypoints = np.asarray(record['keypoints'])
        keypoints = transform_points(keypoints.reshape(-1, 2), m).reshape(keypoints.shape).astype(np.float32)
        visible = np.asarray(record['visible'], np.float32).copy()
        if plan['flip']:
            keypoints, visible = keypoints[:, self.flip_perm], visible[:, self.flip_perm]
        return dict(image=normalize(crop, plan['gain']), keypoints=keypoints, visible=visible, affine=m.astype(np.float32),
                    box=plan['box'])

    def _half_body(self, record, rng, center, scale):
        """The half-body box of the record's first person, drawn as HRNet does (a uniform draw
        against the probability, for people with enough labelled joints)."""
        prob, min_joints, upper = self.half_body
        visible = np.asarray(record['visible'])
        if len(visible) == 0 or visible[0].sum() <= min_joints or rng.random() >= prob:
            return center, scale
        c, s = half_body_box(np.asarray(record['keypoints'])[0], visible[0], upper, self.input_size, rng)
        return (center, scale) if c is None else (c, s)
