"""Fused BatchNorm + ReLU for training on the CPU (models/csrc/bn_relu.cpp).

Eager PyTorch trains ``BatchNorm2d`` + ``ReLU`` as separate kernels (statistics, normalisation,
clamp; the ReLU mask, the batch-norm reductions, the input gradient), each a pass over the
activation with bfloat16 <-> float conversions, and a Python-side autograd node per pair would
cost as much again. These kernels compute the same function in one pass of statistics and one
of normalisation forward, two passes backward, with the autograd node in C++. They are built
once per machine, on first use, with the C++ compiler (``torch.utils.cpp_extension``, about
30 s, cached under ``TORCH_EXTENSIONS_DIR``), and used only where they compute what the modules
compute: a training-mode ``nn.BatchNorm2d`` (affine, running statistics, a momentum) followed
by a ReLU, on a channels-last bfloat16 CPU tensor (the ``--amp`` autocast) with a multiple of
16 channels. They compute float32 as well (the tests compare that with float64); on an AVX2 CPU
(no AVX-512) float32 trains through them too, the BatchNorm-ReLU pairs and the 2x2 max-poolings,
where their passes take 0.65-0.75x the time of PyTorch's float32 ones (isolated, warm) and the
quick start's float32 step runs 1.04x; on AVX-512 they were no faster than the modules, so
float32 training runs the modules there (``DTYPES``). On AVX2 the 3x3 convolutions' float32
weight and bias gradients come from a C++ kernel as well (``conv3x3_f32``: oneDNN's forward and
input gradient, ours for the weights, 1.1-1.5x oneDNN's on the hourglass's shapes, the
paper-shaped step 1.03-1.05x with every kernel). Everywhere else (evaluation, CUDA,
NCHW, SyncBatchNorm, ``--fusedBNReLU false``) the modules run as they are. Parameter names and
counts do not change: checkpoints load either way.

The same switch and build carry the hourglass family's other bfloat16 kernels: the residual sum
(``add``), the 2x2 max-pooling (``max_pool2``), the merge of an hourglass level's two branches
(``add_up2``), all bit for bit PyTorch's, and, on CPUs with AVX-512 BF16, the 1x1 and 3x3
convolutions (``conv``: autocast's function to the bfloat16 rounding, the weight and bias
gradients kept in float; oneDNN's per-call set-up dominated the small levels), and the residual
block's pre-activation branch (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1) as one autograd
node over those same kernels (``branch``: the layers' values bit for bit, without six layers'
Python calls, checks and graph nodes).

Where no compiler is found the build fails once, the reason is printed once, and the modules
run unfused.
"""
import hashlib
import os
import platform
import sys
import threading

import torch
import torch.nn as nn

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
# the kernels, and the caching CPU allocator that utils.cpu.cache_cpu_memory installs
_SOURCES = [os.path.join(_CSRC, 'bn_relu.cpp'), os.path.join(_CSRC, 'cpu_cache.cpp')]


def _dtypes():
    """The input dtypes that run fused: bfloat16 (autocast), where the quick-start step runs 1.1x
    the modules'; float32 too on an AVX2 CPU (no AVX-512), where the kernels' float32 passes take
    0.65-0.75x the time of PyTorch's (on AVX-512 they were no faster, so float32 runs the modules)."""
    try:
        avx2 = torch.backends.cpu.get_cpu_capability() == 'AVX2'
    except (AttributeError, RuntimeError):
        avx2 = False
    return (torch.bfloat16, torch.float32) if avx2 else (torch.bfloat16,)


DTYPES = _dtypes()
_CFLAGS = ['-O3', '-march=native', '-ffp-contract=off', '-fopenmp']
_state = {'enabled': True, 'loaded': None, 'error': None}
_lock = threading.Lock()


def set_enabled(flag):
    """Turn the fused kernels on or off for this process (the trainer's ``--fusedKernels``)."""
    _state['enabled'] = bool(flag)


