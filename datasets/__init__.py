"""Dataset registry.

A reader file registers its class with ``@register_dataset('Name')``; ``dataset = Name`` in a
.defconf (or ``--dataset Name``) selects it. ``build_dataset`` joins the reader with the shared
pipeline and the run's codec.
"""
import importlib
import pkgutil

import cv2

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
        if not info.name.startswith('_') and info.name not in ('base', 'pipeline', 'codecs', 'joints'):
            importlib.import_module(f'{__name__}.{info.name}')


def available():
    _import_all()
    return sorted(DATASETS)


def reader_class(name):
    _import_all()
    if name not in DATASETS:
        import difflib
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise SystemExit(f'error: unknown dataset {name!r}{hint}; available: {", ".join(sorted(DATASETS))}')
    return DATASETS[name]


def build_reader(opts, split):
    return reader_class(opts.dataset)(opts, split)


def build_dataset(opts, split, codec, reader=None):
    """-> PoseDataset for split 'train' or 'val'."""
    from datasets.base import PoseDataset
    from datasets.pipeline import Pipeline
    reader = reader or build_reader(opts, split)
    train = split == 'train'
    pipeline = Pipeline(opts.inputRes, reader.joint_set.flip_permutation(), train=train,
                        max_scale=opts.maxScale, max_rotate=opts.maxRotate,
                        max_translate=opts.maxTranslate, flip=opts.flipAug,
                        color_jitter=opts.colorJitter)
    return PoseDataset(reader, pipeline, codec, seed=opts.seed)
