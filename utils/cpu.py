"""Process-wide settings for fast CPU training.

``keep_freed_memory``: glibc's malloc returns every large freed block to the system (blocks above
its mmap threshold are unmapped at once, the top of the heap is trimmed), so each of the hundreds
of activation and gradient tensors a training step allocates comes back as fresh pages that the
kernel must fault in and zero (60,000-180,000 page faults in 20 quick-start steps on the 2-core
machine; the steps run a median 1.1x faster without them). Raising the mmap and trim
thresholds keeps freed memory in the heap for the next step (the resident memory stays at the
step's peak instead of falling between steps), as the preloaded allocators recommended for
PyTorch on the CPU (jemalloc, tcmalloc) do.

``cache_cpu_memory``: where the C++ kernels of CPU training are built (models/fused.py), a
caching CPU allocator (models/csrc/cpu_cache.cpp) on top: each freed block of 64 KB or more goes
to a free list of its size class (sizes rounded up by at most 1/8) and serves the next request
of that class, without malloc's search through its bins, its splitting and coalescing of free
chunks (about 3 ms of serial work in each quick-start step). The trainer installs it for CPU
training with the kernels (``--keepFreedMemory``).

``native_bfloat16``: whether the CPU computes bfloat16 in hardware; where it does not, the
``--amp`` autocast would emulate it several times slower than float32, and CPU runs use float32.
"""
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = {}


def native_bfloat16():
    """Whether this CPU runs bfloat16 convolutions and matrix products in hardware (oneDNN's own
    test: AVX-512 (BW, VL, DQ), AMX or AVX-NE-CONVERT). On a CPU without (an AVX2-only one, or a
    virtual machine that hides AVX-512) PyTorch emulates them: a 96-channel 3x3 convolution's
    forward and backward ran 4.7x slower in bfloat16 than in float32 on such a machine."""
    if 'native_bfloat16' not in _done:
        import torch
        try:
            _done['native_bfloat16'] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bfloat16 either
            _done['native_bfloat16'] = False
    return _done['native_bfloat16']


def keep_freed_memory(mmap_threshold=1 << 30, trim_threshold=(1 << 31) - 1):
    """Tune glibc's malloc to keep freed memory for reuse; True when applied (Linux with glibc).

    Idempotent; elsewhere (macOS, Windows, musl) a no-op that returns False.
    """
    if 'result' in _done:
        return _done['result']
    ok = False
    if sys.platform.startswith('linux'):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
        except (OSError, AttributeError):  # not glibc
            ok = False
    _done['result'] = ok
    return ok


def _physical_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _ops():
    """``torch.ops.posefast`` where the C++ kernels, and the allocator built with them, load."""
    from models import fused
    if not fused.load():
        return None
    import torch
    return torch.ops.posefast if hasattr(torch.ops.posefast, 'cache_cpu_memory') else None


def cache_cpu_memory(limit=None):
    """Install the caching CPU allocator for this process; True when done.

    ``limit``: at most this many bytes of freed blocks are kept (default: a quarter of the
    physical memory); beyond it freed blocks go back to malloc. ``limit=0`` uninstalls it (the
    default allocator again, the cached blocks freed). False, and nothing changes, where the C++
    kernels cannot be built.
    """
    ops = _ops()
    if ops is None:
        return False
    return bool(ops.cache_cpu_memory(int(_physical_memory() // 4 if limit is None else limit)))


def cpu_cache_stats():
    """The caching allocator's counters (cached bytes and blocks, live blocks, hits, misses,
    limit), or None where it cannot be built."""
    ops = _ops()
    if ops is None:
        return None
    keys = ('cached_bytes', 'cached_blocks', 'live_blocks', 'hits', 'misses', 'limit')
    return dict(zip(keys, ops.cpu_cache_stats()))


def empty_cpu_cache():
    """Free the blocks the caching allocator keeps (the live tensors stay)."""
    ops = _ops()
    if ops is not None:
        ops.cpu_cache_empty()
