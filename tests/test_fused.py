"""The fused BatchNorm-ReLU kernels (models/fused.py, models/csrc/bn_relu.cpp) and the CPU
allocator setting (utils/cpu.py): the same function as the modules, where they apply."""
import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import fused
from models.layers import BNReLU, Conv, ConvBNReLU, MaxPool2, Residual
from models.hourglass import StackedHourglass
from utils.cpu import keep_freed_memory

needs_kernels = pytest.mark.skipif(not fused.load(), reason=f'fused kernels not built here: {fused.error()}')


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def random_bn(channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(channels, generator=g) - 0.5)
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def run(fn, bn, x, grad):
    x = x.clone().requires_grad_()
    y = fn(bn, x)
    y.backward(grad)
    return y, x.grad, bn.weight.grad, bn.bias.grad


@needs_kernels
@pytest.mark.parametrize('shape', [(4, 16, 9, 7), (2, 48, 8, 8), (3, 32, 1, 1)])
def test_matches_float64_reference(shape):
    torch.manual_seed(0)
    # an offset mean: the one-pass statistics must not cancel
    x = channels_last(torch.randn(*shape) * 3 + 20)
    grad = channels_last(torch.randn(*shape))
    bn = random_bn(shape[1])
    ref_bn = copy.deepcopy(bn).double()
    y, dx, dw, db = run(fused.bn_relu, bn, x, grad)
    ry, rdx, rdw, rdb = run(lambda m, t: F.relu(m(t)), ref_bn, x.double(), grad.double())
    for ours, ref in ((y, ry), (dx, rdx), (dw, rdw), (db, rdb), (bn.running_mean, ref_bn.running_mean),
                      (bn.running_var, ref_bn.running_var)):
        scale = ref.abs().max().item() + 1e-6
        assert (ours.double() - ref).abs().max().item() <= 2e-5 * scale
    assert int(bn.num_batches_tracked) == 1 == int(ref_bn.num_batches_tracked)
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    assert (y >= 0).all() and (y == 0).any()


@needs_kernels
def test_bfloat16_matches_the_modules_to_bfloat16_rounding():
    torch.manual_seed(1)
    x = channels_last(torch.randn(4, 32, 8, 8)).bfloat16()
    grad = channels_last(torch.randn(4, 32, 8, 8)).bfloat16()
    bn = random_bn(32)
    native = copy.deepcopy(bn)
    y, dx, dw, db = run(fused.bn_relu, bn, x, grad)
    ny, ndx, ndw, ndb = run(lambda m, t: F.relu(m(t)), native, x, grad)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    # outputs within one bfloat16 rounding step of the modules' (8 bits of mantissa)
    assert ((y.float() - ny.float()).abs() <= ny.float().abs() / 128 + 1e-2).all()
    assert ((dx.float() - ndx.float()).abs() <= ndx.float().abs().max() / 64).all()
    assert torch.allclose(dw, ndw, rtol=1e-3, atol=1e-3) and torch.allclose(db, ndb, rtol=1e-3, atol=1e-3)
    assert torch.allclose(bn.running_var, native.running_var, rtol=1e-5)


@needs_kernels
def test_float32_runs_fused_only_on_an_avx2_cpu(monkeypatch):
    """bfloat16 always; float32 where ATen dispatches to AVX2 (no AVX-512), where the kernels beat
    PyTorch's float32 passes; on AVX-512 float32 runs the modules."""
    avx2 = torch.backends.cpu.get_cpu_capability() == 'AVX2'
    assert fused.DTYPES == ((torch.bfloat16, torch.float32) if avx2 else (torch.bfloat16,))
    bn = random_bn(16).train()
    x = channels_last(torch.randn(2, 16, 4, 4))
    assert fused.can_fuse(bn, x) == avx2 and fused.can_fuse(bn, x.bfloat16())
    assert fused.can_pool(x) == avx2
    for capability, expected in (('AVX2', (torch.bfloat16, torch.float32)), ('AVX512', (torch.bfloat16,)),
                                 ('DEFAULT', (torch.bfloat16,))):
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda c=capability: c)
        assert fused._dtypes() == expected


@needs_kernels
def test_deterministic_bit_for_bit():
    x = channels_last(torch.randn(8, 64, 16, 16))
    grad = channels_last(torch.randn(8, 64, 16, 16))
    a = run(fused.bn_relu, random_bn(64), x, grad)
    b = run(fused.bn_relu, random_bn(64), x, grad)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@needs_kernels