def enabled():
    return _state['enabled']


def _build_name():
    """The extension's name: one build per CPU model and compiler flags (``-march=native`` code
    must not run on another machine sharing the cache, e.g. a cluster's home folder)."""
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        pass
    key = '|'.join([flags, platform.machine(), platform.processor(), torch.__version__, ' '.join(_CFLAGS)])
    return 'posefast_bn_relu_' + hashlib.sha1(key.encode()).hexdigest()[:12]


def load():
    """Build (once per machine) and load the kernels; True when ``torch.ops.posefast`` is usable.

    Never raises: a failed build is reported once on stderr and the caller falls back.
    """
    if _state['loaded'] is not None:
        return _state['loaded']
    with _lock:
        if _state['loaded'] is None:
            try:
                from torch.utils import cpp_extension
                name = _build_name()
                built = os.path.join(cpp_extension._get_build_directory(name, False), name + '.so')
                if not os.path.exists(built):
                    print('models.fused: building the C++ kernels of CPU training (once per machine, '
                          'about 30 s)', file=sys.stderr, flush=True)
                cpp_extension.load(name=name, sources=_SOURCES, is_python_module=False,
                                   extra_cflags=_CFLAGS, verbose=False)
                _state['loaded'] = hasattr(torch.ops.posefast, 'bn_relu_train')
            except Exception as e:  # no compiler, no ninja, a read-only cache: run unfused
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                first_error = next((ln for ln in lines if 'error' in ln.lower()), lines[-1] if lines else '')
                _state['loaded'], _state['error'] = False, f'{type(e).__name__}: {first_error}'
                print(f'models.fused: fused BatchNorm-ReLU kernels unavailable ({_state["error"]}); '
                      f'training runs the unfused modules', file=sys.stderr)
    return _state['loaded']


def loaded():
    """Whether the kernels are loaded in this process (without building or loading them)."""
    return _state['loaded'] is True


def error():
    """Why the kernels could not be built (None when they were, or were not tried)."""
    return _state['error']


def _bn_ok(bn):
    """The module side of ``can_fuse``: a training-mode affine ``nn.BatchNorm2d`` with running
    statistics and a momentum, float32 CPU parameters, a multiple of 16 channels up to 1024."""
    return (bn.training and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and bn.momentum is not None and bn.weight.dtype == torch.float32 and bn.weight.device.type == 'cpu'
            and bn.num_features % 16 == 0 and bn.num_features <= 1024)


def can_fuse(bn, x):
    """Whether the fused kernels compute exactly ``relu(bn(x))`` for this module and input."""
    return (_state['enabled'] and _bn_ok(bn) and x.device.type == 'cpu'
            and x.dim() == 4 and x.dtype in DTYPES and x.shape[1] == bn.num_features
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and x.is_contiguous(memory_format=torch.channels_last) and load())


def can_add(a, b):
    """Whether ``add`` computes ``a + b`` here: two bfloat16 CPU tensors of one shape and layout."""
    return (_state['enabled'] and a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
            and a.device.type == 'cpu' and b.device.type == 'cpu' and a.shape == b.shape
            and a.stride() == b.stride()
            and (a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last)) and load())


def add(a, b):
    """``a + b``; one pass of the C++ kernel for two bfloat16 CPU tensors of one layout (bit for
    bit PyTorch's sum: PyTorch's own bfloat16 addition ran at a third of the memory bandwidth)."""
    if can_add(a, b):
        return torch.ops.posefast.add(a, b)
    return a + b


def can_pool(x):
    """Whether ``max_pool2`` computes ``F.max_pool2d(x, 2, 2)`` here: bfloat16, channels-last, a
    multiple of 16 channels, an even height and width."""
    return (_state['enabled'] and x.dtype in DTYPES and x.device.type == 'cpu' and x.dim() == 4
            and x.shape[1] % 16 == 0 and x.shape[1] <= 1024 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last) and load())


