"""Bottom-up multi-person pose with associative embedding (Newell et al. 2017), as HigherHRNet
(Cheng et al., CVPR 2020) trains and tests it: the codec and its whole-image pipeline.

A bottom-up sample is a whole image with all its people. Training (the authors'
RandomAffineTransform and RandomHorizontalFlip): the shorter side of the image, scaled by a factor
uniform in ``scale_range`` (0.75-1.5), onto the square input (512); a rotation uniform in
+/- ``max_rotate`` (30 degrees); a shift of the centre uniform in +/- ``max_translate`` (0.2, the
authors' 40 in units of 200) of that box; a horizontal flip with probability 1/2. The loss mask
(0 on crowd regions and on people without keypoints, and outside the image) goes through the same
matrix. A rectangular training input (``train_size``, not in the authors' code) takes the
shorter image side onto its shorter side: at scale 1 and without a shift, the training input of
an image of the input's aspect ratio is then its test input. Testing (the authors'
``resize_align_multi_scale``): per test scale, the shorter side to scale x the input size and
the longer one padded to a multiple of 64.

The codec (target ``associative_embedding``, HigherHRNet's ``[heatmaps + tags at 1/4, heatmaps
at 1/2]``):

* targets per output resolution: heatmaps (a person's Gaussian of sigma 2, window 6 sigma + 3,
  centred on the truncated position, as the authors' HeatmapGenerator; the maximum where people
  overlap) and the loss mask; at the first resolution, the joint-to-person index lists for the tag
  loss (``grouping.tag_targets``, at most ``max_people``);
* loss terms: masked heatmap MSE at each resolution (``heatmap_4``, ``heatmap_2``) and the
  associative-embedding ``push`` and ``pull`` losses on the tags (the "exp" push type), weighted
  by ``tag_factor`` (1e-3) as the authors';
* test: every scale and its mirror through the model, heatmaps averaged at the input resolution
  and tags concatenated (``grouping.aggregate``), people grouped by tags (``grouping.parse``: NMS,
  top 30 per joint, Hungarian matching in the authors' joint order, quarter-pixel adjustment,
  refinement of missing joints), mapped back to the original image (``grouping.final_people``);
  a person's score is the mean of its joints' scores.
"""
import cv2
import numpy as np
import torch

from datasets import grouping
from datasets.codecs import Codec, register_codec
from datasets.pipeline import affine_matrix, normalize, transform_points
from utils.errors import ConfigError


