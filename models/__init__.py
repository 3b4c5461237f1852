"""Model registry.

A model file registers its class with ``@register_model('Name')``; ``model = Name`` in a
.defconf (or ``--model Name``) selects it. Every registered class

* subclasses ``torch.nn.Module`` and returns a **list** of outputs from ``forward`` (one per
  stack or stage; intermediate supervision puts a loss on each, the last one is the prediction);
* declares ``target``, the name of the codec that trains and decodes it (``datasets.codecs``):
  ``'heatmap'`` (outputs are (N, K, H/stride, W/stride)) or ``'coords'`` (outputs are (N, K, 2)
  normalised coordinates);
* declares ``stride`` -- input pixels per output pixel (heatmap models);
* builds itself from the parsed options with the classmethod ``from_opts(opts)``.

``build_model`` records which options ``from_opts`` read: those that define the layout become
the model's ``arch`` (checked when a checkpoint is loaded); nothing else has to be declared.
"""
import importlib
import pkgutil

import torch.nn as nn

from utils.errors import ConfigError, did_you_mean

MODELS = {}
# Options a model may read that do not change its parameters: not part of its ``arch``.
NOT_ARCH = ('pretrained', 'inputRes', 'outputRes')
# The older framework's spelling of a model's target (--TargetType) -> codec name.
TARGET_TYPES = {'heatmap': 'heatmap', 'direct': 'coords'}


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


def canonical_name(name):
    """The registered spelling of a model name, matched case-insensitively ('hrnet' -> 'HRNet');
    an unknown name is a ConfigError with the closest registered one."""
    _import_all()
    if name in MODELS:
        return name
    by_lower = {n.lower(): n for n in MODELS}
    if str(name).lower() in by_lower:
        return by_lower[str(name).lower()]
    raise ConfigError(f'unknown model {name!r}{did_you_mean(name, MODELS)} (available: {", ".join(sorted(MODELS))})')


def model_class(name):
    return MODELS[canonical_name(name)]


class _Recorder:
    """Passes attribute reads through to ``opts`` and remembers their names."""

    def __init__(self, opts):
        object.__setattr__(self, '_opts', opts)
        object.__setattr__(self, 'read', [])

    def __getattr__(self, name):
        value = getattr(self._opts, name)
        if name not in self.read:
            self.read.append(name)
        return value


def build_model(opts) -> nn.Module:
    """The registered model ``opts.model``, built by its ``from_opts``.

    Sets ``model.arch``: {option: value} of the options ``from_opts`` read that define the
    layout (``model`` and ``nJoints`` first). Checks --TargetType against the model's target and,
    for heatmap models, that outputRes x stride == inputRes.
    """
    cls = model_class(opts.model)
    wanted = getattr(opts, 'TargetType', None)
    if wanted and TARGET_TYPES[wanted] != cls.target:
        raise ConfigError(f'--TargetType {wanted} does not fit {opts.model}, which predicts {cls.target} '
                          f'(the model decides what it predicts; drop TargetType)')
    recorder = _Recorder(opts)
    model = cls.from_opts(recorder)
    keys = ['model', 'nJoints'] + [k for k in recorder.read if k not in NOT_ARCH and k not in ('model', 'nJoints')]
    model.arch = {k: getattr(opts, k) for k in keys}
    model.arch['model'] = canonical_name(opts.model)
    check_output_size(model, opts)
    check_input_size(cls, opts)
    return model


def check_input_size(cls, opts):
    """The model runs at --inputRes: a forward pass of the same model built on the meta device (no
    memory, no arithmetic), so an input too small for its downsamplings is refused before any
    work starts instead of crashing in the first batch."""
    import torch
    h, w = opts.inputRes
    try:
        with torch.device('meta'):
            probe = cls.from_opts(_Probe(opts)).eval()
            with torch.no_grad():
                out = probe(torch.empty(2, 3, h, w))
    except ConfigError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f'--inputRes {opts.inputRes} is too small for {opts.model} with these options '
                          f'({first[:160]})') from None
    if cls.target in ('heatmap', 'associative_embedding'):
        expect = (h // int(getattr(cls, 'strides', (cls.stride,))[0]), w // int(getattr(cls, 'strides', (cls.stride,))[0]))
        if cls.target == 'heatmap':
            expect = tuple(opts.outputRes)
        got = tuple(out[0].shape[-2:]) if cls.target == 'associative_embedding' else tuple(out[-1].shape[-2:])
        if got != expect:
            raise ConfigError(f'--inputRes {opts.inputRes}: {opts.model} makes {got[0]}x{got[1]} heatmaps at this input, '
                              f'not {expect[0]}x{expect[1]} (its input must be divisible by its downsampling)')


class _Probe:
    """The options with --pretrained off (a meta-device model loads no weights)."""

    def __init__(self, opts):
        self._opts = opts

    def __getattr__(self, name):
        return None if name == 'pretrained' else getattr(self._opts, name)


def check_output_size(model, opts):
    """A heatmap model makes outputs at 1/stride of its input: outputRes must be inputRes / stride."""
    if model.target != 'heatmap':
        return
    stride = model.stride
    (ih, iw), (oh, ow) = opts.inputRes, opts.outputRes
    if oh * stride != ih or ow * stride != iw:
        expected = f'{ih / stride:g}' if ih == iw else f'{ih / stride:g}x{iw / stride:g}'
        raise ConfigError(f'--inputRes {opts.inputRes} / --outputRes {opts.outputRes} does not match the output '
                          f'stride {stride:g} of {opts.model}: outputRes must be inputRes/{stride:g} = {expected}')


def count_parameters(model):
    """Number of parameters of ``model`` (every one of them; -summary and the README count these)."""
    return sum(p.numel() for p in model.parameters())