def max_pool2(x):
    """``F.max_pool2d(x, 2, 2)`` through the C++ kernels (bit for bit PyTorch's values and
    gradients: no int64 indices written, the backward recomputes each window's winner)."""
    return torch.ops.posefast.max_pool2(x)


def can_add_up2(upper, lower):
    """Whether ``add_up2`` computes ``upper + F.interpolate(lower, scale_factor=2)`` here:
    channels-last bfloat16 CPU tensors with a multiple of 16 channels (up to 1024), the lower
    branch at half the upper's height and width."""
    return (_state['enabled'] and upper.dtype == torch.bfloat16 and lower.dtype == torch.bfloat16
            and upper.device.type == 'cpu' and lower.device.type == 'cpu' and upper.dim() == 4 and lower.dim() == 4
            and upper.shape[:2] == lower.shape[:2] and upper.shape[1] % 16 == 0 and upper.shape[1] <= 1024
            and upper.shape[2] == 2 * lower.shape[2] and upper.shape[3] == 2 * lower.shape[3] and lower.numel() > 0
            and upper.is_contiguous(memory_format=torch.channels_last)
            and lower.is_contiguous(memory_format=torch.channels_last) and load())


def add_up2(upper, lower):
    """The hourglass's merge ``upper + upsample_nearest(lower, 2)`` in one C++ pass (the same
    sums bit for bit; no upsampled tensor; backward, the lower gradient sums each 2x2 window)."""
    return torch.ops.posefast.add_up2(upper, lower)


def can_heatmap_mse(outputs, target, weight):
    """Whether ``heatmap_mse`` computes the heatmap codecs' loss of each of ``outputs`` here:
    float32 CPU (B, K, H, W) outputs of one shape and layout (channels-last or contiguous), a
    float32 target of that shape and (B, K) weights, neither of which needs a gradient."""
    if not (_state['enabled'] and outputs and torch.is_tensor(target) and torch.is_tensor(weight)):
        return False
    o = outputs[0]
    if not (o.dtype == torch.float32 and o.dim() == 4 and o.is_cpu and target.dtype == torch.float32
            and target.is_cpu and target.shape == o.shape and not target.requires_grad
            and weight.dtype == torch.float32 and weight.is_cpu and tuple(weight.shape) == tuple(o.shape[:2])
            and not weight.requires_grad
            and (o.is_contiguous(memory_format=torch.channels_last) or o.is_contiguous())):
        return False
    return all(torch.is_tensor(x) and x.shape == o.shape and x.stride() == o.stride() and x.dtype == o.dtype
               and x.is_cpu for x in outputs) and load()


def heatmap_mse(outputs, target, weight):
    """``[((o - target) ** 2 * weight[:, :, None, None]).mean() for o in outputs]`` for a
    ``can_heatmap_mse`` case, one C++ pass each way per output: the gradients autograd's of that
    expression bit for bit, the losses the same sums in another order (in double: within a few
    float roundings). The target is brought into the outputs' layout once."""
    o = outputs[0]
    if target.stride() != o.stride():
        target = torch.empty_like(o).copy_(target)      # empty_like keeps a dense tensor's strides
    weight = weight.contiguous()
    return [torch.ops.posefast.heatmap_mse(x, target, weight) for x in outputs]


def _conv_ok(conv):
    """The module side of ``can_conv``: a 1x1 or 3x3 convolution, stride 1, 'same' zero padding,
    no groups, a float32 CPU weight, multiples of 16 channels in and out (3x3: at least 32 in;
    with 16, oneDNN's kernels are faster)."""
    return _conv_shape_ok(conv) and conv.weight.dtype == torch.float32 and conv.weight.device.type == 'cpu'


