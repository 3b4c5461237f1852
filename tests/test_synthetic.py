"""Tests of the Synthetic reader: determinism, record layout, left/right convention, variety,
truncation, the MPII json export round trip and the full reader -> pipeline -> codec path."""
import json
import os

import cv2
import numpy as np
import pytest

import opts as options
from datasets import build_dataset, reader_class
from datasets.codecs import HeatmapCodec
from datasets.joints import MPII
from datasets.synthetic import HEAD_SIZE_RATIO, Synthetic, main as synthetic_main

J = {n: i for i, n in enumerate(MPII.names)}
RES = 256


def make_opts(*extra):
    return options.parse(['--nTrainSamples', '48', '--nValSamples', '12', *extra])


@pytest.fixture(scope='module')
def reader():
    return Synthetic(make_opts('--nTrainSamples', '300'), 'train')


def test_registered_as_default_dataset():
    assert reader_class('Synthetic') is Synthetic
    assert options.parse([]).dataset == 'Synthetic'
    assert Synthetic.joint_set is MPII


def test_record_fields(reader):
    assert len(reader) == 300
    for rec in reader.records[:20]:
        assert rec['image'] is None
        assert isinstance(rec['seed'], int)
        assert rec['center'].shape == (2,) and rec['center'].dtype == np.float32
        assert rec['scale'].shape == (2,) and rec['scale'].dtype == np.float32
        assert rec['scale'][0] == rec['scale'][1]
        assert rec['keypoints'].shape == (1, 16, 2) and rec['keypoints'].dtype == np.float32   # one person
        assert rec['visible'].shape == (1, 16) and rec['visible'].dtype == np.float32
        assert set(np.unique(rec['visible'][0])) <= {0.0, 1.0}
        assert isinstance(rec['head_size'], float) and rec['head_size'] > 0
    img = reader.load_image(reader.records[0])
    assert img.shape == (RES, RES, 3) and img.dtype == np.uint8


def test_split_sizes_caps_and_resolution():
    o = make_opts('--maxTrainSamples', '5', '--maxValSamples', '0', '--syntheticRes', '128')
    train, val = Synthetic(o, 'train'), Synthetic(o, 'val')
    assert len(train) == 5 and len(val) == 12
    assert train.load_image(train.records[0]).shape == (128, 128, 3)
    # train and val are different people (disjoint seed streams)
    assert not {r['seed'] for r in train.records} & {r['seed'] for r in val.records}
    with pytest.raises(ValueError):
        Synthetic(o, 'test')


def test_deterministic_per_seed_split_index():
    a, b = Synthetic(make_opts('--syntheticCacheMB', '0'), 'val'), Synthetic(make_opts(), 'val')
    for i in (0, 7):
        np.testing.assert_array_equal(a.records[i]['keypoints'], b.records[i]['keypoints'])
        np.testing.assert_array_equal(a.load_image(a.records[i]), b.load_image(b.records[i]))
        # rendering twice gives the same pixels
        np.testing.assert_array_equal(a.load_image(a.records[i]), a.load_image(a.records[i]))
    c = Synthetic(make_opts('--seed', '1'), 'val')
    assert not np.allclose(a.records[0]['keypoints'], c.records[0]['keypoints'])
    assert not np.array_equal(a.load_image(a.records[0]), c.load_image(c.records[0]))


def test_box_and_head_size(reader):
    for rec in reader.records:
        half = rec['scale'][0] * 200 / 2
        # every joint, labelled or not, lies inside the person box with the MPII margin
        assert np.all(np.abs(rec['keypoints'][0] - rec['center']) <= half / 1.25 + 1e-3)
        seg = np.linalg.norm(rec['keypoints'][0][J['head_top']] - rec['keypoints'][0][J['upper_neck']])
        assert rec['head_size'] == pytest.approx(HEAD_SIZE_RATIO * seg, rel=1e-5)
    # the box covers 60-90 % of the image side
    sides = np.array([r['scale'][0] * 200 for r in reader.records]) / RES
    assert sides.min() >= 0.6 - 1e-4 and sides.max() <= 0.9 + 1e-4


def test_visible_joints_inside_and_truncation_exists(reader):
    vis = np.stack([r['visible'][0] for r in reader.records]) > 0
    joints = np.stack([r['keypoints'][0] for r in reader.records])
    inside = np.all((joints >= 0) & (joints <= RES - 1), axis=2)
    np.testing.assert_array_equal(vis, inside)      # labelled <=> inside the image
    assert (~vis).any(axis=1).sum() >= 10            # some people are cut by the border
    assert vis.mean() > 0.85                         # but most joints are labelled


