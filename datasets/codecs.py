"""Codecs: what a model is trained to output, and how its output becomes people again.

A codec owns its task end to end, so training and evaluation can never disagree:

* ``encode(sample) -> {name: array}``: the training targets of one sample, from its keypoints
  (N, K, 2) and visibility (N, K) in input-crop pixels;
* ``loss(outputs, batch) -> {term: tensor}``: named loss terms (the trainer sums them for the
  backward pass and logs each one);
* ``accuracy(outputs, batch) -> float or None``: the training accuracy it reports, if any;
* ``flip_back(output, flip_perm)`` / ``flip_merge(outputs, flipped, flip_perm)``: the flip test;
* ``decode(outputs, batch) -> [instances per image]``: keypoints (N, K, 2) in ORIGINAL image
  pixels, scores (N, K) and an instance score (N,). Subclasses decode in the crop
  (``decode_crop``); the inverse affine is applied here, in one place, for every codec.

Codecs are registered by the target a model declares (``model.target``), here or in any module
of ``datasets/``: ``build_codec(opts, model)``. A codec's ``settings()`` are recorded in checkpoints, and ``from_settings`` rebuilds it.

Sizes given to a codec are an int (a square) or (W, H).
"""
import numpy as np
import torch

from datasets.pipeline import to_original
from utils import metrics
from utils.errors import ConfigError, did_you_mean

CODECS = {}


def register_codec(target):
    def wrap(cls):
        if target in CODECS:
            raise ValueError(f'codec for {target!r} registered twice')
        cls.target = target
        CODECS[target] = cls
        return cls
    return wrap


def _import_codecs():
    """Codecs may live in any module of ``datasets/`` (a dataset that brings its own task): import
    them all before a lookup."""
    import datasets
    datasets.available()


def build_codec(opts, model):
    """The codec of the target ``model`` declares, with the run's options."""
    _import_codecs()
    if model.target not in CODECS:
        raise ConfigError(f'no codec for target {model.target!r} of {type(model).__name__}'
                          f'{did_you_mean(model.target, CODECS)}; known: {", ".join(sorted(CODECS))}')
    return CODECS[model.target].from_opts(opts, model)


def codec_from_settings(settings):
    """Rebuild a codec from the ``settings()`` a checkpoint recorded."""
    _import_codecs()
    settings = dict(settings)
    target = settings.pop('target')
    if target not in CODECS:
        raise ConfigError(f'no codec for target {target!r}; known: {", ".join(sorted(CODECS))}')
    return CODECS[target](**settings)


class Codec:
    """Base class; see the module docstring for the contract."""
    target = None
    people_fields = ()        # extra sample fields whose length follows the number of people

    @classmethod
    def from_opts(cls, opts, model):
        raise NotImplementedError

    def settings(self):
        """The constructor's arguments, plain values: recorded in a checkpoint."""
        raise NotImplementedError

    def encode(self, sample):
        raise NotImplementedError

    def loss(self, outputs, batch):
        raise NotImplementedError

    def accuracy(self, outputs, batch):
        return None

    def flip_back(self, output, flip_perm):
        raise NotImplementedError

    def flip_merge(self, outputs, flipped, flip_perm):
        """Outputs of the image and of its mirror image -> the flip test's outputs (the mean)."""
        return [(o + self.flip_back(f, flip_perm)) / 2 for o, f in zip(outputs, flipped)]

    def decode_crop(self, outputs):
        """-> keypoints (B, N, K, 2) in input-crop pixels, scores (B, N, K)."""
        raise NotImplementedError

    def decode(self, outputs, batch):
        """Per image of the batch: {'index', 'keypoints' (N, K, 2) original pixels, 'scores' (N, K),
        'score' (N,)}."""
        coords, scores = self.decode_crop(outputs)
        meta = batch['meta']
        original = to_original(coords, _numpy(meta['affine']))
        index = _numpy(meta['index']).astype(np.int64)
        return [dict(index=int(i), keypoints=k, scores=s, score=s.mean(-1) if s.size else np.zeros(len(s), np.float32))
                for i, k, s in zip(index, original, scores)]


