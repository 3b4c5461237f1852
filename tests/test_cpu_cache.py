"""The caching CPU allocator of CPU training (utils/cpu.py, models/csrc/cpu_cache.cpp): freed
blocks reused by size class, a cap on what it keeps, uninstalled cleanly, safe across fork, and
training steps that compute the same bits as with malloc's fresh memory."""
import copy
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from models import fused
from models.hourglass import StackedHourglass
from utils.cpu import cache_cpu_memory, cpu_cache_stats, empty_cpu_cache

pytestmark = pytest.mark.skipif(not fused.load(), reason=f'C++ kernels not built here: {fused.error()}')


@pytest.fixture
def cache():
    assert cache_cpu_memory(1 << 30) is True
    empty_cpu_cache()                       # what earlier tests' training left in the lists
    yield
    cache_cpu_memory(0)


def test_freed_blocks_serve_the_next_request_of_their_size_class(cache):
    a = torch.empty(100_000)                # 400,000 bytes: 13 steps of 32 KiB (1/8 of 256 KiB)
    ptr = a.data_ptr()
    before = cpu_cache_stats()
    del a
    after_free = cpu_cache_stats()
    assert after_free['cached_bytes'] - before['cached_bytes'] == 425_984
    b = torch.empty(99_000)                 # 396,000 bytes: the same class, the same block
    assert b.data_ptr() == ptr
    assert cpu_cache_stats()['hits'] == before['hits'] + 1
    c = torch.empty(120_000)                # 480,000 bytes: another class, a new block
    assert c.data_ptr() != ptr and cpu_cache_stats()['misses'] == before['misses'] + 1
    small = torch.empty(1000)               # under 64 KB: malloc's, never cached
    del small
    assert cpu_cache_stats()['cached_bytes'] == before['cached_bytes']
    del b, c
    empty_cpu_cache()
    assert cpu_cache_stats()['cached_bytes'] == 0 and cpu_cache_stats()['cached_blocks'] == 0


def test_the_limit_caps_what_is_kept_and_zero_uninstalls():
    assert cache_cpu_memory(500_000) is True
    try:
        empty_cpu_cache()
        blocks = [torch.empty(100_000) for _ in range(3)]
        del blocks
        stats = cpu_cache_stats()
        assert stats['cached_blocks'] == 1 and stats['cached_bytes'] == 425_984 <= stats['limit']
    finally:
        cache_cpu_memory(0)
    stats = cpu_cache_stats()
    assert stats['cached_bytes'] == 0 and stats['limit'] == 0
    misses = stats['misses']
    torch.empty(100_000)                    # the default allocator's again
    assert cpu_cache_stats()['misses'] == misses


def _child_allocates(queue):
    torch.set_num_threads(1)                # as DataLoader workers: OpenMP does not survive fork
    x = torch.ones(200_000)
    y = x * 2                               # blocks of the caching allocator, taken and given back
    del x
    queue.put(float((y + 1).sum()))


def test_a_forked_process_allocates(cache):
    keep = [torch.empty(200_000) for _ in range(4)]
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_allocates, args=(queue,))
    proc.start()
    assert queue.get(timeout=60) == 600_000.0
    proc.join(60)
    assert proc.exitcode == 0
    del keep


def test_onednn_scratch_memory_comes_and_goes(cache):
    """oneDNN allocates through raw_allocate / raw_deallocate: small and large scratch blocks."""
    x = torch.randn(2, 64, 40, 40).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3)
    for _ in range(3):
        y = F.conv2d(x, w, padding=1)
    assert torch.equal(y, F.conv2d(x, w, padding=1))


def test_training_steps_give_the_same_bits_as_fresh_memory():
    """Reused blocks hold the last step's values where malloc's fresh pages hold zeros: no kernel
    may read what it did not write."""
    torch.manual_seed(0)
    net = StackedHourglass(num_joints=16, num_stacks=2, channels=32, num_reductions=2, stem_channels=32)
    net = net.to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    target = torch.rand(4, 16, 16, 16)

    def steps(model):
        grads = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = model(x)
            sum(((o.float() - target) ** 2).mean() for o in out).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        return grads

    plain = steps(copy.deepcopy(net))
    assert cache_cpu_memory(1 << 30) is True
    try:
        cached = steps(copy.deepcopy(net))
        assert cpu_cache_stats()['hits'] > 50
    finally:
        cache_cpu_memory(0)
    for a, b in zip(plain, cached):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
