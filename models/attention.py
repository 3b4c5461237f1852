"""Multi-Context Attention for Human Pose Estimation (Chu et al., CVPR 2017).

Built as in the authors' Torch code (bearpaw/pose-attention ``train/models/hg-attention.lua``,
``layers/AttentionPartsCRF.lua``, ``layers/ResidualPool.lua``):

* **Hourglass Residual Units** (HRU): a pre-activation bottleneck residual with a third, side
  branch of larger receptive field, BN-ReLU - maxpool/2 - conv3x3 - BN-ReLU - conv3x3 - nearest
  upsample x2, summed with the other two. The upper (skip) branch of a hourglass level of depth
  n > 1 is a chain of n - 1 units, a residual then HRUs (3 units at the finest level of a
  4-reduction hourglass, 1 at the two coarsest); the rest of the hourglass is plain residuals.
* **Holistic attention** after every hourglass: two 1x1 conv-BN-ReLU, then an attention map
  s = conv3x3(f) (one channel) refined by ``IterSize`` CRF-like mean-field steps
  Q_1 = sigmoid(s + k * s), Q_t = sigmoid(s + k * Q_(t-1)), with one ``LRNSize`` x ``LRNSize``
  kernel k shared by all steps; the features are multiplied by Q.
* **Part attention** in the second half of the stacks (stacks 5 to 8 of 8): one refined map per
  joint, and the joint's heatmap is a 1x1 conv of the features attended by its own map. The
  earlier stacks predict heatmaps with a 1x1 conv of the holistically attended features. The last
  stack works at twice the width (1x1 conv-BN-ReLU to 2C).
* Between stacks: x + conv1x1(heatmaps) + (1x1 conv-BN-ReLU of the first head features).

Notes:

* The stem is the code's: conv7x7 **stride 1** (64) - residual(64, 64) - maxpool - residual(64,
  64) - residual(64, 128) - maxpool - residual(128, 128) x 2 - residual(128, C); output stride 4.
* The per-part attention is computed in a mathematically identical but cheaper form: since a
  part's map multiplies every channel, conv1x1_k(f * Q_k) = Q_k * (w_k . f) + b_k, so the K part
  convolutions are one C -> K conv and the K kernels k one grouped conv. Parameters and outputs
  are those of the K separate branches of the code.
* With ``num_modules`` > 1 the lower branch repeats ``num_modules`` residuals at every position
  (the shared ``models.layers.Hourglass``); the code repeats only the one after the pooling.
  The paper's 8-stack model has one module, where the two agree.
* The paper also describes multi-resolution attention inside each hourglass; the authors'
  released training code does not build it, and neither does this model.
* The Pytorch-Human-Pose-Estimation port this framework descends from shipped a PoseAttention
  config that said ``model = StackedHourGlass`` and silently trained the plain hourglass; its
  PoseAttention also had no HRUs and computed ``u + sigmoid(k * q)`` instead of
  ``sigmoid(u + k * q)``. ``model: PoseAttention`` builds this class.
"""
import torch
import torch.nn as nn

from models import register_model
from models.layers import Hourglass, Residual, bn_relu, conv_bn_relu, residual_factory, upsample_to


class HourglassResidual(nn.Module):
    """Hourglass Residual Unit (the code's ``ResidualPool``): bottleneck branch + skip + side
    branch BN-ReLU-maxpool-conv3x3-BN-ReLU-conv3x3-upsample. (N, C_in, H, W) -> (N, C_out, H, W),
    H and W even."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.residual = Residual(in_channels, out_channels)
        self.side = nn.Sequential(
            bn_relu(in_channels), nn.MaxPool2d(2, 2),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            bn_relu(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1))

    def forward(self, x):
        return self.residual(x) + upsample_to(self.side(x), x)


def attention_skip_factory(num_modules):
    """Upper branch of a PoseAttention hourglass level: ``num_modules`` chains of max(1, depth-1)
    units, each chain a residual followed by HRUs (``repResidual`` of hg-attention.lua); at depth 1
    the first unit is a residual and further modules are HRUs."""
    def make_skip(channels, depth, scale=1):
        units = []
        for m in range(num_modules):
            if depth > 1:
                units.append(Residual(channels, channels))
                units.extend(HourglassResidual(channels, channels) for _ in range(depth - 2))
            else:
                units.append(Residual(channels, channels) if m == 0 else HourglassResidual(channels, channels))
        return nn.Sequential(*units)
    return make_skip


class MeanFieldAttention(nn.Module):
    """``maps`` attention maps refined by CRF-like mean-field iterations.

    s = conv3x3(f) (C -> maps); Q_1 = sigmoid(s + k * s); Q_t = sigmoid(s + k * Q_(t-1)),
    t = 2..iterations, with one ``kernel_size`` x ``kernel_size`` kernel k per map shared by all
    iterations. (N, C, H, W) -> Q (N, maps, H, W) in (0, 1).
    """

    def __init__(self, channels, maps=1, kernel_size=1, iterations=3):
        super().__init__()
        self.iterations = iterations
        self.unary = nn.Conv2d(channels, maps, 3, padding=1)
        self.pairwise = nn.Conv2d(maps, maps, kernel_size, padding=kernel_size // 2, groups=maps)

    def forward(self, x):
        unary = self.unary(x)
        q = unary
        for _ in range(self.iterations):
            q = torch.sigmoid(unary + self.pairwise(q))
        return q


class HolisticAttention(nn.Module):
    """Features re-weighted by one refined attention map: f * Q. (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels, kernel_size=1, iterations=3):
        super().__init__()
        self.attention = MeanFieldAttention(channels, 1, kernel_size, iterations)

    def forward(self, x):
        return x * self.attention(x)


