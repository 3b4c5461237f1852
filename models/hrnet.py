"""HRNet: Deep High-Resolution Representation Learning (Sun, Xiao, Liu and Wang, CVPR 2019).

A stem of two 3x3 stride-2 convolutions (to 1/4) and four Bottlenecks (``layer1``, 256
channels), then three stages that keep every resolution they have and add one lower one:
stage 2 has branches at 1/4 and 1/8, stage 3 adds 1/16, stage 4 adds 1/32, with C, 2C, 4C, 8C
channels (the width C is ``--hrnetWidth``; the papers use 32 and 48). A stage is a sequence of
``HighResolutionModule``: four BasicBlocks per branch, then every branch receives the sum of
all branches brought to its resolution and width (1x1 conv + nearest upsampling from lower
resolutions, 3x3 stride-2 convs from higher ones). Stages 2, 3, 4 have 1, 4, 3 modules.

The module layout and the parameter and buffer names are the authors' (``pose_hrnet.py`` of
leoxiaobin/deep-high-resolution-net.pytorch, ``cls_hrnet.py`` of HRNet-Image-Classification):
``conv1 bn1 conv2 bn2 layer1 transition1 stage2 transition2 stage3 transition3 stage4``, then
``final_layer`` (pose) or ``incre_modules downsamp_modules final_layer classifier``
(classification), so their released state dicts load with ``model.load_state_dict``.

* ``HRNet`` (pose, top-down): the last module of stage 4 keeps only the 1/4 branch, a 1x1 conv
  makes K heatmaps at stride 4. 28,536,113 parameters for W32 and 63,595,745 for W48 (17
  joints), the 28.5M / 63.6M of the paper. ``--pretrained`` fills the backbone with ImageNet
  weights of the classifier below (the authors' ``hrnet_w32-36af842e.pth``). Paper (COCO
  val2017, detector person AP 56.4, flip test): W32 256x192 74.4 AP, W48 256x192 75.1 AP;
  MPII val PCKh@0.5, W32 256x256: 90.3.
* ``ClassificationHRNet`` (ImageNet, HRNet-W32-C: 41.2M parameters): stage 4 keeps all four
  branches; each goes through one Bottleneck (to 128, 256, 512, 1024 channels), the higher ones
  are folded into the lower ones by 3x3 stride-2 convolutions, a 1x1 conv to 2048, global
  average pooling and a linear classifier.

Inputs must have height and width divisible by 32 (the 1/32 branch is upsampled back by exact
factors), e.g. 256x192, 256x256, 384x288, 224x224.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import CheckpointError, ConfigError

from . import register_model
from .resnet import BasicBlock, Bottleneck, _some, _unwrap, init_conv_bn, make_stage

# HighResolutionModules per stage and blocks per branch (the same in every published HRNet)
MODULES = {'stage2': 1, 'stage3': 4, 'stage4': 3}
BLOCKS_PER_BRANCH = 4
STEM_CHANNELS = 64
# The top-level modules of the backbone: what ImageNet weights fill (the authors' PRETRAINED_LAYERS)
BACKBONE = ('conv1', 'bn1', 'conv2', 'bn2', 'layer1', 'transition1', 'stage2', 'transition2',
            'stage3', 'transition3', 'stage4')
# ClassificationHRNet: Bottleneck planes of the head per branch (x4 channels out), and its width
HEAD_PLANES = (32, 64, 128, 256)
HEAD_CHANNELS = 2048
MIN_DIVISOR = 32


def conv_bn(in_channels, out_channels, kernel_size=3, stride=1, relu=True, bias=False):
    """Conv (padding keeps the size at stride 1) + BN (+ ReLU), as one nn.Sequential (.0 .1 .2)."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias),
              nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def downsampler(in_channels, out_channels, steps):
    """``steps`` 3x3 stride-2 conv+BN, ReLU after all but the last; the width changes at the last."""
    return nn.Sequential(*[conv_bn(in_channels, out_channels if s == steps - 1 else in_channels,
                                   stride=2, relu=s < steps - 1) for s in range(steps)])


