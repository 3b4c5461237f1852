"""Tests of the synthetic multi-person scenes (datasets.synthetic_multi): determinism, people
counts and sizes, COCO visibility (outside, occluded, visible), left/right, face keypoints on the
drawn face, the COCO export through COCOReader and pycocotools (AP 1 for the ground truth), and
the command line."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import opts as options
from datasets.coco import COCOReader
from datasets.joints import COCO
from datasets.synthetic import _appearance, _colour, _Draws, record_seed, sample_person
from datasets.synthetic_multi import (CATEGORY, EAR_HIDDEN, MAX_PEOPLE, SyntheticScenes, export, head_left_depth,
                                      main as multi_main, render_scene, self_hidden)
from utils.errors import ConfigError
from utils.metrics import coco_oks_ap

RES = 256
J = {n: i for i, n in enumerate(COCO.names)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def scenes():
    return [render_scene(s, RES) for s in range(120)]


def _people(scenes):
    return [p for _, people in scenes for p in people]


def _pixels(kp, res=RES):
    return np.clip(np.rint(kp[:, :2]).astype(np.int64), 0, res - 1)


def test_deterministic_per_seed():
    a_img, a = render_scene(5, RES)
    b_img, b = render_scene(5, RES)
    np.testing.assert_array_equal(a_img, b_img)
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p['keypoints'], q['keypoints'])
        np.testing.assert_array_equal(p['mask'], q['mask'])
        assert p['bbox'] == q['bbox'] and p['area'] == q['area']
    c_img, _ = render_scene(6, RES)
    assert np.abs(a_img.astype(int) - c_img).mean() > 10


def test_scenes_from_options_use_disjoint_split_streams():
    o = options.parse(['--nTrainSamples', '7', '--nValSamples', '3', '--syntheticRes', '160', '--seed', '4'])
    train, val = SyntheticScenes(o, 'train'), SyntheticScenes(o, 'val')
    assert len(train) == 7 and len(val) == 3
    o2 = options.parse(['--nTrainSamples', '7', '--maxTrainSamples', '2'])
    assert len(SyntheticScenes(o2, 'train')) == 2
    assert train.scene_seed(2) == record_seed(4, 'train', 2)
    assert not {train.scene_seed(i) for i in range(7)} & {val.scene_seed(i) for i in range(7)}
    img, people = train.scene(0)
    assert img.shape == (160, 160, 3) and img.dtype == np.uint8 and people
    np.testing.assert_array_equal(img, render_scene(record_seed(4, 'train', 0), 160)[0])
    with pytest.raises(ConfigError):
        SyntheticScenes(o, 'test')
    with pytest.raises(ConfigError):
        render_scene(0, 16)
    with pytest.raises(ConfigError):
        render_scene(0, RES, max_people=0)


def test_people_counts_and_sizes_vary(scenes):
    counts = np.array([len(people) for _, people in scenes])
    assert counts.min() >= 1 and counts.max() <= MAX_PEOPLE
    assert len(set(counts.tolist())) >= 5
    assert all(1 <= len(render_scene(s, RES, max_people=2)[1]) <= 2 for s in range(20))
    heights = np.array([p['height'] for p in _people(scenes)]) / RES
    assert heights.min() >= 0.25 - 1e-6 and heights.max() <= 0.95 + 1e-6
    assert heights.min() < 0.35 and heights.max() > 0.8 and heights.std() > 0.12
    for _, people in scenes:     # painter's order: far (small) to near (big)
        h = [p['height'] for p in people]
        assert h == sorted(h)
    img, people = render_scene(3, 320)
    assert img.shape == (320, 320, 3) and all(p['mask'].shape == (320, 320) for p in people)


def test_fields_masks_boxes_and_areas(scenes):
    for img, people in scenes[:40]:
        assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
        assert (np.sum([p['mask'] for p in people], axis=0) <= 1).all()     # visible masks are disjoint
        for p in people:
            kp = p['keypoints']
            assert kp.shape == (17, 3) and kp.dtype == np.float32
            assert set(np.unique(kp[:, 2])) <= {0.0, 1.0, 2.0}
            assert p['num_keypoints'] == int((kp[:, 2] > 0).sum()) >= 1
            assert p['area'] == float(p['mask'].sum()) > 0
            ys, xs = np.nonzero(p['mask'])
            assert p['bbox'] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_labelled_inside_unlabelled_outside(scenes):
    kps = np.stack([p['keypoints'] for p in _people(scenes)])
    inside = np.all((kps[..., :2] >= 0) & (kps[..., :2] <= RES - 1), axis=2)
    np.testing.assert_array_equal(kps[..., 2] > 0, inside)
    cut = (kps[..., 2] == 0).any(1) & (kps[..., 2] > 0).any(1)
    assert cut.sum() >= 20                       # some people are cut by the border
    assert (kps[..., 2] == 2).mean() > 0.5


def test_keypoints_under_nearer_people_are_occluded(scenes):
    under, overlapping = 0, 0
    for _, people in scenes:
        for i, p in enumerate(people):
            kp = p['keypoints']
            ij = _pixels(kp)
            nearer = np.zeros((RES, RES), bool)
            for q in people[i + 1:]:
                nearer |= q['mask']
            covered = (kp[:, 2] > 0) & nearer[ij[:, 1], ij[:, 0]]
            assert (kp[covered, 2] == 1).all()
            under += int(covered.sum())
            # a visible keypoint lies on its person's visible silhouette
            seen = kp[:, 2] == 2
            assert p['mask'][ij[seen, 1], ij[seen, 0]].all()
            x, y, w, h = p['bbox']
            for q in people[i + 1:]:
                qx, qy, qw, qh = q['bbox']
                overlapping += int(x < qx + qw and qx < x + w and y < qy + qh and qy < y + h)
    assert under >= 50 and overlapping >= 30


def _side(kp, a, b):
    """> 0 when keypoint b lies on the image-right of a, seen along the spine (hips -> shoulders)."""
    spine = (kp[J['l_shoulder']] + kp[J['r_shoulder']] - kp[J['l_hip']] - kp[J['r_hip']])[:2] / 2
    d = (kp[b] - kp[a])[:2]
    return spine[0] * d[1] - spine[1] * d[0]


def test_left_right_follow_the_facing_direction(scenes):
    people = [p for p in _people(scenes) if (p['keypoints'][[5, 6, 11, 12], 2] > 0).all()]
    facing = np.array([p['facing'] for p in people])
    assert 0.4 < facing.mean() < 0.9 and len(people) > 100
    for a, b in (('r_shoulder', 'l_shoulder'), ('r_hip', 'l_hip')):
        s = np.array([_side(p['keypoints'], J[a], J[b]) for p in people])
        assert np.mean(s[facing] > 0) > 0.97, a      # the person's left on the image right
        assert np.mean(s[~facing] < 0) > 0.97, a
    faces = [p for p in people if p['face']]
    s = np.array([_side(p['keypoints'], J['r_eye'], J['l_eye']) for p in faces])
    assert np.mean(s > 0) > 0.97


def test_face_keypoints_on_the_drawn_head(scenes):
    dark_ok = []
    for img, people in scenes:
        for p in people:
            h, kp = p['head'], p['keypoints']
            a = np.radians(h['angle'])
            axis = np.array([np.cos(a), np.sin(a)])               # neck -> head top
            normal = np.array([-axis[1], axis[0]])
            d = kp[:5, :2] - h['center']
            r = np.hypot(d @ axis / (h['half_length'] + h['outline']), d @ normal / (h['half_width'] + h['outline']))
            assert r.max() <= 1.05                                 # inside the head ellipse
            if not p['face']:
                assert (kp[:3, 2] != 2).all()                      # turned away: nose and eyes hidden
                continue
            assert (kp[0, :2] - (kp[1, :2] + kp[2, :2]) / 2) @ axis < 0   # the nose below the eyes
            if h['half_width'] >= 8 and (kp[1:3, 2] == 2).all():   # big faces: the eyes on the eye dots
                dark = np.array(_colour(_appearance(_Draws(p['seed'], 1))['hair'], 0.3))
                ij = _pixels(kp[1:3])
                dark_ok += [np.abs(img[y, x].astype(int) - dark).max() <= 10 for x, y in ij]
    assert len(dark_ok) >= 40 and np.mean(dark_ok) > 0.85


def test_head_depth_axis_and_hidden_ears():
    # the head's left axis: its image part is sample_person's head_left, its depth from the cross
    # product; a face turned to the image right (the person's left) hides the left ear
    turned = 0
    for seed in range(300):
        p = sample_person(seed, RES)
        lz = head_left_depth(p)
        assert lz ** 2 + float(np.dot(p['head_left'], p['head_left'])) == pytest.approx(1.0, abs=1e-6)
        up = np.subtract(p['points']['head_top'], p['points']['upper_neck'])
        fx = p['head_fwd'][0]
        if p['face'] and up[1] < -0.8 * np.linalg.norm(up) and abs(fx) > 0.5:
            turned += 1
            assert np.sign(lz) == -np.sign(fx)
            hidden = self_hidden(p)
            assert not hidden[:3].any() and not (hidden[3] and hidden[4])
            if abs(lz) > EAR_HIDDEN:   # the ear on the side the face turns away from
                assert hidden[3] == (fx > 0) and hidden[4] == (fx < 0)
    assert turned >= 10


def _coco_reader(root, split):
    return COCOReader(options.parse(['--dataset', 'COCO', '--dataDir', str(root)]), split)


def test_export_round_trip_through_coco_reader_and_pycocotools(tmp_path):
    path, n_people = export(str(tmp_path), 6, 'val', RES, seed=2)
    assert path == os.path.join(str(tmp_path), 'annotations', 'person_keypoints_val2017.json')
    data = json.load(open(path))
    assert data['categories'] == [CATEGORY] and len(CATEGORY['keypoints']) == 17
    assert CATEGORY['keypoints'][:3] == ['nose', 'left_eye', 'right_eye']
    assert [im['id'] for im in data['images']] == list(range(1, 7)) and len(data['annotations']) == n_people
    rendered = {}
    for im in data['images']:
        img = cv2.imread(os.path.join(str(tmp_path), 'val2017', im['file_name']))
        assert img is not None and img.shape == (RES, RES, 3) and im['width'] == im['height'] == RES
        rendered[im['id']] = render_scene(record_seed(2, 'val', im['id'] - 1), RES)[1]
    ann_iter = iter(data['annotations'])
    for image_id, people in rendered.items():
        for p in people:
            a = next(ann_iter)
            assert a['image_id'] == image_id and a['iscrowd'] == 0 and a['category_id'] == 1
            kp = np.array(a['keypoints'], np.float64).reshape(17, 3)
            np.testing.assert_array_equal(kp[:, 2], p['keypoints'][:, 2])
            lab = kp[:, 2] > 0
            np.testing.assert_allclose(kp[lab, :2], p['keypoints'][lab, :2], atol=0.006)
            assert (kp[~lab] == 0).all() and a['num_keypoints'] == lab.sum()
            assert a['bbox'] == p['bbox'] and a['area'] == p['area']
            assert a['segmentation'] and all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in a['segmentation'])

    reader = _coco_reader(tmp_path, 'val')
    assert len(reader) == n_people
    first = reader.records[0]
    assert first['image'].endswith(os.path.join('val2017', '000000000001.jpg'))
    first_kp = np.array(data['annotations'][0]['keypoints']).reshape(17, 3)
    np.testing.assert_allclose(first['keypoints'][0], first_kp[:, :2])

    # the ground truth as results (the results layout of COCOReader.results): AP 1
    results = []
    for a in data['annotations']:
        kp = np.array(a['keypoints'], np.float64).reshape(17, 3)
        kp[:, 2] = 1.0
        results.append(dict(image_id=a['image_id'], category_id=1, keypoints=kp.reshape(-1).tolist(),
                            box_score=1.0, area=a['area']))
    assert coco_oks_ap(results, path)['AP'] == pytest.approx(1.0)
    preds = np.stack([r['keypoints'][0] for r in reader.records])
    table, ap = reader.evaluate(preds, np.ones(preds.shape[:2]), np.arange(len(reader)))
    assert ap == pytest.approx(1.0) and table['AR'] == pytest.approx(1.0)

    # the polygons cover the visible masks (pycocotools' own rasterisation)
    from pycocotools import mask as mask_utils
    people = [p for ps in rendered.values() for p in ps]
    for a, p in zip(data['annotations'], people):
        if p['area'] < 400:
            continue
        poly = mask_utils.merge(mask_utils.frPyObjects(a['segmentation'], RES, RES))
        visible = mask_utils.encode(np.asfortranarray(p['mask'].astype(np.uint8)))
        assert mask_utils.iou([poly], [visible], [0])[0, 0] > 0.75


def test_train_and_val_exports_differ(tmp_path):
    export(str(tmp_path), 2, 'train', 96)
    export(str(tmp_path), 2, 'val', 96)
    seeds = {split: {im['synthetic_seed'] for im in json.load(open(os.path.join(
        str(tmp_path), 'annotations', f'person_keypoints_{split}2017.json')))['images']} for split in ('train', 'val')}
    assert len(seeds['train']) == 2 and not seeds['train'] & seeds['val']
    assert len(_coco_reader(tmp_path, 'train')) >= 2


def test_command_line(tmp_path, capsys):
    multi_main(['--export', str(tmp_path), '--n', '3', '--split', 'val', '--res', '128', '--seed', '1',
                '--maxPeople', '3'])
    assert 'scenes/s' in capsys.readouterr().out
    data = json.load(open(os.path.join(str(tmp_path), 'annotations', 'person_keypoints_val2017.json')))
    assert len(data['images']) == 3 and all(im['width'] == 128 for im in data['images'])
    assert all(os.path.isfile(os.path.join(str(tmp_path), 'val2017', im['file_name'])) for im in data['images'])
    counts = np.bincount([a['image_id'] for a in data['annotations']])[1:]
    assert counts.min() >= 1 and counts.max() <= 3
    # a bad value: one 'error: ...' line and status 1, no traceback
    proc = subprocess.run([sys.executable, '-m', 'datasets.synthetic_multi', '--export', str(tmp_path / 'x'),
                           '--n', '0'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith('error: ') and 'Traceback' not in proc.stderr