def test_modules_use_the_kernels_only_where_they_apply(monkeypatch):
    monkeypatch.setattr(fused, 'DTYPES', (torch.float32,))
    calls = []
    real = fused.bn_relu
    monkeypatch.setattr(fused, 'bn_relu', lambda bn, x: calls.append(tuple(x.shape)) or real(bn, x))
    block = BNReLU(16)
    assert [k for k, _ in block.state_dict().items()] == [
        '0.weight', '0.bias', '0.running_mean', '0.running_var', '0.num_batches_tracked']
    x = torch.randn(2, 16, 4, 4)
    block(channels_last(x))
    assert calls == [(2, 16, 4, 4)]
    block(x)                                   # NCHW: the modules
    block.eval()(channels_last(x))             # evaluation: the modules
    BNReLU(8).train()(channels_last(torch.randn(2, 8, 4, 4)))    # 8 channels: not a multiple of 16
    fused.set_enabled(False)
    try:
        BNReLU(16).train()(channels_last(x))   # --fusedBNReLU false
    finally:
        fused.set_enabled(True)
    assert calls == [(2, 16, 4, 4)]
    conv = ConvBNReLU(3, 16, 3)
    assert list(conv.state_dict())[:2] == ['0.weight', '0.bias']
    conv(channels_last(torch.randn(2, 3, 8, 8)))
    assert calls[-1] == (2, 16, 8, 8)


@needs_kernels
def test_hourglass_training_step_matches_float64(monkeypatch):
    """A float32 training step of a small hourglass through the fused kernels against the same
    network in float64 (the modules): the loss, every gradient and the running statistics."""
    torch.manual_seed(0)
    net = StackedHourglass(num_joints=16, num_stacks=2, channels=32, num_reductions=2, stem_channels=32)
    net = net.to(memory_format=torch.channels_last).train()
    ref = copy.deepcopy(net).double()
    monkeypatch.setattr(fused, 'DTYPES', (torch.float32,))
    x = channels_last(torch.randn(2, 3, 64, 64))
    target = torch.rand(2, 16, 16, 16)
    calls = []
    real = fused.bn_relu

    def step(model, xx, tt):
        loss = sum(((o - tt) ** 2).mean() for o in model(xx))
        loss.backward()
        return loss.item()

    fused.bn_relu = lambda bn, t: calls.append(1) or real(bn, t)
    try:
        loss = step(net, x, target)
    finally:
        fused.bn_relu = real
    assert len(calls) == sum(isinstance(m, (BNReLU, ConvBNReLU)) for m in net.modules()) > 40
    assert loss == pytest.approx(step(ref, x.double(), target.double()), rel=1e-6)
    checked = 0
    for (name, p), r in zip(net.named_parameters(), ref.parameters()):
        scale = r.grad.abs().max().item()
        if scale < 1e-6:        # the biases of convolutions followed by BatchNorm: no gradient
            continue
        assert (p.grad.double() - r.grad).abs().max().item() <= 1e-4 * scale, name
        checked += 1
    assert checked > 100
    for b, c in zip(net.buffers(), ref.buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-5, atol=1e-6)


@needs_kernels
def test_kernel_rejects_what_it_does_not_compute():
    bn = random_bn(16)
    args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match='channels-last'):
        torch.ops.posefast.bn_relu_forward(torch.randn(2, 16, 3, 3).transpose(2, 3), *args)
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.posefast.bn_relu_forward(channels_last(torch.randn(2, 8, 3, 3)), *args)
    with pytest.raises(RuntimeError, match='float32 or bfloat16'):
        torch.ops.posefast.bn_relu_forward(channels_last(torch.randn(2, 16, 3, 3)).double(), *args)


@needs_kernels
@pytest.mark.parametrize('shape', [(16, 96, 8, 8), (3, 16, 5, 7), (7, 13)])
def test_add_is_pytorchs_sum_bit_for_bit(shape):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(*shape, generator=g) * 100).bfloat16()
    b = torch.randn(*shape, generator=g).bfloat16()
    a[0, 0] = float('inf')
    if len(shape) == 4:
        a, b = channels_last(a), channels_last(b)
    a.requires_grad_()
    b.requires_grad_()
    assert fused.can_add(a, b)
    out = fused.add(a, b)
    assert out.dtype == torch.bfloat16 and out.stride() == a.stride()
    assert torch.equal(out, a.detach() + b.detach())     # every sum rounded as PyTorch rounds it
    grad = torch.randn(*shape, generator=g).bfloat16()
    out.backward(grad)
    assert torch.equal(a.grad, grad) and torch.equal(b.grad, grad)


