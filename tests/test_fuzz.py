"""Every malformation of every supported annotation format is one line naming the file, never a
traceback: each format's real fixture (or a small file in its official layout) mutated a few
hundred times in all (a key deleted or duplicated, a value of the wrong type, NaN, inf, a
negative or huge number, a wrong shape, a truncated file); reading it either works or raises the
project's one-line error."""
import copy
import json
import math
import os
import random

import h5py
import numpy as np
import pytest
import scipy.io

import datasets
import opts as options
from conftest import fixture_path
from datasets import formats
from utils import metrics
from utils.errors import PoseError

BAD_VALUES = [None, 'x', [], {}, [1, 2], -1, 0, 1e30, -1e30, float('nan'), float('inf'), True, [[1, 2, 3]]]


def check(read, path):
    """read() works or raises a one-line PoseError naming ``path`` (or one of several); anything
    else fails."""
    paths = path if isinstance(path, tuple) else (path,)
    try:
        read()
    except PoseError as exc:
        msg = str(exc)
        assert '\n' not in msg and any(str(p) in msg for p in paths), msg
        return 'error'
    return 'ok'


def mutations(value, rng, n):
    """n mutated copies of a json value: a key deleted / duplicated under another name, a leaf or
    a container replaced by a bad value."""
    paths = []

    def walk(v, at):
        paths.append(at)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, at + [k])
        elif isinstance(v, list):
            for i, x in enumerate(v[:3]):
                walk(x, at + [i])
    walk(value, [])
    out = []
    for _ in range(n):
        m = copy.deepcopy(value)
        at = rng.choice(paths[1:])
        parent = m
        for key in at[:-1]:
            parent = parent[key]
        kind = rng.random()
        if kind < 0.25 and isinstance(parent, dict):
            del parent[at[-1]]
        elif kind < 0.35 and isinstance(parent, dict):
            parent[f'{at[-1]}_copy'] = parent[at[-1]]
        elif kind < 0.45 and isinstance(parent, list):
            del parent[at[-1]]
        else:
            parent[at[-1]] = copy.deepcopy(rng.choice(BAD_VALUES))
        out.append(m)
    return out


def write_json(path, value):
    path.write_text(json.dumps(value, allow_nan=True))


