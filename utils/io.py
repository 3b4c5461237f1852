"""Files a run writes: one atomic write for all of them, json that numpy values survive, and the
run folder's ownership (one live run per folder, never another run's checkpoints overwritten)."""
import json
import math
import os

import numpy as np

from utils.errors import StorageError, TrainingError


def atomic_write(path, write, binary=False):
    """Write ``path`` through ``write(file_object)`` into a temporary file beside it, flushed to
    the disk, then rename: a crash or a failed write leaves the previous file intact and removes
    the temporary one. Every file a run writes goes through here.

    An operating-system error (no space left on the device, no permission, a file where a folder
    should be) is a ``StorageError`` naming the file and the cause, in one line.
    """
    folder = os.path.dirname(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(tmp, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise StorageError(f'cannot write {path}: {exc.strerror or exc}') from None
        raise
    return path


def write_text(path, text):
    return atomic_write(path, lambda f: f.write(text))


def jsonable(x):
    """numpy scalars and arrays as plain numbers and lists; NaN and infinities as null."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_json(path, obj, indent=1):
    return write_text(path, json.dumps(jsonable(obj), indent=indent))


# ----------------------------------------------------------------------------- run folders

LOCK_NAME = '.lock'
CHECKPOINTS = ('model_last.pth', 'model_best.pth')


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """Ownership of a run folder for the lifetime of one run.

    ``claim`` refuses a folder that another live run holds (its ``.lock`` names a live process)
    and a folder that already holds another run's checkpoints, unless the run resumes from a
    checkpoint in that folder or ``overwrite`` is set. A lock left by a dead process is taken over.
    """

    def __init__(self, path):
        self.path = path
        self.lock_path = os.path.join(path, LOCK_NAME)
        self.held = False

    def claim(self, resume_from=None, overwrite=False):
        try:
            os.makedirs(self.path, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise TrainingError(f'run folder {self.path}: a file is in the way (not a folder)') from None
        existing = [n for n in CHECKPOINTS if os.path.isfile(os.path.join(self.path, n))]
        resuming_here = resume_from is not None and os.path.isfile(resume_from) and \
            os.path.samefile(os.path.dirname(os.path.abspath(resume_from)), self.path)
        if existing and not (resuming_here or overwrite):
            raise TrainingError(
                f'run folder {self.path} already holds a run ({", ".join(existing)}); resume it with '
                f'--loadModel {os.path.join(self.path, existing[0])}, choose another --expID, or '
                f'pass --overwrite to replace it')
        self._lock()
        return self

    def _lock(self):
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.lock_path) as f:
                        pid = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise TrainingError(f'run folder {self.path} is in use by another run (process {pid}); '
                                        f'wait for it or choose another --expID') from None
                os.remove(self.lock_path)         # a dead run's lock
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise TrainingError(f'run folder {self.path}: cannot take the lock {self.lock_path}')

    def release(self):
        if self.held:
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