@needs_kernels
def test_add_falls_back_where_it_does_not_apply():
    x = torch.randn(2, 16, 4, 4)
    pairs = [(x, x), (x.bfloat16(), x),                               # float32; mixed types
             (x.bfloat16(), channels_last(x.bfloat16())),             # two layouts
             (x.bfloat16(), x[:1].bfloat16())]                       # broadcasting
    for a, b in pairs:
        assert not fused.can_add(a, b)
        assert torch.equal(fused.add(a, b), a + b)
    with pytest.raises(RuntimeError, match='same sizes and strides'):
        torch.ops.posefast.add(x.bfloat16(), channels_last(x.bfloat16()))


@needs_kernels
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_max_pool2_is_pytorchs_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 32, 6, 8, generator=g) * 4).round() / 4          # many ties in the windows
    flat = x.view(-1)
    flat[::37], flat[5::41], flat[7::211] = 0.0, -0.0, float('nan')
    x = channels_last(x.to(dtype))
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = MaxPool2()(ours), F.max_pool2d(ref, 2, 2)
    assert fused.can_pool(ours) == (dtype in fused.DTYPES)
    y = torch.ops.posefast.max_pool2(ours)                    # the kernel itself for float32 too
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y), torch.signbit(y_ref)) and y.is_contiguous(memory_format=torch.channels_last)
    grad = channels_last(torch.randn(y.shape, generator=g).to(dtype))
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(ours.grad, ref.grad) and torch.equal(torch.signbit(ours.grad), torch.signbit(ref.grad))
    with pytest.raises(RuntimeError, match='even height and width'):
        torch.ops.posefast.max_pool2(channels_last(torch.randn(1, 16, 5, 4)))
    odd = channels_last(torch.randn(1, 16, 5, 4).bfloat16())
    assert not fused.can_pool(odd) and torch.equal(MaxPool2()(odd), F.max_pool2d(odd, 2, 2))


needs_conv = pytest.mark.skipif(not (fused.load() and fused._has_conv()),
                                   reason='the 1x1 convolution kernels need AVX-512 BF16')


def bf16_autocast():
    return torch.autocast('cpu', dtype=torch.bfloat16)


@needs_conv
@pytest.mark.parametrize('shape,out_channels,k,bias', [
    ((3, 96, 5, 7), 48, 1, True), ((2, 48, 4, 4), 96, 1, False), ((1, 16, 3, 3), 112, 1, True),
    ((2, 128, 2, 3), 16, 1, True), ((2, 48, 8, 8), 48, 3, True), ((3, 32, 5, 7), 16, 3, False),
    ((1, 32, 1, 19), 112, 3, True), ((2, 112, 3, 2), 32, 3, True),
    ((1, 64, 3, 5), 64, 3, True), ((2, 256, 2, 2), 128, 1, False)])     # weights packed by PyTorch's ops
