"""The official file formats, read and written in one place: MATLAB .mat files (v5 through scipy,
v7.3 through h5py), MPII / LSP ``pred.mat``, LSP ``joints.mat``, LIP csv and json.

Readers (``datasets/*.py``) and the evaluators (``utils/metrics.py``, ``utils/evaluate.py``) all
use these, so a file that loads for training loads for evaluation too. Every failure is a
``DatasetError`` naming the file and what is wrong, in one line.
"""
import csv
import json
import os

import numpy as np

from utils.errors import DatasetError
from utils.io import atomic_write


def fail(path, what):
    return DatasetError(f'{path}: {what}')


def loadmat(path, keys):
    """The named arrays of a .mat file: {key: ndarray} for the keys present.

    MATLAB v5 files are read with scipy; v7.3 files are HDF5, read with h5py, whose axes come
    reversed and are transposed back, so both give the same arrays.
    """
    if not os.path.isfile(path):
        raise fail(path, 'file not found')
    import scipy.io
    try:
        mat = scipy.io.loadmat(path)
        return {k: mat[k] for k in keys if k in mat}
    except NotImplementedError:          # MATLAB v7.3 = HDF5
        pass
    except Exception as exc:             # noqa: BLE001 -- any parse failure is a bad file
        raise fail(path, f'not a readable .mat file ({type(exc).__name__}: {exc})') from None
    try:
        import h5py
        with h5py.File(path, 'r') as f:
            return {k: np.asarray(f[k]).T for k in keys if k in f}
    except Exception as exc:             # noqa: BLE001
        raise fail(path, f'not a readable .mat file ({type(exc).__name__}: {exc})') from None


def save_pred_mat(path, preds):
    """Write preds (N, K, 2) as a MATLAB .mat file with key 'preds' (HRNet's pred.mat)."""
    import scipy.io
    preds = np.asarray(preds, np.float64)
    return atomic_write(path, lambda f: scipy.io.savemat(f, {'preds': preds}), binary=True)


def load_pred_mat(path):
    """Read a pred.mat (key 'preds') -> (N, K, 2) float64."""
    mat = loadmat(path, ['preds'])
    if 'preds' not in mat:
        raise fail(path, "no 'preds' array in the file")
    preds = np.asarray(mat['preds'])
    if preds.ndim != 3 or preds.shape[2] < 2:
        raise fail(path, f"'preds' has shape {preds.shape}, expected (N, K, 2)")
    if not np.issubdtype(preds.dtype, np.number):
        raise fail(path, f"'preds' is not numeric ({preds.dtype})")
    return preds[:, :, :2].astype(np.float64)


def read_gt_valid(path):
    """MPII's official validation ground truth ``gt_valid.mat``: pos_gt_src (16, 2, N) 1-based,
    jnt_missing (16, N), headboxes_src (2, 2, N).

    Returns joints (N, 16, 2) 1-based float64, visible (N, 16) float64 (1 - jnt_missing) and the
    PCKh head size (N,) = 0.6 x the head box diagonal.
    """
    mat = loadmat(path, ['pos_gt_src', 'jnt_missing', 'headboxes_src'])
    for key in ('pos_gt_src', 'jnt_missing', 'headboxes_src'):
        if key not in mat:
            raise fail(path, f"no '{key}' array (not an MPII gt_valid.mat?)")
    try:
        pos, missing, boxes = (np.asarray(mat[k], np.float64) for k in ('pos_gt_src', 'jnt_missing', 'headboxes_src'))
    except (TypeError, ValueError):
        raise fail(path, 'pos_gt_src, jnt_missing and headboxes_src must be numeric arrays') from None
    if pos.ndim != 3 or pos.shape[:2] != (16, 2):
        raise fail(path, f"'pos_gt_src' has shape {pos.shape}, expected (16, 2, N)")
    n = pos.shape[2]
    if missing.shape != (16, n):
        raise fail(path, f"'jnt_missing' has shape {missing.shape}, expected (16, {n})")
    if boxes.shape != (2, 2, n):
        raise fail(path, f"'headboxes_src' has shape {boxes.shape}, expected (2, 2, {n})")
    head = 0.6 * np.linalg.norm(boxes[1] - boxes[0], axis=0)
    return pos.transpose(2, 0, 1), 1.0 - missing.T, head


