"""Soft-gated skip connections (Bulat, Kossaifi, Tzimiropoulos and Pantic, FG 2020, "Toward fast
and accurate human pose estimation via soft-gated skip connections").

Two changes to the stacked hourglass:

* **Soft-gated residual block** (``SoftGatedResidual``): the hierarchical, parallel and
  multi-scale block of Bulat and Tzimiropoulos -- three pre-activated 3x3 convolutions in a chain
  with C/2, C/4 and C/4 outputs, concatenated back to C -- whose skip connection is multiplied by
  a learnable per-channel gate alpha (C values, shape (1, C, 1, 1), shared by every sample of the
  batch): y = alpha * x + F(x). When the widths differ the skip is a 1x1 conv, then gated.
* **Hybrid HourGlass / U-Net**: every hourglass level keeps the hourglass's block on the skip
  branch, but joins the skip and the upsampled lower branch U-Net style, by concatenation and a
  1x1 convolution back to C, instead of a sum (``ConcatMerge``), which removes that identity
  connection.

Everything else is the pose-hg-train network with the soft-gated block in place of the
bottleneck (stem, heads, intermediate supervision). The paper claims a ~3x smaller model than
the 8-stack hourglass at the same accuracy; the configuration of ``conf/models/softgated.defconf``
(4 stacks, 144 channels) has 8,373,064 parameters with 16 joints against the hourglass's
25,434,112.

Notes. The paper text could not be consulted while writing this; the block, the gate and the
merge follow its figures and abstract as described by two public reimplementations
(benjs/hourglass_networks, dkurzend/Soft_Gated_Pose_Estimation_Pytorch), which disagree on two
details: the gate's initial value (ones vs zeros) and the merge convolution (1x1 vs 3x3). Here:
gates start at 1 (``gate_init``, the block then starts as the ordinary residual block) and the
merge is 1x1. One reimplementation sized alpha by the batch size
(``Parameter(randn(batch_size, C, 1, 1))``), which ties the model to one batch size; the gate
here is per channel only.
"""
import torch
import torch.nn as nn

from models import register_model
from models.hourglass import StackedHourglass
from models.layers import bn_relu


class SoftGatedResidual(nn.Module):
    """y = alpha * skip(x) + concat(c1, c2, c3), c1 = conv3x3(BN-ReLU(x)) (C_out/2),
    c2 = conv3x3(BN-ReLU(c1)) (C_out/4), c3 = conv3x3(BN-ReLU(c2)) (C_out/4).

    alpha: (1, C_out, 1, 1), one learnable value per output channel. skip is the identity, or a
    1x1 conv when C_in != C_out. (N, C_in, H, W) -> (N, C_out, H, W); C_out divisible by 4.
    """

    def __init__(self, in_channels, out_channels, gate_init=1.0):
        super().__init__()
        if out_channels % 4:
            raise ValueError(f'SoftGatedResidual needs a width divisible by 4, got {out_channels}')
        half, quarter = out_channels // 2, out_channels // 4
        self.conv1 = nn.Sequential(bn_relu(in_channels), nn.Conv2d(in_channels, half, 3, padding=1, bias=False))
        self.conv2 = nn.Sequential(bn_relu(half), nn.Conv2d(half, quarter, 3, padding=1, bias=False))
        self.conv3 = nn.Sequential(bn_relu(quarter), nn.Conv2d(quarter, quarter, 3, padding=1, bias=False))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.gate = nn.Parameter(torch.full((1, out_channels, 1, 1), float(gate_init)))

    def forward(self, x):
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        return self.gate * self.skip(x) + torch.cat([c1, c2, c3], dim=1)


def soft_gated_factory(in_channels, out_channels, scale=1):
    return SoftGatedResidual(in_channels, out_channels)


class ConcatMerge(nn.Module):
    """U-Net style join of a hourglass level: concat(upper, lower) (2C) -> conv1x1 -> C."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, upper, lower):
        return self.conv(torch.cat([upper, lower], dim=1))


@register_model('SoftGatedHourglass')
class SoftGatedHourglass(StackedHourglass):
    """(N, 3, H, W) -> list of ``num_stacks`` heatmaps (N, num_joints, H/4, W/4).

    The stacked hourglass with ``SoftGatedResidual`` blocks and ``ConcatMerge`` joins. H and W
    divisible by ``4 * 2 ** num_reductions``; ``channels`` divisible by 4.
    """

    def __init__(self, num_joints=16, num_stacks=4, num_modules=1, channels=144, num_reductions=4,
                 stem_channels=128):
        super().__init__(num_joints, num_stacks, num_modules, channels, num_reductions,
                         make_block=soft_gated_factory, make_merge=ConcatMerge, stem_channels=stem_channels)