def test_conv_matches_float64(shape, out_channels, k, bias):
    """Forward: autocast's function (the weight and bias rounded to bfloat16, the output rounded
    once); backward: the input gradient as autocast's, the weight and bias gradients the float
    sums (within 1e-5 of float64, where autocast's path rounds them to bfloat16)."""
    torch.manual_seed(0)
    conv = Conv(shape[1], out_channels, k, bias=bias)
    x = channels_last(torch.randn(*shape).bfloat16()).requires_grad_()
    grad = channels_last(torch.randn(shape[0], out_channels, *shape[2:]).bfloat16())
    calls = []
    real = fused.conv
    fused.conv = lambda c, t: calls.append(1) or real(c, t)
    try:
        with bf16_autocast():
            y = conv(x)
    finally:
        fused.conv = real
    assert calls == [1] and y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    params = [x] + list(conv.parameters())
    grads = torch.autograd.grad(y, params, grad)
    xd = x.detach().double().requires_grad_()
    wd = conv.weight.detach().bfloat16().double().requires_grad_()
    bd = conv.bias.detach().bfloat16().double().requires_grad_() if bias else None
    exact = F.conv2d(xd, wd, bd, padding=k // 2)
    truth = torch.autograd.grad(exact, [xd, wd] + ([bd] if bias else []), grad.double())
    # the output: the float sum rounded once to bfloat16 (8 bits), as oneDNN's
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    fused.set_enabled(False)
    try:
        with bf16_autocast():
            y_ref = conv(x)
    finally:
        fused.set_enabled(True)
    ref_grads = torch.autograd.grad(y_ref, params, grad)
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()
    dx, dx_ref = grads[0].double(), ref_grads[0].double()
    assert grads[0].dtype == torch.bfloat16 and ((dx - truth[0]).abs() <= truth[0].abs() * 2 ** -8 + 1e-6).all()
    assert (dx - dx_ref).abs().max() <= 2 ** -7 * dx_ref.abs().max()
    for ours, autocast_grad, t in zip(grads[1:], ref_grads[1:], truth[1:]):
        assert ours.dtype == torch.float32 and ours.shape == t.shape
        scale = t.abs().max().item()
        assert (ours.double() - t).abs().max().item() <= 1e-5 * scale
        assert (autocast_grad.double() - t).abs().max().item() > 1e-4 * scale    # rounded to bfloat16
    with torch.no_grad(), bf16_autocast():                     # inference: the same kernel, no graph
        assert torch.equal(conv(x), y)


@needs_conv
def test_conv_runs_only_where_it_applies(monkeypatch):
    calls = []
    real = fused.conv
    monkeypatch.setattr(fused, 'conv', lambda c, t: calls.append(tuple(t.shape)) or real(c, t))
    conv = Conv(16, 32)
    assert list(conv.state_dict()) == ['weight', 'bias'] and isinstance(conv, nn.Conv2d)
    x = channels_last(torch.randn(2, 16, 4, 4).bfloat16())
    cases = [(conv, x.contiguous(), True),                          # NCHW
             (conv, x.float(), True),                               # float32 input
             (conv, x, False),                                      # no autocast
             (Conv(16, 17), x, True),                               # 17 outputs (COCO's joints)
             (Conv(16, 32, 3), x, True)]                            # 3x3 with 16 inputs
    for module, inp, autocast in cases:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = module(inp) if autocast or inp.dtype == module.weight.dtype else None
        assert out is None or out.shape[1] == module.out_channels
    with torch.autocast('cpu', dtype=torch.float16):
        assert not fused.can_conv(conv, x)
    fused.set_enabled(False)
    try:
        with bf16_autocast():
            conv(x)                                                  # --fusedBNReLU false
    finally:
        fused.set_enabled(True)
    assert calls == []
    with bf16_autocast():
        conv(x)
    assert calls == [(2, 16, 4, 4)]
    with pytest.raises(RuntimeError, match='multiples of 16'):
        torch.ops.posefast.conv(channels_last(torch.randn(1, 8, 2, 2).bfloat16()), torch.randn(16, 8, 1, 1), None)
    with pytest.raises(RuntimeError, match='channels-last bfloat16'):
        torch.ops.posefast.conv(x.contiguous(), conv.weight, conv.bias)


@needs_conv
def test_bfloat16_hourglass_step_through_the_kernels():
    """A bfloat16 autocast step of a small hourglass with every kernel on, against the modules'
    step and a float64 step: each 1x1 convolution through the C++ kernel, and the gradients as
    close to float64 as the modules' (bfloat16 alone leaves them far from it at initialisation)."""
    torch.manual_seed(0)
    net = StackedHourglass(num_joints=16, num_stacks=2, channels=32, num_reductions=2, stem_channels=32)
    net = net.to(memory_format=torch.channels_last).train()
    ref, exact = copy.deepcopy(net), copy.deepcopy(net).double()
    x = channels_last(torch.randn(4, 3, 64, 64))
    target = torch.rand(4, 16, 16, 16)
    calls = []
    real = fused.conv

    def step(model, dtype=torch.float32):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.float32):
            out = model(x.to(dtype))
        loss = sum(((o.to(dtype) - target.to(dtype)) ** 2).mean() for o in out)
        loss.backward()
        return loss.item()

    fused.conv = lambda c, t: calls.append(1) or real(c, t)
    try:
        loss = step(net)
    finally:
        fused.conv = real
    # every 1x1 and 3x3 convolution but the 3x3 ones with 16 inputs (oneDNN's are faster there)
    expected = [m for m in net.modules() if isinstance(m, Conv) and (m.kernel_size == (1, 1) or m.in_channels >= 32)]
    assert len(calls) == len(expected) > 40
    fused.set_enabled(False)
    try:
        loss_ref = step(ref)
    finally:
        fused.set_enabled(True)
    loss_exact = step(exact, torch.float64)
    assert abs(loss - loss_exact) <= 2 * abs(loss_ref - loss_exact) + 1e-3 * loss_exact
    errors = {'ours': [], 'modules': []}
    for p, r, e in zip(net.parameters(), ref.parameters(), exact.parameters()):
        scale = e.grad.abs().max().item()
        if scale > 1e-4:
            errors['ours'].append((p.grad.double() - e.grad).abs().max().item() / scale)
            errors['modules'].append((r.grad.double() - e.grad).abs().max().item() / scale)
    ours, modules = (sorted(v)[len(v) // 2] for v in errors.values())
    assert len(errors['ours']) > 100 and ours <= 1.25 * modules


def test_a_failed_build_falls_back_with_one_message(monkeypatch, tmp_path, capsys):
    bad = tmp_path / 'broken.cpp'
    bad.write_text('this is not C++\n')
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'ext'))
    monkeypatch.setattr(fused, '_SOURCES', [str(bad)])
    monkeypatch.setattr(fused, '_build_name', lambda: 'posefast_broken_test')
    monkeypatch.setattr(fused, '_state', {'enabled': True, 'loaded': None, 'error': None})
    assert fused.load() is False and fused.load() is False
    err = capsys.readouterr().err
    assert err.count('fused BatchNorm-ReLU kernels unavailable') == 1 and 'training runs the unfused modules' in err
    assert fused.error()
    block = BNReLU(16)
    x = channels_last(torch.randn(2, 16, 4, 4))
    assert torch.equal(block(x), F.relu(copy.deepcopy(block)(x)))


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_keep_freed_memory_applies_once():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


