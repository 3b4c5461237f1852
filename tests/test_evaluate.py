"""Tests of the model-free evaluator, ``python -m utils.evaluate``."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from conftest import ROOT, fixture_path
from datasets import formats
from utils import evaluate, metrics
from utils.errors import DatasetError

COLUMNS = ['Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle', 'Mean', 'Mean@0.1',
           'per_joint']


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'utils.evaluate', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_mpii_cli_writes_json(tmp_path):
    gt_path = fixture_path('mpii', 'gt_valid.mat')
    mat = scipy.io.loadmat(gt_path)
    gt = mat['pos_gt_src'].transpose(2, 0, 1)
    head = 0.6 * np.linalg.norm(mat['headboxes_src'][1] - mat['headboxes_src'][0], axis=0)
    vis = 1 - mat['jnt_missing'].T
    pred = gt.copy()
    pred[1::2, :, 0] += 0.6 * head[1::2, None]          # odd persons: every joint wrong
    pred[0::2, :, 1] += 0.3 * head[0::2, None]          # even persons: right at 0.5, not at 0.1
    pred_path = str(tmp_path / 'pred.mat')
    formats.save_pred_mat(pred_path, pred)
    out = str(tmp_path / 'x.json')
    r = _cli('mpii', '--pred', pred_path, '--gt', gt_path, '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'Mean@0.1' in r.stdout and '2958 persons' in r.stdout
    with open(out) as f:
        table = json.load(f)
    assert list(table) == COLUMNS
    body = [i for i in range(16) if i not in (6, 7)]
    assert table['Mean'] == pytest.approx(100 * vis[0::2][:, body].sum() / vis[:, body].sum())
    assert table['Mean@0.1'] == 0.0
    head_top = vis[:, 9]
    assert table['Head'] == pytest.approx(100 * head_top[0::2].sum() / head_top.sum())
    assert table['per_joint']['head_top'] == pytest.approx(table['Head'])
    assert len(table['per_joint']) == 16


def test_cli_error_is_one_line_naming_the_file(tmp_path):
    gt_path = fixture_path('mpii', 'gt_valid.mat')
    missing = str(tmp_path / 'nothere.mat')
    r = _cli('mpii', '--pred', missing, '--gt', gt_path)
    assert r.returncode != 0
    assert r.stderr.strip() == f'error: {missing}: file not found'
    bad = tmp_path / 'gt.mat'
    bad.write_text('garbage')
    formats.save_pred_mat(str(tmp_path / 'p.mat'), np.zeros((2958, 16, 2)))
    r = _cli('mpii', '--pred', str(tmp_path / 'p.mat'), '--gt', str(bad))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {bad}: ') and 'Traceback' not in r.stderr


def _write_lsp(path, xy, flag, extended):
    """xy (N, 14, 2), flag (N, 14) -> an LSP (3x14xN) or LSP-extended (14x3xN) joints.mat."""
    j = np.concatenate([xy, flag[..., None]], axis=2)
    scipy.io.savemat(path, {'joints': j.transpose(1, 2, 0) if extended else j.transpose(2, 1, 0)})


def test_lsp_cli_both_layouts(tmp_path, capsys):
    rng = np.random.default_rng(0)
    xy = rng.uniform(1, 400, (2000, 14, 2))
    flag = (rng.uniform(size=(2000, 14)) < 0.2).astype(np.float64)     # 1 = occluded in LSP
    gt_path = str(tmp_path / 'joints.mat')
    _write_lsp(gt_path, xy, flag, extended=False)
    torso = np.linalg.norm(xy[:, 9] - xy[:, 2], axis=1)
    pred = xy.copy()
    pred[:, 0, 0] += 0.25 * torso              # right ankle wrong everywhere
    formats.save_pred_mat(str(tmp_path / 'all.mat'), pred)
    formats.save_pred_mat(str(tmp_path / 'test.mat'), pred[1000:])
    for p in ('all.mat', 'test.mat'):
        out = str(tmp_path / f'{p}.json')
        assert evaluate.main(['lsp', '--pred', str(tmp_path / p), '--gt', gt_path,
                              '--out', out]) == 0
        with open(out) as f:
            t = json.load(f)
        assert t['per_joint']['r_ankle'] == 0.0 and t['Ankle'] == 50.0
        assert t['Mean'] == pytest.approx(100 * 13 / 14)
        assert list(t) == ['Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle', 'Mean',
                           'per_joint']
    assert '1000 images, split test' in capsys.readouterr().out
    # LSP-extended layout (flag 1 = visible), whole file; --visible-only scores visible joints
    small = str(tmp_path / 'lspet.mat')
    _write_lsp(small, xy[:10], 1 - flag[:10], extended=True)
    formats.save_pred_mat(str(tmp_path / 'p10.mat'), xy[:10])
    out = str(tmp_path / 'et.json')
    evaluate.main(['lsp', '--pred', str(tmp_path / 'p10.mat'), '--gt', small, '--split', 'all',
                   '--visible-only', '--out', out])
    with open(out) as f:
        assert json.load(f)['Mean'] == 100.0
    with pytest.raises(DatasetError, match='lspet.mat: 10 images; the LSP test split'):
        evaluate.main(['lsp', '--pred', str(tmp_path / 'p10.mat'), '--gt', small])
    with pytest.raises(DatasetError, match=r'p10.mat: 10 predictions, expected 1000'):
        evaluate.main(['lsp', '--pred', str(tmp_path / 'p10.mat'), '--gt', gt_path])


def test_lip_cli_matches_rows_by_name(tmp_path):
    src = fixture_path('lip', 'lip_val_annotations.csv')
    with open(src) as f:
        lines = [next(f) for _ in range(300)]
    gt_path = tmp_path / 'gt.csv'
    gt_path.write_text(''.join(lines))
    names, gt, vis, _ = formats.read_lip_csv(str(gt_path))
    order = np.random.default_rng(0).permutation(len(names))
    pred_path = str(tmp_path / 'pred.csv')
    formats.write_lip_csv(pred_path, [names[i] for i in order], gt[order])
    out = str(tmp_path / 'lip.json')
    assert evaluate.main(['lip', '--pred', pred_path, '--gt', str(gt_path), '--out', out]) == 0
    with open(out) as f:
        t = json.load(f)
    assert list(t) == COLUMNS and t['Mean'] == 100.0 and t['Head'] == 100.0
    formats.write_lip_csv(pred_path, names[1:], gt[1:])
    with pytest.raises(DatasetError, match=f'pred.csv: no prediction for 1 of 300 images.*{names[0]}'):
        evaluate.main(['lip', '--pred', pred_path, '--gt', str(gt_path)])


def test_coco_cli(tmp_path):
    gt_path = fixture_path('coco', 'person_keypoints_val4.json')
    with open(gt_path) as f:
        anns = json.load(f)['annotations']
    results = [dict(image_id=a['image_id'], box_score=1.0, area=a['area'],
                    keypoints=[v if i % 3 != 2 else 1.0 for i, v in enumerate(a['keypoints'])])
               for a in anns if a['num_keypoints'] > 0]
    pred = tmp_path / 'results.json'
    pred.write_text(json.dumps(results))
    out = str(tmp_path / 'coco.json')
    assert evaluate.main(['coco', '--pred', str(pred), '--gt', gt_path, '--out', out]) == 0
    with open(out) as f:
        t = json.load(f)
    assert list(t) == list(metrics.COCO_STATS)
    assert all(v == pytest.approx(1.0) for v in t.values())
    pred.write_text('{"not": "a list"}')
    with pytest.raises(DatasetError, match='results.json: expected a json list'):
        evaluate.main(['coco', '--pred', str(pred), '--gt', gt_path])
