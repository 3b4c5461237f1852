"""Using a trained model: the Python API (``Predictor(image, boxes)``) and ``-demo`` on images,
folders, videos and cameras, against ``-test`` on the same crops; on tiny checkpoints trained here."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import main as main_module
import opts as options
from conftest import ROOT, fixture_path
from datasets import build_reader
from datasets.associative_embedding import AssociativeEmbeddingCodec
from datasets.coco import box_to_center_scale, clean_box
from datasets.synthetic import Synthetic
from utils import metrics
from utils.errors import PoseError
from utils.predictor import Predictor

SYNTHETIC = ['--dataset', 'Synthetic', '--nTrainSamples', '16', '--nValSamples', '8', '--syntheticRes', '64',
             '--inputRes', '32', '--outputRes', '8', '--hmGauss', '1', '--model', 'StackedHourGlass',
             '--nStack', '2', '--nChannels', '8', '--nReductions', '1', '--data_loader_size', '8',
             '--nThreads', '0', '--progress', 'false', '--visCount', '0', '--LR', '1e-3', '--nEpochs', '1']
COCO_TOP_DOWN = ['--dataset', 'COCO', '--nJoints', '17', '--inputRes', '64x48', '--outputRes', '16x12', '--hmGauss', '1',
                 '--model', 'StackedHourGlass', '--nStack', '2', '--nChannels', '8', '--nReductions', '1',
                 '--data_loader_size', '8', '--nThreads', '0', '--progress', 'false', '--visCount', '0',
                 '--LR', '1e-3', '--nEpochs', '1']
BOTTOM_UP = ['--dataset', 'COCO', '--nJoints', '17', '--model', 'HigherHRNet', '--hrnetWidth', '4', '--inputRes', '128',
             '--outputRes', '32', '--hmGauss', '2', '--data_loader_size', '2', '--nThreads', '0', '--progress', 'false',
             '--visCount', '0', '--maxPeople', '30', '--nEpochs', '1', '--LR', '1e-3', '--optimizer_type', 'Adam']


pytestmark = pytest.mark.usefixtures('one_thread')   # torch on one thread (conftest)


def _train(root, name, args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main_module.main(args + ['--expDir', str(root), '--expID', name])
    finally:
        torch.set_num_threads(threads)
    return str(root / name / 'model_best.pth')


@pytest.fixture(scope='module')
def synthetic_ckpt(tmp_path_factory):
    """A 16-joint top-down hourglass trained for one epoch on Synthetic."""
    return _train(tmp_path_factory.mktemp('runs'), 'synthetic', SYNTHETIC)


def coco_root(tmp_path):
    """A COCO folder over the fixture: its annotations as both splits, its images."""
    (tmp_path / 'annotations').mkdir(parents=True, exist_ok=True)
    for split in ('train2017', 'val2017'):
        os.symlink(fixture_path('coco', 'person_keypoints_val4.json'),
                   tmp_path / 'annotations' / f'person_keypoints_{split}.json')
        os.symlink(fixture_path('coco', 'images'), tmp_path / split)
    return tmp_path


@pytest.fixture(scope='module')
def coco_ckpts(tmp_path_factory):
    """(root, top-down 17-joint checkpoint, bottom-up HigherHRNet checkpoint) on the COCO fixture."""
    root = coco_root(tmp_path_factory.mktemp('coco'))
    runs = tmp_path_factory.mktemp('coco_runs')
    top_down = _train(runs, 'td', COCO_TOP_DOWN + ['--dataDir', str(root)])
    bottom_up = _train(runs, 'bu', BOTTOM_UP + ['--dataDir', str(root)])
    return root, top_down, bottom_up


@pytest.fixture
def finds_people(monkeypatch):
    """A one-epoch HigherHRNet's heatmaps are nearly flat: keep every peak (detection threshold 0;
    at most 4 people an image, which keeps the grouping quick), so the bottom-up paths have people."""
    made = AssociativeEmbeddingCodec.from_opts.__func__

    def from_opts(cls, opts, model):
        codec = made(cls, opts, model)
        codec.detection_threshold, codec.max_people = 0.0, 4
        return codec
    monkeypatch.setattr(AssociativeEmbeddingCodec, 'from_opts', classmethod(from_opts))


def demo(path, ckpt, out, *extra):
    return main_module.main(['-demo', str(path), '--loadModel', ckpt, '--out', str(out), '--progress', 'false', *extra])


def write_video(path, frames=10, size=(96, 80), fps=12.0):
    """A short mp4v video of a synthetic person sliding to the right."""
    person = Synthetic(options.parse(['--nValSamples', '1', '--syntheticRes', '64']), 'val')
    image = cv2.cvtColor(person.load_image(person.records[0]), cv2.COLOR_RGB2BGR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, size)
    for i in range(frames):
        canvas = np.full((size[1], size[0], 3), 90, np.uint8)
        x = 2 * i
        canvas[8:72, x:x + 64] = image
        writer.write(canvas)
    writer.release()
    return path


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


# ----------------------------------------------------------------------------- the Python API

@pytest.mark.parametrize('flip', [False, True], ids=['plain', 'flip-test'])
def test_api_gives_the_keypoints_of_test_on_the_same_crops(synthetic_ckpt, flip):
    result = main_module.main(['-test', '--loadModel', synthetic_ckpt, '--progress', 'false',
                               '--flipTest', str(flip).lower()])
    predictor = Predictor.from_checkpoint(synthetic_ckpt, 'cpu', flip_test=flip)
    reader = Synthetic(predictor.opts, 'val')
    assert len(result['predictions']) == len(reader) == 8
    for p in result['predictions']:
        rec = reader.records[p['index']]
        people = predictor(reader.load_image(rec), centers=rec['center'][None], scales=rec['scale'][None])
        assert len(people) == 1 and people[0]['keypoints'].shape == (16, 3)
        assert np.array_equal(people[0]['keypoints'][:, :2], p['keypoints'][0])
        assert np.allclose(people[0]['keypoints'][:, 2], p['scores'][0], atol=1e-6)
        assert people[0]['score'] == pytest.approx(float(p['score'][0]), abs=1e-6)
    assert predictor.joint_names[0] == 'r_ankle' and (8, 9) in predictor.skeleton


def test_api_boxes_are_the_coco_readers_boxes_and_demo_agrees(coco_ckpts, tmp_path):
    root, ckpt, _ = coco_ckpts
    result = main_module.main(['-test', '--loadModel', ckpt, '--progress', 'false'])
    predictor = Predictor.from_checkpoint(ckpt)
    reader = build_reader(predictor.opts, 'val')
    anns = {a['id']: a for a in json.load(open(fixture_path('coco', 'person_keypoints_val4.json')))['annotations']}
    images = {im['id']: im for im in json.load(open(fixture_path('coco', 'person_keypoints_val4.json')))['images']}
    dets, expected = [], []
    for p in result['predictions']:
        rec = reader.records[p['index']]
        im = images[rec['image_id']]
        box = clean_box(anns[rec['ann_id']]['bbox'], im['width'], im['height'])
        image = cv2.imread(rec['image'])
        people = predictor(image, [box], bgr=True)
        assert np.array_equal(people[0]['keypoints'][:, :2], p['keypoints'][0])      # the same crop
        assert np.allclose(people[0]['box'], box)
        center, scale = box_to_center_scale(*box, 48 / 64)
        again = predictor(image, centers=center[None], scales=scale[None], bgr=True)
        assert np.array_equal(again[0]['keypoints'], people[0]['keypoints'])
        dets.append(dict(image_id=rec['image_id'], category_id=1, bbox=box, score=1.0))
        expected.append((rec['image_id'], box, people[0]['keypoints']))
    det_file = tmp_path / 'dets.json'
    det_file.write_text(json.dumps(dets))
    out = demo(root / 'val2017', ckpt, tmp_path / 'out', '--detFile', str(det_file))
    results = json.load(open(out['keypoints']))
    assert len(results) == len(result['predictions']) == 12
    for r in results:
        kp = metrics._keypoints_array(r['keypoints'], 17)
        same = [k for i, box, k in expected if i == r['image_id'] and np.allclose(box, r['box'], atol=1e-2)]
        assert len(same) == 1 and np.allclose(kp, same[0], atol=1e-3)
        assert set(r) == {'image_id', 'category_id', 'keypoints', 'score', 'box', 'file_name'}
    # the COCO evaluator reads the file as it is
    table = metrics.coco_keypoint_ap(results, fixture_path('coco', 'person_keypoints_val4.json'))
    assert 0.0 <= table['AP'] <= 1.0
    for name in os.listdir(fixture_path('coco', 'images')):
        drawn = cv2.imread(str(tmp_path / 'out' / name))
        assert drawn.shape == cv2.imread(fixture_path('coco', 'images', name)).shape


def test_api_inputs(synthetic_ckpt, coco_ckpts):
    predictor = Predictor.from_checkpoint(synthetic_ckpt)
    rgb = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    whole = predictor.predict(rgb)
    assert len(whole) == 1 and whole[0]['box'].tolist() == [0, 0, 90, 60]
    assert np.array_equal(predictor(rgb[..., ::-1].copy(), bgr=True)[0]['keypoints'], whole[0]['keypoints'])
    two = predictor(rgb, np.array([[10, 5, 30, 40], [0, 0, 90, 60]]))
    assert [p['box'].tolist() for p in two] == [[10, 5, 30, 40], [0, 0, 90, 60]]
    alone = predictor(rgb, [[0, 0, 90, 60]])[0]['keypoints']              # a batch of 2 or of 1: the same
    assert np.array_equal(two[1]['keypoints'][:, :2], alone[:, :2]) and np.allclose(two[1]['keypoints'], alone, atol=1e-6)
    assert predictor(rgb, np.zeros((0, 4))) == []
    square = predictor(rgb, centers=[[45, 30]], scales=[0.3])
    assert square[0]['box'].tolist() == [15, 0, 60, 60]
    for bad in (dict(boxes=[[0, 0, 0, 10]]), dict(centers=[[1, 2]]),
                dict(boxes=[[0, 0, 5, 5]], centers=[[1, 1]], scales=[1])):
        with pytest.raises(PoseError):
            predictor(rgb, **bad)
    with pytest.raises(PoseError, match='uint8'):
        predictor(rgb.astype(np.float32))
    bottom_up = Predictor.from_checkpoint(coco_ckpts[2])
    assert len(bottom_up.joint_names) == 17 and bottom_up.bottom_up
    with pytest.raises(PoseError, match='bottom-up'):
        bottom_up(rgb, [[0, 0, 10, 10]])


def test_infer_many_batches_several_images_and_gives_the_people_of_infer(synthetic_ckpt, coco_ckpts):
    predictor = Predictor.from_checkpoint(synthetic_ckpt)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((60, 90, 3), (80, 50, 3), (64, 64, 3))]
    boxes = [None, np.array([[5, 5, 30, 40], [0, 0, 50, 80]]), np.zeros((0, 4))]
    predictor.batch_size = 3                  # crops of different images share a forward pass
    many = predictor.infer_many(images, boxes)
    assert [len(f['people']) for f in many] == [1, 2, 0]
    for image, b, found in zip(images, boxes, many):
        alone = predictor.infer(image, b)['people']
        for p, q in zip(found['people'], alone):
            assert np.array_equal(p['keypoints'][:, :2], q['keypoints'][:, :2]) and np.array_equal(p['box'], q['box'])
            assert np.allclose(p['keypoints'][:, 2], q['keypoints'][:, 2], atol=1e-6)
    assert [len(f['people']) for f in predictor.infer_many(images[:2])] == [1, 1]
    maps = predictor.infer_many(images[:2], bgr=True, maps=True)
    single = predictor.infer(images[1][..., ::-1].copy(), maps=True)['maps'][0]
    assert [len(f['maps']) for f in maps] == [1, 1] and maps[1]['maps'][0]['heatmaps'].shape == single['heatmaps'].shape
    assert np.allclose(maps[1]['maps'][0]['heatmaps'], single['heatmaps'], atol=1e-5)
    assert np.array_equal(maps[1]['maps'][0]['affine'], single['affine'])
    with pytest.raises(PoseError, match='2 images but 1'):
        predictor.infer_many(images[:2], [None])
    bottom_up = Predictor.from_checkpoint(coco_ckpts[2])
    coco = cv2.imread(os.path.join(fixture_path('coco', 'images'), sorted(os.listdir(fixture_path('coco', 'images')))[0]))
    one = bottom_up.infer_many([coco], bgr=True)[0]['people']
    assert [p['keypoints'].tolist() for p in one] == [p['keypoints'].tolist() for p in bottom_up(coco, bgr=True)]


# ----------------------------------------------------------------------------- -demo

def test_demo_on_a_folder_of_real_images_whole_image(synthetic_ckpt, tmp_path):
    folder = fixture_path('mpii', 'images')
    out = demo(folder, synthetic_ckpt, tmp_path / 'out')
    names = sorted(os.listdir(folder))
    results = json.load(open(tmp_path / 'out' / 'keypoints.json'))
    assert [r['image_id'] for r in results] == [int(n[:-4]) for n in names]          # one person each
    assert out['frames'] == 5 and not out['skipped']
    predictor = Predictor.from_checkpoint(synthetic_ckpt)
    for name, r in zip(names, results):
        image = cv2.imread(os.path.join(folder, name))
        drawn = cv2.imread(str(tmp_path / 'out' / name))
        assert drawn.shape == image.shape and not np.array_equal(drawn, image)
        assert r['file_name'] == name and r['box'] == [0, 0, image.shape[1], image.shape[0]]
        people = predictor(image, bgr=True)
        assert np.allclose(metrics._keypoints_array(r['keypoints'], 16), people[0]['keypoints'], atol=1e-3)
    # detections matched by file name
    dets = [dict(file_name=names[0], bbox=[100, 50, 300, 400], score=0.9, category_id=1),
            dict(file_name=names[0], bbox=[10, 10, 50, 80], score=0.1, category_id=1),
            dict(file_name=names[1], bbox=[10, 10, 50, 80], score=0.9, category_id=2)]
    (tmp_path / 'dets.json').write_text(json.dumps(dets))
    out = demo(folder, synthetic_ckpt, tmp_path / 'det', '--detFile', str(tmp_path / 'dets.json'), '--detThreshold', '0.5')
    assert [(r['file_name'], r['box']) for r in out['results']] == [(names[0], [100, 50, 300, 400])]
    assert len(os.listdir(tmp_path / 'det')) == 6          # an image without detections is still drawn


def test_demo_on_a_video_and_a_single_image(synthetic_ckpt, tmp_path):
    video = write_video(tmp_path / 'clip.mp4', frames=10)
    source, fps = read_video(video)
    out = demo(video, synthetic_ckpt, tmp_path / 'out', '--heatmaps', 'false')
    frames, out_fps = read_video(tmp_path / 'out' / 'clip.mp4')
    assert len(frames) == len(source) == 10 and frames[0].shape == source[0].shape == (80, 96, 3)
    assert out_fps == pytest.approx(fps)
    results = json.load(open(out['keypoints']))
    assert [r['image_id'] for r in results] == list(range(10)) and 'file_name' not in results[0]
    people = Predictor.from_checkpoint(synthetic_ckpt)(source[3], bgr=True)
    assert np.allclose(np.reshape(results[3]['keypoints'], (16, 3)), people[0]['keypoints'], atol=1e-3)
    # with the heatmap panel the frames are wider, as tall
    demo(video, synthetic_ckpt, tmp_path / 'maps', '--heatmaps')
    frames, _ = read_video(tmp_path / 'maps' / 'clip.mp4')
    assert len(frames) == 10 and frames[0].shape[0] == 80 and frames[0].shape[1] > 96
    # one image
    image = fixture_path('mpii', 'images', '052475643.jpg')
    out = demo(image, synthetic_ckpt, tmp_path / 'one')
    assert out['files'] == [str(tmp_path / 'one' / '052475643.jpg')] and len(out['results']) == 1
    assert cv2.imread(out['files'][0]).shape == cv2.imread(image).shape


def test_bottom_up_demo_heatmaps_and_person_boxes(coco_ckpts, synthetic_ckpt, tmp_path, finds_people):
    root, _, bottom_up = coco_ckpts
    folder = fixture_path('coco', 'images')
    names = sorted(os.listdir(folder))
    people_model = Predictor.from_checkpoint(bottom_up)
    assert people_model.bottom_up
    found = {n: people_model(cv2.imread(os.path.join(folder, n)), bgr=True) for n in names}
    assert sum(len(v) for v in found.values()) > 0
    out = demo(folder, bottom_up, tmp_path / 'bu', '--heatmaps')
    assert len(out['results']) == sum(len(v) for v in found.values())
    for r in out['results']:
        kp = np.reshape(r['keypoints'], (17, 3))
        assert any(np.allclose(kp, p['keypoints'], atol=1e-3) and np.allclose(r['box'], p['box'], atol=1e-3)
                   for p in found[r['file_name']])
    for n in names:
        image, drawn = cv2.imread(os.path.join(folder, n)), cv2.imread(str(tmp_path / 'bu' / n))
        assert drawn.shape[0] == image.shape[0] and drawn.shape[1] > 2 * image.shape[1]     # heatmaps + tags
    # a top-down model on the bottom-up model's people
    out = demo(folder, synthetic_ckpt, tmp_path / 'td', '--personModel', bottom_up)
    assert len(out['results']) == sum(len(v) for v in found.values())
    big = [p['box'] for v in found.values() for p in v if min(p['box'][2:]) >= 16]
    assert all(any(np.allclose(b, r['box'], atol=1e-3) for r in out['results']) for b in big)
    # a top-down checkpoint cannot give the boxes
    with pytest.raises(PoseError, match='top-down model'):
        demo(folder, synthetic_ckpt, tmp_path / 'x', '--personModel', synthetic_ckpt)


# ----------------------------------------------------------------------------- bad inputs

def one_line(exc):
    assert '\n' not in str(exc.value)
    return str(exc.value)


def test_bad_inputs_are_one_line(synthetic_ckpt, tmp_path, capsys):
    with pytest.raises(PoseError) as e:
        demo(tmp_path / 'nowhere.jpg', synthetic_ckpt, tmp_path / 'out')
    assert 'nowhere.jpg' in one_line(e) and 'no such file' in str(e.value)
    with pytest.raises(PoseError) as e:
        demo('cam:99', synthetic_ckpt, tmp_path / 'out')
    assert 'cam:99' in one_line(e) and 'cannot open camera 99' in str(e.value)
    (tmp_path / 'broken.mp4').write_bytes(b'not a video' * 50)
    with pytest.raises(PoseError) as e:
        demo(tmp_path / 'broken.mp4', synthetic_ckpt, tmp_path / 'out')
    assert 'broken.mp4' in one_line(e) and 'cannot read the video' in str(e.value)
    # an unreadable image in a folder: one warning naming it, the rest of the folder runs
    folder = tmp_path / 'images'
    folder.mkdir()
    (folder / 'a_bad.jpg').write_bytes(b'\xff\xd8 truncated')
    os.symlink(fixture_path('mpii', 'images', '052475643.jpg'), folder / 'b_good.jpg')
    capsys.readouterr()
    out = demo(folder, synthetic_ckpt, tmp_path / 'out')
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if 'a_bad.jpg' in line]
    assert len(warnings) == 1 and warnings[0].startswith('warning:') and 'b_good' not in err
    assert out['skipped'] == [str(folder / 'a_bad.jpg')] and len(out['results']) == 1
    assert sorted(os.listdir(tmp_path / 'out')) == ['b_good.jpg', 'keypoints.json']
    # the drawings never replace the input images
    with pytest.raises(PoseError) as e:
        demo(folder, synthetic_ckpt, folder)
    assert '--out' in one_line(e)
    with pytest.raises(PoseError) as e:
        main_module.main(['-demo', str(folder), '--progress', 'false'])
    assert '--loadModel' in one_line(e)


def test_the_detections_a_checkpoint_recorded_are_not_the_demos(synthetic_ckpt, tmp_path, capsys):
    ckpt = torch.load(synthetic_ckpt, weights_only=True)
    ckpt['config']['detFile'] = str(tmp_path / 'val_detections.json')       # validated on detections
    torch.save(ckpt, tmp_path / 'recorded.pth')
    image = fixture_path('mpii', 'images', '052475643.jpg')
    out = demo(image, str(tmp_path / 'recorded.pth'), tmp_path / 'out')
    # the recorded file (which does not even exist here) is not used: the whole image is one person
    assert len(out['results']) == 1 and out['results'][0]['box'] == [0, 0, 854, 480]


def test_command_line_error_is_one_line(synthetic_ckpt, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '-demo', str(tmp_path / 'missing'),
                          '--loadModel', synthetic_ckpt], capture_output=True, text=True, cwd=str(tmp_path),
                         env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f'error: -demo {tmp_path / "missing"}: no such file or folder']