@needs_kernels
@pytest.mark.parametrize('shape,layout', [((4, 16, 8, 8), 'channels_last'), ((3, 17, 6, 5), 'channels_last'),
                                          ((3, 17, 6, 5), 'contiguous'), ((2, 1, 5, 7), 'contiguous')])
def test_heatmap_mse_has_autograds_gradients_bit_for_bit(shape, layout):
    """The heatmap codecs' loss in one C++ pass each way: each output's gradient equals
    autograd's through the expression exactly (an incoming gradient other than 1, weights with
    zeros, 17 joints, both layouts, a target in the other layout), the loss within float rounding."""
    from datasets.codecs import HeatmapCodec
    g = torch.Generator().manual_seed(len(shape) + shape[1])
    fmt = getattr(torch, {'channels_last': 'channels_last', 'contiguous': 'contiguous_format'}[layout])
    outs = [torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_() for _ in range(2)]
    ref = [o.detach().clone().requires_grad_() for o in outs]
    batch = {'heatmap': torch.rand(shape, generator=g),
             'heatmap_weight': (torch.rand(shape[:2], generator=g) > 0.3).float() * 1.5}
    codec = HeatmapCodec(4 * shape[3], shape[3])
    assert fused.can_heatmap_mse(outs, batch['heatmap'], batch['heatmap_weight'])
    ours = codec.loss(outs, batch)['heatmap']
    fused.set_enabled(False)
    try:
        theirs = codec.loss(ref, batch)['heatmap']
    finally:
        fused.set_enabled(True)
    (ours * 0.37).backward()
    (theirs * 0.37).backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6) and ours.dtype == torch.float32 and ours.dim() == 0
    for a, b in zip(outs, ref):
        assert torch.equal(a.grad, b.grad) and a.grad.stride() == b.grad.stride()


@needs_kernels
def test_heatmap_mse_runs_only_where_it_applies():
    o = [torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)]
    t, w = torch.rand(2, 16, 4, 4), torch.ones(2, 16)
    assert fused.can_heatmap_mse(o, t, w)
    assert not fused.can_heatmap_mse([o[0].double()], t.double(), w)                   # float64
    assert not fused.can_heatmap_mse(o + [o[0].contiguous()], t, w)                    # two layouts
    assert not fused.can_heatmap_mse(o, t.requires_grad_(), w)                         # a learnt target
    assert not fused.can_heatmap_mse(o, t.detach(), torch.ones(2, 15))                 # weights of another shape
    assert not fused.can_heatmap_mse([o[0][:, :, ::2]], t[:, :, ::2], w)               # strided
    fused.set_enabled(False)
    try:
        assert not fused.can_heatmap_mse(o, t.detach(), w)                             # --fusedBNReLU false
    finally:
        fused.set_enabled(True)
    with pytest.raises(RuntimeError, match="the target must have the output's shape and strides"):
        torch.ops.posefast.heatmap_mse(o[0], t.detach(), w)                            # NCHW target
    with pytest.raises(RuntimeError, match=r'the weights must be a contiguous \(2, 16\) tensor'):
        torch.ops.posefast.heatmap_mse(o[0], o[0].clone(), torch.ones(2, 16, 1))


