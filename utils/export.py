"""ONNX export of a model's network, and an onnxruntime runner that takes the network's place in a
``utils.predictor.Predictor``.

Only the network goes into the ONNX graph: one input ``input`` (N, 3, H, W), float32, normalised as
the pipeline normalises crops, with a dynamic batch size N (and, for bottom-up models, whose test
images are whole images of any size, dynamic H and W); one output per element of the model's output
list, named ``output0``, ``output1``, ... (intermediate supervision stacks included, the last one is
the prediction, as in PyTorch). The decoding stays in Python: ``OnnxModel`` returns the outputs as
tensors, so the codec that decodes the PyTorch model's outputs (flip test, quarter-pixel / DARK,
grouping) decodes them unchanged, and ``Predictor(OnnxModel(path), codec, ...)`` gives the same
people as the PyTorch model.

    python main.py -export model.onnx --loadModel exp/<id>/model_best.pth

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): it
needs the ``onnx`` package only (the torch.export-based exporter also needs ``onnxscript``, takes
about ten times as long here -- 22 s instead of 1.5 for a tiny HRNet -- and cannot convert
PyraNet's fractional max-pooling either). It traces the model, so a few constructs are given
exact, export-only equivalents while exporting (see
``_exportable``): PyraNet's fractional max-pooling with its fixed evaluation offsets (a gather of
the same 2x2 windows and a max), ChainedPredictions' deconvolution kernel summed from three
(computed once, a constant), and sizes that the tracer returns as tensors where ONNX needs
constants (adaptive pooling output sizes, ``round()`` of a size, a pooling kernel the size of its
input) -- constants at the exported input size, which is fixed for every top-down model.

The file records what rebuilds a predictor without the checkpoint (``metadata_props``): the
model's target, stride(s), registry name and input size, the checkpoint's options and its meta
(joint set, codec settings); ``onnx_predictor(path)`` reads them.
"""
import builtins
import contextlib
import io
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import CheckpointError, ConfigError

OPSET = 17
INPUT_NAME = 'input'
META_PREFIX = 'posekit.'
# targets whose test inputs are whole images of any size: exported with dynamic height and width
DYNAMIC_SIZE_TARGETS = ('associative_embedding',)


def _need(module, what):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f'{what} needs the {module} package: pip install onnx onnxruntime') from None


def output_names(count):
    return [f'output{i}' for i in range(count)]


# ----------------------------------------------------------------------------- export-only equivalents

def _fractional_intervals(sample, input_size, output_size, pool_size, dtype):
    """The window starts of PyTorch's fractional max-pooling for one axis (ATen's
    ``generate_intervals``, in the input's floating type, truncated to int as it does)."""
    t = np.dtype(dtype).type
    starts = np.zeros(output_size, np.int64)
    if output_size > 1:
        alpha = t(input_size - pool_size) / t(output_size - 1)
        for i in range(output_size - 1):
            starts[i] = int(t(t(i) + t(sample)) * alpha) - int(t(sample) * alpha)
    starts[output_size - 1] = input_size - pool_size
    return starts


def _fixed_fractional_max_pool(module, x):
    """PyraNet's ``FractionalMaxPool2d`` in eval mode (offsets fixed at ``eval_sample``) as a gather
    of the same 2x2 windows and a max: the values of ``F.fractional_max_pool2d``, exactly."""
    h, w = (int(s) for s in x.shape[-2:])
    if h < 2 or w < 2:
        return x
    out_h, out_w = max(1, int(h * module.ratio)), max(1, int(w * module.ratio))
    dtype = torch.empty((), dtype=x.dtype).numpy().dtype
    rows = torch.as_tensor(_fractional_intervals(module.eval_sample, h, out_h, 2, dtype), device=x.device)
    cols = torch.as_tensor(_fractional_intervals(module.eval_sample, w, out_w, 2, dtype), device=x.device)
    y = torch.maximum(x.index_select(-2, rows), x.index_select(-2, rows + 1))
    return torch.maximum(y.index_select(-1, cols), y.index_select(-1, cols + 1))