def _conv_shape_ok(conv):
    """``_conv_ok`` but for the weight's dtype and device (what ``.to()`` changes)."""
    k = conv.kernel_size[0]
    return (conv.kernel_size in ((1, 1), (3, 3)) and conv.stride == (1, 1) and conv.padding == (k // 2, k // 2)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == 'zeros'
            and conv.in_channels % 16 == 0 and conv.out_channels % 16 == 0 and (k == 1 or conv.in_channels >= 32))


def can_conv(conv, x):
    """Whether ``conv`` computes what ``conv(x)`` computes under bfloat16 autocast (``_conv_ok``)
    for a channels-last bfloat16 CPU input, on a CPU with AVX-512 BF16."""
    return (_state['enabled'] and x.dtype == torch.bfloat16 and x.device.type == 'cpu' and x.dim() == 4
            and _conv_ok(conv) and x.shape[1] == conv.in_channels
            and torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last) and load()
            and _has_conv())


def _has_conv():
    if _state.get('conv') is None:
        _state['conv'] = hasattr(torch.ops.posefast, 'conv') and hasattr(torch.ops.posefast, 'branch')
    return _state['conv']


def conv(module, x):
    """``module(x)`` for a 1x1 or 3x3 ``nn.Conv2d`` under bfloat16 autocast, through the C++
    kernels: the weight and bias rounded to bfloat16 as autocast rounds them, the products summed
    in float; their gradients are the float sums (autocast's path rounds them to bfloat16)."""
    return torch.ops.posefast.conv(x, module.weight, module.bias)


def bn_relu(bn, x):
    """``relu(bn(x))`` for a training ``nn.BatchNorm2d`` on channels-last CPU tensors, fused."""
    bn.num_batches_tracked.add_(1)
    return torch.ops.posefast.bn_relu_train(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                            float(bn.momentum), float(bn.eps))


def _branch_key(layers):
    """The modules a branch's structure depends on: the Sequential's six, then each pair's two."""
    mods = tuple(layers._modules.values())
    if len(mods) != 6:
        return mods
    return mods + tuple(m for pair in mods[0::2] if isinstance(pair, nn.Module) for m in pair._modules.values())


def _find_branch(mods):
    """The three (BatchNorm2d, Conv) pairs of ``mods`` when they form the pre-activation
    bottleneck the kernels take, as far as its structure goes (types, kernel sizes, widths,
    biases' presence aside); None otherwise."""
    from models.layers import BNReLU, Conv
    if len(mods) < 6:
        return None
    pairs, channels = [], None
    for i, k in ((0, 1), (2, 3), (4, 1)):
        pair, conv = mods[i], mods[i + 1]
        if type(pair) is not BNReLU or len(pair) != 2 or type(pair[1]) is not nn.ReLU or type(conv) is not Conv:
            return None
        bn = pair[0]
        if not (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
                and bn.num_features % 16 == 0 and bn.num_features <= 1024 and conv.kernel_size == (k, k)
                and _conv_shape_ok(conv) and bn.num_features == conv.in_channels
                and (channels is None or channels == bn.num_features)):
            return None
        channels = conv.out_channels
        pairs.append((bn, conv))
    return pairs


