"""ImageNet classification (ILSVRC2012) on the pose spine: a reader, its pipeline and the
'classification' codec.

Layout (what the usual ImageNet preparation scripts produce)::

    dataDir/train/<wnid>/*.JPEG      one folder per class (n01440764, ...)
    dataDir/val/<wnid>/*.JPEG        the validation images sorted into the same class folders

Images may end in .JPEG, .jpg, .jpeg or .png, in any case. The class index of a wnid is its
position among the sorted TRAIN class folders (torchvision's ImageFolder convention), for both
splits; a validation folder that is not a training class is an error.

Record: ``{'image': path, 'label': class index}`` (no people: ``joint_set`` is None).
Sample: ``image`` (3, H, W) normalised, ``label`` int; the batch has ``label`` (B,) int64.

Pipeline: training = the random-resized crop (area 8-100 % of the image, aspect ratio
log-uniform in 3/4..4/3, 10 attempts, then a centre crop of the image clipped to those aspect
ratios) resized to the input size, and a horizontal flip with probability 1/2 (``--flipAug``);
evaluation = the image resized so that it covers the input size enlarged by 256/224 (for a square
224 input: the shorter side to 256), then its centre crop. Resizing is bilinear, and an area
average where the image shrinks (which, like PIL's antialiased bilinear filter of the reference
recipes, does not alias).

Codec: cross-entropy on the last output's logits (N, C); decoding gives each image's top-5
classes and their softmax probabilities. Evaluation: Top-1 and Top-5 accuracy in percent.
"""
import csv
import math
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datasets import register_dataset
from datasets.base import Reader, check_data_dir, sample_limit
from datasets.codecs import Codec, register_codec
from datasets.pipeline import normalize
from utils.errors import DatasetError
from utils.io import atomic_write

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
SPLIT_FOLDERS = {'train': 'train', 'val': 'val'}
AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
EVAL_RESIZE = 256.0 / 224.0
TOP_K = 5


# ----------------------------------------------------------------------------- folders

def _class_folders(split_dir):
    """Sorted class folder names (wnids) of a split folder; hidden folders are ignored.

    A missing folder, or one without class folders, is a one-line ``DatasetError`` naming it."""
    if not os.path.isdir(split_dir):
        raise DatasetError(f'ImageNet: folder {split_dir} not found; expected {split_dir}/<wnid>/*.JPEG '
                           f'(see conf/datasets/imagenet.defconf)')
    with os.scandir(split_dir) as entries:
        entries = list(entries)
    names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
    if names:
        return names
    loose = sum(e.is_file() and _is_image(e.name) for e in entries)
    if loose:
        raise DatasetError(f'ImageNet: {split_dir} holds {loose} images but no class folders; sort them into '
                           f'<wnid> folders (for val: the usual valprep script)')
    raise DatasetError(f'ImageNet: {split_dir} holds no class folders; expected {split_dir}/<wnid>/*.JPEG')


