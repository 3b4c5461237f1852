"""Simple Baselines for human pose estimation (Xiao, Wu and Wei, ECCV 2018).

A ResNet without its pooling and classifier, three 4x4 stride-2 transposed convolutions of 256
channels (each with BN and ReLU), and a 1x1 convolution to one heatmap per joint: stride 4, a
256x256 crop gives 64x64 heatmaps.

The parameter and buffer names are those of the authors' ``pose_resnet`` (``conv1`` ...
``layer4``, ``deconv_layers.{0,1,3,4,6,7}``, ``final_layer``), so their released state dicts
load with ``model.load_state_dict``, and torchvision ImageNet weights fill the trunk.
"""
import torch.nn as nn

from . import register_model
from .resnet import ResNet, check_name, depth_from_state, load_pretrained


@register_model('SimpleBaseline')
class SimpleBaseline(ResNet):
    """ResNet trunk + deconvolution head. (N, 3, H, W) -> [(N, K, H/4, W/4)]."""
    target = 'heatmap'
    stride = 4

    def __init__(self, n_joints=17, base_name='resnet50', deconv_channels=(256, 256, 256)):
        super().__init__(check_name(base_name), num_classes=None)
        layers, channels = [], self.out_channels
        for planes in deconv_channels:
            layers += [nn.ConvTranspose2d(channels, planes, kernel_size=4, stride=2, padding=1,
                                          output_padding=0, bias=False),
                       nn.BatchNorm2d(planes),
                       nn.ReLU(inplace=True)]
            channels = planes
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(channels, n_joints, kernel_size=1)
        self.stride = 2 ** (5 - len(deconv_channels))
        self._init_head()

    def _init_head(self):
        """The authors' init: deconvolutions N(0, 0.001), BN 1/0, final conv N(0, 0.001), bias 0."""
        for m in self.deconv_layers.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        nn.init.normal_(self.final_layer.weight, std=0.001)
        nn.init.constant_(self.final_layer.bias, 0)

    def forward(self, x):
        return [self.final_layer(self.deconv_layers(self.features(x)))]

    @staticmethod
    def options_from_state(state):
        """The options a state dict with this layout was made with: nJoints, baseName."""
        found = {'nJoints': int(state['final_layer.weight'].shape[0])}
        depth = depth_from_state(state)
        if depth:
            found['baseName'] = depth
        return found

    @classmethod
    def from_opts(cls, opts):
        model = cls(n_joints=opts.nJoints, base_name=opts.baseName)
        load_pretrained(model, opts.pretrained)
        return model