def branch_args(layers, x):
    """The C++ branch's arguments ``(params, buffers, momentum, eps)`` when ``branch`` computes
    ``layers(x)`` here, else None: the pre-activation bottleneck's ``Sequential`` of three
    (``BNReLU``, ``Conv``) pairs (models.layers.Residual), 1x1, 3x3, 1x1, each pair one that
    ``can_fuse`` and ``can_conv`` take, with biases and one momentum and eps; training under
    bfloat16 autocast on a channels-last CPU input.

    The structure is checked once per ``Sequential`` and kept on it (checked again when one of
    its modules is replaced); what can change between calls (training mode, momenta, the
    parameters' presence, dtype and device, the input) is checked on every call: six layers'
    checks cost 45 us a call in Python, a quick-start step 17 calls.
    """
    if not (_state['enabled'] and x.dtype == torch.bfloat16 and x.dim() == 4):
        return None
    key = _branch_key(layers)
    cached = layers.__dict__.get('_posefast_branch')
    if cached is None or cached[0] != key:
        cached = (key, _find_branch(key))
        layers.__dict__['_posefast_branch'] = cached
    pairs = cached[1]
    if pairs is None:
        return None
    bn0 = pairs[0][0]
    momentum, eps = bn0.momentum, bn0.eps
    if momentum is None or x.shape[1] != bn0.num_features:
        return None
    params, buffers = [], []
    for bn, conv in pairs:
        if not (bn.training and bn.momentum == momentum and bn.eps == eps):
            return None
        bp, cp, bb = bn._parameters, conv._parameters, bn._buffers
        group = [bp['weight'], bp['bias'], cp['weight'], cp['bias']]
        for t in group:
            if t is None or t.dtype != torch.float32 or not t.is_cpu:
                return None
        params += group
        buffers += [bb['running_mean'], bb['running_var'], bb['num_batches_tracked']]
    if not (x.is_cpu and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
            and x.is_contiguous(memory_format=torch.channels_last) and load() and _has_conv()):
        return None
    return params, buffers, float(momentum), float(eps)


def can_branch(layers, x):
    """Whether ``branch`` computes ``layers(x)`` here (``branch_args``)."""
    return branch_args(layers, x) is not None


def branch(layers, x, args=None):
    """``layers(x)`` for a ``can_branch`` branch: one C++ autograd node running the six layers'
    kernels in their order (the same values, gradients and running statistics bit for bit).
    ``args``: ``branch_args(layers, x)`` where the caller has it."""
    params, buffers, momentum, eps = branch_args(layers, x) if args is None else args
    return torch.ops.posefast.branch(x, params, buffers, momentum, eps)


# ----------------------------------------------------------------------------- float32 3x3 convolutions on AVX2

def can_conv3x3_f32(conv, x):
    """Whether ``conv3x3_f32`` trains ``conv(x)`` here: a 3x3 convolution (stride 1, 'same' zero
    padding, no groups, at least 16 and a multiple of 16 input channels, a float32 CPU weight) on a
    channels-last float32 CPU input that needs gradients, outside autocast, on an AVX2 CPU, where
    float32 runs the kernels (``DTYPES``)."""
    return (_state['enabled'] and x.dtype == torch.float32 and torch.float32 in DTYPES and x.device.type == 'cpu'
            and x.dim() == 4 and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == 'zeros'
            and conv.in_channels % 16 == 0 and x.shape[1] == conv.in_channels and x.numel() > 0
            and conv.weight.dtype == torch.float32 and conv.weight.device.type == 'cpu'
            and torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
            and not torch.is_autocast_enabled('cpu')
            and x.is_contiguous(memory_format=torch.channels_last) and load() and _has_weight_grad())


def _has_weight_grad():
    if _state.get('weight_grad') is None:
        _state['weight_grad'] = hasattr(torch.ops.posefast, 'conv_weight_grad')
    return _state['weight_grad']


class _Conv3x3F32(torch.autograd.Function):
    """oneDNN's forward and input gradient; the weight and bias gradients from the C++ kernel
    (AVX2: oneDNN's float32 3x3 weight gradient ran at about 0.65x its forward rate, ours
    1.1-1.5x oneDNN's on the hourglass's shapes; the same sums in another order)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, padding=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = torch.ops.posefast.conv_weight_grad(grad, x, 3)
            if not weight.is_contiguous(memory_format=torch.channels_last):
                dw = dw.contiguous()
        return dx, dw, db if ctx.has_bias else None


def conv3x3_f32(conv, x):
    """``conv(x)`` for a ``can_conv3x3_f32`` case: the same function, its weight gradient from the
    C++ kernel."""
    return _Conv3x3F32.apply(x, conv.weight, conv.bias)
