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


def canonical_name(name):
    """The registered spelling of a dataset name, matched case-insensitively ('mpii' -> 'MPII');
    an unknown name is a ConfigError with the closest registered one."""
    _import_all()
    if name in DATASETS:
        return name
    by_lower = {n.lower(): n for n in DATASETS}
    if str(name).lower() in by_lower:
        return by_lower[str(name).lower()]
    raise ConfigError(f'unknown dataset {name!r}{did_you_mean(name, DATASETS)} '
                      f'(available: {", ".join(sorted(DATASETS))})')


def reader_class(name):
    return DATASETS[canonical_name(name)]


def build_reader(opts, split, codec=None):
    """The dataset's reader for a split; one record per person, or, for a bottom-up codec
    (``codec.bottom_up``), one per image with all its people (readers that can: ``bottom_up``)."""
    cls = reader_class(opts.dataset)
    if split not in cls.splits:
        raise ConfigError(f'dataset {opts.dataset} has no {split} split here (it has {", ".join(cls.splits)})')
    if getattr(codec, 'bottom_up', False):
        if not getattr(cls, 'bottom_up', False):
            raise ConfigError(f'dataset {opts.dataset} has one record per person: it cannot train or test the '
                              f'bottom-up model {opts.model} (use COCO, or synthetic scenes exported as COCO)')
        return cls(opts, split, bottom_up=True)
    return cls(opts, split)


def build_dataset(opts, split, codec, reader=None):
    """-> PoseDataset for split 'train' or 'val': the reader's records through the pipeline (the
    codec's own for a bottom-up codec, else the reader's: the shared pose pipeline unless the
    dataset needs another) and the run's codec."""
    from datasets.base import PoseDataset
    reader = reader or build_reader(opts, split, codec)
    train = split == 'train'
    if getattr(codec, 'bottom_up', False):
        pipeline = codec.pipeline(opts, reader.joint_set, train)
    else:
        pipeline = reader.pipeline(opts, train)
    return PoseDataset(reader, pipeline, codec, seed=opts.seed)