def _is_image(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images(folder):
    """Sorted image file paths of one class folder; none is a ``DatasetError`` naming it."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if _is_image(e.name) and e.is_file())
    if not names:
        raise DatasetError(f'ImageNet: class folder {folder} holds no images (.JPEG, .jpg, .jpeg or .png)')
    return [os.path.join(folder, n) for n in names]


# ----------------------------------------------------------------------------- pipeline

def random_resized_box(height, width, rng, area_range=AREA_RANGE, aspect_range=ASPECT_RANGE,
                       attempts=CROP_ATTEMPTS):
    """The box of a random-resized crop of a (height, width) image -> (x, y, w, h) ints.

    Each attempt draws an area fraction uniform in ``area_range`` and an aspect ratio w / h
    log-uniform in ``aspect_range``; the first box that fits in the image is placed uniformly at
    random. After ``attempts`` misses: ``fallback_box``.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(attempts):
        target = area * rng.uniform(area_range[0], area_range[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
    return fallback_box(height, width, aspect_range)


def fallback_box(height, width, aspect_range=ASPECT_RANGE):
    """The centre crop of a random-resized crop that found no box: the whole image, cut to the
    nearest aspect ratio of ``aspect_range`` when its own is outside -> (x, y, w, h) ints."""
    aspect = width / float(height)
    w, h = width, height
    if aspect < aspect_range[0]:
        h = min(height, int(round(width / aspect_range[0])))
    elif aspect > aspect_range[1]:
        w = min(width, int(round(height * aspect_range[1])))
    return (width - w) // 2, (height - h) // 2, w, h


def eval_size(height, width, input_size, resize=EVAL_RESIZE):
    """(W, H) the evaluation resizes a (height, width) image to: the aspect ratio kept, the image
    just covering ``input_size`` (W, H) x ``resize`` (for a square 224 input, the shorter side
    becomes 256)."""
    s = resize * max(input_size[0] / float(width), input_size[1] / float(height))
    return max(input_size[0], int(round(width * s))), max(input_size[1], int(round(height * s)))


def resize(image, size):
    """uint8 (H, W, 3) -> (size[1], size[0], 3): bilinear, an area average when shrinking."""
    h, w = image.shape[:2]
    shrink = size[0] <= w and size[1] <= h
    return cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def centre_crop(image, size):
    """(H, W, 3) -> the centred (size[1], size[0], 3) window (offsets rounded down)."""
    h, w = image.shape[:2]
    x, y = (w - size[0]) // 2, (h - size[1]) // 2
    return image[y:y + size[1], x:x + size[0]]


class ClassificationPipeline:
    """Decoded image + record -> dict(image (3, H, W) normalised, label int); see the module
    docstring. input_size: (W, H)."""

    def __init__(self, input_size, train=False, flip=True):
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.train = bool(train)
        self.flip = bool(flip)

    def sample_params(self, height, width, rng):
        """Training draws for a (height, width) image: dict(box=(x, y, w, h), flip=bool); the box
        is drawn first, then the flip."""
        box = random_resized_box(height, width, rng)
        return dict(box=box, flip=bool(self.flip and rng.random() < 0.5))

    def __call__(self, image, record, rng=None):
        """image: uint8 RGB (h, w, 3); record: {'image', 'label'}."""
        h, w = image.shape[:2]
        if self.train:
            p = self.sample_params(h, w, rng if rng is not None else np.random.default_rng())
            x, y, bw, bh = p['box']
            crop = resize(image[y:y + bh, x:x + bw], self.input_size)
            if p['flip']:
                crop = crop[:, ::-1]
        else:
            crop = centre_crop(resize(image, eval_size(h, w, self.input_size)), self.input_size)
        return dict(image=normalize(crop), label=int(record['label']))


# ----------------------------------------------------------------------------- reader

@register_dataset('ImageNet')
class ImageNet(Reader):
    """ILSVRC2012 class folders -> records {'image', 'label'}; Top-1 / Top-5 accuracy."""
    joint_set = None

    def __init__(self, opts, split):
        super().__init__(opts, split)
        check_data_dir('ImageNet', opts.dataDir)
        self.root = opts.dataDir
        train_dir = os.path.join(self.root, SPLIT_FOLDERS['train'])
        self.split_dir = os.path.join(self.root, SPLIT_FOLDERS[split])
        self.classes = _class_folders(train_dir)
        self.num_classes = len(self.classes)
        index = {wnid: i for i, wnid in enumerate(self.classes)}
        wnids = self.classes if split == 'train' else _class_folders(self.split_dir)
        for wnid in wnids:
            folder = os.path.join(self.split_dir, wnid)
            if wnid not in index:
                raise DatasetError(f'ImageNet: {folder}: class {wnid} is not a class folder of {train_dir}')
            self.records.extend(dict(image=path, label=index[wnid]) for path in _images(folder))
        limit = sample_limit(opts, split)
        if limit:
            del self.records[limit:]

    def pipeline(self, opts, train):
        return ClassificationPipeline(opts.inputRes.wh, train=train, flip=opts.flipAug)

    def missing_images(self):
        """None: the records were listed from the folders themselves (no second look at a
        million files)."""
        return []

    def _label_arrays(self, predictions):
        """predictions -> topk (M, k) int64, labels (M,) int64, indices (M,) int64."""
        if not predictions:
            raise DatasetError(f'ImageNet {self.split}: no predictions to evaluate ({self.split_dir})')
        indices = np.array([p['index'] for p in predictions], np.int64)
        topk = np.stack([np.asarray(p['label'], np.int64).reshape(-1) for p in predictions])
        labels = np.array([self.records[i]['label'] for i in indices], np.int64)
        return topk, labels, indices

    def evaluate_predictions(self, predictions):
        """predictions: [{'index', 'label' (k,) classes best first, 'scores' (k,)}] ->
        ({'Top-1': %, 'Top-5': %}, Top-1). With fewer than 5 classes, Top-5 counts all k."""
        from utils import metrics
        topk, labels, _ = self._label_arrays(predictions)
        table = {'Top-1': metrics.topk_accuracy(topk, labels, 1),
                 'Top-5': metrics.topk_accuracy(topk, labels, min(TOP_K, topk.shape[1]))}
        return table, table['Top-1']

    def save_all(self, predictions, out_dir):
        """``out_dir/predictions.csv``: image (relative to dataDir), label, pred1..predk, in record
        order. Returns its path."""
        topk, labels, indices = self._label_arrays(predictions)
        order = np.argsort(indices, kind='stable')

        def write(f):
            out = csv.writer(f, lineterminator='\n')
            out.writerow(['image', 'label'] + [f'pred{j + 1}' for j in range(topk.shape[1])])
            for i in order:
                rel = os.path.relpath(self.records[indices[i]]['image'], self.root).replace(os.sep, '/')
                out.writerow([rel, int(labels[i])] + [int(c) for c in topk[i]])
        return atomic_write(os.path.join(out_dir, 'predictions.csv'), write)


# ----------------------------------------------------------------------------- codec

@register_codec('classification')
class ClassificationCodec(Codec):
    """Class logits (N, C): cross-entropy for training, top-k classes and probabilities out."""

    def __init__(self, num_classes, topk=TOP_K):
        self.num_classes = int(num_classes)
        self.topk = int(topk)

    @classmethod
    def from_opts(cls, opts, model):
        return cls(opts.nClasses)

    def settings(self):
        return dict(target=self.target, num_classes=self.num_classes, topk=self.topk)

    def encode(self, sample):
        """No target beyond the sample's own ``label``."""
        return {}

    def loss(self, outputs, batch):
        """outputs: list whose last item is logits (B, C); batch['label'] (B,) int64."""
        return {'cross_entropy': F.cross_entropy(outputs[-1], batch['label'])}

    def accuracy(self, outputs, batch):
        """Top-1 of the batch, a fraction in [0, 1]."""
        pred = outputs[-1].detach().argmax(1)
        return float((pred == batch['label']).float().mean().item())

    def flip_back(self, output, flip_perm):
        """The logits of a mirrored image are the image's own (flip_perm is not used)."""
        return output

    def decode(self, outputs, batch):
        """Per image: {'index', 'label' (k,) int64 classes best first, 'scores' (k,) float32
        their softmax probabilities}, k = min(topk, num_classes)."""
        probs = torch.softmax(outputs[-1].detach().float(), dim=1)
        scores, labels = probs.topk(min(self.topk, self.num_classes), dim=1)
        index = batch['meta']['index']
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        return [dict(index=int(i), label=c, scores=s) for i, c, s in
                zip(index, labels.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32))]
