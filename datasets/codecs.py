"""Codecs: what a model is trained to output, and how its output becomes people again.

A codec owns its task end to end, so training and evaluation can never disagree:

* ``encode(sample) -> {name: array}``: the training targets of one sample, from its keypoints
  (N, K, 2) and visibility (N, K) in input-crop pixels (a None value removes a sample field the
  codec has consumed);
* ``loss(outputs, batch) -> {term: tensor}``: named loss terms (the trainer sums them for the
  backward pass and logs each one);
* ``accuracy(outputs, batch) -> float or None``: the training accuracy it reports, if any;
* ``flip_back(output, flip_perm)`` / ``flip_merge(outputs, flipped, flip_perm)``: the flip test,
  and ``test_outputs(forward, batch, flip_perm, flip_test)``: how a batch goes through the model
  at test time (once, or at several scales);
* ``decode(outputs, batch) -> [instances per image]``: keypoints (N, K, 2) in ORIGINAL image
  pixels, scores (N, K) and an instance score (N,). Subclasses decode in the crop
  (``decode_crop``); the inverse affine is applied here, in one place, for every codec.

Codecs are registered by the target a model declares (``model.target``), here or in any module
of ``datasets/``: ``build_codec(opts, model)``. A codec's ``settings()`` are recorded in checkpoints, and ``from_settings`` rebuilds it.

Sizes given to a codec are an int (a square) or (W, H).
"""
import cv2
import numpy as np
import torch

