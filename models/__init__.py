"""Model registry.

A model file registers its class with ``@register_model('Name')``; ``model = Name`` in a
.defconf (or ``--model Name``) selects it. Every registered class

* subclasses ``torch.nn.Module`` and returns a **list** of outputs from ``forward`` (one per
  stack or stage; intermediate supervision puts a loss on each, the last one is the prediction);
* declares ``target`` -- ``'heatmap'`` (outputs are (N, K, H/stride, W/stride)) or ``'coords'``
  (outputs are (N, K, 2) normalised coordinates, see ``datasets.codecs.CoordinateCodec``);
* declares ``stride`` -- input pixels per output pixel (heatmap models);
* builds itself from the parsed options with the classmethod ``from_opts(opts)``.
"""
import importlib
import pkgutil

import torch.nn as nn

MODELS = {}


def register_model(name):
    def wrap(cls):
        if name in MODELS:
            raise ValueError(f'model {name!r} registered twice')
        for attr in ('target', 'from_opts'):
            if not hasattr(cls, attr):
                raise TypeError(f'model {name!r} must define {attr!r}')
        cls.registry_name = name
        MODELS[name] = cls
        return cls
    return wrap


def _import_all():
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith('_'):
            importlib.import_module(f'{__name__}.{info.name}')


def available():
    _import_all()
    return sorted(MODELS)


def build_model(opts) -> nn.Module:
    _import_all()
    if opts.model not in MODELS:
        import difflib
        close = difflib.get_close_matches(opts.model, MODELS, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise SystemExit(f'error: unknown model {opts.model!r}{hint}; available: {", ".join(sorted(MODELS))}')
    return MODELS[opts.model].from_opts(opts)