def upsampler(in_channels, out_channels, factor):
    """1x1 conv + BN to ``out_channels``, then nearest upsampling by ``factor``."""
    return nn.Sequential(*conv_bn(in_channels, out_channels, kernel_size=1, relu=False),
                         nn.Upsample(scale_factor=factor, mode='nearest'))


class HighResolutionModule(nn.Module):
    """Parallel branches, then a multi-resolution fusion.

    channels: width of each branch, highest resolution first (branch b is at 1/2**b of branch 0).
    In: list of (N, channels[b], H/2**b, W/2**b). Out: the same list (``multi_scale_output``) or
    only its first element (a list of one).

    ``branches[b]``: ``blocks`` BasicBlocks. ``fuse_layers[i][j]`` brings branch j to branch i:
    None for i == j, an ``upsampler`` for j > i, a ``downsampler`` of i - j steps for j < i.
    """

    def __init__(self, channels, blocks=BLOCKS_PER_BRANCH, multi_scale_output=True):
        super().__init__()
        self.channels = list(channels)
        self.branches = nn.ModuleList(make_stage(BasicBlock, c, c, blocks)[0] for c in channels)
        outputs = len(channels) if multi_scale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse(j, i) for j in range(len(channels))) for i in range(outputs))
        self.relu = nn.ReLU(inplace=True)

    def _fuse(self, j, i):
        c = self.channels
        if j == i:
            return None
        if j > i:
            return upsampler(c[j], c[i], 2 ** (j - i))
        return downsampler(c[j], c[i], i - j)

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, fuse in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else fuse[0](xs[0])
            for j in range(1, len(xs)):
                y = y + (xs[j] if j == i else fuse[j](xs[j]))
            out.append(self.relu(y))
        return out


def transition(in_channels, out_channels):
    """Between stages: a 3x3 conv+BN+ReLU where a kept branch changes width (None where it does
    not), and for each new branch a stride-2 3x3 conv+BN+ReLU from the lowest existing branch.
    A ModuleList with one entry per branch of the next stage."""
    layers = []
    for i, c in enumerate(out_channels):
        if i < len(in_channels):
            layers.append(None if in_channels[i] == c else conv_bn(in_channels[i], c))
        else:
            steps = i + 1 - len(in_channels)
            last = in_channels[-1]
            layers.append(nn.Sequential(*[conv_bn(last, c if s == steps - 1 else last, stride=2)
                                          for s in range(steps)]))
    return nn.ModuleList(layers)


def apply_transition(layers, xs):
    """Branch inputs of the next stage from the outputs ``xs`` of the last one."""
    out = []
    for i, layer in enumerate(layers):
        if i < len(xs):
            out.append(xs[i] if layer is None else layer(xs[i]))
        else:
            out.append(layer(xs[-1]))
    return out


