"""Dataset registry.

A reader file registers its class with ``@register_dataset('Name')``; ``dataset = Name`` in a
.defconf (or ``--dataset Name``) selects it. ``build_dataset`` joins the reader with the shared
pipeline and the run's codec. The shared modules (base, pipeline, codecs, joints, formats) are
not readers.
"""
import importlib
import pkgutil

import cv2

from utils.errors import ConfigError, did_you_mean

# OpenCV single-threaded in every process: parallelism comes from the loader workers, and a
# thread pool that OpenCV created in the main process (drawing, an evaluation crop) would be
# inherited half-alive by the next forked loader worker and deadlock it.
cv2.setNumThreads(1)

DATASETS = {}


def register_dataset(name):
    def wrap(cls):
        if name in DATASETS:
            raise ValueError(f'dataset {name!r} registered twice')
        cls.registry_name = name
        DATASETS[name] = cls
        return cls
    return wrap


def _import_all():
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith('_') and info.name not in ('base', 'pipeline', 'codecs', 'joints', 'formats'):
            importlib.import_module(f'{__name__}.{info.name}')


def available():
    _import_all()
    return sorted(DATASETS)


def reader_class(name):
    _import_all()
    if name not in DATASETS:
        raise ConfigError(f'unknown dataset {name!r}{did_you_mean(name, DATASETS)} '
                          f'(available: {", ".join(sorted(DATASETS))})')
    return DATASETS[name]


def build_reader(opts, split):
    return reader_class(opts.dataset)(opts, split)


def build_dataset(opts, split, codec, reader=None):
    """-> PoseDataset for split 'train' or 'val': the reader's records through the reader's
    pipeline (``Reader.pipeline``: the shared pose pipeline unless the dataset needs another) and
    the run's codec."""
    from datasets.base import PoseDataset
    reader = reader or build_reader(opts, split)
    return PoseDataset(reader, reader.pipeline(opts, split == 'train'), codec, seed=opts.seed)
