"""Prediction outside the trainer: a model, its codec and the joint set's flip permutation turn
batches into people. The trainer's evaluation, ``-test`` and inference from Python all use it;
it holds no optimiser, no log file and no distributed state.
"""
import argparse

import numpy as np
import torch

from datasets.codecs import build_codec
from utils import checkpoint
from utils.cpu import native_bfloat16
from utils.errors import CheckpointError, ConfigError, DatasetError


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

    On batches (``run``: what training's evaluation and ``-test`` use) or on one image
    (``predictor(image, boxes)``, ``infer``: the Python API and ``-demo``); see ``infer``.

    device: a torch.device or a string ('cpu', 'cuda', 'cuda:1'); amp: bfloat16 autocast on the
    CPU, float16 on CUDA (on a CPU without hardware bfloat16, ``utils.cpu.native_bfloat16``, it
    runs float32: ``amp_requested`` keeps what was asked); flip_test: average with the mirrored image's output; channels_last:
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
        self.amp_requested = bool(amp)
        self.amp = self.amp_requested and (self.device.type != 'cpu' or native_bfloat16())
        self.amp_dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        self.flip_test = bool(flip_test)
        self.opts = None              # the options it was built with (from_checkpoint)
        self.batch_size = 32          # crops per forward pass in ``infer``

    @classmethod
    def from_checkpoint(cls, path, device='cpu', ckpt=None, opts=None, **kwargs):
        """Everything from one format-2 checkpoint file: the model with its weights, the codec, the
        joint set. device: 'cpu', 'cuda', 'cuda:1' or a torch.device; ckpt: the dict already read
        from ``path`` (spares reading it again); opts: the options to build with instead of the
        recorded ones (``main.resolve``'s: the recorded ones as defaults, the command line winning;
        with them a format-1 checkpoint loads too). kwargs: amp, flip_test, channels_last (default:
        the options')."""
        import opts as options
        from models import build_model
        ckpt = checkpoint.load(path) if ckpt is None else ckpt
        config = checkpoint.config_defaults(ckpt)
        if config is None and opts is None:
            kind = 'a released weight file' if ckpt.get('released') else 'a format-1 checkpoint'
            raise CheckpointError(f'{path}: {kind} does not describe its model; evaluate it with -test '
                                  f'and its config files')
        given = opts is not None
        opts = options_namespace(opts if given else options.parse([], defaults=config), pretrained=None)
        model = build_model(opts)
        if given and ckpt.get('arch'):            # options from elsewhere: say what differs, in one line
            checkpoint.check_compatible(ckpt, model, path)
        checkpoint.load_weights(model, ckpt['state_dict'], path)
        codec = build_codec(opts, model)
        kwargs.setdefault('flip_test', opts.flipTest)
        kwargs.setdefault('amp', opts.amp)
        kwargs.setdefault('channels_last', opts.channelsLast)
        joint_set = checkpoint.joint_set_of(ckpt)
        if joint_set is None:                     # format 1: the configured dataset's joints
            from datasets import reader_class
            joint_set = reader_class(opts.dataset).joint_set
        predictor = cls(model, codec, device=device, joint_set=joint_set, **kwargs)
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

    # ------------------------------------------------------------------ one image (Python API)
    @property
    def joint_names(self):
        """The K joint names, in the model's output order."""
        return tuple(self._joints().names)

    @property
    def skeleton(self):
        """Limbs as (a, b) joint index pairs, for drawing."""
        return tuple(tuple(limb) for limb in self._joints().skeleton)

    @property
    def bottom_up(self):
        """True for a model that finds every person of a whole image itself (associative embedding)."""
        return bool(getattr(self.codec, 'bottom_up', False))

    def __call__(self, image, boxes=None, *, centers=None, scales=None, bgr=False):
        """The people of one image: ``infer(...)['people']`` (see there)."""
        return self.infer(image, boxes, centers=centers, scales=scales, bgr=bgr)['people']

    predict = __call__

    @torch.no_grad()
    def infer(self, image, boxes=None, *, centers=None, scales=None, bgr=False, maps=False):
        """Predict the people of one image.

        image: uint8 (H, W, 3) RGB (BGR with ``bgr``, as OpenCV reads it; (H, W) grey is taken too).
        Top-down models, one crop per person, all crops batched (``batch_size`` per forward pass):
        * boxes (M, 4) x, y, w, h pixels: made into centre / scale as the COCO reader makes its
          boxes (``datasets.coco.box_to_center_scale``: the shorter side extended to the input's
          aspect ratio, x 1.25);
        * or centers (M, 2) and scales (M, 2) or (M,) (a record's ``center`` and ``scale``: the box
          is scale x 200 pixels, extended to the input's aspect ratio by the pipeline), in their
          own dtype, so a reader's record gives exactly ``-test``'s crop;
        * neither: the whole image is one person (centre = the image centre, the crop the whole
          image extended to the input's aspect ratio, no padding).
        Bottom-up models take no boxes: the whole image goes through the codec's test pipeline.

        Returns dict(people=[{'keypoints' (K, 3) float32 [x, y, score] original pixels, 'score'
        float (the mean joint score), 'box' (4,) float32 x, y, w, h: the given box (with
        centers / scales: the box scale x 200 around the centre; whole image: 0, 0, W, H;
        bottom-up: the extent of the person's keypoints)}], maps=None or, with ``maps``, one entry
        per forward sample {'heatmaps' (K, h, w) float32, 'tags' (K, h, w) (the first tag
        dimension; bottom-up only, else None), 'affine' (2, 3) original pixels -> map pixels}).
        Same crops, same keypoints as ``run`` (``-test``).
        """
        image = _rgb(image, bgr)
        if self.bottom_up:
            if boxes is not None or centers is not None:
                raise ConfigError('boxes: a bottom-up model finds the people of the whole image itself; give none')
            self.model.eval()
            return self._infer_whole(image, maps)
        return self._infer_crops([image], [self._crops(image, boxes, centers, scales)], maps)[0]

    @torch.no_grad()
    def infer_many(self, images, boxes=None, *, bgr=False, maps=False):
        """``infer`` on several images at once (a video's frames): the crops of all of them go
        through the model together, ``batch_size`` per forward pass, which keeps the convolutions
        busier than one small image at a time. boxes: None (every image whole) or one entry per
        image (None or (M, 4) x, y, w, h). -> the list of ``infer``'s dicts, the same people."""
        boxes = [None] * len(images) if boxes is None else list(boxes)
        if len(boxes) != len(images):
            raise ConfigError(f'infer_many: {len(images)} images but {len(boxes)} entries of boxes')
        images = [_rgb(image, bgr) for image in images]
        if self.bottom_up:
            return [self.infer(image, b, maps=maps) for image, b in zip(images, boxes)]
        return self._infer_crops(images, [self._crops(image, b, None, None) for image, b in zip(images, boxes)], maps)

    def _infer_crops(self, images, crops, maps):
        """Top-down: images and, per image, its ``_crops`` -> one ``infer`` dict per image."""
        self.model.eval()
        k, pipeline = self._joints().num_joints, self._pipeline()
        todo = [(i, c, s, box) for i, (centers, scales, boxes) in enumerate(crops)
                for c, s, box in zip(centers, scales, boxes)]
        found = [dict(people=[], maps=[] if maps else None) for _ in images]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            records = [dict(_crop_record(c, s, k), image=i) for i, c, s, _ in chunk]
            batch = self._batch(images, records, pipeline)
            outputs = self.outputs(to_device(batch, self.device, self.channels_last))
            for (i, _, _, box), p in zip(chunk, self.codec.decode(outputs, batch)):
                found[i]['people'].append(_person_dict(p['keypoints'][0], p['scores'][0], np.asarray(box, np.float32)))
            if maps:
                for (i, *_), m in zip(chunk, self._crop_maps(outputs, batch)):
                    found[i]['maps'].append(m)
        return found

    def _joints(self):
        if self.joint_set is None:
            raise ConfigError('this predictor has no joint set (build it with joint_set= or from_checkpoint)')
        return self.joint_set

    def _pipeline(self):
        """The test pipeline of one crop (a top-down codec: the reader's pose pipeline, without
        augmentation) or of a whole image (a bottom-up codec's own)."""
        from datasets.pipeline import Pipeline
        if self.bottom_up:
            import opts as options
            return self.codec.pipeline(self.opts or options.parse([]), self._joints(), train=False)
        size = getattr(self.codec, 'input_size', None)
        if size is None:
            raise ConfigError(f'codec {self.codec.target!r} predicts no keypoints: nothing to infer people from')
        return Pipeline(size, self._joints().flip_permutation(), train=False, udp=getattr(self.codec, 'udp', False))

    def _batch(self, images, records, pipeline):
        """Records of images in memory (one image, or a list that each record's ``image`` indexes)
        -> the batch ``-test`` would make of them (``PoseDataset``'s sample path: pipeline, codec
        encode, meta, collate)."""
        from datasets.base import PoseDataset
        dataset = PoseDataset(_InMemory(images, records), pipeline, self.codec)
        return dataset.collate([dataset[i] for i in range(len(records))])

    def _crops(self, image, boxes, centers, scales):
        """-> centres (M, 2), scales (M, 2) and the boxes (M, 4) x, y, w, h to report."""
        if (centers is None) != (scales is None):
            raise ConfigError('centers and scales: give both (a record\'s center and scale) or neither')
        if boxes is not None and centers is not None:
            raise ConfigError('give boxes or centers and scales, not both')
        if centers is not None:
            centers, scales = np.asarray(centers).reshape(-1, 2), np.asarray(scales)
            if scales.size == len(centers):           # one number a person (MPII's square boxes)
                scales = np.repeat(scales.reshape(-1, 1), 2, axis=1)
            scales = scales.reshape(-1, 2)
            if len(centers) != len(scales):
                raise ConfigError(f'{len(centers)} centers but {len(scales)} scales')
            wh = np.asarray(scales, np.float64) * 200.0
            return centers, scales, np.concatenate([np.asarray(centers, np.float64) - wh / 2, wh], 1)
        from datasets.coco import box_to_center_scale
        w, h = self.codec.input_size
        aspect = w * 1.0 / h
        if boxes is None:
            height, width = image.shape[:2]
            c, s = box_to_center_scale(0.0, 0.0, float(width), float(height), aspect, padding=1.0)
            return c[None], s[None], np.array([[0.0, 0.0, width, height]])
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        bad = ~np.all(np.isfinite(boxes), 1) | np.any(boxes[:, 2:] <= 0, 1)
        if bad.any():
            raise ConfigError(f'boxes: x, y, w, h with w, h > 0 expected, got {boxes[bad][0].tolist()}')
        made = [box_to_center_scale(*(float(v) for v in b), aspect) for b in boxes]
        centers = np.stack([c for c, _ in made]) if made else np.zeros((0, 2), np.float32)
        scales = np.stack([s for _, s in made]) if made else np.zeros((0, 2), np.float32)
        return centers, scales, boxes

    def _crop_maps(self, outputs, batch):
        """Heatmaps of each crop with their original -> heatmap pixel affine."""
        heat = outputs[-1].float().cpu().numpy()
        if heat.ndim != 4:
            return [None] * len(heat)
        to_map = np.diag(1.0 / np.asarray(self.codec.stride, np.float64))
        return [dict(heatmaps=h, tags=None, affine=(to_map @ np.asarray(a, np.float64)).astype(np.float32))
                for h, a in zip(heat, batch['meta']['affine'].numpy())]

    def _infer_whole(self, image, maps):
        """A bottom-up model on the whole image (its codec's test pipeline)."""
        k = self._joints().num_joints
        record = dict(image=None, center=np.zeros(2), scale=np.ones(2), keypoints=np.zeros((0, k, 2), np.float32),
                      visible=np.zeros((0, k), np.float32))
        batch = self._batch(image, [record], self._pipeline())
        outputs = self.outputs(to_device(batch, self.device, self.channels_last))
        found = self.codec.decode(outputs, batch)[0]
        people = [_person_dict(kp, s, _extent(kp)) for kp, s in zip(found['keypoints'], found['scores'])]
        kept = None
        if maps:
            heat, tags = (o[0].float().cpu().numpy() for o in outputs)
            kept = [dict(heatmaps=heat, tags=tags[..., 0], affine=batch['meta']['affine'][0].numpy())]
        return dict(people=people, maps=kept)


class _InMemory:
    """What ``PoseDataset`` reads from a reader, over images already in memory: one image, or a
    list of them that each record's ``image`` indexes."""

    def __init__(self, images, records):
        self.images = images
        self.records = records

    def load_image(self, record):
        return self.images[record['image']] if isinstance(self.images, list) else self.images

    def mask(self, record, height, width):
        return None


def _crop_record(center, scale, k):
    """A top-down record without ground truth: the crop's centre and scale, no labelled joint."""
    return dict(image=None, center=center, scale=scale, keypoints=np.zeros((1, k, 2), np.float32),
                visible=np.zeros((1, k), np.float32))


def _person_dict(keypoints, scores, box):
    """keypoints (K, 2), scores (K,), box (4,) -> one person of ``Predictor.infer``."""
    scores = np.asarray(scores, np.float32)
    kp = np.concatenate([np.asarray(keypoints, np.float32), scores[:, None]], axis=1)
    return dict(keypoints=kp, score=float(scores.mean()) if scores.size else 0.0, box=np.asarray(box, np.float32))


def _extent(keypoints):
    """(K, 2) -> the box x, y, w, h of the points' extent (4,)."""
    lo, hi = np.min(keypoints, 0), np.max(keypoints, 0)
    return np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], np.float32)


def _rgb(image, bgr):
    """A uint8 (H, W, 3) image (BGR with ``bgr``) or (H, W) grey -> contiguous uint8 RGB (H, W, 3)."""
    import cv2
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) \
            or min(image.shape[:2]) < 1:
        raise DatasetError(f'image: expected a uint8 (H, W, 3) array, got {image.dtype} {tuple(image.shape)}')
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(image)


def options_namespace(opts, **changes):
    """A copy of an options namespace with some values changed (opts itself is left as it is)."""
    return argparse.Namespace(**{**vars(opts), **changes})
