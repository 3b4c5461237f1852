"""FlatAdam (utils/optim.py): torch.optim.Adam(fused=True)'s numbers bit for bit, its state_dict."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from models import fused
from models.hourglass import StackedHourglass
from utils.optim import FlatAdam


def tensors():
    torch.manual_seed(0)
    net = StackedHourglass(num_joints=16, num_stacks=1, channels=32, num_reductions=1, stem_channels=16)
    net = net.to(memory_format=torch.channels_last)
    extra = nn.Parameter(torch.randn(17))           # a size that is not a multiple of 16: steps alone
    return list(net.parameters()) + [extra]


def clones(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(seed, *groups):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) * 10 ** (i % 5 - 2) for i, p in enumerate(groups[0])]
    for params in groups:
        for p, q in zip(params, grads):
            p.grad = q.clone().contiguous(memory_format=torch.channels_last) if q.dim() == 4 else q.clone()


@pytest.mark.parametrize('kernels', [False, True], ids=['foreach-copy', 'cpp-copy'])
def test_the_same_numbers_as_torch_adam_and_checkpoints_move_both_ways(monkeypatch, kernels):
    """The gradients gathered by torch._foreach_copy_ or, where the C++ kernels are loaded, by
    their flat_copy: the same bits either way."""
    if kernels and not fused.load():
        pytest.skip(f'the C++ kernels could not be built here: {fused.error()}')
    calls = []
    real = fused.loaded
    monkeypatch.setattr(fused, 'loaded', lambda: calls.append(1) is None and kernels and real())
    ref = clones(tensors())
    ours = clones(ref)
    a = torch.optim.Adam(ref, lr=4e-3, weight_decay=1e-4, fused=True)
    b = FlatAdam(ours, lr=4e-3, weight_decay=1e-4)
    for step in range(3):
        set_grads(step, ref, ours)
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(ref, ours))
    assert len(calls) == 3
    # one buffer for the sizes that are multiples of 16 (the stem's 8 channels and the 17 values step alone)
    inside = {id(p) for p in b._buffers[0].params}
    assert inside == {id(p) for p in ours if p.numel() % 16 == 0} and 0 < len(inside) < len(ours) - 10
    assert ours[0].data_ptr() != ref[0].data_ptr() and ours[0].is_contiguous(memory_format=torch.channels_last)
    sd, torch_sd = b.state_dict(), a.state_dict()
    for k, st in torch_sd['state'].items():
        for name in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(sd['state'][k][name], st[name])
    assert len({id(st['step']) for st in sd['state'].values()}) == len(sd['state'])
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    plain, flat = clones(ours), clones(ours)
    c = torch.optim.Adam(plain, lr=4e-3, weight_decay=1e-4, fused=True)
    c.load_state_dict(copy.deepcopy(loaded))
    d = FlatAdam(flat, lr=4e-3, weight_decay=1e-4)
    d.load_state_dict(copy.deepcopy(torch_sd))       # torch's checkpoint into ours
    for step in range(3, 5):
        set_grads(step, ref, ours, plain, flat)
        for opt in (a, b, c, d):
            opt.step()
        assert all(torch.equal(p, q) and torch.equal(p, r) and torch.equal(p, s)
                   for p, q, r, s in zip(ref, ours, plain, flat))


def test_a_parameter_without_gradient_or_a_replaced_tensor_steps_as_torch_does():
    ref = clones(tensors())
    ours = clones(ref)
    a = torch.optim.Adam(ref, lr=1e-3, fused=True)
    b = FlatAdam(ours, lr=1e-3)
    for step in range(5):
        set_grads(step, ref, ours)
        if step == 1:
            ref[3].grad = ours[3].grad = None        # skipped: it takes one step fewer
        if step == 3:                                # a tensor replaced (as model.to() does)
            ours[0].data = ours[0].data.clone()
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(ref, ours)), step
        assert int(b.state[ours[3]]['step']) == int(a.state[ref[3]]['step'])