class HighResolutionNet(nn.Module):
    """The HRNet backbone shared by the pose, classification (and bottom-up) models.

    width: C; the four branches have C, 2C, 4C, 8C channels. multi_scale_output: False ends
    stage 4 with only the 1/4 branch (pose HRNet, HigherHRNet), True keeps all four
    (classification). ``features(x)``: (N, 3, H, W) -> list of (N, C * 2**b, H/2**(b+2),
    W/2**(b+2)) for the branches kept; ``out_channels`` lists their widths.
    """

    def __init__(self, width=32, multi_scale_output=False):
        super().__init__()
        self.width = width
        widths = [width * 2 ** b for b in range(4)]
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, stem_out = make_stage(Bottleneck, STEM_CHANNELS, STEM_CHANNELS, 4)
        self.transition1 = transition([stem_out], widths[:2])
        self.stage2 = self._stage(widths[:2], MODULES['stage2'])
        self.transition2 = transition(widths[:2], widths[:3])
        self.stage3 = self._stage(widths[:3], MODULES['stage3'])
        self.transition3 = transition(widths[:3], widths)
        self.stage4 = self._stage(widths, MODULES['stage4'], multi_scale_output)
        self.out_channels = widths if multi_scale_output else widths[:1]

    @staticmethod
    def _stage(channels, modules, multi_scale_output=True):
        """``modules`` HighResolutionModules; only the last may drop the lower outputs."""
        return nn.Sequential(*[HighResolutionModule(channels, multi_scale_output=multi_scale_output
                                                    or m < modules - 1) for m in range(modules)])

    def features(self, x):
        """(N, 3, H, W) -> list of branch outputs (N, out_channels[b], H/2**(b+2), W/2**(b+2))."""
        check_input_size(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for layers, stage in ((self.transition1, self.stage2), (self.transition2, self.stage3),
                              (self.transition3, self.stage4)):
            xs = stage(apply_transition(layers, xs))
        return xs


def check_input_size(x):
    h, w = x.shape[-2:]
    if h % MIN_DIVISOR or w % MIN_DIVISOR:
        raise ConfigError(f'HRNet needs an input whose height and width are divisible by {MIN_DIVISOR}, '
                          f'got {h}x{w} (e.g. --inputRes 256x192)')


def check_input_res(opts):
    """One line if --inputRes cannot go through the network (before anything is built)."""
    h, w = opts.inputRes
    if h % MIN_DIVISOR or w % MIN_DIVISOR:
        raise ConfigError(f'--inputRes {opts.inputRes}: {opts.model} needs a height and width divisible by '
                          f'{MIN_DIVISOR} (its lowest branch is at 1/32), e.g. 256x192, 256x256, 384x288')


def init_normal(module):
    """The authors' pose init: every (transposed) convolution N(0, 0.001), biases 0; BN 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


@register_model('HRNet')
class HRNet(HighResolutionNet):
    """Top-down pose HRNet. (N, 3, H, W) -> [(N, K, H/4, W/4)]; H, W divisible by 32."""
    target = 'heatmap'
    stride = 4

    def __init__(self, n_joints=17, width=32):
        super().__init__(width, multi_scale_output=False)
        self.final_layer = nn.Conv2d(width, n_joints, kernel_size=1)
        init_normal(self)

    def forward(self, x):
        return [self.final_layer(self.features(x)[0])]

    @staticmethod
    def options_from_state(state):
        """The options a state dict with this layout was made with: nJoints, hrnetWidth."""
        return {'nJoints': int(state['final_layer.weight'].shape[0]),
                'hrnetWidth': int(state['transition1.0.0.weight'].shape[0])}

    @classmethod
    def from_opts(cls, opts):
        check_input_res(opts)
        model = cls(n_joints=opts.nJoints, width=opts.hrnetWidth)
        load_pretrained(model, opts.pretrained)
        return model


@register_model('ClassificationHRNet')
class ClassificationHRNet(HighResolutionNet):
    """HRNet-W{C}-C ImageNet classifier. (N, 3, H, W) -> [logits (N, num_classes)]."""
    target = 'classification'

    def __init__(self, num_classes=1000, width=32):
        super().__init__(width, multi_scale_output=True)
        head = [p * Bottleneck.expansion for p in HEAD_PLANES]
        self.incre_modules = nn.ModuleList(make_stage(Bottleneck, c, p, 1)[0]
                                           for c, p in zip(self.out_channels, HEAD_PLANES))
        self.downsamp_modules = nn.ModuleList(conv_bn(a, b, stride=2, bias=True)
                                              for a, b in zip(head[:-1], head[1:]))
        self.final_layer = conv_bn(head[-1], HEAD_CHANNELS, kernel_size=1, bias=True)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        init_conv_bn(self)  # the authors' classification init: He (fan_out) convs, BN 1 / 0

    def forward(self, x):
        xs = self.features(x)
        y = self.incre_modules[0](xs[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](xs[i + 1]) + down(y)
        y = self.final_layer(y)                               # (N, 2048, H/32, W/32)
        y = torch.flatten(F.avg_pool2d(y, kernel_size=y.shape[2:]), 1)
        return [self.classifier(y)]

    @staticmethod
    def options_from_state(state):
        """The options a state dict with this layout was made with: nClasses, hrnetWidth."""
        return {'nClasses': int(state['classifier.weight'].shape[0]),
                'hrnetWidth': int(state['transition1.0.0.weight'].shape[0])}

    @classmethod
    def from_opts(cls, opts):
        check_input_res(opts)
        if opts.pretrained:
            raise ConfigError(f'--pretrained is for the pose HRNet (ImageNet weights for its backbone); '
                              f'{opts.model} trains from scratch (use --loadModel to resume a run)')
        return cls(num_classes=opts.nClasses, width=opts.hrnetWidth)


def load_pretrained(model, path):
    """Fill the backbone of ``model`` (an HRNet) with the ImageNet weights in ``path``.

    As the authors' ``init_weights``: only tensors whose first name component is in
    ``BACKBONE`` and that the model has with the same shape are loaded (the classification head,
    the extra stage-4 fusions of the classifier, ``final_layer`` are skipped). Accepts a bare
    state dict, one under 'state_dict' or 'model', and the 'module.' prefix. path None / '':
    nothing. Anything that does not fill the whole backbone is a one-line ``CheckpointError``.
    """
    if not path:
        return
    name = f'HRNet-W{model.width}'
    if path == 'download':
        raise CheckpointError(f"--pretrained download: {name}'s ImageNet weights have no download URL; fetch "
                              f'hrnet_w{model.width}-*.pth from the README of HRNet/HRNet-Image-Classification '
                              f'and pass its path: --pretrained /path/to/hrnet_w{model.width}-*.pth')
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file (--pretrained takes the path of HRNet ImageNet weights, '
                              f'e.g. hrnet_w32-36af842e.pth)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f'{path}: cannot be read as a PyTorch weights file ({reason})')
    state = _unwrap(state, path)

    own = model.state_dict()
    expected = [k for k in own if k.split('.', 1)[0] in BACKBONE]
    given = {k: v for k, v in state.items() if k.split('.', 1)[0] in BACKBONE and k in own}
    loadable = {k: v for k, v in given.items() if v.shape == own[k].shape}
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in given.items() if k not in loadable]
    # files saved before PyTorch 0.4.1 have no num_batches_tracked: not needed
    needed = [k for k in expected if not k.endswith('num_batches_tracked')]
    missing = [k for k in needed if k not in loadable]
    if mismatched:
        width = _file_width(state)
        if width is None:
            hint = f'not HRNet weights? check --pretrained (and --hrnetWidth, now {model.width})'
        elif width != model.width:
            hint = f'the file is HRNet-W{width}: use --hrnetWidth {width}'
        else:
            hint = f'probably weights of another layout: check --hrnetWidth (now {model.width}) and --pretrained'
        raise CheckpointError(f'{path}: shapes differ from {name} for {_tensors(len(mismatched))} of the '
                              f'backbone ({_some(mismatched, 3)}); {hint}')
    if missing:
        raise CheckpointError(f'{path}: fills only {len(needed) - len(missing)} of the {len(needed)} backbone '
                              f'tensors of {name} (missing {_some(missing, 3)}): not HRNet ImageNet weights '
                              f'(hrnet_w{model.width}-*.pth)? check --pretrained and --hrnetWidth')
    model.load_state_dict(loadable, strict=False)


def _tensors(n):
    return f'{n} tensor' + ('' if n == 1 else 's')


def _file_width(state):
    """Width C of the HRNet whose state dict this is (None if it does not look like one)."""
    w = state.get('transition1.0.0.weight')
    return int(w.shape[0]) if w is not None and w.dim() == 4 else None
