"""Dataset readers (MPII, COCO, LSP, LIP) on the real fixtures in ../shared/fixtures.

Each test builds the dataset's official folder layout in tmp_path out of symlinks to the
fixtures (never copies), or writes tiny files of its own (LSP).
"""
import csv
import json
import os

import h5py
import numpy as np
import pytest
import scipy.io

import datasets
import opts as options
from conftest import fixture_path
from datasets import formats
from datasets.codecs import HeatmapCodec
from datasets.pipeline import crop_box, denormalize, to_original, transform_points
from utils import metrics
from utils.errors import DatasetError


# ----------------------------------------------------------------------------- helpers

def make_opts(dataset, data_dir, *extra):
    return options.parse(['--dataset', dataset, '--dataDir', str(data_dir), '--inputRes', '256',
                          '--outputRes', '64', *extra])


def reader(dataset, data_dir, split='val', *extra):
    return datasets.build_reader(make_opts(dataset, data_dir, *extra), split)


def link(src, dst):
    os.makedirs(os.path.dirname(str(dst)), exist_ok=True)
    os.symlink(src, dst)


def one_line_error(excinfo, *must_contain):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, DatasetError) and '\n' not in msg, msg
    for s in must_contain:
        assert str(s) in msg, f'{s!r} not in {msg!r}'
    return msg


def mpii_json_layout(tmp_path, with_gt=False):
    link(fixture_path('mpii', 'mpii_val5.json'), tmp_path / 'annot' / 'valid.json')
    link(fixture_path('mpii', 'images'), tmp_path / 'images')
    if with_gt:
        link(fixture_path('mpii', 'gt_valid.mat'), tmp_path / 'annot' / 'gt_valid.mat')
    return tmp_path


def mpii_h5_layout(tmp_path, with_gt=False, in_annot=True):
    link(fixture_path('mpii', 'valid.h5'), tmp_path / ('annot/valid.h5' if in_annot else 'valid.h5'))
    link(fixture_path('mpii', 'images'), tmp_path / 'images')
    if with_gt:
        link(fixture_path('mpii', 'gt_valid.mat'), tmp_path / 'annot' / 'gt_valid.mat')
    return tmp_path


def coco_layout(tmp_path, images_under='images/val2017'):
    link(fixture_path('coco', 'person_keypoints_val4.json'),
         tmp_path / 'annotations' / 'person_keypoints_val2017.json')
    link(fixture_path('coco', 'images'), tmp_path / images_under)
    return tmp_path


def lip_layout(tmp_path, name='TrainVal_pose_annotations/lip_val_set.csv'):
    link(fixture_path('lip', 'lip_val_annotations.csv'), tmp_path / name)
    os.makedirs(tmp_path / 'TrainVal_images' / 'val_images')     # no LIP images in the fixtures
    return tmp_path


def centroid(gray, near, radius):
    x0, y0 = int(round(near[0])) - radius, int(round(near[1])) - radius
    xa, ya = max(x0, 0), max(y0, 0)
    patch = gray[ya:y0 + 2 * radius + 1, xa:x0 + 2 * radius + 1].astype(np.float64)
    ys, xs = np.mgrid[ya:ya + patch.shape[0], xa:xa + patch.shape[1]]
    return np.array([(xs * patch).sum() / patch.sum(), (ys * patch).sum() / patch.sum()])


