"""DeepPose: human pose estimation via deep neural networks (Toshev and Szegedy, CVPR 2014).

Stage 1 regresses all joints at once from the whole crop: a ResNet (``baseName``; the paper used
an AlexNet-like network, the ResNet is this project's choice), global average pooling and a
linear layer to 2K numbers, the joints as normalised coordinates (x / W - 0.5, y / H - 0.5) of
the crop (``datasets.codecs.CoordinateCodec``).

Stages 2..S (``nStages``) refine. For every joint, a square patch of side sigma * diam(y) is
cut around that joint's previous estimate (the paper's box b_i = (y_i, sigma diam(y), sigma
diam(y))) and resampled to ``patch_size`` pixels with ``F.grid_sample`` (differentiable, no
torchvision). One small ResNet-style regressor per stage, shared by all joints, reads the patch
and predicts a displacement in the patch's normalised frame; joint i takes output i of it (the
paper's psi_i) and the displacement is mapped back to the crop: y_i <- y_i + side * delta_i.

Every stage returns its absolute estimate, (N, K, 2), so the codec's loss (squared distance
weighted by visibility) supervises each stage.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model
from .resnet import BasicBlock, init_conv_bn, load_pretrained, make_stage, resnet


class PatchRegressor(nn.Module):
    """Small ResNet-style regressor: (M, 3, P, P) patches -> (M, 2K) displacements.

    A 3x3 stride-2 stem of ``width`` channels, three stride-2 basic blocks doubling the width,
    global average pooling and a linear layer (N(0, 0.001), bias 0, so that a fresh stage
    starts as the identity correction).
    """

    def __init__(self, n_joints, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, channels = [], width
        for _ in range(3):
            stage, channels = make_stage(BasicBlock, channels, channels * 2, 1, stride=2)
            stages.append(stage)
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, 2 * n_joints)
        init_conv_bn(self)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.constant_(self.fc.bias, 0)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def crop_patches(images, centers, sides, patch_size):
    """Square patches around points, resampled bilinearly (zeros outside the image).

    images (N, C, H, W); centers (N, K, 2) normalised crop coordinates (x / W - 0.5,
    y / H - 0.5); sides (N,) patch side in input pixels; -> (N, K, C, P, P).
    All K patches of an image come from one ``grid_sample`` call over a (K*P, P) grid, so the
    image is never copied K times.
    """
    n, c, h, w = images.shape
    k = centers.shape[1]
    size = images.new_tensor([w, h])
    # grid_sample (align_corners=False): u = (2 * pixel + 1) / W - 1 and pixel = (c + 0.5) W
    middle = 2 * centers + 1 / size                                   # (N, K, 2)
    half = sides[:, None] / size                                      # (N, 2) half side, grid units
    steps = (2 * torch.arange(patch_size, device=images.device, dtype=images.dtype) + 1) / patch_size - 1
    gx = middle[:, :, None, None, 0] + half[:, None, None, None, 0] * steps[None, None, None, :]
    gy = middle[:, :, None, None, 1] + half[:, None, None, None, 1] * steps[None, None, :, None]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), -1)          # (N, K, P, P, 2)
    patches = F.grid_sample(images, grid.reshape(n, k * patch_size, patch_size, 2),
                            mode='bilinear', padding_mode='zeros', align_corners=False)
    return patches.reshape(n, c, k, patch_size, patch_size).transpose(1, 2)


@register_model('DeepPose')
class DeepPose(nn.Module):
    """(N, 3, H, W) -> list of n_stages tensors (N, K, 2), normalised coordinates of the crop.

    n_joints: K; base_name: ResNet of stage 1; n_stages: 1 + refinement stages;
    sigma: patch side as a multiple of the pose's extent (the diagonal of the box around the
    previous estimates, a dataset-independent stand-in for the paper's torso diameter);
    patch_size: side in pixels the patches are resampled to; min_side: smallest patch, as a
    fraction of the crop side (a collapsed early estimate still gets a usable patch).
    """
    target = 'coords'
    stride = 1

    def __init__(self, n_joints=16, base_name='resnet50', n_stages=1, sigma=0.5, patch_size=64,
                 min_side=0.125):
        super().__init__()
        self.n_joints = n_joints
        self.sigma = sigma
        self.patch_size = patch_size
        self.min_side = min_side
        self.backbone = resnet(base_name)
        self.head = nn.Linear(self.backbone.out_channels, 2 * n_joints)
        nn.init.normal_(self.head.weight, std=0.001)
        nn.init.constant_(self.head.bias, 0)
        self.refiners = nn.ModuleList(PatchRegressor(n_joints) for _ in range(n_stages - 1))

    def forward(self, x):
        n = x.shape[0]
        pose = self.head(self.backbone(x).mean((2, 3))).view(n, self.n_joints, 2)
        outputs = [pose]
        for refiner in self.refiners:
            pose = self.refine(refiner, x, pose)
            outputs.append(pose)
        return outputs

    def refine(self, refiner, x, pose):
        """One cascade stage: pose (N, K, 2) -> refined pose (N, K, 2)."""
        n, k, _ = pose.shape
        h, w = x.shape[-2:]
        size = x.new_tensor([w, h])
        # The boxes come from the previous stage's estimate as a fixed input (the paper trains
        # stage s on stage s-1's outputs); the gradient still reaches it through the sum below.
        prev = pose.detach()
        pixels = (prev + 0.5) * size
        extent = (pixels.amax(1) - pixels.amin(1)).norm(dim=-1)       # (N,) diagonal, pixels
        sides = (self.sigma * extent).clamp(min=self.min_side * min(h, w), max=2.0 * max(h, w))
        patches = crop_patches(x, prev, sides, self.patch_size)      # (N, K, 3, P, P)
        out = refiner(patches.reshape(n * k, *patches.shape[2:])).view(n, k, k, 2)
        joint = torch.arange(k, device=x.device)
        delta = out[:, joint, joint]                                  # (N, K, 2), patch frame
        return pose + delta * (sides[:, None, None] / size)

    @classmethod
    def from_opts(cls, opts):
        model = cls(n_joints=opts.nJoints, base_name=opts.baseName, n_stages=opts.nStages,
                    patch_size=max(16, min(opts.inputRes) // 4))
        load_pretrained(model.backbone, opts.pretrained)
        return model
