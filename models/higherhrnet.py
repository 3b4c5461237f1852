"""HigherHRNet: Scale-Aware Representation Learning for Bottom-Up Human Pose Estimation
(Cheng, Xiao, Wang, Shi, Huang and Zhang, CVPR 2020).

A bottom-up model: the whole image goes in, every person's joints come out, grouped by
associative embedding (Newell et al., 2017). The network is the pose HRNet backbone
(``models.hrnet.HighResolutionNet`` with stage 4 ending in the 1/4 branch, C channels) and a
two-level feature pyramid:

* ``final_layers.0``: a 1x1 conv on the 1/4 features -> K heatmaps then K tag maps (one tag
  channel per joint, the authors' ``TAG_PER_JOINT``), (N, 2K, H/4, W/4);
* ``deconv_layers.0``: the 1/4 features concatenated with that output (C + 2K channels, the
  authors' ``CAT_OUTPUT``) -> a 4x4 stride-2 transposed conv to C channels at 1/2, BN, ReLU, then
  four BasicBlocks (each inside its own nn.Sequential, as the authors' names have it);
* ``final_layers.1``: a 1x1 conv -> K heatmaps at 1/2, (N, K, H/2, W/2) (no tags: the authors'
  ``WITH_AE_LOSS: [True, False]``).

``forward`` returns both: ``[(N, 2K, H/4, W/4), (N, K, H/2, W/2)]``; ``stride`` is the first
output's (4), ``strides = (4, 2)`` lists both. The loss puts heatmap terms on both outputs and the
tag (push / pull) terms on the first. At test time the first output is upsampled bilinearly to
the second's size, the two heatmaps are averaged (the paper's heatmap aggregation) and the tags
come from the first output.

The parameter and buffer names are the authors' (``lib/models/pose_higher_hrnet.py`` of
HRNet/HigherHRNet-Human-Pose-Estimation, whose backbone names are those of ``pose_hrnet``):
``conv1 bn1 conv2 bn2 layer1 transition1 stage2 transition2 stage3 transition3 stage4
final_layers deconv_layers``, so their released ``pose_higher_hrnet_w32_512.pth`` loads with
``model.load_state_dict`` and gives their outputs.

Parameters (17 joints): 28,645,331 for W32, 63,827,139 for W48 (the 28.6M / 63.8M of the
authors' README). Their README's GFLOPs: 47.9 (W32, 512x512), 154.3 (W48, 640x640). COCO
val2017 (flip test, single scale): 67.1 AP (W32-512), 68.5 AP (W32-640), 69.9 AP (W48-640);
with the multi-scale test 69.9 / 70.6 / 72.1 AP. Recipe of their configs: Adam, LR 1e-3, x0.1 at
epochs 200 and 260, 300 epochs, 12 images per GPU (W48: 10), sigma 2.

Inputs must have height and width divisible by 32 (HRNet's 1/32 branch), e.g. 512x512, 640x640.
"""
import torch
import torch.nn as nn

from utils.errors import ConfigError

from . import register_model
from .hrnet import HighResolutionNet, check_input_res, init_normal, load_pretrained
from .resnet import BasicBlock

DECONV_KERNEL = 4          # 4x4 stride-2 transposed convolution: padding 1, no output padding
DECONV_BLOCKS = 4          # BasicBlocks after the transposed convolution


def deconv_module(in_channels, out_channels, blocks=DECONV_BLOCKS):
    """(N, in_channels, h, w) -> (N, out_channels, 2h, 2w): ``.0`` = ConvTranspose2d + BN + ReLU,
    ``.1`` .. ``.blocks`` = one BasicBlock each (as ``.b.0``), the authors' layout."""
    up = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, kernel_size=DECONV_KERNEL, stride=2,
                                          padding=1, output_padding=0, bias=False),
                       nn.BatchNorm2d(out_channels),
                       nn.ReLU(inplace=True))
    return nn.Sequential(up, *[nn.Sequential(BasicBlock(out_channels, out_channels)) for _ in range(blocks)])


@register_model('HigherHRNet')
class HigherHRNet(HighResolutionNet):
    """Bottom-up HigherHRNet. (N, 3, H, W) -> [heatmaps + tags (N, 2K, H/4, W/4),
    heatmaps (N, K, H/2, W/2)]; H, W divisible by 32."""
    target = 'associative_embedding'
    stride = 4                 # of the first output (heatmaps and tags)
    strides = (4, 2)           # of each output

    def __init__(self, n_joints=17, width=32):
        super().__init__(width, multi_scale_output=False)
        self.n_joints = n_joints
        tags = n_joints        # one tag channel per joint
        self.final_layers = nn.ModuleList([nn.Conv2d(width, n_joints + tags, kernel_size=1),
                                           nn.Conv2d(width, n_joints, kernel_size=1)])
        self.deconv_layers = nn.ModuleList([deconv_module(width + n_joints + tags, width)])
        init_normal(self)      # the authors' init_weights: N(0, 0.001) (transposed) convs, BN 1 / 0

    def forward(self, x):
        features = self.features(x)[0]                        # (N, C, H/4, W/4)
        low = self.final_layers[0](features)                  # (N, 2K, H/4, W/4)
        high = self.deconv_layers[0](torch.cat((features, low), 1))   # (N, C, H/2, W/2)
        return [low, self.final_layers[1](high)]              # + (N, K, H/2, W/2)

    @staticmethod
    def options_from_state(state):
        """The options a state dict with this layout was made with: nJoints, hrnetWidth."""
        return {'nJoints': int(state['final_layers.1.weight'].shape[0]),
                'hrnetWidth': int(state['transition1.0.0.weight'].shape[0])}

    @classmethod
    def from_opts(cls, opts):
        check_input_res(opts)
        check_output_res(opts)
        model = cls(n_joints=opts.nJoints, width=opts.hrnetWidth)
        # the authors' PRETRAINED_LAYERS ['*'] take every tensor of the file the model has: for
        # ImageNet HRNet weights, exactly the backbone (what load_pretrained fills and checks)
        load_pretrained(model, opts.pretrained)
        return model


def check_output_res(opts):
    """--outputRes is the size of the first output (stride 4); the second is twice that."""
    (ih, iw), (oh, ow) = opts.inputRes, opts.outputRes
    if oh * HigherHRNet.stride != ih or ow * HigherHRNet.stride != iw:
        expected = f'{ih // 4}' if ih == iw else f'{ih // 4}x{iw // 4}'
        raise ConfigError(f'--inputRes {opts.inputRes} / --outputRes {opts.outputRes} does not match {opts.model}, '
                          f'whose first output is at stride 4 (the second at stride 2): outputRes must be '
                          f'inputRes/4 = {expected}')
