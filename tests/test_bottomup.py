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