def _side_sign(rec, a, b):
    """> 0 when joint b lies on the image-right of joint a, seen along the spine (lean-proof)."""
    spine = rec['keypoints'][0][J['thorax']] - rec['keypoints'][0][J['pelvis']]
    d = rec['keypoints'][0][b] - rec['keypoints'][0][a]
    return spine[0] * d[1] - spine[1] * d[0]


def test_left_right_follow_the_facing_direction(reader):
    # MPII convention: r_* is the person's right, on the image-left when facing the camera
    facing = np.array([r['facing'] for r in reader.records])
    assert 0.4 < facing.mean() < 0.9
    for pair in (('r_hip', 'l_hip'), ('r_shoulder', 'l_shoulder')):
        s = np.array([_side_sign(r, J[pair[0]], J[pair[1]]) for r in reader.records])
        assert np.mean(s[facing] > 0) > 0.97, pair
        assert np.mean(s[~facing] < 0) > 0.97, pair


def test_face_drawn_only_for_people_facing_the_camera(reader):
    # the face (eyes, hair only on top) is the left/right cue: compare the head region's colours
    # of one person rendered facing the camera and the same seeds' geometry turned away
    from datasets.synthetic import render, sample_person
    rec = next(r for r in reader.records if r['facing'] and r['visible'][0].all())
    person = sample_person(rec['seed'], RES)
    front = render(rec['seed'], RES, person)
    back = render(rec['seed'], RES, dict(person, face=False, front=False))
    assert person['face'] and person['front']
    diff = np.abs(front.astype(int) - back.astype(int)).sum(2) > 30
    ys, xs = np.nonzero(diff)
    assert len(ys) > 20
    # the difference is on the head and chest, between head top and pelvis
    top, pelvis = rec['keypoints'][0][J['head_top']], rec['keypoints'][0][J['pelvis']]
    size = rec['scale'][0] * 200
    assert np.all(np.hypot(xs - (top[0] + pelvis[0]) / 2, ys - (top[1] + pelvis[1]) / 2) < size / 2)


def test_variety(reader):
    joints = np.stack([r['keypoints'][0] for r in reader.records])
    centred = joints - joints[:, J['pelvis']][:, None]
    scale = np.array([r['scale'][0] for r in reader.records])[:, None, None] * 200
    spread = (centred / scale).std(axis=0)           # pose variety, independent of size/position
    assert spread[[J['r_wrist'], J['l_wrist'], J['r_ankle'], J['l_ankle']]].min() > 0.05
    assert np.std(scale) > 5 and joints[:, J['pelvis']].std(axis=0).min() > 5
    imgs = [reader.load_image(r).astype(np.int16) for r in reader.records[:6]]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 10


def test_export_round_trip(tmp_path):
    r = Synthetic(make_opts(), 'train')
    path = r.export(str(tmp_path), 3)
    assert path == os.path.join(str(tmp_path), 'annot', 'train.json')
    entries = json.load(open(path))
    assert len(entries) == 3
    for e, rec in zip(entries, r.records):
        img = cv2.imread(os.path.join(str(tmp_path), 'images', e['image']))
        assert img is not None and img.shape == (RES, RES, 3)
        # the HRNet / SimpleBaselines MPII loader's correction
        c = np.array(e['center'], np.float64)
        s = np.array([e['scale'], e['scale']], np.float64)
        c[1] = c[1] + 15 * s[1]
        s = s * 1.25
        c = c - 1
        joints = np.array(e['joints'], np.float64) - 1
        np.testing.assert_allclose(c, rec['center'], atol=1e-3)
        np.testing.assert_allclose(s, rec['scale'], atol=1e-3)
        np.testing.assert_allclose(joints, rec['keypoints'][0], atol=1e-3)
        assert e['joints_vis'] == [int(v) for v in rec['visible'][0]]


def test_export_command_line(tmp_path):
    synthetic_main(['--export', str(tmp_path), '--n', '2', '--split', 'val'])
    entries = json.load(open(os.path.join(str(tmp_path), 'annot', 'valid.json')))
    assert len(entries) == 2
    assert all(os.path.isfile(os.path.join(str(tmp_path), 'images', e['image'])) for e in entries)


