"""Building blocks shared by the hourglass family (StackedHourGlass, PyraNet, PoseAttention,
SoftGatedHourglass).

Every block maps ``(N, C_in, H, W) -> (N, C_out, H, W)`` unless stated otherwise. A *block
factory* is any callable ``make_block(in_channels, out_channels, scale)`` that returns such a
module; ``scale`` is the downsampling of the block's input relative to the hourglass input
(1, 2, 4, ...), so a factory can choose a different block at coarse resolutions (PyraNet does).
"""
import torch.nn as nn
import torch.nn.functional as F

from models import fused


def _bn_then_relu(bn, relu, x):
    """``relu(bn(x))``: one fused kernel when training on channels-last CPU tensors (models.fused)."""
    if type(relu) is nn.ReLU and fused.can_fuse(bn, x):
        return fused.bn_relu(bn, x)
    return relu(bn(x))


class BNReLU(nn.Sequential):
    """BatchNorm followed by an in-place ReLU (the pre-activation of a residual branch).

    A ``Sequential`` of the two modules (their parameter names), trained through the fused
    kernels of ``models.fused`` where they apply.
    """

    def __init__(self, channels):
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x):
        return _bn_then_relu(self[0], self[1], x)


class Conv(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)`` (its
    parameters and names); 1x1 and 3x3 ones train under bfloat16 autocast on channels-last CPU
    tensors through one C++ kernel each way (``models.fused.conv``: oneDNN spends most of a
    small level's time setting each convolution up); 3x3 ones training in float32 on an AVX2 CPU
    take their weight gradients from a C++ kernel (``models.fused.conv3x3_f32``)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x):
        if fused.can_conv(self, x):
            return fused.conv(self, x)
        if fused.can_conv3x3_f32(self, x):
            return fused.conv3x3_f32(self, x)
        return super().forward(x)


def conv2d(in_channels, out_channels, kernel_size, stride=1):
    """A convolution with 'same' padding and a bias (``Conv`` where the stride is 1)."""
    if stride == 1:
        return Conv(in_channels, out_channels, kernel_size)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2)


