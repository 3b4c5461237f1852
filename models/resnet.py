"""ResNet-18/34/50/101/152 backbones (He et al. 2016) with torchvision's layout and names.

The modules and their parameter and buffer names are exactly torchvision's (v1.5: the stride of
a bottleneck sits on its 3x3 convolution): ``conv1``, ``bn1``, ``layer1``..``layer4`` made of
blocks ``.0.conv1`` / ``.0.bn1`` / ``.0.downsample.0`` / ``.0.downsample.1`` ..., and, for a
classifier, ``fc``. A user's torchvision ImageNet ``.pth`` therefore loads with
``load_pretrained(backbone, path)``; nothing here imports torchvision.

Without ``num_classes`` a ResNet is a feature extractor: ``forward`` returns the last stage,
(N, out_channels, ceil(H/32), ceil(W/32)).
"""
import os

import torch
import torch.nn as nn

from utils.errors import CheckpointError, ConfigError, did_you_mean

# name -> (block, blocks per stage)
SPECS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    'resnet152': ('bottleneck', (3, 8, 36, 3)),
}

# torchvision's IMAGENET1K_V1 weights (the ones its ``pretrained=True`` gave).
URLS = {
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet34': 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'resnet152': 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
}

# Top-level modules of the convolutional trunk: what ImageNet weights fill in.
TRUNK = ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4')


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)



def init_conv_bn(module):
    """torchvision's initialisation: He (fan_out) convolutions, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)

class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the first carries the stride."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: ResNet v1.5), 1x1 expand by 4."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def make_stage(block, inplanes, planes, blocks, stride=1):
    """One ResNet stage (torchvision's ``_make_layer``): returns (nn.Sequential, out channels)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


class ResNet(nn.Module):
    """torchvision's ResNet. ``arch`` names it (for the download URL and error messages).

    num_classes None: no ``avgpool``/``fc``; ``forward`` returns the stride-32 feature map
    (N, out_channels, h, w). num_classes set: ``forward`` returns logits (N, num_classes).
    """
    stride = 32

    def __init__(self, arch='resnet50', num_classes=None):
        super().__init__()
        kind, layers = SPECS[arch]
        block = BLOCKS[kind]
        self.arch = arch
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        self.layer1, channels = make_stage(block, channels, 64, layers[0])
        self.layer2, channels = make_stage(block, channels, 128, layers[1], stride=2)
        self.layer3, channels = make_stage(block, channels, 256, layers[2], stride=2)
        self.layer4, channels = make_stage(block, channels, 512, layers[3], stride=2)
        self.out_channels = channels
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(channels, num_classes)
        self._init_trunk()

    def _init_trunk(self):
        init_conv_bn(self)

    def features(self, x):
        """(N, 3, H, W) -> (N, out_channels, ceil(H/32), ceil(W/32))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        x = self.features(x)
        if not hasattr(self, 'fc'):
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


def check_name(name):
    """Stop with one clear line if ``name`` is not a ResNet this file builds."""
    if name not in SPECS:
        raise ConfigError(f'unknown ResNet {name!r}{did_you_mean(name, SPECS)} (valid names: {", ".join(SPECS)})')
    return name


def resnet(name, num_classes=None):
    """ResNet by name ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')."""
    return ResNet(check_name(name), num_classes)


def depth_from_state(state, prefix=''):
    """The ResNet name whose blocks a state dict holds ('resnet50', ...), or None: read off the
    number of blocks of layer1..layer4 and whether they are bottlenecks (``conv3``)."""
    blocks = []
    for layer in range(1, 5):
        ids = {int(k[len(prefix):].split('.')[1]) for k in state if k.startswith(f'{prefix}layer{layer}.')}
        blocks.append(len(ids))
    kind = 'bottleneck' if f'{prefix}layer1.0.conv3.weight' in state else 'basic'
    return next((name for name, spec in SPECS.items() if spec == (kind, tuple(blocks))), None)


def trunk_keys(model):
    """State-dict keys of ``model`` that belong to its ResNet trunk (conv1, bn1, layer1-4)."""
    return [k for k in model.state_dict() if k.split('.', 1)[0] in TRUNK]


def load_pretrained(backbone, spec):
    """Fill the ResNet trunk of ``backbone`` with ImageNet weights.

    backbone: a ``ResNet`` (or a module that holds a ResNet trunk at its top level, as
    ``SimpleBaseline`` does); spec: None / '' (do nothing), a path to a torchvision state dict
    (``fc.*`` keys are ignored), or 'download' (torchvision's URL, cached by torch.hub).
    Anything that does not match exactly is a one-line ``CheckpointError`` naming the file.
    """
    if not spec:
        return
    arch = getattr(backbone, 'arch', 'resnet')
    if spec == 'download':
        url = URLS[arch]
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location='cpu', progress=True,
                                                       check_hash=True, weights_only=True)
        except Exception as e:  # no network, proxy, HTTP error, truncated file ...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f'could not download the ImageNet weights of {arch} from {url} ({reason}); '
                f'download that file by hand and pass its path: --pretrained /path/to/{os.path.basename(url)}')
        where = url
    else:
        where = spec
        if not os.path.isfile(spec):
            raise CheckpointError(f'{spec}: no such file (--pretrained takes a .pth path or \'download\')')
        try:
            state = torch.load(spec, map_location='cpu', weights_only=True)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f'{spec}: cannot be read as a PyTorch weights file ({reason})')
    state = _unwrap(state, where)

    expected = trunk_keys(backbone)
    given = {k: v for k, v in state.items() if not k.startswith('fc.')}
    # files saved before PyTorch 0.4.1 (torchvision's original ones) have no num_batches_tracked
    missing = [k for k in expected if k not in given and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in given if k not in set(expected)]
    own = backbone.state_dict()
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in given.items()
                  if k in own and k not in unexpected and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing keys ({_some(missing)})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected keys ({_some(unexpected)})')
        if mismatched:
            parts.append(f'{len(mismatched)} shape mismatches ({_some(mismatched)})')
        raise CheckpointError(f'{where}: does not hold {arch} ImageNet weights: {"; ".join(parts)}')
    backbone.load_state_dict(given, strict=False)


def _unwrap(state, where):
    """A state dict from what torch.load returned: a plain one, or a checkpoint holding one."""
    if isinstance(state, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{where}: not a state dict of tensors (got {type(state).__name__})')
    return {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}


def _some(keys, n=4):
    shown = ', '.join(keys[:n])
    return shown + (f', ... {len(keys) - n} more' if len(keys) > n else '')
