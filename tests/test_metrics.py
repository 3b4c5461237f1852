"""Tests of utils/metrics.py: hand-computed cases, then the real fixtures."""
import json

import numpy as np
import pytest
import scipy.io

from conftest import fixture_path
from datasets.joints import COCO, LSP, MPII
from datasets import formats as F
from utils import metrics as M
from utils.errors import DatasetError


# ---------------------------------------------------------------------------------------------
# pck
# ---------------------------------------------------------------------------------------------

def test_pck_hand_computed_with_unlabelled_joints_and_zero_normaliser():
    gt = np.zeros((3, 2, 2))
    pred = np.zeros((3, 2, 2))
    # joint 0: errors 3, 5, 9 px; joint 1: errors 0, 6, 100 px
    pred[:, 0, 0] = [3, 5, 9]
    pred[:, 1, 1] = [0, 6, 100]
    visible = np.array([[1, 1], [1, 0], [1, 1]])
    normalizer = np.array([10.0, 10.0, 0.0])       # person 2 has no normaliser: skipped
    value, count = M.pck(pred, gt, visible, normalizer, alpha=0.5)
    # joint 0: persons 0, 1 count; 3 <= 5 and 5 <= 5 -> both correct (<= is inclusive)
    # joint 1: person 1 unlabelled, person 2 skipped -> only person 0, correct
    np.testing.assert_array_equal(count, [2, 1])
    np.testing.assert_allclose(value, [100.0, 100.0])
    value, count = M.pck(pred, gt, visible, normalizer, alpha=0.4)
    np.testing.assert_allclose(value, [50.0, 100.0])


def test_pck_joint_without_labels_is_nan_and_nonfinite_prediction_is_wrong():
    gt = np.zeros((2, 3, 2))
    pred = np.zeros((2, 3, 2))
    pred[0, 1] = np.nan
    visible = np.array([[1, 1, 0], [1, 1, 0]])
    value, count = M.pck(pred, gt, visible, np.array([1.0, np.nan]), alpha=0.5)
    np.testing.assert_array_equal(count, [1, 1, 0])       # person 1 (NaN normaliser) skipped
    assert value[0] == 100.0 and value[1] == 0.0 and np.isnan(value[2])


# ---------------------------------------------------------------------------------------------
# heatmap accuracy
# ---------------------------------------------------------------------------------------------

def test_heatmap_accuracy_synthetic_non_square_maps():
    n, k, h, w = 2, 3, 40, 20          # norm: x by h/10 = 4, y by w/10 = 2 (the HRNet code's)
    out = np.zeros((n, k, h, w))
    tgt = np.zeros((n, k, h, w))
    tgt[0, 0, 5, 5] = tgt[1, 0, 5, 5] = 1          # (y, x) = (5, 5)
    out[0, 0, 5, 6] = 1                             # dx = 1 -> 1/4 = 0.25 < 0.5: correct
    out[1, 0, 6, 5] = 1                             # dy = 1 -> 1/2 = 0.5, not < 0.5: wrong
    # joint 1: no target peak anywhere -> -1
    out[:, 1, 3, 3] = 1
    # joint 2: sample 0 labelled and exact; sample 1 unlabelled (target all zero)
    tgt[0, 2, 30, 10] = 1
    out[0, 2, 30, 10] = 1
    out[1, 2, 0, 19] = 1
    acc, avg, cnt = M.heatmap_accuracy(out, tgt)
    np.testing.assert_allclose(acc, [0.5, -1.0, 1.0])
    assert avg == pytest.approx(0.75)
    assert cnt == 2


def test_heatmap_accuracy_flat_prediction_is_taken_at_origin():
    tgt = np.zeros((1, 2, 40, 40))
    out = np.zeros((1, 2, 40, 40))
    tgt[0, 0, 1, 1] = 1              # peak near the origin: a flat output (max 0) -> (0, 0)
    tgt[0, 1, 20, 20] = 1            # far away: wrong
    acc, avg, cnt = M.heatmap_accuracy(out, tgt)
    np.testing.assert_allclose(acc, [1.0, 0.0])
    assert (avg, cnt) == (0.5, 2)