class BottomUpPipeline:
    """Whole image + record (keypoints (N, K, 2), visible (N, K), optional 'mask' (H, W) uint8:
    1 where the loss counts) -> sample.

    Training: dict(image (3, H, W) of ``train_size`` (W, H), keypoints (N, K, 2) and visible (N, K)
    in input pixels, mask (H, W) uint8, affine). Evaluation: dict(image at scale 1, image_scales [one (3, H_s, W_s) per
    test scale], keypoints, visible, affine (scale 1), and the ``size`` (W, H) of scale 1 and the
    ``center`` / ``scale`` of the smallest scale, which map the people back).
    """

    def __init__(self, input_size, flip_perm, train=False, scale_range=(0.75, 1.5), max_rotate=30.0,
                 max_translate=0.2, flip=True, test_scales=(1.0,), train_size=None):
        self.input_size = int(input_size[0]) if not np.isscalar(input_size) else int(input_size)
        # (W, H) of the training inputs: the square input unless told otherwise
        self.train_size = (self.input_size,) * 2 if train_size is None else tuple(int(v) for v in train_size)
        self.flip_perm = np.asarray(flip_perm)
        self.train = bool(train)
        self.scale_range = tuple(float(s) for s in scale_range)
        self.max_rotate = float(max_rotate)
        self.max_translate = float(max_translate)
        self.flip = bool(flip)
        self.test_scales = tuple(float(s) for s in test_scales)
        if 1.0 not in self.test_scales:
            raise ConfigError(f'--testScales {",".join(map(str, self.test_scales))}: the tags come from scale 1, '
                              f'which must be among the test scales')

    def __call__(self, image, record, rng=None):
        keypoints = np.asarray(record['keypoints'], np.float64)
        visible = np.asarray(record['visible'], np.float32).copy()
        if self.train:
            return self._train(image, record, keypoints, visible, rng if rng is not None else np.random.default_rng())
        return self._test(image, keypoints, visible)

    def _train(self, image, record, keypoints, visible, rng):
        h, w = image.shape[:2]
        tw, th = self.train_size
        box = min(h, w) * rng.uniform(*self.scale_range)          # onto the input's shorter side
        rotation = rng.uniform(-self.max_rotate, self.max_rotate)
        shift = rng.uniform(-self.max_translate, self.max_translate, 2) * box if self.max_translate > 0 else np.zeros(2)
        m = affine_matrix(np.array([w / 2.0, h / 2.0]) + shift, box * tw / min(tw, th), (tw, th), rotation)
        if self.flip and rng.random() < 0.5:            # mirror the input: x -> W - 1 - x
            m = np.array([[-1.0, 0.0, tw - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0, 0, 1]])
            keypoints, visible = keypoints[:, self.flip_perm], visible[:, self.flip_perm]
        crop = cv2.warpAffine(image, m, (tw, th), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        mask = record.get('mask')
        mask = np.ones((h, w), np.uint8) if mask is None else np.asarray(mask, np.uint8)
        mask = cv2.warpAffine(mask * 255, m, (tw, th), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        moved = transform_points(keypoints.reshape(-1, 2), m).reshape(keypoints.shape).astype(np.float32)
        return dict(image=normalize(crop), keypoints=moved, visible=visible, mask=(mask > 127).astype(np.uint8),
                    affine=m.astype(np.float32))

    def _test(self, image, keypoints, visible):
        h, w = image.shape[:2]
        low = min(self.test_scales)
        images, first = [], None
        for s in self.test_scales:
            size, center, scale = grouping.multi_scale_size((w, h), self.input_size, s, low)
            m = grouping.scale_affine(center, scale, size)
            images.append(normalize(cv2.warpAffine(image, m, tuple(size), flags=cv2.INTER_LINEAR)))
            if s == 1.0:
                first = (size, m)
        size, m = first
        _, center, scale = grouping.multi_scale_size((w, h), self.input_size, low, low)
        moved = transform_points(keypoints.reshape(-1, 2), m).reshape(keypoints.shape).astype(np.float32)
        return dict(image=images[self.test_scales.index(1.0)], image_scales=images, keypoints=moved,
                    visible=visible, affine=m.astype(np.float32), size=np.array(size, np.int64),
                    center=np.asarray(center, np.float64), scale=np.asarray(scale, np.float64))


# what the bottom-up pipeline says about its crops: moved into the sample's meta
META = ('size', 'center', 'scale')


def gaussian_heatmaps(keypoints, visible, size, sigma):
    """The authors' HeatmapGenerator: keypoints (N, K, 2) in map pixels, visible (N, K), size (W, H)
    -> (K, H, W) float32: per labelled joint on the map a Gaussian of ``sigma`` on a window of
    6 sigma + 3 pixels centred on (int(x), int(y)); the maximum where people overlap."""
    w, h = size
    k = np.asarray(visible).shape[-1]
    maps = np.zeros((k, h, w), np.float32)
    n = 6 * sigma + 3
    grid = np.arange(0, n, 1, np.float64)
    g = np.exp(-((grid[None, :] - 3 * sigma - 1) ** 2 + (grid[:, None] - 3 * sigma - 1) ** 2) / (2 * sigma ** 2))
    for person, labelled in zip(np.asarray(keypoints), np.asarray(visible) > 0):
        for j in np.flatnonzero(labelled):
            x, y = int(person[j, 0]), int(person[j, 1])
            if x < 0 or y < 0 or x >= w or y >= h:
                continue
            x0, y0 = int(np.round(x - 3 * sigma - 1)), int(np.round(y - 3 * sigma - 1))
            x1, y1 = int(np.round(x + 3 * sigma + 2)), int(np.round(y + 3 * sigma + 2))
            gx0, gy0 = max(0, -x0), max(0, -y0)
            gx1, gy1 = min(x1, w) - x0, min(y1, h) - y0
            region = maps[j, max(0, y0):min(y1, h), max(0, x0):min(x1, w)]
            np.maximum(region, g[gy0:gy1, gx0:gx1], out=region)
    return maps


@register_codec('associative_embedding')
class AssociativeEmbeddingCodec(Codec):
    """See the module docstring. input_size: int, the test images' shorter side (and the side of
    the square training inputs); train_size: (W, H) of rectangular training inputs instead
    (``--inputRes 384x640``: the shorter image side, times the scale factor, onto the shorter
    input side); strides: of the model's outputs (HigherHRNet: 4, 2); the first output holds K
    heatmaps then K tag maps."""
    bottom_up = True
    eval_batch_size = 1          # test images keep their aspect ratio: one per batch

    def __init__(self, input_size, strides=(4, 2), num_joints=17, sigma=2.0, max_people=30, tag_factor=1e-3,
                 heatmap_factors=(1.0, 1.0), detection_threshold=0.1, tag_threshold=1.0, joint_order=None,
                 test_scales=(1.0,), push_type='exp', train_size=None):
        self.input_size = int(input_size)
        self.train_size = (self.input_size,) * 2 if train_size is None else tuple(int(v) for v in train_size)
        self.push_type = str(push_type)
        self.test_scales = tuple(float(s) for s in test_scales)
        self.strides = tuple(int(s) for s in strides)
        tw, th = self.train_size
        self.output_sizes = [(tw // s, th // s) for s in self.strides]
        if not 0 < float(sigma) <= min(self.output_sizes[0]) / 2.0:
            raise ConfigError(f'--hmGauss {sigma:g}: a Gaussian of this sigma does not fit the '
                              f'{self.output_sizes[0][1]}x{self.output_sizes[0][0]} heatmap')
        self.num_joints = int(num_joints)
        self.sigma = float(sigma)
        self.max_people = int(max_people)
        self.tag_factor = float(tag_factor)
        self.heatmap_factors = tuple(float(f) for f in heatmap_factors)
        self.detection_threshold = float(detection_threshold)
        self.tag_threshold = float(tag_threshold)
        if joint_order is None and self.num_joints == len(grouping.COCO_JOINT_ORDER):
            joint_order = grouping.COCO_JOINT_ORDER
        self.joint_order = None if joint_order is None else tuple(int(j) for j in joint_order)

    @classmethod
    def from_opts(cls, opts, model):
        h, w = opts.inputRes
        return cls(min(h, w), getattr(model, 'strides', (model.stride,)), opts.nJoints, opts.hmGauss, opts.maxPeople,
                   opts.tagLossFactor, test_scales=opts.testScales, push_type=opts.pushLoss, train_size=(w, h))

    def settings(self):
        return dict(target=self.target, input_size=self.input_size, strides=list(self.strides),
                    num_joints=self.num_joints, sigma=self.sigma, max_people=self.max_people,
                    tag_factor=self.tag_factor, heatmap_factors=list(self.heatmap_factors),
                    detection_threshold=self.detection_threshold, tag_threshold=self.tag_threshold,
                    joint_order=list(self.joint_order) if self.joint_order else None,
                    test_scales=list(self.test_scales), push_type=self.push_type, train_size=list(self.train_size))

    def pipeline(self, opts, joint_set, train):
        """The whole-image pipeline of this codec's samples (``build_dataset`` asks for it)."""
        return BottomUpPipeline(self.input_size, joint_set.flip_permutation(), train=train,
                                scale_range=opts.scaleRange, max_rotate=opts.maxRotate,
                                max_translate=opts.maxTranslate, flip=opts.flipAug, test_scales=self.test_scales,
                                train_size=self.train_size)

    @property
    def draw_threshold(self):
        """A whole image's people include the grouping's low-scoring leftovers: drawings show the
        people and joints at or above the detection threshold."""
        return self.detection_threshold

    def encode(self, sample):
        """Targets per output resolution r: heatmap_r (K, H_r, W_r) and mask_r (H_r, W_r) float32;
        tag_joints (max_people, K, 2) int64 at the first resolution. Evaluation samples (without a
        mask) get none."""
        if 'mask' not in sample:
            return {}
        kp, vis = np.asarray(sample['keypoints'], np.float64), np.asarray(sample['visible'])
        mask = np.asarray(sample['mask'], np.float32)
        out = {}
        for r, size in enumerate(self.output_sizes):
            ratio = size[0] / float(self.train_size[0])
            at = kp * ratio
            out[f'heatmap_{r}'] = gaussian_heatmaps(at, vis, size, self.sigma)
            small = cv2.resize(mask, size, interpolation=cv2.INTER_AREA)
            out[f'mask_{r}'] = (small > 0.5).astype(np.float32)
            if r == 0:
                out['tag_joints'] = grouping.tag_targets(at, vis, size, self.max_people)
        out['mask'] = None                         # the input-size mask has served: no batch field
        return out

    def loss(self, outputs, batch):
        k = self.num_joints
        terms = {}
        for r, out in enumerate(outputs):
            name = f'heatmap_{self.strides[r]}'
            terms[name] = grouping.heatmap_loss(out[:, :k], batch[f'heatmap_{r}'], batch[f'mask_{r}']).mean() \
                * self.heatmap_factors[r]
        push, pull = grouping.ae_loss(outputs[0][:, k:2 * k], batch['tag_joints'], self.push_type)
        terms['push'] = push.mean() * self.tag_factor
        terms['pull'] = pull.mean() * self.tag_factor
        return terms

    def flip_back(self, output, flip_perm):
        return output.flip(-1)[:, flip_perm]

    def test_outputs(self, forward, batch, flip_perm, flip_test):
        """Every test scale (and its mirror) through ``forward``; -> (heatmaps (1, K, H, W), tags
        (1, K, H, W, L)) at the input resolution of scale 1, the authors' aggregation."""
        outs, flipped = [], [] if flip_test else None
        for image in batch['image_scales'][0]:
            x = image[None]
            outs.append(forward(x))
            if flip_test:
                flipped.append(forward(x.flip(-1)))
        size = tuple(int(v) for v in batch['meta']['size'][0])
        perm = None if flip_perm is None else flip_perm.cpu().numpy()
        return grouping.aggregate(outs, self.num_joints, size, self.test_scales, flipped, perm)

    def decode(self, outputs, batch):
        heatmaps, tags = outputs
        people, scores = grouping.parse(heatmaps[0], tags[0], self.max_people, self.detection_threshold,
                                        self.tag_threshold, joint_order=self.joint_order)
        meta = batch['meta']
        size = tuple(int(v) for v in meta['size'][0])
        final = grouping.final_people(people, meta['center'][0].numpy(), meta['scale'][0].numpy(), size)
        n = len(final)
        return [dict(index=int(meta['index'][0]), keypoints=final[:, :, :2].reshape(n, self.num_joints, 2),
                     scores=final[:, :, 2].reshape(n, self.num_joints), score=np.asarray(scores, np.float32).reshape(n),
                     tags=final[:, :, 3:])]
