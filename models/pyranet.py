"""PyraNet: Learning Feature Pyramids for Human Pose Estimation (Yang et al., ICCV 2017).

A stacked hourglass whose residual units are Pyramid Residual Modules (PRM-B, the variant of the
paper's final model and of the authors' Torch code, bearpaw/PyraNet ``models/hg-prm.lua`` and
``models/layers/PRM.lua``):

    x -> [BN-ReLU] conv1x1(C/2) - BN-ReLU - conv3x3(C/2) ............................ f0(x)
    x -> [BN-ReLU] conv1x1(D) - BN-ReLU - sum_c up(conv3x3(FMP_c(.))) - BN-ReLU - conv1x1(C/2)
    (f0 + pyramid) -> BN-ReLU - conv1x1(C)  +  skip(x)

with C pyramid levels (``cardinality``), each subsampled by fractional max-pooling at the ratio
2^(-c/C), c = 1..C, convolved (3x3, D channels, weights not shared across levels) and upsampled
back bilinearly; D = C_out // ``baseWidth`` (the code's ``D = floor(numOut / baseWidth)``:
``baseWidth`` divides the width, it is not a width itself).

As in the authors' code: PRMs in the stem and at the three finest hourglass resolutions (block
scale 1, 2 and 4 relative to the hourglass input; 64, 32 and 16 pixels at 256 input), the plain
pre-activation bottleneck at the coarser ones, and after each hourglass a BN-ReLU then the 1x1
conv-BN-ReLU and the heatmap conv (no residual module there, unlike pose-hg-train).

Departures, all deliberate:

* Fractional max-pooling is random in training, as Torch's ``SpatialFractionalMaxPooling`` the
  code used, but **deterministic in eval mode** (fixed pooling offsets), so that a model gives
  the same output twice; Torch's module stayed random at test time.
* The authors' code gives the last module of every lower branch (``low3``) a BN-ReLU-conv1x1
  projection shortcut even when the widths agree (``useConv = true``); the paper's PRM has an
  identity shortcut, x + P(x), and this follows the paper.
* The paper's multi-branch initialisation (Sec. 3.3) is applied where the code flags it
  (``nBranchIn = C``): the 1x1 convolution fed by the sum of the C pyramid levels is drawn with
  variance 2 / (C * fan_in), i.e. MSRA divided by the number of summed branches. Other layers keep
  PyTorch's default initialisation (the authors' init file is not part of their release).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.layers import Hourglass, Remap, Residual, bn_relu, conv_bn_relu


class FractionalMaxPool2d(nn.Module):
    """Pseudo-random fractional max-pooling (Graham 2014) with 2x2 windows to
    ``floor(size * ratio)`` pixels per side.

    Training: fresh random window offsets every call (``F.fractional_max_pool2d``). Eval: the
    offsets are fixed at ``eval_sample`` in [0, 1), so the output is deterministic.
    A map too small to pool (side < 2) is returned unchanged.
    """

    def __init__(self, ratio, eval_sample=0.5):
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f'fractional pooling ratio must be in (0, 1], got {ratio}')
        self.ratio = ratio
        self.eval_sample = eval_sample

    def forward(self, x):
        h, w = x.shape[-2:]
        if h < 2 or w < 2:
            return x
        out = (max(1, int(h * self.ratio)), max(1, int(w * self.ratio)))
        samples = None
        if not self.training:
            samples = torch.full((x.shape[0], x.shape[1], 2), self.eval_sample, dtype=x.dtype, device=x.device)
        return F.fractional_max_pool2d(x, 2, output_size=out, _random_samples=samples)

    def extra_repr(self):
        return f'ratio={self.ratio:.4f}'


class PyramidBranch(nn.Module):
    """The pyramid of a PRM: for c = 1..C, fractional max-pool at 2^(-c/C), conv3x3 (D -> D),
    bilinear upsampling back to the input size (corners aligned, as Torch's
    ``SpatialUpSamplingBilinear``); the C levels are summed. (N, D, H, W) -> (N, D, H, W)."""

    def __init__(self, channels, cardinality):
        super().__init__()
        self.pools = nn.ModuleList(FractionalMaxPool2d(2.0 ** (-c / cardinality)) for c in range(1, cardinality + 1))
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(cardinality))

    def forward(self, x):
        size = x.shape[-2:]
        out = 0
        for pool, conv in zip(self.pools, self.convs):
            out = out + F.interpolate(conv(pool(x)), size=size, mode='bilinear', align_corners=True)
        return out


class PyramidResidual(nn.Module):
    """Pyramid Residual Module, PRM-B (shared 1x1 reduction before the pyramid levels).

    ``preact=False`` drops the leading BN-ReLU of both branches (the first stem module, whose
    input is already BN-ReLU'd). The shortcut is the identity when the widths agree, else
    BN-ReLU-conv1x1 (the code's ``skipLayer``). (N, C_in, H, W) -> (N, C_out, H, W).
    """

    def __init__(self, in_channels, out_channels, base_width=9, cardinality=4, preact=True):
        super().__init__()
        half = out_channels // 2
        width = max(1, out_channels // base_width)
        lead = (lambda: [bn_relu(in_channels)]) if preact else (lambda: [])
        self.main = nn.Sequential(
            *lead(), nn.Conv2d(in_channels, half, 1), bn_relu(half), nn.Conv2d(half, half, 3, padding=1))
        self.reduce = nn.Sequential(*lead(), nn.Conv2d(in_channels, width, 1), bn_relu(width))
        self.pyramid = PyramidBranch(width, cardinality)
        self.expand = nn.Sequential(bn_relu(width), nn.Conv2d(width, half, 1))
        self.out = nn.Sequential(bn_relu(half), nn.Conv2d(half, out_channels, 1))
        if in_channels == out_channels:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Sequential(bn_relu(in_channels), nn.Conv2d(in_channels, out_channels, 1))
        # multi-branch initialisation of the paper: the conv after the sum of C branches
        conv = self.expand[1]
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (cardinality * conv.in_channels)))
        nn.init.zeros_(conv.bias)

    def forward(self, x):
        pyramid = self.expand(self.pyramid(self.reduce(x)))
        return self.out(self.main(x) + pyramid) + self.skip(x)


def prm_factory(base_width, cardinality, max_scale=4):
    """Block factory of PyraNet: a PRM at block scales <= ``max_scale`` (the three finest
    hourglass resolutions, as ``hg-prm.lua``), the plain bottleneck below them."""
    def make_block(in_channels, out_channels, scale=1):
        if scale <= max_scale:
            return PyramidResidual(in_channels, out_channels, base_width, cardinality)
        return Residual(in_channels, out_channels)
    return make_block


@register_model('PyraNet')
class PyraNet(nn.Module):
    """(N, 3, H, W) -> list of ``num_stacks`` heatmaps (N, num_joints, H/4, W/4).

    H and W must be divisible by ``4 * 2 ** num_reductions``.
    """
    target = 'heatmap'
    stride = 4

    def __init__(self, num_joints=16, num_stacks=8, num_modules=1, channels=256, num_reductions=4,
                 base_width=9, cardinality=4):
        super().__init__()
        self.num_stacks = num_stacks
        make_block = prm_factory(base_width, cardinality)
        self.stem = nn.Sequential(
            conv_bn_relu(3, 64, 7, 2),
            PyramidResidual(64, 128, base_width, cardinality, preact=False),
            nn.MaxPool2d(2, 2),
            PyramidResidual(128, 128, base_width, cardinality),
            PyramidResidual(128, channels, base_width, cardinality))
        self.hourglasses = nn.ModuleList(
            Hourglass(num_reductions, channels, make_block, num_modules) for _ in range(num_stacks))
        self.features = nn.ModuleList(
            nn.Sequential(bn_relu(channels), conv_bn_relu(channels, channels, 1)) for _ in range(num_stacks))
        self.scores = nn.ModuleList(nn.Conv2d(channels, num_joints, 1) for _ in range(num_stacks))
        self.remaps = nn.ModuleList(Remap(channels, num_joints) for _ in range(num_stacks - 1))

    @classmethod
    def from_opts(cls, opts):
        return cls(num_joints=opts.nJoints, num_stacks=opts.nStack, num_modules=opts.nModules,
                   channels=opts.nChannels, num_reductions=opts.nReductions,
                   base_width=opts.baseWidth, cardinality=opts.cardinality)

    def forward(self, x):
        x = self.stem(x)
        outputs = []
        for i in range(self.num_stacks):
            features = self.features[i](self.hourglasses[i](x))
            heatmaps = self.scores[i](features)
            outputs.append(heatmaps)
            if i < self.num_stacks - 1:
                x = self.remaps[i](x, features, heatmaps)
        return outputs