def test_heatmap_accuracy_of_float32_maps_is_float64s():
    """The trainer passes float32 maps uncopied: the same argmaxes, ties and signs as float64."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = rng.standard_normal((3, 16, 8, 6)).astype(np.float32)
        tgt = np.clip(rng.standard_normal((3, 16, 8, 6)), 0, None).astype(np.float32)
        out[0, 1] = -1.0                      # flat and negative: taken at the origin
        out[1, 2, 2:4, 3] = 7.0               # a tie: the first maximum, as float64's
        tgt[2, 5] = 0.0                       # unlabelled
        ours = M.heatmap_accuracy(out, tgt)
        wide = M.heatmap_accuracy(out.astype(np.float64), tgt.astype(np.float64))
        assert np.array_equal(ours[0], wide[0]) and ours[1:] == wide[1:]
    ints = M.heatmap_accuracy((out > 0).astype(np.uint8), (tgt > 0).astype(np.int64))
    assert ints[2] > 0


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def test_pckh_table_column_math():
    n = 4
    gt = np.zeros((n, 16, 2))
    pred = np.zeros((n, 16, 2))
    vis = np.ones((n, 16))
    head = np.array([10.0, 10.0, 10.0, 0.0])      # person 3: zero head size, skipped
    i = MPII.index
    pred[3] = 1000.0                               # would be wrong everywhere if counted
    pred[:3, i('head_top'), 0] = [3, 6, 0]         # @0.5 (5 px): 2 of 3; @0.1 (1 px): 1 of 3
    pred[:3, i('l_shoulder'), 0] = 1               # 3/3 at both
    pred[:3, i('r_shoulder'), 0] = 6               # 0/3
    vis[1:, i('r_elbow')] = 0                      # r_elbow: only person 0, exact
    vis[2:, i('l_elbow')] = 0
    pred[1, i('l_elbow'), 1] = 9                   # l_elbow: 1 of 2
    pred[:3, i('pelvis')] = 50                     # pelvis and thorax wrong: excluded from Mean
    pred[:3, i('thorax')] = 50
    t = M.pckh_table(pred, gt, vis, head, MPII)
    assert list(t) == ['Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle', 'Mean',
                       'Mean@0.1', 'per_joint']
    assert t['Head'] == pytest.approx(200 / 3)     # head top only
    assert t['Shoulder'] == pytest.approx(50.0)
    assert t['Elbow'] == pytest.approx(75.0)
    assert t['Wrist'] == t['Hip'] == t['Knee'] == t['Ankle'] == 100.0
    # counts: 12 joints x 3 + r_elbow 1 + l_elbow 2 = 39; correct: 2+3+0+1+1 + 3 (neck) + 8x3
    assert t['Mean'] == pytest.approx(100 * 34 / 39)
    # at 1 px: head_top 1, l_shoulder 3 (error exactly 1 counts), r_sho 0, elbows 1+1
    assert t['Mean@0.1'] == pytest.approx(100 * 33 / 39)
    assert t['per_joint']['pelvis'] == 0.0 and t['per_joint']['r_elbow'] == 100.0
    assert t['per_joint']['l_elbow'] == 50.0


def test_lsp_table_uses_torso_left_shoulder_to_right_hip():
    gt = np.zeros((2, 14, 2))
    gt[:, LSP.index('l_shoulder')] = [30.0, 40.0]  # right hip at origin: torso = 50
    gt[1, LSP.index('l_shoulder')] = [60.0, 80.0]  # person 1: torso = 100
    pred = gt.copy()
    pred[:, :, 0] += np.array([9.9, 19.9])[:, None]        # 0.198 torso: all correct
    pred[0, LSP.index('head_top'), 0] += 0.2               # 10.1 px = 0.202 torso: wrong
    pred[1, LSP.index('neck'), 1] += 20.5                  # > 0.2 * 100: wrong
    np.testing.assert_allclose(M.lsp_torso_size(gt), [50.0, 100.0])
    t = M.lsp_pck_table(pred, gt, np.ones((2, 14)))
    assert t['Head'] == pytest.approx(50.0)        # mean of neck (50) and head top (50)
    assert t['Shoulder'] == t['Ankle'] == 100.0
    assert t['Mean'] == pytest.approx(100 * 26 / 28)
    assert list(t)[-1] == 'per_joint' and len(t['per_joint']) == 14


def test_lip_table_uses_head_segment_without_factor_and_skips_nan():
    gt = np.zeros((2, 16, 2))
    gt[:, MPII.index('head_top')] = [0.0, 20.0]    # head size 20 (upper neck at origin)
    gt[1, 3] = np.nan                              # unlabelled l_hip
    vis = np.ones((2, 16))
    pred = gt.copy()
    pred[:, :, 0] += 9.9                            # 0.495 head: correct
    pred[0, MPII.index('r_knee'), 0] += 0.2         # 0.505 head: wrong
    t = M.lip_pckh_table(pred, gt, vis)
    assert t['per_joint']['r_knee'] == 50.0
    assert t['per_joint']['l_hip'] == 100.0         # only person 0 counted
    assert t['Knee'] == 75.0
    assert t['Mean'] == pytest.approx(100 * 26 / 27)


def test_format_table_and_per_joint():
    t = {'Head': 97.123, 'Mean': 90.0, 'per_joint': {'a': 1.0, 'b': float('nan')}}
    s = M.format_table(t, title='T')
    lines = s.splitlines()
    assert lines[0] == 'T' and 'Head' in lines[1] and 'per_joint' not in s
    assert lines[-1].split() == ['97.12', '|', '90.00']
    assert M.format_per_joint(t).splitlines()[1].split() == ['b', 'nan']
    coco = dict(zip(M.COCO_STATS, np.linspace(0, 0.9, 10)))
    assert M.format_table(coco).splitlines()[-1].split('|')[1].strip() == '0.100'


# ---------------------------------------------------------------------------------------------
# OKS-NMS
# ---------------------------------------------------------------------------------------------

def _inst(x, score, area, k=17):
    kp = np.zeros((k, 3))
    kp[:, 0] = x + np.arange(k) * 10.0
    kp[:, 1] = 50 + np.arange(k) * 3.0
    kp[:, 2] = 1
    return dict(keypoints=kp, score=score, area=area)


def test_oks_nms_removes_duplicates_and_keeps_distinct_people():
    insts = [_inst(100, 0.8, 5000), _inst(100.5, 0.9, 5000), _inst(400, 0.7, 5000),
             _inst(401, 0.95, 5000)]
    keep = M.oks_nms(insts, COCO.sigmas, thr=0.9)
    assert keep == [3, 1]              # best first; 0 duplicates 1, 2 duplicates 3
    assert M.oks_nms([], COCO.sigmas) == []


def test_oks_nms_uses_mean_of_the_two_areas():
    # one keypoint, sigma 0.1 -> variance 0.04; OKS = exp(-d^2 / 0.04 / area / 2)
    a = dict(keypoints=[0.0, 0.0, 1.0], score=0.9, area=100.0)
    b = dict(keypoints=[1.0, 0.0, 1.0], score=0.5, area=100.0)
    assert M.oks_nms([a, b], [0.1], thr=0.9) == [0, 1]        # exp(-1/8) = 0.882 <= 0.9: kept
    b['area'] = 300.0                                          # mean area 200: exp(-1/16) = 0.939
    assert M.oks_nms([a, b], [0.1], thr=0.9) == [0]
    b['keypoints'] = [0.5, 0.0, 1.0]
    b['area'] = 100.0                                          # exp(-1/32) = 0.969
    assert M.oks_nms([a, b], [0.1], thr=0.9) == [0]
    assert M.oks_nms([a, b], [0.1], thr=0.97) == [0, 1]


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def test_pred_mat_roundtrip_and_errors(tmp_path):
    preds = np.random.default_rng(0).uniform(0, 500, (7, 16, 2))
    path = str(tmp_path / 'sub' / 'pred.mat')
    F.save_pred_mat(path, preds)
    np.testing.assert_array_equal(F.load_pred_mat(path), preds)
    with pytest.raises(DatasetError, match='missing.mat: file not found'):
        F.load_pred_mat(str(tmp_path / 'missing.mat'))
    other = str(tmp_path / 'other.mat')
    scipy.io.savemat(other, {'x': preds})
    with pytest.raises(DatasetError, match="other.mat: no 'preds'"):
        F.load_pred_mat(other)
    scipy.io.savemat(other, {'preds': preds[0]})
    with pytest.raises(DatasetError, match=r"other.mat: 'preds' has shape \(16, 2\)"):
        F.load_pred_mat(other)
    junk = tmp_path / 'junk.mat'
    junk.write_text('not a mat file\n')
    with pytest.raises(DatasetError) as e:
        F.load_pred_mat(str(junk))
    assert str(e.value).startswith(f'{junk}: ') and '\n' not in str(e.value)


def test_read_lsp_joints_both_layouts(tmp_path):
    rng = np.random.default_rng(1)
    xy = rng.uniform(1, 300, (5, 14, 2))
    flag = rng.integers(0, 2, (5, 14)).astype(np.float64)
    lsp = np.concatenate([xy, flag[..., None]], axis=2).transpose(2, 1, 0)      # 3 x 14 x N
    scipy.io.savemat(str(tmp_path / 'lsp.mat'), {'joints': lsp})
    lspet = np.concatenate([xy, flag[..., None]], axis=2).transpose(1, 2, 0)    # 14 x 3 x N
    scipy.io.savemat(str(tmp_path / 'lspet.mat'), {'joints': lspet})
    j, v, layout = F.read_lsp_joints(str(tmp_path / 'lsp.mat'))
    assert layout == 'lsp'
    np.testing.assert_array_equal(j, xy)
    np.testing.assert_array_equal(v, 1 - flag)            # LSP: flag 0 = visible
    j, v, layout = F.read_lsp_joints(str(tmp_path / 'lspet.mat'))
    assert layout == 'lspet'
    np.testing.assert_array_equal(j, xy)
    np.testing.assert_array_equal(v, flag)                # LSP-extended: flag 1 = visible
    t = M.lsp_pck_table(j, j, np.ones_like(v))
    assert t['Mean'] == 100.0
    scipy.io.savemat(str(tmp_path / 'bad.mat'), {'joints': np.zeros((2, 14, 5))})
    with pytest.raises(DatasetError, match="bad.mat: 'joints' has shape"):
        F.read_lsp_joints(str(tmp_path / 'bad.mat'))


def test_lip_csv_roundtrip_and_errors(tmp_path):
    gt = tmp_path / 'gt.csv'
    row = ['a_1.jpg'] + ['nan'] * 3 + ['%d,%d,%d' % (i, 2 * i, i % 2) for i in range(1, 16)]
    gt.write_text(','.join(row) + '\n\n' + ','.join(['b_2.jpg'] + ['1,2,0'] * 16))
    names, j, v, occ = F.read_lip_csv(str(gt))
    assert names == ['a_1.jpg', 'b_2.jpg']
    assert np.isnan(j[0, 0]).all() and j[0, 3].tolist() == [3.0, 6.0]
    assert v[0].tolist() == [0] + [1] * 15 and v[1].all()
    assert occ[0, 2] == 0 and occ[0, 3] == 1 and occ[0, 0] == 0
    out = str(tmp_path / 'pred.csv')
    F.write_lip_csv(out, names, j)
    names2, j2, v2, _ = F.read_lip_csv(out)
    assert names2 == names
    np.testing.assert_array_equal(j2, j)
    np.testing.assert_array_equal(v2, v)
    bad = tmp_path / 'bad.csv'
    bad.write_text('x.jpg,1,2,3\n')
    with pytest.raises(DatasetError, match='bad.csv: line 1: 4 fields'):
        F.read_lip_csv(str(bad))
    bad.write_text('x.jpg,' + ','.join(['oops'] * 32) + '\n')
    with pytest.raises(DatasetError, match='bad.csv: line 1: not a number'):
        F.read_lip_csv(str(bad))
    bad.write_text(','.join(['x.jpg'] + ['1,2,0'] * 5 + ['1,2,7e40'] + ['1,2,1'] * 10) + '\n')
    with pytest.raises(DatasetError, match='bad.csv: line 1: joint 5: occluded flag 7e[+]40, expected 0 or 1'):
        F.read_lip_csv(str(bad))


# ---------------------------------------------------------------------------------------------
# real fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mpii_gt():
    path = fixture_path('mpii', 'gt_valid.mat')
    mat = scipy.io.loadmat(path)
    gt = mat['pos_gt_src'].transpose(2, 0, 1)                       # (N, 16, 2), 1-based
    head = 0.6 * np.linalg.norm(mat['headboxes_src'][1] - mat['headboxes_src'][0], axis=0)
    return path, gt, head, 1 - mat['jnt_missing'].T


def test_mpii_official_ground_truth_scores_100(mpii_gt):
    path, gt, _, vis = mpii_gt
    assert gt.shape == (2958, 16, 2)
    t = M.mpii_official(gt, path)
    for col in ('Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle', 'Mean', 'Mean@0.1'):
        assert t[col] == 100.0, col
    assert set(t['per_joint']) == set(MPII.names)
    assert 0 < vis.sum() < 2958 * 16                     # some joints really are missing


def _shift(gt, head, frac, seed=0):
    """Move every joint by exactly frac head sizes in a random direction."""
    ang = np.random.default_rng(seed).uniform(0, 2 * np.pi, gt.shape[:2])
    d = np.stack([np.cos(ang), np.sin(ang)], -1) * (frac * head)[:, None, None]
    return gt + d


def test_mpii_official_known_perturbations(mpii_gt):
    path, gt, head, _ = mpii_gt
    t = M.mpii_official(_shift(gt, head, 0.4), path)
    assert t['Mean'] == 100.0 and t['Mean@0.1'] == 0.0
    t = M.mpii_official(_shift(gt, head, 0.6), path)
    assert t['Mean'] == 0.0 and t['Head'] == 0.0
    # 0.105 head sizes: correct at 0.11 (HRNet's "Mean@0.1"), wrong at exactly 0.1
    t = M.mpii_official(_shift(gt, head, 0.105), path)
    assert t['Mean'] == 100.0 and t['Mean@0.1'] == 0.0
    t = M.mpii_official(_shift(gt, head, 0.095), path)
    assert t['Mean@0.1'] == 100.0
    # half the persons right, half 0.6 off: Mean = share of the counted joints of even persons
    pred = gt.copy()
    pred[1::2] = _shift(gt, head, 0.6)[1::2]
    t = M.mpii_official(pred, path)
    vis = (1 - scipy.io.loadmat(path)['jnt_missing'].T)[:, [i for i in range(16) if i not in (6, 7)]]
    assert t['Mean'] == pytest.approx(100 * vis[0::2].sum() / vis.sum())


def test_mpii_official_bad_inputs(mpii_gt, tmp_path):
    path, gt, _, _ = mpii_gt
    with pytest.raises(DatasetError, match=r'predictions have shape \(10, 16, 2\)'):
        M.mpii_official(gt[:10], path)
    scipy.io.savemat(str(tmp_path / 'g.mat'), {'pos_gt_src': np.zeros((16, 2, 3))})
    with pytest.raises(DatasetError, match="g.mat: no 'jnt_missing'"):
        M.mpii_official(gt[:3], str(tmp_path / 'g.mat'))


def test_lip_fixture_ground_truth_scores_100():
    names, gt, vis, _ = F.read_lip_csv(fixture_path('lip', 'lip_val_annotations.csv'))
    assert len(names) == 10000 and gt.shape == (10000, 16, 2)
    assert vis.sum() == np.isfinite(gt[..., 0]).sum() < 160000
    t = M.lip_pckh_table(gt, gt, vis)
    assert t['Mean'] == 100.0 and t['Head'] == 100.0 and t['Mean@0.1'] == 100.0
    head = M.lip_head_size(gt)
    ok = np.isfinite(head) & (head > 0)
    t = M.lip_pckh_table(_shift(np.nan_to_num(gt), np.where(ok, head, 0), 0.6), gt, vis)
    assert t['Mean'] == 0.0


def test_coco_ground_truth_as_results_gives_ap_1():
    path = fixture_path('coco', 'person_keypoints_val4.json')
    with open(path) as f:
        anns = json.load(f)['annotations']
    results = []
    for a in anns:
        if a['num_keypoints'] == 0:
            continue
        kp = np.array(a['keypoints'], np.float64).reshape(17, 3)
        kp[:, 2] = 1.0
        results.append(dict(image_id=a['image_id'], keypoints=kp.tolist(), box_score=1.0,
                            area=a['bbox'][2] * a['bbox'][3]))
    assert len(results) == 12
    stats = M.coco_oks_ap(results, path)
    assert list(stats) == list(M.COCO_STATS)
    assert all(v == pytest.approx(1.0) for v in stats.values()), stats
    # an exact duplicate with a lower score is removed by OKS-NMS and costs nothing
    dup = dict(results[0], box_score=0.5)
    assert M.coco_oks_ap(results + [dup], path)['AP'] == pytest.approx(1.0)
    # every keypoint 3 px off lowers AP below 1 but keeps AP .5 at 1
    moved = [dict(r, keypoints=(np.array(r['keypoints']) + [3.0, 0, 0]).tolist()) for r in results]
    s = M.coco_oks_ap(moved, path)
    assert s['AP .5'] == pytest.approx(1.0) and 0.3 < s['AP'] < 0.99
    with pytest.raises(DatasetError, match='not in the annotations'):
        M.coco_oks_ap([dict(results[0], image_id=-5)], path)