def read_lsp_joints(path):
    """Read an LSP or LSP-extended ``joints.mat``.

    LSP:          key 'joints', (3, 14, 2000), rows x, y, flag with 0 = visible;
    LSP-extended: key 'joints', (14, 3, 10000), columns x, y, flag with 1 = visible.
    Coordinates are returned as stored (MATLAB pixels, 1-based).

    Returns joints (N, 14, 2) float64, visible (N, 14) float64 (1 = visible by the flag) and the
    layout, 'lsp' or 'lspet'.
    """
    mat = loadmat(path, ['joints'])
    if 'joints' not in mat:
        raise fail(path, "no 'joints' array (not an LSP joints.mat?)")
    j = np.asarray(mat['joints'])
    shape = 'x'.join(map(str, j.shape))
    if not np.issubdtype(j.dtype, np.number) or j.ndim != 3 or j.shape[:2] not in ((3, 14), (14, 3)):
        raise fail(path, f"'joints' has shape {shape}, expected 3x14xN (LSP) or 14x3xN (LSP-extended)")
    j = j.astype(np.float64)
    if j.shape[:2] == (3, 14):                   # LSP: flag 0 = visible
        return j[:2].transpose(2, 1, 0), (j[2].T == 0).astype(np.float64), 'lsp'
    return j[:, :2].transpose(2, 0, 1), (j[:, 2].T == 1).astype(np.float64), 'lspet'


LIP_FIELDS = {1 + 16 * 3: 3, 1 + 16 * 2: 2}     # name + 16 x (x, y, occluded) or 16 x (x, y)


def read_lip_csv(path, with_flags=None):
    """Read a LIP pose csv (no header): ``ImageID_PersonID.jpg`` then 16 x (x, y, occluded), or
    16 x (x, y) for a prediction file; ``nan`` marks an unlabelled joint.

    with_flags: True to require the 49-field annotation rows, False the 33-field prediction rows,
    None to accept either (the same for every row of the file).

    Returns names (list of N str), joints (N, 16, 2) float64 with NaN where unlabelled, visible
    (N, 16) float64 (1 where labelled, occluded or not) and occluded (N, 16) (0 where unlabelled or
    where the file has no flags).
    """
    if not os.path.isfile(path):
        raise fail(path, 'file not found')
    names, rows, flags = [], [], []
    allowed = {True: (49,), False: (33,), None: (49, 33)}[with_flags]
    expected = ' or '.join(f'{n} (name + 16 x ({"x, y, occluded" if n == 49 else "x, y"}))' for n in allowed)
    width = None
    try:
        with open(path, newline='') as f:
            for line_no, row in enumerate(csv.reader(f), 1):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) not in allowed or (width is not None and len(row) != width):
                    raise fail(path, f'line {line_no}: {len(row)} fields, expected '
                                     f'{width if width is not None else expected}')
                width = len(row)
                try:
                    values = np.array([float(c) for c in row[1:]], np.float64)
                except ValueError as exc:
                    raise fail(path, f'line {line_no}: not a number ({exc})') from None
                per = LIP_FIELDS[len(row)]
                values = values.reshape(16, per)
                if per == 3:
                    labelled = np.all(np.isfinite(values[:, :2]), axis=-1)
                    bad = labelled & ~np.isin(values[:, 2], (0.0, 1.0))
                    if bad.any():
                        j = int(np.flatnonzero(bad)[0])
                        raise fail(path, f'line {line_no}: joint {j}: occluded flag {values[j, 2]:g}, expected 0 or 1')
                names.append(row[0].strip())
                rows.append(values[:, :2])
                flags.append(values[:, 2] if per == 3 else np.zeros(16))
    except UnicodeDecodeError:
        raise fail(path, 'not a text csv file') from None
    if not rows:
        raise fail(path, 'no rows')
    joints = np.stack(rows)
    visible = np.all(np.isfinite(joints), axis=-1).astype(np.float64)
    occluded = np.nan_to_num(np.stack(flags)) * visible
    return names, joints, visible, occluded


def write_lip_csv(path, names, preds):
    """Write predictions in the LIP layout: name, then 16 x (x, y); NaN written as ``nan``.

    names: N image names (``ImageID_PersonID.jpg``); preds: (N, 16, 2).
    """
    preds = np.asarray(preds, np.float64)
    if preds.shape != (len(names), 16, 2):
        raise ValueError(f'write_lip_csv: preds {preds.shape} must be ({len(names)}, 16, 2)')
    lines = [name + ',' + ','.join('%.3f' % v for v in p.reshape(-1)) + '\n' for name, p in zip(names, preds)]
    return atomic_write(path, lambda f: f.writelines(lines))


def load_json(path, what='file'):
    """Parsed json of ``path``; a missing or unparsable file is a one-line error naming it."""
    if not os.path.isfile(path):
        raise fail(path, f'{what} not found')
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail(path, f'not valid json ({str(exc).splitlines()[0]})') from None
    except OSError as exc:
        raise fail(path, f'cannot read the {what} ({exc.strerror})') from None