def _person(sample):
    """The sample's first person (a top-down crop has exactly one); zero visibility if none."""
    kp, vis = np.asarray(sample['keypoints']), np.asarray(sample['visible'])
    if len(kp) == 0:
        k = vis.shape[-1]
        return np.zeros((k, 2), np.float32), np.zeros(k, np.float32)
    return kp[0], vis[0]


@register_codec('heatmap')
class HeatmapCodec(Codec):
    """MSRA Gaussian heatmaps (Xiao et al. 2018, as in the HRNet / SimpleBaselines code).

    Encode: one map per joint; each person's Gaussian of ``sigma`` heatmap pixels, peak 1,
    truncated at 3 sigma, centred at ``int(x / stride + 0.5)``; where several people's Gaussians
    overlap the map takes their maximum. ``heatmap_weight`` (K,) is 0 for a joint no person has
    labelled on the map (unlabelled, or its Gaussian entirely outside). Decode: argmax, then a
    quarter-pixel shift towards the higher neighbour, times the stride (one person per image).
    """

    def __init__(self, input_size, output_size, sigma=2.0):
        self.input_size = _pair(input_size)     # (W, H)
        self.output_size = _pair(output_size)   # (W, H)
        self.sigma = float(sigma)
        self.stride = np.array(self.input_size, np.float32) / np.array(self.output_size, np.float32)
        radius = int(np.ceil(3 * self.sigma))
        g1 = np.arange(2 * radius + 1, dtype=np.float32) - radius
        self.radius = radius
        self.kernel = np.exp(-(g1[None, :] ** 2 + g1[:, None] ** 2) / (2 * self.sigma ** 2))

    @classmethod
    def from_opts(cls, opts, model):
        return cls(opts.inputRes.wh, opts.outputRes.wh, opts.hmGauss)

    def settings(self):
        return dict(target=self.target, input_size=list(self.input_size), output_size=list(self.output_size),
                    sigma=self.sigma)

    def encode(self, sample):
        """sample keypoints (N, K, 2) crop pixels, visible (N, K) -> heatmap (K, H, W) float32,
        heatmap_weight (K,) float32."""
        kp, vis = np.asarray(sample['keypoints']), np.asarray(sample['visible'])
        w, h = self.output_size
        k = vis.shape[-1]
        target = np.zeros((k, h, w), np.float32)
        weight = np.zeros(k, np.float32)
        r, gauss = self.radius, self.kernel
        for person, labelled in zip(kp, vis > 0):
            for j in np.flatnonzero(labelled):
                mx = int(person[j, 0] / self.stride[0] + 0.5)
                my = int(person[j, 1] / self.stride[1] + 0.5)
                x0, y0, x1, y1 = mx - r, my - r, mx + r + 1, my + r + 1
                if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
                    continue
                gx0, gx1 = max(0, -x0), min(x1, w) - x0
                gy0, gy1 = max(0, -y0), min(y1, h) - y0
                region = target[j, max(0, y0):min(y1, h), max(0, x0):min(x1, w)]
                np.maximum(region, gauss[gy0:gy1, gx0:gx1], out=region)
                weight[j] = 1.0
        return dict(heatmap=target, heatmap_weight=weight)

    def loss(self, outputs, batch):
        """Mean squared error, weighted per joint, summed over the list of outputs
        (intermediate supervision). outputs: list of (B, K, H, W)."""
        target, w = batch['heatmap'], batch['heatmap_weight'][:, :, None, None]
        return {'heatmap': sum(((o - target) ** 2 * w).mean() for o in outputs)}

    def accuracy(self, outputs, batch):
        """The HRNet / SimpleBaselines training accuracy of the last output (None if no joint of
        the batch is labelled)."""
        _, acc, cnt = metrics.heatmap_accuracy(outputs[-1].detach().cpu().numpy(), batch['heatmap'].cpu().numpy())
        return acc if cnt > 0 else None

    def flip_back(self, output, flip_perm):
        """Output of the horizontally flipped image -> output for the original image.

        Mirrors the maps, swaps left/right channels, and shifts one pixel right (the usual
        correction of the half-stride misalignment of a flipped heatmap).
        """
        out = output.flip(-1)[:, flip_perm]
        out = torch.cat([out[..., :1], out[..., :-1]], dim=-1)
        return out

    def decode_crop(self, outputs):
        coords, scores = self.decode_heatmaps(outputs[-1])
        return coords[:, None], scores[:, None]

    def decode_heatmaps(self, heatmaps):
        """heatmaps (B, K, H, W) array or tensor -> coords (B, K, 2) crop pixels, scores (B, K)."""
        hm = _numpy(heatmaps).astype(np.float32, copy=False)
        n, k, h, w = hm.shape
        flat = hm.reshape(n, k, -1)
        idx = flat.argmax(-1)
        scores = flat.max(-1)
        xs = (idx % w).astype(np.float32)
        ys = (idx // w).astype(np.float32)
        # quarter-pixel shift towards the higher neighbour
        ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing='ij')
        xi, yi = xs.astype(int), ys.astype(int)
        inner_x = (xi > 0) & (xi < w - 1)
        inner_y = (yi > 0) & (yi < h - 1)
        dx = np.zeros_like(xs)
        dy = np.zeros_like(ys)
        dx[inner_x] = np.sign(hm[ni, ki, yi, np.minimum(xi + 1, w - 1)] - hm[ni, ki, yi, np.maximum(xi - 1, 0)])[inner_x]
        dy[inner_y] = np.sign(hm[ni, ki, np.minimum(yi + 1, h - 1), xi] - hm[ni, ki, np.maximum(yi - 1, 0), xi])[inner_y]
        coords = np.stack([xs + 0.25 * dx, ys + 0.25 * dy], -1) * self.stride
        coords[scores <= 0] = 0  # no peak: HRNet's convention of a zero prediction
        return coords.astype(np.float32), scores.astype(np.float32)


