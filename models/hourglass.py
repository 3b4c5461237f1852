"""Stacked Hourglass Networks (Newell, Yang and Deng, ECCV 2016).

Follows the authors' Torch code (pose-hg-train ``src/models/hg.lua`` and ``Residual.lua``):
pre-activation bottleneck residuals, a conv7x7/2 + residual + maxpool stem to 1/4 resolution,
``nStack`` hourglasses of ``nReductions`` max-pool downsamplings each, a heatmap head after each
hourglass and the intermediate-supervision remap into the next stack's input. All convolutions
carry a bias, as in the Torch code.

Paper configuration (8 stacks, 256 channels, 1 module, 4 reductions, 16 joints): 25,434,112
parameters (``models.count_parameters``), the ~25M the paper reports.
"""
import torch.nn as nn

from models import register_model
from models.layers import Hourglass, Remap, StackHead, Stem, add_merge, residual_factory


@register_model('StackedHourGlass')
class StackedHourglass(nn.Module):
    """(N, 3, H, W) -> list of ``num_stacks`` heatmaps (N, num_joints, H/4, W/4).

    H and W must be divisible by ``4 * 2 ** num_reductions`` (256 with the paper's 4).
    ``make_block`` (the block used everywhere) and ``make_merge`` (how each hourglass level joins
    its two branches) are the hooks of ``models.layers.Hourglass``; variants of the family
    (SoftGatedHourglass) pass their own.
    """
    target = 'heatmap'
    stride = 4

    def __init__(self, num_joints=16, num_stacks=8, num_modules=1, channels=256, num_reductions=4,
                 make_block=residual_factory, make_merge=add_merge, stem_channels=128):
        super().__init__()
        self.num_stacks = num_stacks
        self.stem = Stem(channels, make_block, width=stem_channels)
        self.hourglasses = nn.ModuleList(
            Hourglass(num_reductions, channels, make_block, num_modules, make_merge=make_merge)
            for _ in range(num_stacks))
        self.heads = nn.ModuleList(
            StackHead(channels, num_joints, make_block, num_modules) for _ in range(num_stacks))
        self.remaps = nn.ModuleList(Remap(channels, num_joints) for _ in range(num_stacks - 1))

    @staticmethod
    def options_from_state(state):
        """The options a state dict with this layout was made with."""
        score = state['heads.0.score.weight']
        return {'nJoints': int(score.shape[0]), 'nChannels': int(score.shape[1]),
                'nStack': len({k.split('.')[1] for k in state if k.startswith('heads.')}),
                'stemChannels': 2 * int(state['stem.conv.0.weight'].shape[0])}

    @classmethod
    def from_opts(cls, opts):
        return cls(num_joints=opts.nJoints, num_stacks=opts.nStack, num_modules=opts.nModules,
                   channels=opts.nChannels, num_reductions=opts.nReductions,
                   stem_channels=opts.stemChannels)

    def forward(self, x):
        x = self.stem(x)
        outputs = []
        for i in range(self.num_stacks):
            features, heatmaps = self.heads[i](self.hourglasses[i](x))
            outputs.append(heatmaps)
            if i < self.num_stacks - 1:
                x = self.remaps[i](x, features, heatmaps)
        return outputs