def check_pipeline_geometry(rdr, opts, max_records=None):
    """Every record's labelled joints go through the eval pipeline onto the crop pixels that
    carry them, and back to the original within half a pixel."""
    codec = HeatmapCodec(opts.inputRes.wh, opts.outputRes.wh, opts.hmGauss)
    ds = datasets.build_dataset(opts, 'val', codec, reader=rdr)
    width, height = opts.inputRes.wh
    checked = 0
    for i, rec in enumerate(rdr.records[:max_records]):
        sample = ds[i]
        image = sample['image']
        assert tuple(image.shape) == (3, height, width)
        m = np.asarray(sample['meta']['affine'], np.float64)
        joints, lab = rec['keypoints'][0], rec['visible'][0] > 0
        crop_joints = sample['keypoints'][0]
        expected = transform_points(joints, m)
        assert np.abs(crop_joints[lab] - expected[lab]).max() < 1e-2
        back = to_original(np.asarray(crop_joints)[None], m[None])[0]
        assert np.abs(back[lab] - joints[lab]).max() < 0.5
        # the crop is the real image, warped: not blank
        assert denormalize(image).std() > 5
        # paint discs on a black copy of the image at two labelled joints, warp, find them
        original = rdr.load_image(rec)
        zoom = width / crop_box(rec['scale'], (width, height))[0]
        r_crop = 4.0
        r = r_crop / min(zoom, 1.0)               # at least 4 px in the crop and in the original
        h, w = original.shape[:2]
        inside = lab & np.all((expected > 2 * r_crop + 2) & (expected < np.array([width, height]) - 2 * r_crop - 3), axis=1)
        inside &= np.all((joints > r + 1) & (joints < np.array([w, h]) - r - 2), axis=1)
        if not inside.any():
            continue
        idx = np.flatnonzero(inside)
        first = idx[0]
        far = idx[np.argmax(np.linalg.norm(expected[idx] - expected[first], axis=1))]
        picks = [first] + ([far] if np.linalg.norm(expected[far] - expected[first]) > 6 * r_crop * max(zoom, 1) else [])
        yy, xx = np.mgrid[0:h, 0:w]
        painted = np.zeros_like(original)
        for j in picks:
            x, y = joints[j]
            painted[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = 255
        rdr.load_image = lambda record, _img=painted: _img
        try:
            crop = denormalize(ds[i]['image']).astype(np.float64)[..., 0]
        finally:
            del rdr.load_image
        for j in picks:
            found = centroid(crop, expected[j], int(np.ceil(r * zoom)) + 3)
            assert np.linalg.norm(found - expected[j]) < 0.5, (i, j, found, expected[j])
        checked += len(picks)
    return checked


# ----------------------------------------------------------------------------- MPII

def test_mpii_json_records_box_and_joints(tmp_path):
    rdr = reader('MPII', mpii_json_layout(tmp_path))
    assert len(rdr) == 5 and rdr.layout == 'json'
    raw = json.load(open(fixture_path('mpii', 'mpii_val5.json')))
    for rec, a in zip(rdr.records, raw):
        s = a['scale']
        # HRNet: c[1] += 15 s, s *= 1.25, then 1-based -> 0-based
        assert np.allclose(rec['center'], [a['center'][0] - 1, a['center'][1] + 15 * s - 1], atol=1e-3)
        assert np.allclose(rec['scale'], [1.25 * s, 1.25 * s], atol=1e-5)
        vis = np.array(a['joints_vis']) > 0
        assert np.array_equal(rec['visible'][0] > 0, vis)
        assert np.allclose(rec['keypoints'][0][vis], np.array(a['joints'])[vis] - 1, atol=1e-4)
        assert rec['image'] == str(tmp_path / 'images' / a['image']) and os.path.isfile(rec['image'])


def test_mpii_h5_records_and_same_box_as_json(tmp_path):
    rdr = reader('MPII', mpii_h5_layout(tmp_path / 'h5'))
    assert len(rdr) == 2958 and rdr.layout == 'h5'
    js = reader('MPII', mpii_json_layout(tmp_path / 'js'))
    with h5py.File(fixture_path('mpii', 'valid.h5'), 'r') as f:
        part, normalize = f['part'][()], f['normalize'][()]
    # the h5's centre / scale are already adjusted: the same box as the json after HRNet's adjustment
    for a, b in zip(rdr.records[:5], js.records):
        assert os.path.basename(a['image']) == os.path.basename(b['image'])
        assert np.allclose(a['center'], b['center'], atol=1e-3)
        assert np.allclose(a['scale'], b['scale'], atol=1e-4)
        lab = b['visible'][0] > 0
        assert np.array_equal(a['visible'][0] > 0, lab)
        assert np.abs(a['keypoints'][0][lab] - b['keypoints'][0][lab]).max() <= 1.0   # the h5 truncates to integers
    lab = np.stack([r['visible'][0] for r in rdr.records]) > 0
    assert np.array_equal(lab, (part > 0).any(-1))
    assert np.allclose(np.stack([r['keypoints'][0] for r in rdr.records])[lab], part[lab] - 1)
    assert np.allclose([r['head_size'] for r in rdr.records], normalize)
    # also found directly under dataDir, and --maxValSamples
    assert len(reader('MPII', mpii_h5_layout(tmp_path / 'flat', in_annot=False), 'val', '--maxValSamples', '7')) == 7


def test_mpii_h5_official_protocol_gives_100_on_ground_truth(tmp_path):
    rdr = reader('MPII', mpii_h5_layout(tmp_path, with_gt=True))
    assert rdr.gt_valid_path is not None
    n = len(rdr)
    gt = scipy.io.loadmat(fixture_path('mpii', 'gt_valid.mat'))
    pos0 = gt['pos_gt_src'].transpose(2, 0, 1) - 1            # the official ground truth, 0-based
    perm = np.random.default_rng(0).permutation(n)            # indices in any order
    table, headline = rdr.evaluate(pos0[perm], np.ones((n, 16)), perm)
    assert headline == pytest.approx(100.0)
    for column in ('Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle', 'Mean@0.1'):
        assert table[column] == pytest.approx(100.0)
    # the h5's own joints (integer-truncated) through the same protocol: gt_valid.mat zeroes a
    # coordinate of 12 labelled joints, the only misses
    joints = np.stack([r['keypoints'][0] for r in rdr.records])
    table, headline = rdr.evaluate(joints, np.ones((n, 16)), np.arange(n))
    assert 99.9 < headline < 100.0
    # a subset: PCKh with the h5 head sizes
    table, headline = rdr.evaluate(joints[:100], np.ones((100, 16)), np.arange(100))
    assert headline == pytest.approx(100.0)
    # pred.mat: 1-based, record order
    path = rdr.save_predictions(joints[perm], None, perm, str(tmp_path / 'out'))
    assert np.allclose(formats.load_pred_mat(path), joints + 1)


def test_mpii_json_evaluation_head_sizes(tmp_path):
    rdr = reader('MPII', mpii_json_layout(tmp_path / 'gt', with_gt=True))
    joints = np.stack([r['keypoints'][0] for r in rdr.records])
    table, headline = rdr.evaluate(joints, np.ones((5, 16)), np.arange(5))   # head boxes of gt_valid
    assert headline == pytest.approx(100.0)
    shifted = joints + np.array([40.0, 0.0])
    assert rdr.evaluate(shifted, np.ones((5, 16)), np.arange(5))[1] < 100
    no_gt = reader('MPII', mpii_json_layout(tmp_path / 'nogt'))
    with pytest.raises(DatasetError) as e:
        no_gt.evaluate(joints, np.ones((5, 16)), np.arange(5))
    one_line_error(e, 'gt_valid.mat')


def test_mpii_images_through_the_pipeline(tmp_path):
    o = make_opts('MPII', mpii_json_layout(tmp_path))
    rdr = datasets.build_reader(o, 'val')
    assert check_pipeline_geometry(rdr, o) >= 9


# ----------------------------------------------------------------------------- COCO

def test_coco_ground_truth_records(tmp_path):
    rdr = reader('COCO', coco_layout(tmp_path))
    raw = json.load(open(fixture_path('coco', 'person_keypoints_val4.json')))
    kept = [a for a in raw['annotations'] if a['num_keypoints'] > 0 and not a.get('iscrowd')]
    assert len(rdr) == len(kept) == 12
    sizes = {im['id']: (im['width'], im['height']) for im in raw['images']}
    for rec, a in zip(sorted(rdr.records, key=lambda r: r['ann_id']), sorted(kept, key=lambda a: a['id'])):
        kp = np.array(a['keypoints'], np.float64).reshape(17, 3)
        assert rec['image_id'] == a['image_id'] and os.path.isfile(rec['image'])
        assert rec['visible'][0].sum() == a['num_keypoints']
        assert np.allclose(rec['keypoints'][0][kp[:, 2] > 0], kp[kp[:, 2] > 0, :2])
        x, y, w, h = rec['bbox']
        assert x >= 0 and y >= 0 and x + w <= sizes[a['image_id']][0] - 1 + 1e-3 and w > 0 and h > 0
        assert np.allclose(rec['center'], [x + w / 2, y + h / 2])
        side = 1.25 * max(w, h)                  # HRNet's _box2cs at the square input's aspect, padded 1.25
        assert np.allclose(rec['scale'] * 200, [side, side], rtol=1e-5)
        assert crop_box(rec['scale'], (256, 256)) == pytest.approx((side, side), rel=1e-5)   # used as it is
        assert rec['area'] == pytest.approx(side * side, rel=1e-5)
        assert rec['score'] == 1.0
    # images directly under dataDir/val2017 too
    assert len(reader('COCO', coco_layout(tmp_path / 'flat', images_under='val2017'))) == 12
    # the published 256x192 input: HRNet's _box2cs extends the box to width / height = 0.75
    tall = datasets.build_reader(options.parse(['--dataset', 'COCO', '--dataDir', str(tmp_path), '--inputRes',
                                                '256x192', '--outputRes', '64x48']), 'val')
    for rec in tall.records:
        x, y, w, h = rec['bbox']
        ew, eh = (w, w / 0.75) if w > 0.75 * h else (h * 0.75, h)
        assert crop_box(rec['scale'], (192, 256)) == pytest.approx((1.25 * ew, 1.25 * eh), rel=1e-5)
        assert rec['area'] == pytest.approx(1.25 ** 2 * ew * eh, rel=1e-5)


def test_coco_ground_truth_gives_ap_1_and_results_file(tmp_path):
    rdr = reader('COCO', coco_layout(tmp_path))
    n = len(rdr)
    preds = np.stack([np.where(r['visible'][0][:, None] > 0, r['keypoints'][0], r['center']) for r in rdr.records])
    scores = np.stack([np.where(r['visible'][0] > 0, 1.0, 0.0) for r in rdr.records])
    table, headline = rdr.evaluate(preds, scores, np.arange(n))
    assert headline == pytest.approx(1.0) and table['AR'] == pytest.approx(1.0)
    path = rdr.save_predictions(preds, scores, np.arange(n), str(tmp_path / 'out'))
    results = json.load(open(path))
    assert len(results) == n and set(results[0]) >= {'image_id', 'keypoints', 'box_score', 'area'}
    assert np.allclose(np.array(results[0]['keypoints']).reshape(17, 3)[:, :2], preds[0], atol=1e-3)
    assert metrics.coco_oks_ap(results, fixture_path('coco', 'person_keypoints_val4.json'))['AP'] == pytest.approx(1.0)
    # --maxValSamples: the ground truth is restricted to the records' images (the first 3
    # records are all the people of the first two images; 5 records cut the third image short)
    sub = reader('COCO', tmp_path, 'val', '--maxValSamples', '3')
    assert sub.evaluate(preds[:3], scores[:3], np.arange(3))[1] == pytest.approx(1.0)
    sub = reader('COCO', tmp_path, 'val', '--maxValSamples', '5')
    assert sub.evaluate(preds[:5], scores[:5], np.arange(5))[1] < 1.0


def test_coco_detection_records(tmp_path):
    det_path = fixture_path('coco', 'person_detections_val4.json')
    dets = json.load(open(det_path))
    root = coco_layout(tmp_path)
    rdr = reader('COCO', root, 'val', '--detFile', det_path)
    people = [d for d in dets if d.get('category_id', 1) == 1]
    assert len(rdr) == len(people) > 0
    assert [r['score'] for r in rdr.records] == [d['score'] for d in people]
    assert all(r['visible'][0].sum() == 0 and os.path.isfile(r['image']) for r in rdr.records)
    thr = float(np.median([d['score'] for d in people]))
    high = reader('COCO', root, 'val', '--detFile', det_path, '--detThreshold', str(thr))
    assert len(high) == sum(d['score'] >= thr for d in people) < len(rdr)
    # evaluation of the detection records runs (boxes' centres as predictions: low AP)
    preds = np.stack([np.tile(r['center'], (17, 1)) for r in high.records])
    table, headline = high.evaluate(preds, np.full((len(high), 17), 0.5), np.arange(len(high)))
    assert 0.0 <= headline <= 1.0
    with pytest.raises(DatasetError) as e:
        reader('COCO', root, 'val', '--detFile', str(tmp_path / 'no_dets.json'))
    one_line_error(e, 'no_dets.json')


@pytest.mark.parametrize('size', [('256', '64'), ('256x192', '64x48')], ids=['square', '256x192'])
def test_coco_images_through_the_pipeline(tmp_path, size):
    o = make_opts('COCO', coco_layout(tmp_path), '--inputRes', size[0], '--outputRes', size[1])
    rdr = datasets.build_reader(o, 'val')
    assert check_pipeline_geometry(rdr, o) >= 12


# ----------------------------------------------------------------------------- LIP

def test_lip_records_and_nan_joints(tmp_path):
    rdr = reader('LIP', lip_layout(tmp_path))
    rows = list(csv.reader(open(fixture_path('lip', 'lip_val_annotations.csv'))))
    assert len(rdr) == len(rows) == 10000
    values = np.array([[float(v) for v in r[1:]] for r in rows]).reshape(-1, 16, 3)
    labelled = ~np.isnan(values[..., 0])
    vis = np.stack([r['visible'][0] for r in rdr.records])
    assert np.array_equal(vis > 0, labelled) and (vis == 0).sum() > 0
    joints = np.stack([r['keypoints'][0] for r in rdr.records])
    assert np.allclose(joints[labelled], values[..., :2][labelled] - 1)      # 1-based -> 0-based
    assert np.all(joints[~labelled] == 0)
    r0 = rdr.records[0]
    assert r0['image'] == str(tmp_path / 'TrainVal_images' / 'val_images' / rows[0][0])
    lab = r0['visible'][0] > 0
    half = r0['scale'][0] * 100
    assert np.all(np.abs(r0['keypoints'][0][lab] - r0['center']) <= half)         # the box holds the joints
    # ground truth -> 100; pred.csv in the annotation frame
    table, headline = rdr.evaluate(joints, np.ones((len(rdr), 16)), np.arange(len(rdr)))
    assert headline == pytest.approx(100.0)
    path = rdr.save_predictions(joints[:50], None, np.arange(50), str(tmp_path / 'out'))
    names, back, _, _ = formats.read_lip_csv(path)
    assert names == [r[0] for r in rows[:50]]
    assert np.allclose(back[labelled[:50]], values[:50, :, :2][labelled[:50]], atol=1e-3)


def test_lip_other_file_names_and_limit(tmp_path):
    flat = lip_layout(tmp_path / 'a', 'lip_val_annotations.csv')
    assert len(reader('LIP', flat, 'val', '--maxValSamples', '20')) == 20
    nested = lip_layout(tmp_path / 'b', 'annotations/lip_val_annotations.csv')
    assert len(reader('LIP', nested, 'val', '--maxValSamples', '5')) == 5


# ----------------------------------------------------------------------------- LSP

def write_lsp(tmp_path, rng, n_ext=12):
    """LSP joints.mat 3x14x2000 (flag 0 = visible) and LSP-extended 14x3xn_ext (flag 1 = visible)."""
    lsp = np.zeros((3, 14, 2000))
    lsp[:2] = rng.uniform(20, 280, (2, 14, 2000)).round(1)
    lsp[2] = rng.integers(0, 2, (14, 2000))
    os.makedirs(tmp_path / 'images')
    scipy.io.savemat(str(tmp_path / 'joints.mat'), {'joints': lsp})
    ext = np.zeros((14, 3, n_ext))
    ext[:, :2] = rng.uniform(10, 200, (14, 2, n_ext)).round(1)
    ext[:, 2] = rng.integers(0, 2, (14, n_ext))
    ext[:, 2, 3] = 0                                   # person 4: no visible joint -> skipped
    os.makedirs(tmp_path / 'lspet' / 'images')
    scipy.io.savemat(str(tmp_path / 'lspet' / 'joints.mat'), {'joints': ext})
    return lsp, ext


def test_lsp_both_layouts_flags_and_frames(tmp_path):
    lsp, ext = write_lsp(tmp_path, np.random.default_rng(0))
    val = reader('LSP', tmp_path, 'val')
    assert len(val) == 1000
    r = val.records[0]                                  # LSP image 1001
    assert r['image'] == str(tmp_path / 'images' / 'im1001.jpg')
    assert np.allclose(r['keypoints'][0], lsp[:2, :, 1000].T - 1, atol=1e-5)
    assert np.all(r['visible'][0] == 1)                    # every LSP joint is labelled ...
    assert np.array_equal(r['occluded'][0], lsp[2, :, 1000])   # ... flag 1 = occluded (0 = visible)
    lo, hi = r['keypoints'][0].min(0), r['keypoints'][0].max(0)
    assert np.allclose(r['center'], (lo + hi) / 2, atol=1e-4)
    assert r['scale'][0] * 200 == pytest.approx(1.25 * (hi - lo).max(), rel=1e-5)

    train = reader('LSP', tmp_path, 'train')
    assert len(train) == 1000 + ext.shape[2] - 1
    e = [t for t in train.records if t['source'] == 'lspet']
    assert e[0]['image'] == str(tmp_path / 'lspet' / 'images' / 'im00001.jpg')
    assert all(t['index_in_file'] != 3 for t in e)
    for t in e:
        flag = ext[:, 2, t['index_in_file']]
        assert np.array_equal(t['visible'][0], flag)       # LSP-extended: flag 1 = visible
        lab = flag > 0
        assert np.allclose(t['keypoints'][0][lab], ext[lab, :2, t['index_in_file']] - 1, atol=1e-5)
        assert np.all(t['keypoints'][0][~lab] == 0)
    assert len(reader('LSP', tmp_path, 'train', '--maxTrainSamples', '10')) == 10

    # ground truth -> 100; pred.mat back in the frame of joints.mat
    joints = np.stack([r['keypoints'][0] for r in val.records])
    table, headline = val.evaluate(joints, np.ones((1000, 14)), np.arange(1000))
    assert headline == pytest.approx(100.0)
    assert val.evaluate(joints + 30, np.ones((1000, 14)), np.arange(1000))[1] < 100
    perm = np.random.default_rng(1).permutation(1000)
    path = val.save_predictions(joints[perm], None, perm, str(tmp_path / 'out'))
    assert np.allclose(formats.load_pred_mat(path), lsp[:2, :, 1000:].transpose(2, 1, 0), atol=1e-4)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize('name', ['MPII', 'COCO', 'LSP', 'LIP'])
def test_missing_folder_and_missing_annotation(tmp_path, name):
    with pytest.raises(DatasetError) as e:
        reader(name, tmp_path / 'nowhere')
    one_line_error(e, name, tmp_path / 'nowhere')
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(DatasetError) as e:
        reader(name, tmp_path / 'empty')
    expected = {'MPII': 'annot/valid.json', 'COCO': 'person_keypoints_val2017.json',
                'LSP': 'joints.mat', 'LIP': 'lip_val_set.csv'}[name]
    one_line_error(e, name, expected, tmp_path / 'empty')


def test_missing_images_folder(tmp_path):
    link(fixture_path('mpii', 'mpii_val5.json'), tmp_path / 'annot' / 'valid.json')
    with pytest.raises(DatasetError) as e:
        reader('MPII', tmp_path)
    one_line_error(e, tmp_path / 'images')


def test_malformed_annotations(tmp_path):
    mp = tmp_path / 'mpii'
    os.makedirs(mp / 'annot')
    os.makedirs(mp / 'images')
    (mp / 'annot' / 'valid.json').write_text('[{"image": "a.jpg", "center": [1, 2]')
    with pytest.raises(DatasetError) as e:
        reader('MPII', mp)
    one_line_error(e, mp / 'annot' / 'valid.json', 'json')
    (mp / 'annot' / 'valid.json').write_text('[{"image": "a.jpg", "center": [1, 2]}]')
    with pytest.raises(DatasetError) as e:
        reader('MPII', mp)
    one_line_error(e, mp / 'annot' / 'valid.json', 'scale')

    co = tmp_path / 'coco'
    os.makedirs(co / 'annotations')
    os.makedirs(co / 'images' / 'val2017')
    (co / 'annotations' / 'person_keypoints_val2017.json').write_text('{"images": [], "annot')
    with pytest.raises(DatasetError) as e:
        reader('COCO', co)
    one_line_error(e, co / 'annotations' / 'person_keypoints_val2017.json')
    (co / 'annotations' / 'person_keypoints_val2017.json').write_text('[1, 2]')
    with pytest.raises(DatasetError) as e:
        reader('COCO', co)
    one_line_error(e, 'not a COCO annotation file')

    li = tmp_path / 'lip'
    os.makedirs(li / 'val_images')
    (li / 'lip_val_annotations.csv').write_text('a.jpg,1,2,0\n')
    with pytest.raises(DatasetError) as e:
        reader('LIP', li)
    one_line_error(e, 'LIP', li / 'lip_val_annotations.csv')

    ls = tmp_path / 'lsp'
    os.makedirs(ls / 'images')
    scipy.io.savemat(str(ls / 'joints.mat'), {'joints': np.zeros((2, 14, 5))})
    with pytest.raises(DatasetError) as e:
        reader('LSP', ls)
    one_line_error(e, ls / 'joints.mat', '3x14xN')
    (ls / 'joints.mat').write_text('not a mat file')
    with pytest.raises(DatasetError) as e:
        reader('LSP', ls)
    one_line_error(e, ls / 'joints.mat')


def test_h5_missing_fields(tmp_path):
    os.makedirs(tmp_path / 'images')
    with h5py.File(tmp_path / 'valid.h5', 'w') as f:
        f['imgname'] = np.array([b'a.jpg'])
        f['center'] = np.zeros((1, 2))
    with pytest.raises(DatasetError) as e:
        reader('MPII', tmp_path)
    one_line_error(e, tmp_path / 'valid.h5', 'scale', 'part')


def test_readers_are_registered():
    assert {'MPII', 'COCO', 'LSP', 'LIP'} <= set(datasets.available())


@pytest.mark.parametrize('name', ['mpii', 'coco', 'lsp', 'lip'])
def test_dataset_defconf_matches_its_reader(name):
    from conftest import ROOT
    o = options.parse(['-DataConfig', os.path.join(ROOT, 'conf', 'datasets', f'{name}.defconf')])
    cls = datasets.reader_class(o.dataset)
    assert o.dataset == name.upper() and o.nJoints == cls.joint_set.num_joints
    assert o.dataDir == f'data/{name}'
    # the published input sizes: COCO 256x192 -> 64x48, the others 256x256 -> 64x64
    assert (o.inputRes, o.outputRes) == (((256, 192), (64, 48)) if name == 'coco' else ((256, 256), (64, 64)))


def test_mpii_training_samples_with_reduced_decode(tmp_path):
    """The real MPII images: a training sample decoded smaller where the crop shrinks the person
    has the same keypoints, targets and augmentation as the full decode, and nearly the same
    pixels; the images whose crop does not shrink them 2x are decoded whole."""
    layout = mpii_json_layout(tmp_path)
    os.symlink('valid.json', tmp_path / 'annot' / 'train.json')
    codec = HeatmapCodec((256, 256), (64, 64), 2)
    full = datasets.build_dataset(make_opts('MPII', layout, '--reducedDecode', 'false'), 'train', codec)
    small = datasets.build_dataset(make_opts('MPII', layout), 'train', codec)
    factors = []
    for i in range(len(full)):
        a, b = full[i], small[i]
        plan = small.pipeline.plan(small.reader.records[i], np.random.default_rng([small.seed, small.epoch, i]))
        factors.append(plan['reduce'])
        assert np.array_equal(a['keypoints'], b['keypoints']) and np.array_equal(a['heatmap'], b['heatmap'])
        diff = np.abs(denormalize(a['image']).astype(np.float64) - denormalize(b['image']))
        assert diff.mean() < 6, (i, plan['reduce'], diff.mean())
    assert max(factors) >= 2, factors
