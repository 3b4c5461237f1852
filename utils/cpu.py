"""Process-wide settings for fast CPU training.

``keep_freed_memory``: glibc's malloc returns every large freed block to the system (blocks above
its mmap threshold are unmapped at once, the top of the heap is trimmed), so each of the hundreds
of activation and gradient tensors a training step allocates comes back as fresh pages that the
kernel must fault in and zero (60,000-180,000 page faults in 20 quick-start steps on the 2-core
machine; the steps run a median 1.1x faster without them). Raising the mmap and trim
thresholds keeps freed memory in the heap for the next step (the resident memory stays at the
step's peak instead of falling between steps), as the preloaded allocators recommended for
PyTorch on the CPU (jemalloc, tcmalloc) do.

``spin_wait``: GNU OpenMP's threads sleep after spinning a while between two parallel regions;
on a CPU run whose data are made in the main process, every operation's parallel region then
waits for its other threads to wake (PyTorch's small operations and oneDNN's set-up steps are
many per training step). ``OMP_WAIT_POLICY=ACTIVE`` keeps them spinning; it must be set before
PyTorch loads, so ``main.py`` decides from its command line (``--spinWait``) before importing it.
"""
import contextlib
import ctypes
import ctypes.util
import glob
import io
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = {}


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


def spin_wait(argv):
    """Set ``OMP_WAIT_POLICY=ACTIVE`` for a run of ``main.py`` with this command line when it
    trains or evaluates on the CPU in one process with its data made in the main process
    (``--nThreads 0``), unless the environment sets a policy or ``--spinWait false``. Call it
    before PyTorch is imported (it reads the options without PyTorch); True when it set it.

    Where the threads would compete with something (loader workers, several processes on one
    machine, a GPU run's host) the policy stays OpenMP's default.
    """
    if 'OMP_WAIT_POLICY' in os.environ or 'torch' in sys.modules or int(os.environ.get('WORLD_SIZE', '1')) > 1:
        return False
    import opts as options
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            o = options.parse(argv)
    except (SystemExit, Exception):  # the run's own parse reports it
        return False
    busy = o.summary or o.checkData or o.demo or o.export
    gpu = o.gpuid >= 0 and bool(glob.glob('/dev/nvidia[0-9]*'))
    if not o.spinWait or busy or gpu or o.nThreads != 0:
        return False
    os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'
    return True