def test_render_cache_keeps_the_rendered_pixels_within_its_budget():
    fresh = Synthetic(make_opts('--syntheticCacheMB', '0', '--syntheticRes', '512'), 'val')
    # 1 MB holds one 512 x 512 image (768 KB), not two
    cached = Synthetic(make_opts('--syntheticCacheMB', '1', '--syntheticRes', '512'), 'val')
    assert cached.cache_size == 1 and fresh.cache_size == 0
    first, second = cached.records[:2]
    image = cached.load_image(first)
    assert not image.flags.writeable and np.shares_memory(cached.load_image(first), image)
    np.testing.assert_array_equal(image, fresh.load_image(fresh.records[0]))
    again = cached.load_image(second)
    assert not np.shares_memory(cached.load_image(second), again) and again.flags.writeable
    np.testing.assert_array_equal(again, fresh.load_image(fresh.records[1]))
    # a record that is not this reader's (another split's) is rendered, never taken from the cache
    other = Synthetic(make_opts('--syntheticRes', '512'), 'train').records[0]
    np.testing.assert_array_equal(cached.load_image(other), fresh.load_image(other))


def test_render_cache_gives_the_same_training_samples():
    """Two epochs of samples (augmented crops and targets) with and without the cache: the
    pipeline reads the cached image, never writes into it."""
    codec = HeatmapCodec(64, 16, 1.0)
    sets = [build_dataset(make_opts('--inputRes', '64', '--outputRes', '16', '--syntheticRes', '96',
                                    '--syntheticCacheMB', mb), 'train', codec) for mb in ('0', '8')]
    for epoch in (0, 1):
        for ds in sets:
            ds.epoch = epoch
        for i in range(3):
            a, b = sets[0][i], sets[1][i]
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['heatmap'], b['heatmap'])
    assert sets[1].reader._cached.sum() == 3 and sets[0].reader._cache.size == 0


def test_render_cache_is_shared_with_the_loader_workers(monkeypatch):
    """The images a forked loader worker renders are kept for the main process and for the next
    epoch's workers (new processes): the second epoch renders nothing."""
    import multiprocessing
    import pickle
    import torch
    import datasets.synthetic as synthetic
    if 'fork' not in multiprocessing.get_all_start_methods():
        pytest.skip('the cache is shared with forked workers; this platform cannot fork')
    codec = HeatmapCodec(64, 16, 1.0)
    ds = build_dataset(make_opts('--inputRes', '64', '--outputRes', '16', '--syntheticRes', '96',
                                 '--syntheticCacheMB', '8', '--nTrainSamples', '6'), 'train', codec)
    context = multiprocessing.get_context('fork')

    def one_epoch():
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=ds.collate,
                                             multiprocessing_context=context)
        return [batch['image'] for batch in loader]

    first = one_epoch()
    assert ds.reader._cached.all()          # rendered in the worker, seen here
    for i, record in enumerate(ds.reader.records):
        np.testing.assert_array_equal(ds.reader._cache[i], synthetic.render(record['seed'], 96, record['person']))

    def no_render(*args):
        raise AssertionError('rendered again')
    monkeypatch.setattr(synthetic, 'render', no_render)     # inherited by the next worker
    second = one_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # a pickled copy (a spawned worker) starts a cache of its own instead of copying the pixels
    copy = pickle.loads(pickle.dumps(ds.reader))
    assert copy.cache_size == 6 and not copy._cached.any() and ds.reader._cached.all()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_pipeline_targets_peak_at_the_joints(split):
    o = make_opts('--inputRes', '128', '--outputRes', '32')
    codec = HeatmapCodec(128, 32, 1.0)
    ds = build_dataset(o, split, codec)
    for i in range(4):
        sample = ds[i]
        image, target, weight, joints = sample['image'], sample['heatmap'], sample['heatmap_weight'], sample['keypoints'][0]
        assert tuple(image.shape) == (3, 128, 128) and sample['keypoints'].shape == (1, 16, 2)
        assert target.shape == (16, 32, 32) and weight.shape == (16,)
        coords, _ = codec.decode_heatmaps(target[None])
        inside = np.all((joints >= 0) & (joints <= 127), axis=1)
        ok = (weight > 0) & inside     # a joint off the crop has a clipped Gaussian
        assert ok.sum() >= 8
        err = np.abs(coords[0][ok] - joints[ok])
        assert err.max() <= 4.0   # within one heatmap pixel (the stride)