from datasets.pipeline import heatmap_to_original, to_original
from models import fused
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
    draw_threshold = None     # drawings show the people and joints scoring at least this (None: all)

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

    def test_outputs(self, forward, batch, flip_perm, flip_test):
        """What ``decode`` reads for a batch: ``forward(images)`` (a list of outputs) of the batch's
        images, merged with their mirror images' when ``flip_test``. A codec that tests at several
        scales overrides this."""
        images = batch['image']
        outputs = forward(images)
        if flip_test:
            outputs = self.flip_merge(outputs, forward(images.flip(-1)), flip_perm)
        return outputs

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
    """Gaussian heatmaps: the MSRA convention of HRNet / SimpleBaselines, with DARK decoding and
    UDP as options.

    Encode: one map per joint; each person's Gaussian of ``sigma`` heatmap pixels, peak 1,
    truncated at 3 sigma; where several people's Gaussians overlap the map takes their maximum.
    ``heatmap_weight`` (K,) is 0 for a joint no person has labelled on the map (unlabelled, or its
    Gaussian entirely outside).

    * standard (MSRA): centred on the heatmap pixel ``int(x / stride + 0.5)``, stride = input /
      output size; the flip test shifts the mirrored maps one pixel right.
    * ``udp`` (Huang et al., CVPR 2020, unbiased data processing): centred exactly on the
      sub-pixel position ``x / s`` with s = (input - 1) / (output - 1) (pixel-size units; the
      pipeline's ``udp_affine_matrix`` is the matching crop), and a mirrored map needs no shift.

    Decode (one person per image): the argmax, then
    * ``decode='quarter'``: HRNet's ``get_final_preds``: a quarter pixel towards the higher
      neighbour along x and y, for maxima at least two pixels inside the map;
    * ``decode='dark'`` (Zhang et al., CVPR 2020): the maps blurred by a Gaussian of the
      training sigma (kernel ``dark_kernel(sigma)``: 11 for sigma 2) rescaled to their maximum,
      then one Newton step on their logarithm (the second-order Taylor expansion, finite
      differences as the authors' ``taylor``), for maxima at least two pixels inside the map;
    then times the stride (or s with UDP).
    """

    def __init__(self, input_size, output_size, sigma=2.0, decode='quarter', udp=False):
        self.input_size = _pair(input_size)     # (W, H)
        self.output_size = _pair(output_size)   # (W, H)
        self.sigma = float(sigma)
        if decode not in ('quarter', 'dark'):
            raise ConfigError(f"--decode {decode!r}: expected 'quarter' or 'dark'")
        self.decode_mode = decode
        self.udp = bool(udp)
        if not 0 < self.sigma <= min(self.output_size) / 2.0:
            raise ConfigError(f'--hmGauss {sigma:g}: a Gaussian of this sigma does not fit the '
                              f'{self.output_size[1]}x{self.output_size[0]} heatmap (at most half its shorter side, '
                              f'{min(self.output_size) / 2.0:g})')
        size, out = np.array(self.input_size, np.float32), np.array(self.output_size, np.float32)
        self.stride = (size - 1) / (out - 1) if self.udp else size / out
        radius = int(np.ceil(3 * self.sigma))
        g1 = np.arange(2 * radius + 1, dtype=np.float32) - radius
        self.radius = radius
        self.kernel = np.exp(-(g1[None, :] ** 2 + g1[:, None] ** 2) / (2 * self.sigma ** 2))
        self.grid = g1                          # offsets of the kernel's samples from its centre

    @classmethod
    def from_opts(cls, opts, model):
        return cls(opts.inputRes.wh, opts.outputRes.wh, opts.hmGauss, decode=opts.decode, udp=opts.udp)

    def settings(self):
        return dict(target=self.target, input_size=list(self.input_size), output_size=list(self.output_size),
                    sigma=self.sigma, decode=self.decode_mode, udp=self.udp)

    def _gaussian(self, x, y):
        """The kernel for a joint at heatmap position (x, y): the precomputed one (MSRA), or one
        evaluated at the sub-pixel offset from the nearest pixel (UDP); its centre pixel."""
        mx, my = int(x + 0.5), int(y + 0.5)
        if not self.udp:
            return self.kernel, mx, my
        dx, dy = self.grid - (x - mx), self.grid - (y - my)
        return np.exp(-(dx[None, :] ** 2 + dy[:, None] ** 2) / (2 * self.sigma ** 2)).astype(np.float32), mx, my

    def encode(self, sample):
        """sample keypoints (N, K, 2) crop pixels, visible (N, K) -> heatmap (K, H, W) float32,
        heatmap_weight (K,) float32."""
        kp, vis = np.asarray(sample['keypoints']), np.asarray(sample['visible'])
        w, h = self.output_size
        k = vis.shape[-1]
        target = np.zeros((k, h, w), np.float32)
        weight = np.zeros(k, np.float32)
        r = self.radius
        for person, labelled in zip(kp, vis > 0):
            for j in np.flatnonzero(labelled):
                gauss, mx, my = self._gaussian(person[j, 0] / self.stride[0], person[j, 1] / self.stride[1])
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
        target, w = batch['heatmap'], batch['heatmap_weight']
        if fused.can_heatmap_mse(outputs, target, w):     # CPU: one C++ pass each way (the same gradients)
            return {'heatmap': sum(fused.heatmap_mse(outputs, target, w))}
        w = w[:, :, None, None]
        return {'heatmap': sum(((o - target) ** 2 * w).mean() for o in outputs)}

    def accuracy(self, outputs, batch):
        """The HRNet / SimpleBaselines training accuracy of the last output (None if no joint of
        the batch is labelled)."""
        _, acc, cnt = metrics.heatmap_accuracy(outputs[-1].detach().cpu().numpy(), batch['heatmap'].cpu().numpy())
        return acc if cnt > 0 else None

    def flip_back(self, output, flip_perm):
        """Output of the horizontally flipped image -> output for the original image.

        Mirrors the maps and swaps left/right channels; the standard codec also shifts them one
        pixel right (the usual correction of the half-stride misalignment of a mirrored heatmap),
        UDP needs no shift.
        """
        out = output.flip(-1)[:, flip_perm]
        if not self.udp:
            out = torch.cat([out[..., :1], out[..., :-1]], dim=-1)
        return out

    def decode_crop(self, outputs):
        coords, scores = self.decode_heatmaps(outputs[-1])
        return coords[:, None], scores[:, None]

    def decode(self, outputs, batch):
        """As ``Codec.decode``; for the standard codec with the crop's box at hand, the heatmap
        positions go back to the original image as HRNet's ``transform_preds`` takes them
        (``heatmap_to_original``), so predictions equal the reference code's to the last bit."""
        meta = batch['meta']
        if self.udp or 'box' not in meta:
            return super().decode(outputs, batch)
        xy, scores = self.peaks(outputs[-1])
        boxes, index = _numpy(meta['box']), _numpy(meta['index']).astype(np.int64)
        people = []
        for i, box, p, s in zip(index, boxes, xy, scores):
            k = heatmap_to_original(p, box, self.output_size).astype(np.float32)[None]
            people.append(dict(index=int(i), keypoints=k, scores=s[None], score=s[None].mean(-1)))
        return people

    def decode_heatmaps(self, heatmaps):
        """heatmaps (B, K, H, W) array or tensor -> coords (B, K, 2) crop pixels, scores (B, K)."""
        xy, scores = self.peaks(heatmaps)
        return (xy * self.stride).astype(np.float32), scores

    def peaks(self, heatmaps):
        """heatmaps (B, K, H, W) -> refined maxima (B, K, 2) in heatmap pixels (0 where a map has no
        positive value, HRNet's convention), scores (B, K) = the maxima's values."""
        hm = _numpy(heatmaps).astype(np.float32, copy=False)
        n, k, h, w = hm.shape
        flat = hm.reshape(n, k, -1)
        idx = flat.argmax(-1)
        scores = flat.max(-1)
        xs = (idx % w).astype(np.float32)
        ys = (idx // w).astype(np.float32)
        if self.decode_mode == 'dark':
            xy = dark_refine(hm, np.stack([xs, ys], -1), dark_kernel(self.sigma))
        else:
            xy = quarter_refine(hm, xs, ys)
        xy = xy.astype(np.float32)
        xy[scores <= 0] = 0  # no peak: HRNet's convention of a zero prediction
        return xy, scores.astype(np.float32)


def quarter_refine(hm, xs, ys):
    """HRNet's post-processing: the argmax (xs, ys) (B, K) moved a quarter pixel towards the higher
    neighbour along each axis, where the maximum lies inside 1 < x < W - 1 and 1 < y < H - 1.
    hm (B, K, H, W). -> (B, K, 2) heatmap pixels."""
    n, k, h, w = hm.shape
    ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing='ij')
    xi, yi = xs.astype(int), ys.astype(int)
    inner = (xi > 1) & (xi < w - 1) & (yi > 1) & (yi < h - 1)
    xc, yc = np.clip(xi, 1, w - 2), np.clip(yi, 1, h - 2)
    dx = np.where(inner, np.sign(hm[ni, ki, yc, xc + 1] - hm[ni, ki, yc, xc - 1]), 0).astype(np.float32)
    dy = np.where(inner, np.sign(hm[ni, ki, yc + 1, xc] - hm[ni, ki, yc - 1, xc]), 0).astype(np.float32)
    return np.stack([xs + 0.25 * dx, ys + 0.25 * dy], -1)


