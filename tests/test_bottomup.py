"""Bottom-up multi-person pose on the spine: COCO whole-image records with their loss masks, the
whole-image pipeline, the associative-embedding codec's targets, loss terms and test path, and
HigherHRNet end to end on the real COCO fixture images."""
import json
import os

import numpy as np
import pytest
import torch

import main as main_module
import opts as options
from conftest import fixture_path
from datasets import build_dataset, build_reader
from datasets.associative_embedding import AssociativeEmbeddingCodec, BottomUpPipeline, gaussian_heatmaps
from datasets.base import collate
from datasets.joints import COCO
from datasets.pipeline import transform_points
from models import build_model
from utils.errors import ConfigError
from utils.predictor import Predictor

TINY = ['--dataset', 'COCO', '--nJoints', '17', '--model', 'HigherHRNet', '--hrnetWidth', '4', '--inputRes', '128',
        '--outputRes', '32', '--hmGauss', '2', '--data_loader_size', '2', '--nThreads', '0', '--progress', 'false',
        '--visCount', '2', '--maxRotate', '30', '--maxTranslate', '0.2', '--maxPeople', '30']


pytestmark = pytest.mark.usefixtures('one_thread')   # torch on one thread (conftest)


def coco_root(tmp_path):
    (tmp_path / 'annotations').mkdir(parents=True)
    for split in ('train2017', 'val2017'):
        os.symlink(fixture_path('coco', 'person_keypoints_val4.json'),
                   tmp_path / 'annotations' / f'person_keypoints_{split}.json')
        os.symlink(fixture_path('coco', 'images'), tmp_path / split)
    return tmp_path


def tiny(tmp_path, *extra):
    return options.parse(TINY + ['--dataDir', str(coco_root(tmp_path)), *extra])


