"""Codecs: keypoints <-> training targets, and model output -> keypoints.

The trainer builds one codec per run (``build_codec``) and uses it for the target, the loss,
the flip test and the decoding, so training and evaluation can never disagree.

Coordinates given to and returned by a codec are in **input-crop pixels** (the frame of the
image tensor the model sees), 0-based, pixel centres at integers.
"""
import numpy as np
import torch


class HeatmapCodec:
    """MSRA Gaussian heatmaps (Xiao et al. 2018, as in the HRNet / SimpleBaselines code).

    Encode: a Gaussian of ``sigma`` heatmap pixels, peak 1, truncated at 3 sigma, centred at
    ``int(x / stride + 0.5)``; weight 0 for an unlabelled joint or one whose Gaussian falls
    entirely outside the map. Decode: argmax, then a quarter-pixel shift towards the higher
    neighbour, times the stride.
    """
    target = 'heatmap'

    def __init__(self, input_size, output_size, sigma=2.0):
        self.input_size = _pair(input_size)     # (W, H)
        self.output_size = _pair(output_size)   # (W, H)
        self.sigma = float(sigma)
        self.stride = np.array(self.input_size, np.float32) / np.array(self.output_size, np.float32)

    def encode(self, joints, visible):
        """joints (K, 2) crop pixels, visible (K,) -> target (K, H, W) float32, weight (K,) float32."""
        w, h = self.output_size
        k = len(joints)
        target = np.zeros((k, h, w), np.float32)
        weight = (np.asarray(visible) > 0).astype(np.float32)
        radius = int(np.ceil(3 * self.sigma))
        size = 2 * radius + 1
        g1 = np.arange(size, dtype=np.float32) - radius
        gauss = np.exp(-(g1[None, :] ** 2 + g1[:, None] ** 2) / (2 * self.sigma ** 2))
        for j in range(k):
            if weight[j] == 0:
                continue
            mx = int(joints[j, 0] / self.stride[0] + 0.5)
            my = int(joints[j, 1] / self.stride[1] + 0.5)
            x0, y0, x1, y1 = mx - radius, my - radius, mx + radius + 1, my + radius + 1
            if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
                weight[j] = 0
                continue
            gx0, gx1 = max(0, -x0), min(x1, w) - x0
            gy0, gy1 = max(0, -y0), min(y1, h) - y0
            target[j, max(0, y0):min(y1, h), max(0, x0):min(x1, w)] = gauss[gy0:gy1, gx0:gx1]
        return target, weight

    def decode(self, heatmaps):
        """heatmaps (N, K, H, W) array or tensor -> coords (N, K, 2) crop pixels, scores (N, K)."""
        hm = _numpy(heatmaps)
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

    def loss(self, outputs, target, weight):
        """Mean squared error summed over the list of outputs (intermediate supervision).

        outputs: list of (N, K, H, W); target (N, K, H, W); weight (N, K).
        """
        w = weight[:, :, None, None]
        return sum(((o - target) ** 2 * w).mean() for o in outputs)

    def flip_back(self, output, flip_perm):
        """Output of the horizontally flipped image -> output for the original image.

        Mirrors the maps, swaps left/right channels, and shifts one pixel right (the usual
        correction of the half-stride misalignment of a flipped heatmap).
        """
        out = output.flip(-1)[:, flip_perm]
        out = torch.cat([out[..., :1], out[..., :-1]], dim=-1)
        return out


class CoordinateCodec:
    """Direct regression (DeepPose): joints as (x / W - 0.5, y / H - 0.5) of the input crop."""
    target = 'coords'

    def __init__(self, input_size):
        self.input_size = _pair(input_size)
        self.stride = np.array([1.0, 1.0], np.float32)

    def encode(self, joints, visible):
        """joints (K, 2) crop pixels -> target (K, 2) in [-0.5, 0.5], weight (K,)."""
        size = np.array(self.input_size, np.float32)
        inside = np.all((joints >= 0) & (joints <= size - 1), axis=1)
        weight = ((np.asarray(visible) > 0) & inside).astype(np.float32)
        target = (joints / size - 0.5).astype(np.float32)
        target[weight == 0] = 0
        return target, weight

    def decode(self, coords):
        """coords (N, K, 2) normalised -> crop pixels (N, K, 2), scores (N, K) (all ones)."""
        c = _numpy(coords)
        pix = (c + 0.5) * np.array(self.input_size, np.float32)
        return pix.astype(np.float32), np.ones(c.shape[:2], np.float32)

    def loss(self, outputs, target, weight):
        """Squared L2 distance per joint, weighted by visibility, summed over stages."""
        w = weight[:, :, None]
        return sum(((o - target) ** 2 * w).sum(-1).mean() for o in outputs)

    def flip_back(self, output, flip_perm):
        """x of the flipped crop -> x of the original: x = W - 1 - x_f, in normalised units."""
        out = output[:, flip_perm].clone()
        out[..., 0] = -out[..., 0] - 1.0 / self.input_size[0]
        return out


def build_codec(target, opts):
    if target == 'heatmap':
        return HeatmapCodec(opts.inputRes, opts.outputRes, opts.hmGauss)
    if target == 'coords':
        return CoordinateCodec(opts.inputRes)
    raise ValueError(f'unknown target type {target!r}')


def _pair(v):
    if isinstance(v, (tuple, list, np.ndarray)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)
