"""Chained predictions (Gkioxari, Toshev and Jaitly, ECCV 2016), single-image chain model.

The joints are predicted one after another, each conditioned on the image and on every joint
predicted before it. With untied weights at every step t (the paper's single-image model):

    h_0 = CNN(x)                                                 the encoder (``modelName``)
    h_t = ReLU(w^h_t * h_{t-1} + sum_{i<t} w^y_{i,t} * e(y_i))   t = 1 .. K-1
    y_t = m_t(h_t)                                               one heatmap per step

* ``*`` is a convolution: w^h_t has ``hhKernel`` x ``hhKernel`` kernels, w^y_{i,t} has
  ``ohKernel`` x ``ohKernel`` kernels (each followed by BN here, as in the older framework).
* e(y_i) brings heatmap y_i down to the hidden resolution (adaptive average pooling, so any
  input size works); the sum over i of w^y_{i,t} * e(y_i) is one convolution over the t
  previous heatmaps stacked as channels, which is exactly that sum with untied weights.
* m_t is the paper's multi-scale deconvolution head ("deception"): per doubling of the
  resolution, three transposed convolutions of kernel 2, 4 and 6 run in parallel and are summed;
  as many doublings as take the encoder's stride 32 to the heatmap stride, then a 3x3
  convolution to one map, resized to exactly (H, W) * outputRes / inputRes when they differ.

The hidden state is at the encoder's stride (8x8 for a 256x256 crop, 2x2 for 64x64); nothing
assumes a particular size. Joints are chained in the dataset's order.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model
from .resnet import load_pretrained, resnet


def conv_bn(in_channels, out_channels, kernel):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding='same', bias=False),
                         nn.BatchNorm2d(out_channels))


class MultiScaleUp(nn.Module):
    """Doubles the resolution: sum of 2x2, 4x4 and 6x6 stride-2 transposed convolutions, BN, ReLU.

    The three are centred alike (padding (k - 2) / 2), so their sum is one 6x6 transposed
    convolution whose kernel is the sum of the three zero-padded kernels: ``forward`` runs that
    single convolution (same result, a third of the work).
    """

    def __init__(self, channels):
        super().__init__()
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(channels, channels, k, stride=2, padding=(k - 2) // 2, bias=False)
            for k in (2, 4, 6))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def kernel(self):
        """The 6x6 kernel equal to the sum of the three."""
        return sum(F.pad(d.weight, [(6 - d.kernel_size[0]) // 2] * 4) for d in self.deconvs)

    def forward(self, x):
        return self.relu(self.bn(F.conv_transpose2d(x, self.kernel(), stride=2, padding=2)))


class Deception(nn.Module):
    """(N, hidden, h, w) -> (N, 1, h * 2**n_up, w * 2**n_up): one joint's heatmap."""

    def __init__(self, hidden, n_up, width=32):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.up = nn.Sequential(*[MultiScaleUp(width) for _ in range(n_up)])
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x):
        return self.out(self.up(self.reduce(x)))


@register_model('ChainedPredictions')
class ChainedPredictions(nn.Module):
    """(N, 3, H, W) -> [(N, K, H * outputRes / inputRes, W * outputRes / inputRes)].

    n_joints: K; encoder: ResNet name; hh_kernel / oh_kernel: hidden-to-hidden and
    output-to-hidden kernel sizes; input_res / output_res: input and heatmap heights, which fix
    the heatmap stride (the same along both axes);
    hidden: channels of the hidden state.
    """
    target = 'heatmap'
    stride = 4

    def __init__(self, n_joints=16, encoder='resnet34', hh_kernel=3, oh_kernel=3, input_res=256,
                 output_res=64, hidden=64):
        super().__init__()
        self.n_joints = n_joints
        self.scale = output_res / input_res
        stride = input_res / output_res
        self.stride = int(stride) if float(stride).is_integer() else stride
        self.encoder = resnet(encoder)
        n_up = max(0, round(math.log2(self.encoder.stride / stride)))
        self.init_hidden = nn.Sequential(nn.Conv2d(self.encoder.out_channels, hidden, 1, bias=False),
                                         nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.hidden_to_hidden = nn.ModuleList(conv_bn(hidden, hidden, hh_kernel) for _ in range(1, n_joints))
        self.output_to_hidden = nn.ModuleList(conv_bn(t, hidden, oh_kernel) for t in range(1, n_joints))
        self.heads = nn.ModuleList(Deception(hidden, n_up) for _ in range(n_joints))
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
        for head in self.heads:
            nn.init.normal_(head.out.weight, std=0.001)
            nn.init.constant_(head.out.bias, 0)

    def forward(self, x):
        out_size = (round(x.shape[-2] * self.scale), round(x.shape[-1] * self.scale))
        h = self.init_hidden(self.encoder(x))
        heatmaps, encoded = [], []
        for t, head in enumerate(self.heads):
            if t > 0:
                h = F.relu(self.hidden_to_hidden[t - 1](h) + self.output_to_hidden[t - 1](torch.cat(encoded, 1)))
            y = head(h)
            if y.shape[-2:] != out_size:
                y = F.interpolate(y, size=out_size, mode='bilinear', align_corners=False)
            heatmaps.append(y)
            if t < self.n_joints - 1:
                encoded.append(F.adaptive_avg_pool2d(y, h.shape[-2:]))
        return [torch.cat(heatmaps, 1)]

    @classmethod
    def from_opts(cls, opts):
        model = cls(n_joints=opts.nJoints, encoder=opts.modelName, hh_kernel=opts.hhKernel,
                    oh_kernel=opts.ohKernel, input_res=opts.inputRes.height, output_res=opts.outputRes.height)
        load_pretrained(model.encoder, opts.pretrained)
        return model