def test_mpii_json_fuzz(tmp_path):
    entries = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    root = tmp_path / 'mpii'
    (root / 'annot').mkdir(parents=True)
    os.symlink(fixture_path('mpii', 'images'), root / 'images')
    path = root / 'annot' / 'valid.json'
    o = options.parse(['--dataset', 'MPII', '--dataDir', str(root)])
    rng = random.Random(0)
    outcomes = []
    for m in mutations(entries, rng, 120):
        write_json(path, m)
        outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    text = json.dumps(entries)
    for cut in (1, len(text) // 3, len(text) - 2):             # truncated files
        path.write_text(text[:cut])
        outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    assert outcomes.count('error') > 40


def test_coco_json_fuzz(tmp_path):
    data = json.load(open(fixture_path('coco', 'person_keypoints_val4.json')))
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    os.symlink(fixture_path('coco', 'images'), root / 'val2017')
    path = root / 'annotations' / 'person_keypoints_val2017.json'
    rng = random.Random(1)
    outcomes = []
    small = dict(data, annotations=data['annotations'][:6])
    for bottom_up in (False, True):
        o = options.parse(['--dataset', 'COCO', '--dataDir', str(root)])
        codec = type('C', (), {'bottom_up': bottom_up})()
        for m in mutations(small, rng, 60):
            write_json(path, m)
            outcomes.append(check(lambda: datasets.build_reader(o, 'val', codec), path))
    # the detections file of --detFile
    dets = json.load(open(fixture_path('coco', 'person_detections_val4.json')))[:5]
    write_json(path, data)
    det_path = tmp_path / 'dets.json'
    o = options.parse(['--dataset', 'COCO', '--dataDir', str(root), '--detFile', str(det_path)])
    for m in mutations(dets, rng, 40):
        write_json(det_path, m)
        outcomes.append(check(lambda: datasets.build_reader(o, 'val'), det_path))
    assert outcomes.count('error') > 30


def test_lip_csv_fuzz(tmp_path):
    rows = open(fixture_path('lip', 'lip_val_annotations.csv')).read().splitlines()[:12]
    root = tmp_path / 'lip'
    (root / 'val_images').mkdir(parents=True)
    path = root / 'lip_val_annotations.csv'
    o = options.parse(['--dataset', 'LIP', '--dataDir', str(root)])
    rng = random.Random(2)
    outcomes = []
    for _ in range(60):
        lines = list(rows)
        i = rng.randrange(len(lines))
        fields = lines[i].split(',')
        kind = rng.random()
        if kind < 0.3:
            del fields[rng.randrange(1, len(fields))]                    # a field missing (48, or 33 + ...)
        elif kind < 0.5:
            fields = fields[:33]                                         # exactly 33 fields
        else:
            fields[rng.randrange(1, len(fields))] = rng.choice(['x', '', 'inf', '-inf', '1e400', '-5', 'nan'])
        lines[i] = ','.join(fields)
        path.write_text('\n'.join(lines) + '\n')
        outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    path.write_bytes(b'\xff\xfe\x00garbage')
    outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    assert outcomes.count('error') > 20


def test_lsp_mat_and_h5_fuzz(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / 'lsp'
    (root / 'images').mkdir(parents=True)
    path = root / 'joints.mat'
    o = options.parse(['--dataset', 'LSP', '--dataDir', str(root)])
    outcomes = []
    good = np.concatenate([rng.uniform(10, 200, (2, 14, 2000)), rng.integers(0, 2, (1, 14, 2000))])
    for shape in [(3, 14, 2000), (2, 14, 2000), (3, 13, 2000), (14, 3, 2000), (3, 14), (3, 14, 5), (0,)]:
        for fill in (None, np.nan, np.inf, -1e30):
            j = good[:shape[0], :shape[1] if len(shape) > 1 else None] if len(shape) == 3 and shape[2] == 2000 else \
                rng.uniform(0, 100, shape)
            if fill is not None and j.size:
                j = j.copy()
                j.flat[rng.integers(0, j.size)] = fill
            scipy.io.savemat(str(path), {'joints': j})
            outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    scipy.io.savemat(str(path), {'other': good})
    outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    path.write_bytes(open(fixture_path('mpii', 'gt_valid.mat'), 'rb').read()[:300])     # truncated
    outcomes.append(check(lambda: datasets.build_reader(o, 'val'), path))
    # the pose-hg-train h5 of MPII
    mp = tmp_path / 'mpii'
    os.makedirs(mp / 'images')
    h5 = mp / 'valid.h5'
    om = options.parse(['--dataset', 'MPII', '--dataDir', str(mp)])
    with h5py.File(fixture_path('mpii', 'valid.h5'), 'r') as f:
        real = {k: f[k][()][:5] for k in f}
    for key in list(real) + ['imgname']:
        for bad in ('drop', 'nan', 'shape', 'type'):
            d = dict(real)
            if bad == 'drop':
                d.pop(key)
            elif bad == 'nan' and np.issubdtype(np.asarray(d[key]).dtype, np.floating):
                d[key] = np.full_like(d[key], np.nan)
            elif bad == 'shape':
                d[key] = np.asarray(d[key]).reshape(-1)[:3]
            else:
                d[key] = np.array([b'x'] * 5) if key != 'imgname' else np.zeros(5)
            with h5py.File(h5, 'w') as f:
                for k, v in d.items():
                    f[k] = v
            outcomes.append(check(lambda: datasets.build_reader(om, 'val'), h5))
    assert len(outcomes) > 50 and outcomes.count('error') > 20


def test_evaluator_inputs_fuzz(tmp_path):
    """The model-free evaluator's inputs: pred.mat, gt_valid.mat, results json."""
    rng = np.random.default_rng(4)
    outcomes = []
    gt = fixture_path('mpii', 'gt_valid.mat')
    pred = tmp_path / 'pred.mat'
    for shape in [(2958, 16, 2), (2958, 16), (10, 16, 2), (2958, 15, 2), (0, 16, 2)]:
        for fill in (None, np.nan, np.inf):
            p = rng.uniform(0, 500, shape)
            if fill is not None and p.size:
                p.flat[0] = fill
            formats.save_pred_mat(str(pred), p)
            from utils import evaluate
            outcomes.append(check(lambda: evaluate.main(['mpii', '--pred', str(pred), '--gt', gt]), pred))
    results = tmp_path / 'results.json'
    coco = fixture_path('coco', 'person_keypoints_val4.json')
    base = [dict(image_id=785, category_id=1, keypoints=[1.0] * 51, score=0.9, box_score=1.0, area=100.0)]
    for m in mutations(base, random.Random(5), 40):
        write_json(results, m)
        from utils import evaluate
        outcomes.append(check(lambda: evaluate.main(['coco', '--pred', str(results), '--gt', coco]), results))
    assert outcomes.count('error') > 10