def dark_kernel(sigma):
    """The odd Gaussian-blur kernel size of DARK for a heatmap sigma: the size whose default
    OpenCV sigma, 0.3 ((k - 1) / 2 - 1) + 0.8, is nearest to it (11 for sigma 2, 17 for 3)."""
    return 2 * max(1, int(round((float(sigma) - 0.8) / 0.3 + 1))) + 1


def dark_refine(hm, coords, kernel):
    """DARK's distribution-aware refinement of argmax positions.

    hm (B, K, H, W); coords (B, K, 2) integer argmax positions (x, y); kernel: odd blur size.
    Each map is blurred (zero padding, OpenCV's Gaussian of that size) and rescaled to its own
    maximum, its logarithm taken (values floored at 1e-10), and at maxima with 1 < x < W - 2 and
    1 < y < H - 2 one Newton step x - H^-1 g is taken, with g and H the central finite differences
    of the log-map (second derivatives over two pixels, as the authors' ``taylor``).
    -> (B, K, 2) heatmap pixels, float32.
    """
    n, k, h, w = hm.shape
    border = (kernel - 1) // 2
    logs = np.empty((n, k, h, w), np.float64)
    for b in range(n):
        for j in range(k):
            peak = hm[b, j].max()
            padded = np.zeros((h + 2 * border, w + 2 * border))
            padded[border:border + h, border:border + w] = hm[b, j]
            blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:border + h, border:border + w]
            top = blurred.max()
            blurred = (blurred * (peak / top) if top > 0 else blurred).astype(np.float32)
            logs[b, j] = np.log(np.maximum(blurred, 1e-10))
    out = np.asarray(coords, np.float64).copy()
    px, py = out[..., 0].astype(int), out[..., 1].astype(int)
    inner = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    for b, j in zip(*np.nonzero(inner)):
        m, x, y = logs[b, j], px[b, j], py[b, j]
        dx = 0.5 * (m[y, x + 1] - m[y, x - 1])
        dy = 0.5 * (m[y + 1, x] - m[y - 1, x])
        dxx = 0.25 * (m[y, x + 2] - 2 * m[y, x] + m[y, x - 2])
        dyy = 0.25 * (m[y + 2, x] - 2 * m[y, x] + m[y - 2, x])
        dxy = 0.25 * (m[y + 1, x + 1] - m[y - 1, x + 1] - m[y + 1, x - 1] + m[y - 1, x - 1])
        det = dxx * dyy - dxy * dxy
        if det != 0:
            out[b, j, 0] -= (dyy * dx - dxy * dy) / det
            out[b, j, 1] -= (dxx * dy - dxy * dx) / det
    return out.astype(np.float32)


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
    """A tensor or array as a numpy array: half precisions as float32, other dtypes kept."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)