@needs_kernels
def test_flat_copy_copies_every_pair_and_names_a_bad_one():
    """The optimiser's gradient gather (utils/optim.py): a memcpy where the strides agree over
    dense memory, Tensor.copy_ where they do not (channels-last into contiguous, a strided view),
    the same values either way; lists of other lengths or shapes are refused."""
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(8, 16, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
           torch.randn(32, generator=g), torch.randn(8, 16, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
           torch.randn(6, 10, generator=g)[:, ::2], torch.randn(0)]
    flat = torch.zeros(1400)
    dst = [flat.as_strided((8, 16, 3, 3), (144, 1, 48, 16), 200),     # channels-last views of one buffer
           flat[100:132], torch.zeros(8, 16, 3, 3), torch.zeros(6, 5), torch.zeros(0)]
    torch.ops.posefast.flat_copy(src, dst)
    for a, b in zip(src, dst):
        assert torch.equal(a, b)
    assert torch.equal(flat[100:132], src[1]) and flat[:100].abs().sum() == 0 and flat[132:200].abs().sum() == 0
    assert flat[1352:].abs().sum() == 0
    with pytest.raises(RuntimeError, match='two lists of one length'):
        torch.ops.posefast.flat_copy(src, dst[:2])
    with pytest.raises(RuntimeError, match='tensor 1 has shape'):
        torch.ops.posefast.flat_copy(src[:2], [dst[0], torch.zeros(31)])


@needs_kernels
def test_add_up2_is_upsampling_then_the_sum():
    """The hourglass's merge in one pass: the same sums bit for bit as upsampling and adding; the
    lower branch's gradient each 2x2 window's sum (rounded once, within a bfloat16 step of
    PyTorch's upsampling gradient)."""
    from models.layers import Hourglass
    g = torch.Generator().manual_seed(0)
    upper = channels_last(torch.randn(2, 32, 6, 8, generator=g).bfloat16()).requires_grad_()
    lower = channels_last((torch.randn(2, 32, 3, 4, generator=g) * 50).bfloat16()).requires_grad_()
    assert fused.can_add_up2(upper, lower)
    out = fused.add_up2(upper, lower)
    ref = upper + F.interpolate(lower, scale_factor=2, mode='nearest')
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)
    grad = channels_last(torch.randn(2, 32, 6, 8, generator=g).bfloat16())
    gu, gl = torch.autograd.grad(out, (upper, lower), grad)
    ru, rl = torch.autograd.grad(ref, (upper, lower), grad)
    exact = F.avg_pool2d(grad.double(), 2) * 4
    assert torch.equal(gu, ru)
    assert ((gl.double() - exact).abs() <= exact.abs() * 2 ** -8).all()
    assert (gl.double() - rl.double()).abs().max() <= 2 ** -7 * exact.abs().max()
    assert not fused.can_add_up2(upper.float(), lower.float())
    assert not fused.can_add_up2(upper, lower[:, :, :2])
    hg = Hourglass(1, 32).train()
    calls = []
    real = fused.add_up2
    fused.add_up2 = lambda a, b: calls.append(1) or real(a, b)
    try:
        with bf16_autocast():
            hg(channels_last(torch.randn(2, 32, 8, 8)).bfloat16())
        hg(channels_last(torch.randn(2, 32, 8, 8)))          # float32: upsampling and the sum
    finally:
        fused.add_up2 = real
    assert calls == [1]
    with pytest.raises(RuntimeError, match='half the upper'):
        torch.ops.posefast.add_up2(upper.detach(), upper.detach())


def residual_step(block, x, grad, fused_branch=True):
    """Output, input gradient, parameter gradients and buffers after one bfloat16 step of a
    Residual (the branch as one node, or as its six layers)."""
    real = fused.branch_args
    if not fused_branch:
        fused.branch_args = lambda layers, t: None
    try:
        x = x.clone().requires_grad_()
        with bf16_autocast():
            y = block(x)
        y.backward(grad)
    finally:
        fused.branch_args = real
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()] + list(block.buffers())