@register_codec('coords')
class CoordinateCodec(Codec):
    """Direct regression (DeepPose): one person's joints as (x / W - 0.5, y / H - 0.5) of the crop."""

    def __init__(self, input_size):
        self.input_size = _pair(input_size)
        self.stride = np.array([1.0, 1.0], np.float32)

    @classmethod
    def from_opts(cls, opts, model):
        return cls(opts.inputRes.wh)

    def settings(self):
        return dict(target=self.target, input_size=list(self.input_size))

    def encode(self, sample):
        """The sample's person (K, 2) crop pixels -> coords (K, 2) in [-0.5, 0.5], coords_weight (K,)
        (0 for an unlabelled joint or one outside the crop)."""
        joints, visible = _person(sample)
        size = np.array(self.input_size, np.float32)
        inside = np.all((joints >= 0) & (joints <= size - 1), axis=1)
        weight = ((np.asarray(visible) > 0) & inside).astype(np.float32)
        target = (joints / size - 0.5).astype(np.float32)
        target[weight == 0] = 0
        return dict(coords=target, coords_weight=weight)

    def loss(self, outputs, batch):
        """Squared L2 distance per joint, weighted by visibility, summed over stages."""
        target, w = batch['coords'], batch['coords_weight'][:, :, None]
        return {'coords': sum(((o - target) ** 2 * w).sum(-1).mean() for o in outputs)}

    def flip_back(self, output, flip_perm):
        """x of the flipped crop -> x of the original: x = W - 1 - x_f, in normalised units."""
        out = output[:, flip_perm].clone()
        out[..., 0] = -out[..., 0] - 1.0 / self.input_size[0]
        return out

    def decode_crop(self, outputs):
        """Last stage (B, K, 2) normalised -> crop pixels (B, 1, K, 2), scores (B, 1, K) (all ones)."""
        c = _numpy(outputs[-1])
        pix = (c + 0.5) * np.array(self.input_size, np.float32)
        return pix.astype(np.float32)[:, None], np.ones(c.shape[:2], np.float32)[:, None]


def _pair(v):
    if isinstance(v, (tuple, list, np.ndarray)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)
