"""Prediction outside the trainer: a model, its codec and the joint set's flip permutation turn
batches into people. The trainer's evaluation, ``-test`` and inference from Python all use it;
it holds no optimiser, no log file and no distributed state.
"""
import argparse

import numpy as np
import torch

from datasets.codecs import build_codec
from utils import checkpoint
from utils.errors import CheckpointError, DatasetError


def pick_device(gpuid):
    """CUDA device ``gpuid`` when CUDA is present and gpuid >= 0, else the CPU. Under torchrun the
    process's LOCAL_RANK picks the GPU."""
    import os
    if gpuid >= 0 and torch.cuda.is_available():
        local = int(os.environ.get('LOCAL_RANK', gpuid))
        return torch.device('cuda', local)
    return torch.device('cpu')


def to_device(batch, device, channels_last=True):
    """Tensor fields of a batch on ``device`` (the image channels-last unless told otherwise);
    meta stays on the CPU."""
    out = {}
    for key, value in batch.items():
        if key == 'image':
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            out[key] = value.to(device, non_blocking=True, memory_format=fmt)
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


class Predictor:
    """model + codec + flip permutation -> people.

    device: a torch.device or a string ('cpu', 'cuda', 'cuda:1'); amp: bfloat16 autocast on the
    CPU, float16 on CUDA; flip_test: average with the mirrored image's output; channels_last:
    the memory layout of the convolutions (faster on CPUs and tensor cores; the reference code's
    NCHW layout gives the last float bits of the reference's heatmaps).
    """

    def __init__(self, model, codec, flip_perm=None, device='cpu', amp=False, flip_test=False, joint_set=None,
                 channels_last=True):
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        self.codec = codec
        self.joint_set = joint_set
        if flip_perm is None and joint_set is not None:
            flip_perm = joint_set.flip_permutation()
        self.flip_perm = None if flip_perm is None else torch.as_tensor(np.asarray(flip_perm), device=self.device)
        self.amp = bool(amp)
        self.amp_dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        self.flip_test = bool(flip_test)

    @classmethod
    def from_checkpoint(cls, path, device='cpu', **kwargs):
        """Everything from one format-2 checkpoint file: the model with its weights, the codec, the
        joint set. kwargs: amp, flip_test."""
        import opts as options
        from models import build_model
        ckpt = checkpoint.load(path)
        config = checkpoint.config_defaults(ckpt)
        if config is None:
            kind = 'a released weight file' if ckpt.get('released') else 'a format-1 checkpoint'
            raise CheckpointError(f'{path}: {kind} does not describe its model; evaluate it with -test '
                                  f'and its config files')
        opts = options.parse([], defaults=config)
        opts.pretrained = None
        model = build_model(opts)
        checkpoint.load_weights(model, ckpt['state_dict'], path)
        codec = build_codec(opts, model)
        kwargs.setdefault('flip_test', opts.flipTest)
        kwargs.setdefault('amp', opts.amp)
        kwargs.setdefault('channels_last', opts.channelsLast)
        predictor = cls(model, codec, device=device, joint_set=checkpoint.joint_set_of(ckpt), **kwargs)
        predictor.opts = opts
        return predictor

    def forward(self, images):
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.model(images)
        return [o.float() for o in out]

    @torch.no_grad()
    def outputs(self, batch):
        """What the codec decodes for a batch on the device (the model's outputs, the flip test
        merged in; ``Codec.test_outputs``)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.codec.test_outputs(lambda x: self.forward(x.to(self.device, memory_format=fmt)), batch,
                                       self.flip_perm, self.flip_test)

    def run(self, loader, keep=0, progress=None):
        """Predict every batch of ``loader`` (no augmentation).

        Returns dict(predictions: per sample {'index', 'keypoints' (N, K, 2) original pixels,
        'scores' (N, K), 'score' (N,)}, acc: the codec's accuracy over the batches that have one
        (None otherwise), kept: the first ``keep`` samples' crops with their ground truth and
        prediction, for drawing).
        """
        self.model.eval()
        predictions, accs, kept = [], [], []
        for batch in (progress(loader) if progress else loader):
            if batch.get('errors'):
                raise DatasetError(batch['errors'][0])
            batch = to_device(batch, self.device, self.channels_last)
            outputs = self.outputs(batch)
            acc = self.codec.accuracy(outputs, batch)
            if acc is not None:
                accs.append((acc, batch['image'].shape[0]))
            people = self.codec.decode(outputs, batch)
            predictions.extend(people)
            for b in range(min(keep - len(kept), len(people)) if 'keypoints' in batch else 0):
                kept.append(dict(image=batch['image'][b].float().cpu(), keypoints=batch['keypoints'][b].cpu().numpy(),
                                 visible=batch['visible'][b].cpu().numpy(), affine=batch['meta']['affine'][b].numpy(),
                                 prediction=people[b]))
        acc = sum(a * n for a, n in accs) / sum(n for _, n in accs) if accs else None
        return dict(predictions=predictions, acc=acc, kept=kept)


def options_namespace(opts, **changes):
    """A copy of an options namespace with some values changed (opts itself is left as it is)."""
    return argparse.Namespace(**{**vars(opts), **changes})