def test_coco_whole_image_records_and_loss_masks(tmp_path):
    o = tiny(tmp_path)
    model = build_model(o)
    codec = AssociativeEmbeddingCodec.from_opts(o, model)
    reader = build_reader(o, 'val', codec)
    raw = json.load(open(fixture_path('coco', 'person_keypoints_val4.json')))
    assert len(reader) == 4 and sum(len(r['keypoints']) for r in reader.records) == 12
    for rec in reader.records:
        anns = [a for a in raw['annotations'] if a['image_id'] == rec['image_id']]
        people = [a for a in anns if a['num_keypoints'] > 0 and not a['iscrowd']]
        assert rec['keypoints'].shape == (len(people), 17, 2)
        for kp, a in zip(rec['keypoints'], people):
            k = np.array(a['keypoints'], float).reshape(17, 3)
            assert np.allclose(kp[k[:, 2] > 0], k[k[:, 2] > 0, :2])
        mask = reader.mask(rec, rec['height'], rec['width'])
        ignored = [a for a in anns if a['num_keypoints'] == 0 or a['iscrowd']]
        assert (mask is None) == (not ignored)
        for a in ignored:                   # the loss skips the people without keypoints
            x, y, w, h = (int(round(v)) for v in a['bbox'])
            assert mask[y + h // 2, x + w // 2] == 0 and mask.mean() > 0.9
    # a top-down dataset refuses a bottom-up model
    with pytest.raises(ConfigError) as e:
        build_reader(options.parse(['--dataset', 'LIP', '--model', 'HigherHRNet']), 'val', codec)
    assert 'one record per person' in str(e.value)


def test_bottom_up_pipeline_moves_people_and_mask_with_the_image():
    rng = np.random.default_rng(0)
    image = np.zeros((300, 400, 3), np.uint8)
    people = rng.uniform(50, 250, (3, 17, 2))
    for p in people.reshape(-1, 2):
        image[int(p[1]), int(p[0])] = 255
    mask = np.ones((300, 400), np.uint8)
    mask[100:150, 200:260] = 0
    record = dict(keypoints=people, visible=np.ones((3, 17)), mask=mask)
    pipe = BottomUpPipeline(128, COCO.flip_permutation(), train=True)
    for seed in range(5):
        out = pipe(image, record, np.random.default_rng(seed))
        assert tuple(out['image'].shape) == (3, 128, 128) and out['mask'].shape == (128, 128)
        flipped = out['affine'][0, 0] < 0
        moved = transform_points(people.reshape(-1, 2), out['affine']).reshape(3, 17, 2)
        perm = COCO.flip_permutation() if flipped else np.arange(17)
        assert np.allclose(out['keypoints'], moved[:, perm], atol=1e-3)
        inside = transform_points([[230.0, 125.0]], out['affine'])[0]
        x, y = int(round(inside[0])), int(round(inside[1]))
        if 2 <= x < 126 and 2 <= y < 126:
            assert out['mask'][y, x] == 0       # the ignored region went with the image
    # test: the shorter side to the input size, the longer one padded to a multiple of 64
    single = BottomUpPipeline(128, COCO.flip_permutation())(image, record)
    assert tuple(single['image'].shape[1:]) == (128, 192) and tuple(single['size']) == (192, 128)
    # multi-scale: the sizes of the smallest scale (64 x 128 at 0.5) times each scale
    test = BottomUpPipeline(128, COCO.flip_permutation(), test_scales=(0.5, 1.0, 2.0))(image, record)
    assert [tuple(im.shape[1:]) for im in test['image_scales']] == [(64, 128), (128, 256), (256, 512)]
    assert tuple(test['size']) == (256, 128) and test['image'] is test['image_scales'][1]
    with pytest.raises(ConfigError):
        BottomUpPipeline(128, COCO.flip_permutation(), test_scales=(0.5, 2.0))


def test_rectangular_training_inputs_frame_the_image_as_the_test_resize_does(tmp_path):
    """--inputRes 128x192: the shorter image side (times the scale factor) onto the input's shorter
    side, as the test resize puts it; at scale 1 without a shift the training crop is the test
    image of a 3:2 picture pixel for pixel, and the targets follow the rectangle."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (300, 450, 3), np.uint8)
    people = rng.uniform(20, 280, (2, 17, 2))
    record = dict(keypoints=people, visible=np.ones((2, 17)))
    perm = COCO.flip_permutation()
    train = BottomUpPipeline(128, perm, train=True, scale_range=(1, 1), max_rotate=0, max_translate=0, flip=False,
                             train_size=(192, 128))(image, record, np.random.default_rng(0))
    test = BottomUpPipeline(128, perm)(image, record)
    assert tuple(train['image'].shape) == (3, 128, 192) and train['mask'].shape == (128, 192)
    assert np.allclose(train['affine'], test['affine'], atol=1e-4)
    assert np.abs(np.asarray(train['image']) - np.asarray(test['image'])).max() < 1e-5
    assert np.allclose(train['keypoints'], test['keypoints'], atol=1e-3)
    o = tiny(tmp_path, '--inputRes', '128x192', '--outputRes', '32x48')
    model = build_model(o)
    codec = AssociativeEmbeddingCodec.from_opts(o, model)
    assert codec.input_size == 128 and codec.output_sizes == [(48, 32), (96, 64)]
    ds = build_dataset(o, 'train', codec)
    batch = collate([ds[0], ds[1]])
    assert batch['image'].shape == (2, 3, 128, 192) and batch['heatmap_1'].shape == (2, 17, 64, 96)
    assert batch['mask_0'].shape == (2, 32, 48)
    s = ds[2]
    for n, j in np.argwhere(s['visible'] > 0):                # Gaussians peak on the joints
        x, y = (int(v) for v in s['keypoints'][n, j] / 4)
        if 0 <= x < 48 and 0 <= y < 32:
            assert s['heatmap_0'][j, y, x] == pytest.approx(1.0)
            assert s['tag_joints'][n][s['tag_joints'][n, :, 1] > 0, 0].tolist().count(j * 32 * 48 + y * 48 + x) == 1
    terms = codec.loss(model(batch['image']), batch)
    assert all(torch.isfinite(v) for v in terms.values())
    assert AssociativeEmbeddingCodec(**{k: v for k, v in codec.settings().items() if k != 'target'}).train_size == (192, 128)


def test_targets_and_named_loss_terms(tmp_path):
    o = tiny(tmp_path)
    torch.manual_seed(0)
    model = build_model(o)
    codec = AssociativeEmbeddingCodec.from_opts(o, model)
    ds = build_dataset(o, 'train', codec)
    batch = collate([ds[0], ds[1]])
    assert batch['heatmap_0'].shape == (2, 17, 32, 32) and batch['heatmap_1'].shape == (2, 17, 64, 64)
    assert batch['mask_0'].shape == (2, 32, 32) and batch['tag_joints'].shape == (2, 30, 17, 2)
    assert 'mask' not in batch                           # consumed by the codec
    # the heatmap targets peak on the people's joints
    s = ds[0]
    k = s['keypoints'] / 4
    j = np.argwhere(s['visible'] > 0)[0]
    x, y = (int(v) for v in k[j[0], j[1]])
    if 0 <= x < 32 and 0 <= y < 32:
        assert s['heatmap_0'][j[1], y, x] == pytest.approx(1.0)
    terms = codec.loss(model(batch['image']), batch)
    assert set(terms) == {'heatmap_4', 'heatmap_2', 'push', 'pull'}
    sum(terms.values()).backward()
    assert model.conv1.weight.grad.abs().sum() > 0


def ideal_outputs(sample, num_joints=17, sigma=2.0):
    """What a perfect model gives at the test input: Gaussians on every labelled joint, and each
    person's tag (its index) wherever its joints' Gaussians reach."""
    h, w = sample['image'].shape[1:]
    heat = np.zeros((num_joints, h, w), np.float32)
    tags = np.zeros((num_joints, h, w, 1), np.float32)
    for n, (kp, vis) in enumerate(zip(sample['keypoints'], sample['visible'])):
        one = gaussian_heatmaps(kp[None], vis[None], (w, h), sigma)
        tags[one > 0.01] = n
        heat = np.maximum(heat, one)
    return torch.from_numpy(heat[None]), torch.from_numpy(tags[None])


def test_grouping_ideal_outputs_gives_ap_1_on_the_coco_images(tmp_path):
    o = tiny(tmp_path, '--inputRes', '512', '--outputRes', '128')
    with torch.device('meta'):
        model = build_model(o)
    codec = AssociativeEmbeddingCodec.from_opts(o, model)
    ds = build_dataset(o, 'val', codec)
    predictions = []
    for i in range(len(ds)):
        batch = collate([ds[i]])
        predictions += codec.decode(ideal_outputs(ds[i]), batch)
    assert sum(len(p['keypoints']) for p in predictions) == 12
    table, ap = ds.reader.evaluate_predictions(predictions)
    assert ap > 0.99 and table['AR'] > 0.99
    path = ds.reader.save_all(predictions, str(tmp_path / 'out'))
    results = json.load(open(path))
    assert len(results) == 12 and set(results[0]) == {'image_id', 'category_id', 'keypoints', 'score'}


def test_higherhrnet_trains_tests_and_resumes_from_the_command_line(tmp_path):
    root = coco_root(tmp_path / 'coco')
    run = TINY + ['--dataDir', str(root), '--nEpochs', '1', '--LR', '1e-3', '--optimizer_type', 'Adam',
                  '--expDir', str(tmp_path), '--expID', 'bu', '--flipTest', '--testScales', '1,0.5']
    result = main_module.main(run)
    assert set(result['table']) >= {'AP', 'AR'} and 0 <= result['headline'] <= 1
    history = json.load(open(tmp_path / 'bu' / 'metrics.json'))
    assert set(history[0]['train_loss_terms']) == {'heatmap_4', 'heatmap_2', 'push', 'pull'}
    assert (tmp_path / 'bu' / 'vis.png').is_file()
    best = tmp_path / 'bu' / 'model_best.pth'
    again = main_module.main(['-test', '--loadModel', str(best), '--progress', 'false'])
    assert again['headline'] == pytest.approx(torch.load(best, weights_only=True)['headline'])
    assert (tmp_path / 'bu' / 'results.json').is_file()
    predictor = Predictor.from_checkpoint(str(best))
    assert isinstance(predictor.codec, AssociativeEmbeddingCodec) and predictor.codec.test_scales == (1.0, 0.5)


def test_drawings_of_whole_images_leave_out_the_groupings_low_scoring_people(tmp_path):
    """vis.png / test_vis.png of a bottom-up model: people scoring under the detection threshold
    (the grouping's leftovers) and joints under it are not drawn; top-down drawings show all."""
    import cv2
    from utils.trainer import write_vis
    image = torch.zeros(3, 64, 96)
    k = 17
    good = np.stack([np.linspace(10, 80, k), np.linspace(10, 50, k)], 1)
    stray = np.stack([np.full(k, 5.0), np.linspace(5, 60, k)], 1)
    scores = np.full((2, k), 0.9)
    scores[0, :3] = 0.05                      # three joints of the good person too weak to show
    scores[1] = 0.02
    kept = [dict(image=image, keypoints=np.zeros((0, k, 2)), visible=np.zeros((0, k)), affine=np.eye(2, 3),
                 prediction=dict(keypoints=np.stack([good, stray]), scores=scores, score=scores.mean(1)))]

    def read(threshold):
        path = tmp_path / f'vis_{threshold}.png'
        write_vis(str(path), dict(kept=kept), COCO, threshold)
        return cv2.imread(str(path)).astype(int)

    blank = read(1.0)                                       # no one scores 1: nothing drawn
    everything, thresholded = (np.abs(read(t) - blank).max(axis=2) > 0 for t in (None, 0.1))
    f = 256 / 96                                            # the tile's zoom

    def at(drawn, points):                                  # drawn at each joint's pixel in the tile
        return [drawn[int(round((y + 0.5) * f - 0.5)), int(round((x + 0.5) * f - 0.5))] for x, y in points]

    assert all(at(everything, stray)) and not any(at(thresholded, stray))
    assert all(at(thresholded, good[3:])) and not any(at(thresholded, good[:2]))
    codec = AssociativeEmbeddingCodec(128)
    assert codec.draw_threshold == codec.detection_threshold == 0.1