class PartAttention(nn.Module):
    """One refined attention map per joint; joint k's heatmap is conv1x1_k(f * Q_k).
    (N, C, H, W) -> (N, K, H, W)."""

    def __init__(self, channels, num_joints, kernel_size=1, iterations=3):
        super().__init__()
        self.attention = MeanFieldAttention(channels, num_joints, kernel_size, iterations)
        self.score = nn.Conv2d(channels, num_joints, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_joints))
        bound = 1.0 / channels ** 0.5  # PyTorch's default conv bias range
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return self.attention(x) * self.score(x) + self.bias[None, :, None, None]


class AttentionHead(nn.Module):
    """What follows one hourglass: lin - lin - holistic attention - heatmaps (1x1 conv, or part
    attention when ``parts``). ``forward`` returns ``(first lin features, heatmaps)``."""

    def __init__(self, channels, width, num_joints, parts, kernel_size, iterations):
        super().__init__()
        self.lin1 = conv_bn_relu(channels, width, 1)
        self.lin2 = conv_bn_relu(width, width, 1)
        self.holistic = HolisticAttention(width, kernel_size, iterations)
        if parts:
            self.score = PartAttention(width, num_joints, kernel_size, iterations)
        else:
            self.score = nn.Conv2d(width, num_joints, 1)

    def forward(self, x):
        features = self.lin1(x)
        return features, self.score(self.holistic(self.lin2(features)))


@register_model('PoseAttention')
class PoseAttention(nn.Module):
    """(N, 3, H, W) -> list of ``num_stacks`` heatmaps (N, num_joints, H/4, W/4).

    H and W must be divisible by ``4 * 2 ** num_reductions``.
    ``lrn_size``: the shared CRF kernel (option ``LRNSize``); ``iterations``: mean-field steps
    (``IterSize``). Part attention is used from stack ``num_stacks // 2 + 1`` on, and always in
    the last stack.
    """
    target = 'heatmap'
    stride = 4

    def __init__(self, num_joints=16, num_stacks=8, num_modules=1, channels=256, num_reductions=4,
                 lrn_size=1, iterations=3):
        super().__init__()
        self.num_stacks = num_stacks
        self.stem = nn.Sequential(
            conv_bn_relu(3, 64, 7, 1),
            Residual(64, 64), nn.MaxPool2d(2, 2), Residual(64, 64), Residual(64, 128),
            nn.MaxPool2d(2, 2), Residual(128, 128), Residual(128, 128), Residual(128, channels))
        make_skip = attention_skip_factory(num_modules)
        self.hourglasses = nn.ModuleList(
            Hourglass(num_reductions, channels, residual_factory, num_modules, make_skip=make_skip)
            for _ in range(num_stacks))
        heads = []
        for i in range(num_stacks):
            last = i == num_stacks - 1
            parts = last or i >= num_stacks // 2
            width = 2 * channels if last else channels
            heads.append(AttentionHead(channels, width, num_joints, parts, lrn_size, iterations))
        self.heads = nn.ModuleList(heads)
        self.remap_heatmaps = nn.ModuleList(nn.Conv2d(num_joints, channels, 1) for _ in range(num_stacks - 1))
        self.remap_features = nn.ModuleList(conv_bn_relu(channels, channels, 1) for _ in range(num_stacks - 1))

    @classmethod
    def from_opts(cls, opts):
        return cls(num_joints=opts.nJoints, num_stacks=opts.nStack, num_modules=opts.nModules,
                   channels=opts.nChannels, num_reductions=opts.nReductions,
                   lrn_size=opts.LRNSize, iterations=opts.IterSize)

    def forward(self, x):
        x = self.stem(x)
        outputs = []
        for i in range(self.num_stacks):
            features, heatmaps = self.heads[i](self.hourglasses[i](x))
            outputs.append(heatmaps)
            if i < self.num_stacks - 1:
                x = x + self.remap_heatmaps[i](heatmaps) + self.remap_features[i](features)
        return outputs