@needs_conv
@pytest.mark.parametrize('cin,cout', [(64, 64), (64, 128), (96, 96)])
def test_residual_branch_is_its_layers_bit_for_bit(monkeypatch, cin, cout):
    """The pre-activation branch as one C++ node: the output, every gradient, the running
    statistics and num_batches_tracked equal the six layers' exactly, with the layers' own
    kernels not called."""
    torch.manual_seed(0)
    block = Residual(cin, cout).to(memory_format=torch.channels_last).train()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict(random_bn(m.num_features, seed=m.num_features).state_dict())
    layers = copy.deepcopy(block)
    x = channels_last(torch.randn(3, cin, 8, 6).bfloat16())
    grad = channels_last(torch.randn(3, cout, 8, 6).bfloat16())
    calls = {'branch': 0, 'bn_relu': 0}
    real_branch, real_bn = fused.branch, fused.bn_relu
    monkeypatch.setattr(fused, 'branch', lambda l, t, a=None: calls.update(branch=calls['branch'] + 1) or real_branch(l, t, a))
    monkeypatch.setattr(fused, 'bn_relu', lambda b, t: calls.update(bn_relu=calls['bn_relu'] + 1) or real_bn(b, t))
    ours = residual_step(block, x, grad)
    assert calls == {'branch': 1, 'bn_relu': 0}
    theirs = residual_step(layers, x, grad, fused_branch=False)
    assert calls == {'branch': 1, 'bn_relu': 3}
    assert len(ours) == len(theirs) > 20
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert int(block.branch[0][0].num_batches_tracked) == 1
    with torch.no_grad(), bf16_autocast():              # without a graph: the same forward
        y = fused.branch(block.branch, x)
    assert y.dtype == torch.bfloat16 and int(block.branch[4][0].num_batches_tracked) == 2


@needs_conv
def test_branch_runs_only_where_it_applies():
    block = Residual(64, 64).to(memory_format=torch.channels_last).train()
    x = channels_last(torch.randn(2, 64, 4, 4).bfloat16())
    with bf16_autocast():
        assert fused.can_branch(block.branch, x)
        assert not fused.can_branch(block.branch, x.float())                       # float32 input
        assert not fused.can_branch(block.branch, x.contiguous())                  # NCHW
        assert not fused.can_branch(Residual(32, 32).branch, x[:, :32].contiguous(memory_format=torch.channels_last))  # 3x3 with 16 inputs
        assert not fused.can_branch(copy.deepcopy(block).eval().branch, x)         # evaluation
        other = copy.deepcopy(block)
        other.branch[2][0].momentum = 0.2                                          # momenta differ
        assert not fused.can_branch(other.branch, x)
        other = copy.deepcopy(block)
        other.branch[3].bias = None                                                # no bias
        assert not fused.can_branch(other.branch, x)
        # the structure is checked once and kept on the Sequential; a replaced module is seen
        other = copy.deepcopy(block)
        assert fused.can_branch(other.branch, x)
        other.branch[3] = nn.Conv2d(32, 32, 3, padding=1)                          # not the kernels' Conv
        assert not fused.can_branch(other.branch, x)
        other = copy.deepcopy(block)
        assert fused.can_branch(other.branch, x)
        other.branch[2][0] = nn.SyncBatchNorm(32)                                  # inside a pair
        assert not fused.can_branch(other.branch, x)
        other = copy.deepcopy(block).double()                                      # float64 parameters,
        assert not fused.can_branch(other.branch, x)
        assert fused.can_branch(other.float().branch, x)                           # then float32 again
        fused.set_enabled(False)
        try:
            assert not fused.can_branch(block.branch, x)                           # --fusedBNReLU false
        finally:
            fused.set_enabled(True)
    assert not fused.can_branch(block.branch, x)                                   # no autocast
    with pytest.raises(RuntimeError, match='12 parameters and 9 buffers'):
        torch.ops.posefast.branch(x, [block.branch[0][0].weight], [], 0.1, 1e-5)


@needs_conv
def test_conv_weight_gradient_comes_in_the_weights_layout():
    """A channels-last weight (the trainer's) gets a channels-last gradient with the values of a
    contiguous weight's: autograd keeps it without a strided copy. Its packing (vectorised along
    the contiguous inputs) rounds as the contiguous weight's scalar one."""
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 32, 5, 6).bfloat16())
    grad = channels_last(torch.randn(2, 48, 5, 6).bfloat16())
    w = torch.randn(48, 32, 3, 3)
    b = torch.randn(48)
    results = []
    for weight in (w.clone(), w.clone().contiguous(memory_format=torch.channels_last)):
        weight.requires_grad_()
        y = torch.ops.posefast.conv(x, weight, b)
        (dw,) = torch.autograd.grad(y, [weight], grad)
        assert dw.stride() == weight.stride()
        results.append((y, dw))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


needs_weight_grad = pytest.mark.skipif(not (fused.load() and fused._has_weight_grad()),
                                       reason='the float32 weight-gradient kernel needs AVX2 and FMA without AVX-512 BF16')