class ConvBNReLU(nn.Sequential):
    """Post-activation convolution: conv (with bias, as in the Torch code) - BN - ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1):
        super().__init__(conv2d(in_channels, out_channels, kernel_size, stride),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        return _bn_then_relu(self[1], self[2], self[0](x))


def bn_relu(channels):
    """BatchNorm followed by an in-place ReLU (``BNReLU``)."""
    return BNReLU(channels)


def conv_bn_relu(in_channels, out_channels, kernel_size=1, stride=1):
    """conv - BN - ReLU (``ConvBNReLU``)."""
    return ConvBNReLU(in_channels, out_channels, kernel_size, stride)


def skip_layer(in_channels, out_channels):
    """Identity when the widths agree, else a 1x1 projection (pose-hg-train's ``skipLayer``)."""
    if in_channels == out_channels:
        return nn.Identity()
    return Conv(in_channels, out_channels)


class Residual(nn.Module):
    """Pre-activation bottleneck of Newell et al. (pose-hg-train ``Residual.lua``).

    BN-ReLU-conv1x1(C/2) - BN-ReLU-conv3x3(C/2) - BN-ReLU-conv1x1(C), plus the skip (identity,
    or a 1x1 convolution when the widths differ).
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.branch = nn.Sequential(
            bn_relu(in_channels), Conv(in_channels, mid),
            bn_relu(mid), Conv(mid, mid, 3),
            bn_relu(mid), Conv(mid, out_channels))
        self.skip = skip_layer(in_channels, out_channels)

    def forward(self, x):
        # the branch as one C++ node where its six layers would all run the kernels (models.fused.branch)
        args = fused.branch_args(self.branch, x)
        h = self.branch(x) if args is None else fused.branch(self.branch, x, args)
        return fused.add(h, self.skip(x))


def residual_factory(in_channels, out_channels, scale=1):
    """Block factory of the plain stacked hourglass (the resolution does not matter)."""
    return Residual(in_channels, out_channels)


def repeat_blocks(make_block, in_channels, out_channels, count, scale=1):
    """``count`` blocks in sequence; the first changes the width, the others keep it."""
    layers = [make_block(in_channels if i == 0 else out_channels, out_channels, scale) for i in range(count)]
    return nn.Sequential(*layers) if layers else nn.Identity()


class MaxPool2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)``; on channels-last bfloat16 CPU tensors one C++ kernel each way
    (``models.fused.max_pool2``: the same values and gradients)."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x):
        if fused.can_pool(x):
            return fused.max_pool2(x)
        return super().forward(x)


def upsample_to(x, like):
    """Nearest-neighbour upsampling of ``x`` to the spatial size of ``like`` (x2 in the
    hourglass when the size divides evenly, like Torch's ``SpatialUpSamplingNearest(2)``)."""
    return F.interpolate(x, size=like.shape[-2:], mode='nearest')


class AddMerge(nn.Module):
    """The hourglass's merge of its two branches: elementwise sum (Newell et al.)."""

    def forward(self, upper, lower):
        return fused.add(upper, lower)


def add_merge(channels):
    return AddMerge()


class Hourglass(nn.Module):
    """One recursive hourglass (Newell et al. 2016, pose-hg-train ``hg.lua``), block-agnostic.

    At each of the ``depth`` levels: an upper (skip) branch of ``num_modules`` blocks at the
    current resolution; a lower branch that max-pools by 2, applies ``num_modules`` blocks,
    recurses (or, at the bottom, applies ``num_modules`` more blocks), applies ``num_modules``
    blocks and upsamples (nearest) by 2; the two branches are merged (summed).

    Variants plug in without copying the recursion:

    * ``make_block(in_channels, out_channels, scale)`` -- the block everywhere;
    * ``make_skip(channels, depth, scale)`` -- the upper branch at a level (default:
      ``num_modules`` blocks); PoseAttention's grows with the depth;
    * ``make_merge(channels)`` -- a module ``(upper, lower) -> merged`` (default: sum);
      SoftGatedHourglass concatenates.

    Input and output: (N, C, H, W), H and W divisible by ``2 ** depth``.
    """

    def __init__(self, depth, channels, make_block=residual_factory, num_modules=1, scale=1,
                 make_skip=None, make_merge=add_merge):
        super().__init__()
        self.depth = depth
        if make_skip is None:
            self.up1 = repeat_blocks(make_block, channels, channels, num_modules, scale)
        else:
            self.up1 = make_skip(channels, depth, scale)
        self.pool = MaxPool2()
        self.low1 = repeat_blocks(make_block, channels, channels, num_modules, 2 * scale)
        if depth > 1:
            self.low2 = Hourglass(depth - 1, channels, make_block, num_modules, 2 * scale,
                                  make_skip, make_merge)
        else:
            self.low2 = repeat_blocks(make_block, channels, channels, num_modules, 2 * scale)
        self.low3 = repeat_blocks(make_block, channels, channels, num_modules, 2 * scale)
        self.merge = make_merge(channels)

    def forward(self, x):
        up1 = self.up1(x)
        low = self.low3(self.low2(self.low1(self.pool(x))))
        if type(self.merge) is AddMerge and fused.can_add_up2(up1, low):
            return fused.add_up2(up1, low)      # the sum without the upsampled tensor
        return self.merge(up1, upsample_to(low, up1))


class Stem(nn.Module):
    """Initial processing of pose-hg-train: conv7x7/2 (64) - BN - ReLU - block(64, 128) -
    maxpool/2 - block(128, 128) - block(128, C). (N, 3, H, W) -> (N, C, H/4, W/4).

    ``width`` is the 128 of the paper (the conv has half of it); only small models for the CPU
    narrow it, since at 1/2 resolution the stem costs more than a whole 96-channel hourglass.
    """

    def __init__(self, out_channels, make_block=residual_factory, in_channels=3, width=128):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, width // 2, 7, 2)
        self.block1 = make_block(width // 2, width, 2)
        self.pool = MaxPool2()
        self.block2 = make_block(width, width, 4)
        self.block3 = make_block(width, out_channels, 4)

    def forward(self, x):
        return self.block3(self.block2(self.pool(self.block1(self.conv(x)))))


class StackHead(nn.Module):
    """What follows each hourglass in pose-hg-train: ``num_modules`` blocks, a 1x1 conv-BN-ReLU
    ("lin"), and the 1x1 conv to ``num_joints`` heatmaps.

    ``forward`` returns ``(features, heatmaps)``: (N, C, H, W) and (N, K, H, W).
    """

    def __init__(self, channels, num_joints, make_block=residual_factory, num_modules=1):
        super().__init__()
        self.blocks = repeat_blocks(make_block, channels, channels, num_modules)
        self.lin = conv_bn_relu(channels, channels, 1)
        self.score = Conv(channels, num_joints)

    def forward(self, x):
        feat = self.lin(self.blocks(x))
        return feat, self.score(feat)


class Remap(nn.Module):
    """Intermediate-supervision remap between stacks: the next stack's input is
    ``x + conv1x1(features) + conv1x1(heatmaps)`` (pose-hg-train's ``ll_`` and ``tmpOut_``)."""

    def __init__(self, channels, num_joints):
        super().__init__()
        self.features = Conv(channels, channels)
        self.heatmaps = Conv(num_joints, channels)

    def forward(self, x, features, heatmaps):
        return fused.add(fused.add(x, self.features(features)), self.heatmaps(heatmaps))