def _module_adapters():
    """{module class: function(module, static) -> export-time forward or None (keep the module's
    own)}; static: the export's input size is fixed."""
    from models.chained import MultiScaleUp
    from models.pyranet import FractionalMaxPool2d

    def fractional(module, static):
        if module.training or not static:    # random offsets, or windows that follow the input size
            return None
        return lambda x: _fixed_fractional_max_pool(module, x)

    def multiscale(module, static):
        kernel = module.kernel().detach()    # the summed 6x6 kernel, a constant of the graph
        return lambda x: module.relu(module.bn(F.conv_transpose2d(x, kernel, stride=2, padding=2)))

    return {FractionalMaxPool2d: fractional, MultiScaleUp: multiscale}


def _int_size(size):
    """A size the tracer returns as 0-dim tensors -> plain ints (the export's fixed input size)."""
    if isinstance(size, torch.Tensor):
        return int(size)
    if isinstance(size, (tuple, list)):
        return tuple(int(s) if isinstance(s, torch.Tensor) else s for s in size)
    return size


@contextlib.contextmanager
def _static_sizes():
    """While tracing at a fixed input size: the sizes read off tensors are constants where ONNX
    needs constants (adaptive pooling output sizes, pooling kernels, ``round()`` of a size)."""
    saved = {name: getattr(F, name) for name in ('adaptive_avg_pool2d', 'adaptive_max_pool2d', 'avg_pool2d', 'max_pool2d')}

    def adaptive(fn, average):
        def wrapped(x, output_size, *a, **k):
            size = _int_size(output_size)
            size = (size, size) if isinstance(size, int) else size
            (h, w), out = (int(s) for s in x.shape[-2:]), tuple(size)
            if average and None not in out and h % out[0] == 0 and w % out[1] == 0 and not a and not k:
                # the same windows as a fixed average pooling: ONNX's AvgPool needs no input shape
                return saved['avg_pool2d'](x, (h // out[0], w // out[1]))
            return fn(x, out, *a, **k)
        return wrapped

    def pool(fn):
        def wrapped(x, kernel_size, stride=None, *a, **k):
            return fn(x, _int_size(kernel_size), _int_size(stride) if stride is not None else None, *a, **k)
        return wrapped

    had_round = '__round__' in vars(torch.Tensor)
    try:
        F.adaptive_avg_pool2d = adaptive(saved['adaptive_avg_pool2d'], True)
        F.adaptive_max_pool2d = adaptive(saved['adaptive_max_pool2d'], False)
        F.avg_pool2d = pool(saved['avg_pool2d'])
        F.max_pool2d = pool(saved['max_pool2d'])
        if not had_round:
            torch.Tensor.__round__ = lambda self, ndigits=None: (int(torch.round(self)) if ndigits is None
                                                                 else builtins.round(float(self), ndigits))
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
        if not had_round and '__round__' in vars(torch.Tensor):
            del torch.Tensor.__round__


@contextlib.contextmanager
def _quiet():
    """No warnings, prints or graph dumps from the exporter (torch 2.13's TorchScript exporter
    leaves its C++ log on and dumps the whole graph to stderr when a node fails)."""
    log = torch._C._jit_onnx_log
    try:
        torch._C._jit_onnx_log = lambda *args: None
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter('ignore')
            yield
    finally:
        torch._C._jit_onnx_log = log


@contextlib.contextmanager
def _exportable(model, static):
    """The model with its export-only equivalents in place (instance forwards, restored after)."""
    adapters = _module_adapters()
    replaced = []
    try:
        for module in model.modules():
            make = adapters.get(type(module))
            forward = make(module, static) if make else None
            if forward is not None:
                replaced.append((module, 'forward' in vars(module), vars(module).get('forward')))
                module.forward = forward
        with (_static_sizes() if static else contextlib.nullcontext()):
            yield model
    finally:
        for module, had, old in replaced:
            if had:
                module.forward = old
            else:
                del module.forward


# ----------------------------------------------------------------------------- export

def _first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ''
    return f'{type(exc).__name__}: {text[:240]}'


def export_onnx(model, path, input_size, opset=OPSET, dynamic_size=None, metadata=None):
    """Write ``model``'s network in eval mode as an ONNX graph at ``path`` (atomically).

    input_size: (H, W) of the traced input; the batch size is dynamic, and so are H and W when
    ``dynamic_size`` (default: for bottom-up models, whose inputs are whole images). Outputs are
    ``output0``, ``output1``, ... one per element of the model's output list. metadata: extra
    {key: value} recorded in the file's metadata_props (values as json). The model's train/eval
    mode is restored afterwards. A model the exporter cannot export is a ConfigError of one line.
    Returns ``path``.
    """
    return _export(model, path, input_size, opset, dynamic_size, metadata)[0]


def _export(model, path, input_size, opset=OPSET, dynamic_size=None, metadata=None):
    onnx = _need('onnx', 'ONNX export')
    from utils.io import atomic_write
    name = getattr(model, 'registry_name', type(model).__name__)
    h, w = (int(v) for v in input_size)
    target = getattr(model, 'target', None)
    if dynamic_size is None:
        dynamic_size = target in DYNAMIC_SIZE_TARGETS
    first = next(model.parameters(), None)
    # batch 2: a traced batch of 1 could let the exporter fold the batch dimension away
    dummy = torch.zeros(2, 3, h, w, device=first.device if first is not None else 'cpu')
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            count = len(model(dummy))
        names = output_names(count)
        axes = {0: 'batch', 2: 'height', 3: 'width'} if dynamic_size else {0: 'batch'}
        dynamic_axes = {INPUT_NAME: axes, **{n: {0: 'batch'} for n in names}}
        buffer = io.BytesIO()
        with _quiet(), _exportable(model, static=not dynamic_size):
            torch.onnx.export(model, (dummy,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- the exporter's errors are of many types
        raise ConfigError(f'{name} cannot be exported to ONNX (opset {opset}): {_first_line(e)}') from None
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    meta = dict(model=name, target=target, stride=getattr(model, 'stride', None),
                strides=list(getattr(model, 'strides', ())) or None, input_size=[h, w], dynamic_size=bool(dynamic_size),
                outputs=count)
    meta.update(metadata or {})
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value)
    proto.producer_name = 'posekit'
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return atomic_write(path, lambda f: f.write(data), binary=True), names, bool(dynamic_size)


def run_export(opts, ckpt):
    """``python main.py -export FILE.onnx --loadModel CKPT``: the checkpoint's network at its input
    size. ``opts`` are the resolved options (the checkpoint's, as ``main.resolve`` makes them).
    Prints one line with the path; returns the path."""
    from models import build_model
    from utils import checkpoint
    from utils.predictor import options_namespace
    if ckpt is None:
        raise ConfigError('-export needs --loadModel PATH (the checkpoint to export)')
    path = opts.export
    if os.path.isdir(path):
        raise ConfigError(f'-export {path}: a folder; give the .onnx file to write')
    model = build_model(options_namespace(opts, pretrained=None))
    checkpoint.check_compatible(ckpt, model, opts.loadModel)
    checkpoint.load_weights(model, ckpt['state_dict'], opts.loadModel)
    h, w = opts.inputRes
    extra = dict(checkpoint=os.path.abspath(opts.loadModel), config=checkpoint.config_defaults(ckpt),
                 meta=ckpt.get('meta'))
    _, names, dynamic = _export(model, path, (h, w), metadata=extra)
    size = f'N x 3 x H x W (all dynamic; traced at {h}x{w})' if dynamic else f'N x 3 x {h} x {w} (N dynamic)'
    print(f'exported {opts.model} to {path} (ONNX opset {OPSET}, input {size}, outputs {", ".join(names)})')
    return path


def read_metadata(path):
    """{key: value} that ``export_onnx`` recorded in the file (without the prefix)."""
    onnx = _need('onnx', 'reading an ONNX file')
    proto = onnx.load(path, load_external_data=False)
    return {p.key[len(META_PREFIX):]: json.loads(p.value) for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


# ----------------------------------------------------------------------------- running

class OnnxModel:
    """An exported network run by onnxruntime, usable where a Predictor takes a model.

    ``model(images)`` -> list of float32 tensors (one per ONNX output, in order) on the device the
    model was moved to with ``.to()``; the images are read as a float32 NCHW array (channels-last
    inputs are made contiguous). target / stride(s) default to what the file recorded.
    ``providers``: onnxruntime execution providers (default the CPU's); ``threads``: its intra-op
    threads (default torch.get_num_threads()). ``to``, ``eval`` and ``train`` exist for the
    Predictor's sake: the graph is always the eval-mode network.
    """

    def __init__(self, path, target=None, stride=None, strides=None, providers=None, threads=None):
        ort = _need('onnxruntime', 'running an ONNX model')
        if not os.path.isfile(path):
            raise ConfigError(f'{path}: no such ONNX file')
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, options, providers=providers or ['CPUExecutionProvider'])
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own exception types
            raise ConfigError(f'{path}: not a readable ONNX model ({_first_line(e)})') from None
        meta = {k[len(META_PREFIX):]: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k.startswith(META_PREFIX)}
        self.path = path
        self.metadata = meta
        self.registry_name = meta.get('model')
        self.target = target or meta.get('target')
        self.stride = stride if stride is not None else meta.get('stride')
        recorded = strides if strides is not None else meta.get('strides')
        if recorded:
            self.strides = tuple(recorded)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)           # ('batch', 3, H, W): ints where fixed
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = torch.device('cpu')
        self.training = False

    def to(self, device=None, *args, **kwargs):
        if isinstance(device, (str, torch.device)):
            self.device = torch.device(device)
        return self

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def parameters(self):
        return iter(())

    def __call__(self, images):
        x = images.detach().to('cpu', torch.float32).contiguous()
        fixed = [(i, s) for i, s in enumerate(self.input_shape) if isinstance(s, int)]
        if x.dim() != 4 or any(x.shape[i] != s for i, s in fixed):
            want = ' x '.join(str(s) if isinstance(s, int) else 'N' if i == 0 else str(s) for i, s in enumerate(self.input_shape))
            raise ConfigError(f'{self.path} takes inputs of {want}, got {" x ".join(map(str, x.shape))}')
        outs = self.session.run(self.output_names, {self.input_name: x.numpy()})
        return [torch.from_numpy(o).to(self.device) for o in outs]

    forward = __call__

    def __repr__(self):
        return f'OnnxModel({self.path!r}, target={self.target!r}, outputs={len(self.output_names)})'


def onnx_predictor(path, device='cpu', threads=None, providers=None, **kwargs):
    """A Predictor on an ONNX file that ``run_export`` wrote, as ``Predictor.from_checkpoint`` on
    its checkpoint: the codec from the checkpoint's options recorded in the file, the joint set
    from its meta. kwargs: flip_test (default: the checkpoint's --flipTest). amp is off:
    onnxruntime runs the float32 graph."""
    import opts as options
    from datasets.codecs import build_codec, codec_from_settings
    from utils import checkpoint
    from utils.predictor import Predictor
    model = OnnxModel(path, threads=threads, providers=providers)
    config, meta = model.metadata.get('config'), model.metadata.get('meta') or {}
    if config:
        opts = options.parse([], defaults=config)
        codec = build_codec(opts, model)
        kwargs.setdefault('flip_test', opts.flipTest)
    elif meta.get('codec'):
        codec = codec_from_settings(meta['codec'])
    else:
        raise CheckpointError(f'{path}: records neither options nor codec settings (write it with python main.py '
                              f'-export FILE --loadModel CKPT, or build Predictor(OnnxModel(path), codec) yourself)')
    kwargs['amp'] = False
    kwargs.setdefault('channels_last', False)
    return Predictor(model, codec, device=device, joint_set=checkpoint.joint_set_of({'meta': meta}), **kwargs)