@needs_weight_grad
@pytest.mark.parametrize('shape,cout', [((2, 32, 5, 7), 7), ((3, 16, 6, 4), 12)])
def test_conv1x1_float32_weight_gradient_matches_float64(shape, cout):
    """The op's 1x1 path (the input read in place; the trainer keeps oneDNN's 1x1 convolutions)."""
    g = torch.Generator().manual_seed(4)
    x = channels_last(torch.randn(*shape, generator=g))
    dy = channels_last(torch.randn(shape[0], cout, shape[2], shape[3], generator=g))
    dw, db = torch.ops.posefast.conv_weight_grad(dy, x, 1)
    ref = torch.einsum('nohw,nihw->oi', dy.double(), x.double())[:, :, None, None]
    assert dw.shape == ref.shape and (dw.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert torch.allclose(db.double(), dy.double().sum((0, 2, 3)), atol=1e-5)


@needs_weight_grad
@pytest.mark.parametrize('shape,cout,bias', [((2, 16, 5, 7), 7, True), ((3, 32, 6, 4), 16, False),
                                             ((2, 48, 1, 9), 13, True)])
def test_conv3x3_float32_gradients_match_float64(shape, cout, bias):
    """The weight and bias gradients of the C++ kernel (every tile width, rows of one pixel) and the
    whole convolution through ``Conv``, against float64; the weight gradient in the weight's layout."""
    g = torch.Generator().manual_seed(3)
    x = channels_last(torch.randn(*shape, generator=g))
    dy = channels_last(torch.randn(shape[0], cout, shape[2], shape[3], generator=g))
    dw, db = torch.ops.posefast.conv_weight_grad(dy, x, 3)
    w = torch.randn(cout, shape[1], 3, 3, dtype=torch.float64)
    _, rdw, rdb = torch.ops.aten.convolution_backward(dy.double(), x.double(), w, [cout], [1, 1], [1, 1], [1, 1],
                                                      False, [0, 0], 1, [False, True, True])
    assert dw.shape == rdw.shape and dw.is_contiguous(memory_format=torch.channels_last)
    assert (dw.double() - rdw).abs().max() <= 1e-6 * rdw.abs().max() and torch.allclose(db.double(), rdb, atol=1e-5)

    conv = Conv(shape[1], cout, 3, bias=bias).to(memory_format=torch.channels_last).train()
    ref = copy.deepcopy(conv).double()
    xs = x.clone().requires_grad_()
    assert fused.can_conv3x3_f32(conv, xs) == (torch.float32 in fused.DTYPES)
    y = fused.conv3x3_f32(conv, xs)
    y.backward(dy)
    xr = x.double().requires_grad_()
    ref(xr).backward(dy.double())
    for ours, theirs in ((y, ref(x.double())), (xs.grad, xr.grad), (conv.weight.grad, ref.weight.grad)):
        assert (ours.double() - theirs).abs().max() <= 2e-6 * theirs.abs().max()
    assert conv.weight.grad.stride() == conv.weight.stride()
    assert (conv.bias is None) == (not bias) and (not bias or torch.allclose(conv.bias.grad.double(), ref.bias.grad))


@needs_weight_grad
def test_conv3x3_float32_runs_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(fused, 'DTYPES', (torch.bfloat16, torch.float32))
    conv = Conv(16, 16, 3).to(memory_format=torch.channels_last)
    x = channels_last(torch.randn(2, 16, 6, 6)).requires_grad_()
    assert fused.can_conv3x3_f32(conv, x)
    calls = []
    real = fused.conv3x3_f32
    monkeypatch.setattr(fused, 'conv3x3_f32', lambda m, t: calls.append(t.shape) or real(m, t))
    conv(x)
    assert len(calls) == 1
    with torch.no_grad():
        assert not fused.can_conv3x3_f32(conv, x)                                  # evaluation
    assert not fused.can_conv3x3_f32(conv, x.detach().contiguous())                # NCHW
    assert not fused.can_conv3x3_f32(Conv(16, 16, 1), x)                           # 1x1: oneDNN's
    assert not fused.can_conv3x3_f32(Conv(8, 16, 3), channels_last(torch.randn(2, 8, 6, 6)).requires_grad_())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fused.can_conv3x3_f32(conv, x)
    fused.set_enabled(False)
    try:
        assert not fused.can_conv3x3_f32(conv, x)                                  # --fusedBNReLU false
    finally:
        fused.set_enabled(True)
    monkeypatch.setattr(fused, 'DTYPES', (torch.bfloat16,))                        # an AVX-512 CPU
    assert not fused.can_conv3x3_f32(conv, x)
    with pytest.raises(RuntimeError, match='1x1 and 3x3'):
        torch.ops.posefast.conv_weight_grad(x.detach(), x.detach(), 5)
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.posefast.conv_weight_grad(channels_last(torch.randn(1, 8, 3, 3)), channels_last(torch.randn(1, 8, 3, 3)), 3)
