"""ImageNet classification (datasets/imagenet.py): the class-folder reader, its pipeline, the
'classification' codec, the Predictor and the reader's evaluation, and metrics.topk_accuracy.

Everything runs on tiny folders written into tmp_path with OpenCV (a few small images per class)
and a dummy classifier that is not in the model registry; single-threaded, a few seconds.
"""
import csv
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import opts as options
from datasets import build_dataset, build_reader
from datasets.base import collate
from datasets.codecs import build_codec, codec_from_settings
from datasets.imagenet import (ClassificationCodec, ClassificationPipeline, fallback_box,
                               random_resized_box)
from datasets.pipeline import MEAN, STD, normalize
from utils import metrics
from utils.errors import DatasetError
from utils.predictor import Predictor


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers

# (file name, height, width): several extensions in several cases, sizes and aspect ratios
FILES = [('a.JPEG', 40, 60), ('b.jpg', 64, 32), ('c.PNG', 30, 30), ('d.jpeg', 50, 90)]
WNIDS = ['n02000002', 'n01000001', 'n03000003']        # written unsorted on purpose


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_image(path, rgb):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def make_split(root, split, wnids, files=FILES, value=None):
    """root/split/<wnid>/<files>: noise images, or solid grey ``value(class position)``."""
    for c, wnid in enumerate(wnids):
        for j, (name, h, w) in enumerate(files):
            img = noise(h, w, seed=100 * c + j) if value is None else np.full((h, w, 3), value(c), np.uint8)
            write_image(os.path.join(root, split, wnid, name), img)
    return root


def small_tree(tmp_path):
    make_split(tmp_path, 'train', WNIDS)
    make_split(tmp_path, 'val', ['n03000003', 'n01000001'], FILES[:2])
    (tmp_path / 'train' / WNIDS[0] / 'notes.txt').write_text('not an image')
    return tmp_path


def make_opts(data_dir, *extra):
    return options.parse(['--dataset', 'ImageNet', '--dataDir', str(data_dir), '--nClasses', '3',
                          '--inputRes', '32', *extra])


def one_line_error(excinfo, *must_contain):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, DatasetError) and '\n' not in msg, msg
    for s in must_contain:
        assert str(s) in msg, f'{s!r} not in {msg!r}'
    return msg


class DummyClassifier(torch.nn.Module):
    """Not registered: logits (N, C) = ``table[c]`` where c is the class whose grey level
    (20 + 30 c, see ``grey``) the image shows."""
    target = 'classification'

    def __init__(self, table):
        super().__init__()
        self.register_buffer('table', torch.as_tensor(table, dtype=torch.float32))

    def forward(self, x):
        level = x[:, 0].mean((1, 2)) * (STD[0] * 255.0) + MEAN[0] * 255.0
        c = ((level - 20.0) / 30.0).round().long().clamp(0, len(self.table) - 1)
        return [self.table[c]]


def grey(c):
    return 20 + 30 * c


# ----------------------------------------------------------------------------- reader

def test_reader_classes_labels_and_counts(tmp_path):
    root = small_tree(tmp_path)
    train = build_reader(make_opts(root), 'train')
    assert train.registry_name == 'ImageNet' and train.joint_set is None
    assert train.classes == sorted(WNIDS) and train.num_classes == 3
    assert len(train) == 12                                   # notes.txt is not an image
    assert [r['label'] for r in train.records] == [0] * 4 + [1] * 4 + [2] * 4
    for r in train.records:
        assert set(r) == {'image', 'label'}
        assert os.path.basename(os.path.dirname(r['image'])) == train.classes[r['label']]
        assert os.path.isfile(r['image'])
    assert sorted(os.path.basename(r['image']) for r in train.records[:4]) == sorted(n for n, _, _ in FILES)
    assert train.missing_images() == []

    val = build_reader(make_opts(root), 'val')           # only two classes, written in another order
    assert val.classes == train.classes and val.num_classes == 3
    assert [r['label'] for r in val.records] == [0, 0, 2, 2]     # n01 -> 0, n03 -> 2: the train indices
    assert [os.path.basename(os.path.dirname(r['image'])) for r in val.records] == ['n01000001'] * 2 + ['n03000003'] * 2


def test_reader_sample_limits(tmp_path):
    root = small_tree(tmp_path)
    train = build_reader(make_opts(root, '--maxTrainSamples', '5'), 'train')
    val = build_reader(make_opts(root, '--maxValSamples', '1', '--maxTrainSamples', '5'), 'val')
    assert len(train) == 5 and [r['label'] for r in train.records] == [0, 0, 0, 0, 1]
    assert len(val) == 1 and train.num_classes == val.num_classes == 3


def _no_data_dir(root):
    return root / 'nowhere', 'train', root / 'nowhere'


def _no_train(root):
    make_split(root, 'val', WNIDS[:1], FILES[:1])
    return root, 'val', root / 'train'


def _no_val(root):
    make_split(root, 'train', WNIDS[:1], FILES[:1])
    return root, 'val', root / 'val'


def _no_class_folders(root):
    (root / 'train').mkdir()
    (root / 'train' / 'LOC_synset_mapping.txt').write_text('n01 x')     # a file is not a class
    return root, 'train', root / 'train'


def _val_not_sorted(root):
    make_split(root, 'train', WNIDS[:1], FILES[:1])
    write_image(root / 'val' / 'ILSVRC2012_val_00000001.JPEG', noise(8, 8))
    return root, 'val', root / 'val'


def _empty_class(root):
    make_split(root, 'train', WNIDS[:2], FILES[:1])
    (root / 'train' / 'n09999999').mkdir()
    (root / 'train' / 'n09999999' / 'readme.txt').write_text('x')
    return root, 'train', root / 'train' / 'n09999999'


def _unknown_val_class(root):
    make_split(root, 'train', WNIDS[:2], FILES[:1])
    make_split(root, 'val', ['n07777777'], FILES[:1])
    return root, 'val', root / 'val' / 'n07777777'


@pytest.mark.parametrize('layout', [_no_data_dir, _no_train, _no_val, _no_class_folders, _val_not_sorted,
                                    _empty_class, _unknown_val_class])
def test_reader_errors_name_the_path(tmp_path, layout):
    root, split, named = layout(tmp_path)
    with pytest.raises(DatasetError) as e:
        build_reader(make_opts(root), split)
    msg = one_line_error(e, named)
    if layout is _val_not_sorted:
        assert 'no class folders' in msg and '1 images' in msg
    if layout is _unknown_val_class:
        assert 'n07777777' in msg and str(root / 'train') in msg


def test_defconf_matches_the_reader():
    from conftest import ROOT
    o = options.parse(['-DataConfig', os.path.join(ROOT, 'conf', 'datasets', 'imagenet.defconf')])
    assert datasets.reader_class(o.dataset) is datasets.imagenet.ImageNet
    assert (o.dataDir, o.inputRes, o.nClasses, o.flipTest, o.flipAug) == ('data/imagenet', (224, 224), 1000, False, True)


# ----------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize('res, hw', [('224', (224, 224)), ('40x24', (40, 24))])
def test_pipeline_output_size(tmp_path, res, hw):
    reader = build_reader(make_opts(small_tree(tmp_path), '--inputRes', res), 'train')
    for train in (True, False):
        pipe = reader.pipeline(reader.opts, train)
        for k, rec in enumerate(reader.records[:4]):        # the four sizes / aspect ratios
            out = pipe(reader.load_image(rec), rec, np.random.default_rng(k))
            assert set(out) == {'image', 'label'} and out['label'] == rec['label']
            assert tuple(out['image'].shape) == (3,) + hw and out['image'].dtype == torch.float32


def test_train_crops_vary_with_the_rng_and_repeat_with_it():
    pipe = ClassificationPipeline((32, 32), train=True)
    img, rec = noise(90, 120), {'label': 1}
    a = pipe(img, rec, np.random.default_rng([0, 0, 7]))['image']
    b = pipe(img, rec, np.random.default_rng([0, 0, 7]))['image']
    c = pipe(img, rec, np.random.default_rng([0, 1, 7]))['image']
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    outs = {pipe(img, rec, np.random.default_rng(s))['image'].sum().item() for s in range(8)}
    assert len(outs) == 8


def test_train_crop_is_the_box_resized():
    pipe = ClassificationPipeline((24, 40), train=True, flip=False)      # (W, H)
    img = noise(90, 120, seed=3)
    p = pipe.sample_params(90, 120, np.random.default_rng(5))
    x, y, w, h = p['box']
    expected = cv2.resize(img[y:y + h, x:x + w], (24, 40), interpolation=cv2.INTER_AREA
                          if (24 <= w and 40 <= h) else cv2.INTER_LINEAR)
    out = pipe(img, {'label': 0}, np.random.default_rng(5))['image']
    assert torch.equal(out, normalize(expected))


def test_eval_is_resize_256_and_centre_crop():
    pipe = ClassificationPipeline((224, 224), train=False)
    # enlarged: 200x300 (h x w) -> shorter side 256: 256x384, bilinear; centre 224 at (x 80, y 16)
    img = noise(200, 300, seed=1)
    big = cv2.resize(img, (384, 256), interpolation=cv2.INTER_LINEAR)
    out = pipe(img, {'label': 4}, None)
    assert out['label'] == 4
    assert torch.equal(out['image'], normalize(big[16:240, 80:304]))
    # shrunk: 500x600 -> 256x307 (600 * 256 / 500 = 307.2), area average; centre at (x 41, y 16)
    img = noise(500, 600, seed=2)
    small = cv2.resize(img, (307, 256), interpolation=cv2.INTER_AREA)
    assert torch.equal(pipe(img, {'label': 0}, None)['image'], normalize(small[16:240, 41:265]))
    # evaluation draws nothing: any rng, or none, gives the same crop
    a = pipe(img, {'label': 0}, np.random.default_rng(1))['image']
    assert torch.equal(a, pipe(img, {'label': 0}, np.random.default_rng(2))['image'])


def test_eval_non_square_input_covers_the_enlarged_input():
    pipe = ClassificationPipeline((48, 64), train=False)                 # W 48, H 64
    img = noise(100, 100, seed=4)
    # scale = 256/224 * max(48/100, 64/100) = 0.7314...: 73x73 (area average), centre 48x64 at (12, 4)
    small = cv2.resize(img, (73, 73), interpolation=cv2.INTER_AREA)
    out = pipe(img, {'label': 0}, None)['image']
    assert tuple(out.shape) == (3, 64, 48)
    assert torch.equal(out, normalize(small[4:68, 12:60]))


def test_eval_through_the_reader_reads_the_png_exactly(tmp_path):
    img = noise(200, 300, seed=9)
    write_image(tmp_path / 'train' / 'n01' / 'x.png', img)
    reader = build_reader(make_opts(tmp_path, '--inputRes', '224', '--nClasses', '2'), 'train')
    rec = reader.records[0]
    assert np.array_equal(reader.load_image(rec), img)
    out = reader.pipeline(reader.opts, False)(reader.load_image(rec), rec, None)
    big = cv2.resize(img, (384, 256), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(out['image'], normalize(big[16:240, 80:304]))


def test_flip_mirrors_the_crop():
    flipping = ClassificationPipeline((32, 24), train=True, flip=True)
    plain = ClassificationPipeline((32, 24), train=True, flip=False)
    img, rec = noise(70, 110, seed=6), {'label': 2}
    seen = set()
    for seed in range(12):
        flip = flipping.sample_params(70, 110, np.random.default_rng(seed))['flip']
        assert plain.sample_params(70, 110, np.random.default_rng(seed))['flip'] is False
        a = flipping(img, rec, np.random.default_rng(seed))['image']
        b = plain(img, rec, np.random.default_rng(seed))['image']      # the same box, never mirrored
        assert torch.equal(a, b.flip(-1) if flip else b)
        seen.add(flip)
    assert seen == {True, False}
    flips = [flipping.sample_params(70, 110, np.random.default_rng(s))['flip'] for s in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_random_resized_box_area_and_aspect_ranges():
    height, width = 480, 640
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_box(height, width, rng) for _ in range(2000)], np.float64)
    x, y, w, h = boxes.T
    assert np.all((x >= 0) & (y >= 0) & (x + w <= width) & (y + h <= height) & (w > 0) & (h > 0))
    area = w * h / (height * width)
    aspect = w / h
    tol = 0.01                               # the sides are rounded to whole pixels (>= 135 here)
    assert area.min() >= 0.08 * (1 - tol) and area.max() <= 1.0
    assert aspect.min() >= 0.75 * (1 - tol) and aspect.max() <= 4 / 3 * (1 + tol)
    assert area.min() < 0.1 and area.max() > 0.9              # the whole range is drawn
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    assert len({(int(a), int(b)) for a, b in zip(x, y)}) > 1500    # placed at random
    # on a square image the accepted aspect ratios are log-uniform, so symmetric around 1
    square = np.array([random_resized_box(600, 600, rng) for _ in range(2000)], np.float64)
    assert abs(np.log(square[:, 2] / square[:, 3]).mean()) < 0.02


def test_random_resized_box_fallback():
    # 50 x 2000: no box of >= 8 % of the area with aspect <= 4/3 fits in 50 rows: always the fallback,
    # the centre of the image cut to aspect 4/3 (w = round(50 * 4/3) = 67)
    rng = np.random.default_rng(1)
    assert {random_resized_box(50, 2000, rng) for _ in range(50)} == {(966, 0, 67, 50)}
    assert {random_resized_box(2000, 50, rng) for _ in range(50)} == {(0, 966, 50, 67)}   # h = 50 / (3/4)
    assert fallback_box(300, 400) == (0, 0, 400, 300)           # aspect in range: the whole image
    assert fallback_box(300, 200) == (0, 16, 200, 267)          # 2/3 < 3/4: h = round(200 / 0.75)
    assert fallback_box(200, 400) == (66, 0, 267, 200)          # 2 > 4/3: w = round(200 * 4/3)


# ----------------------------------------------------------------------------- codec

def test_codec_loss_accuracy_decode_and_settings():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5, 0.0, 1.0, -2.0],      # best: 1, 5, 3, 0, 4
                           [3.0, 0.2, 0.1, -0.5, 0.4, -1.0, 0.3],      # best: 0, 4, 6, 1, 2
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])       # best: 6, 5, 4, 3, 2
    labels = torch.tensor([1, 2, 0])
    model = DummyClassifier(torch.zeros(1, 7))
    codec = build_codec(make_opts('unused', '--nClasses', '7'), model)
    assert isinstance(codec, ClassificationCodec) and codec.num_classes == 7
    batch = {'label': labels, 'meta': {'index': torch.tensor([10, 11, 12])}}
    assert codec.encode({'image': None, 'label': 1}) == {}
    terms = codec.loss([logits * 0, logits], batch)
    assert list(terms) == ['cross_entropy']
    assert torch.allclose(terms['cross_entropy'], F.cross_entropy(logits, labels))
    assert codec.accuracy([logits], batch) == pytest.approx(1 / 3)
    assert codec.flip_back(logits, None) is logits
    merged = codec.flip_merge([logits], [logits + 2], None)[0]
    assert torch.allclose(merged, logits + 1)

    out = codec.decode([logits], batch)
    assert [o['index'] for o in out] == [10, 11, 12]
    assert [o['label'].tolist() for o in out] == [[1, 5, 3, 0, 4], [0, 4, 6, 1, 2], [6, 5, 4, 3, 2]]
    probs = torch.softmax(logits, 1).numpy()
    for o, p in zip(out, probs):
        assert o['label'].shape == (5,) and o['scores'].shape == (5,) and o['scores'].dtype == np.float32
        assert np.allclose(o['scores'], p[o['label']]) and np.all(np.diff(o['scores']) <= 0)

    settings = codec.settings()
    assert settings['target'] == 'classification' and settings['num_classes'] == 7
    again = codec_from_settings(settings)
    assert type(again) is ClassificationCodec and again.settings() == settings
    small = ClassificationCodec(3)                    # fewer than 5 classes: k = 3
    assert [o['label'].shape for o in small.decode([logits[:, :3]], batch)] == [(3,)] * 3


# ----------------------------------------------------------------------------- end to end

# ranks of the true class in the dummy model's logits, per class (1 = best): top-1 right for
# classes 0 and 1, top-5 right for classes 0, 1, 2, 3 and 6
RANKS = [1, 1, 2, 5, 6, 7, 3]


def logit_table(ranks):
    """(C, C): row c puts class c at rank ranks[c], the other classes in index order around it;
    -> table, and the top-5 classes of each row."""
    n = len(ranks)
    table, top5 = np.zeros((n, n), np.float32), []
    for c, r in enumerate(ranks):
        order = [j for j in range(n) if j != c]
        order.insert(r - 1, c)
        table[c, order] = np.arange(n, 0, -1)
        top5.append(order[:5])
    return table, top5


def test_dataset_batch_predictor_evaluation_and_csv(tmp_path):
    wnids = [f'n0{c}' for c in range(7)]
    files = [('p.png', 20, 30), ('q.JPEG', 26, 18)]
    make_split(tmp_path, 'train', wnids, files, value=grey)
    make_split(tmp_path, 'val', wnids, files, value=grey)
    opts = make_opts(tmp_path, '--nClasses', '7', '--inputRes', '24x16')
    table, top5 = logit_table(RANKS)
    model = DummyClassifier(table)
    codec = build_codec(opts, model)

    train_set = build_dataset(opts, 'train', codec)
    assert datasets.available().count('ImageNet') == 1 and len(train_set) == 14
    batch = collate([train_set[i] for i in (0, 3, 13)])
    assert set(batch) == {'image', 'label', 'meta'}
    assert tuple(batch['image'].shape) == (3, 3, 24, 16) and batch['image'].dtype == torch.float32
    assert batch['label'].dtype == torch.int64 and batch['label'].tolist() == [0, 1, 6]
    assert batch['meta']['index'].tolist() == [0, 3, 13]
    loss = codec.loss(model(batch['image']), batch)['cross_entropy']
    assert torch.isfinite(loss)

    val_set = build_dataset(opts, 'val', codec)
    loader = torch.utils.data.DataLoader(val_set, batch_size=4, collate_fn=val_set.collate)
    for flip_test in (False, True):               # flip_back is the identity: the same predictions
        out = Predictor(model, codec, flip_test=flip_test).run(loader)
        preds = out['predictions']
        assert [p['index'] for p in preds] == list(range(14))
        assert [p['label'].tolist() for p in preds] == [top5[c] for c in range(7) for _ in files]
        assert out['acc'] == pytest.approx(4 / 14)                 # classes 0 and 1, two images each
        scores, headline = val_set.reader.evaluate_predictions(preds)
        assert list(scores) == ['Top-1', 'Top-5']
        assert scores['Top-1'] == pytest.approx(100 * 4 / 14) and headline == scores['Top-1']
        assert scores['Top-5'] == pytest.approx(100 * 10 / 14)     # classes 0, 1, 2, 3, 6

    path = val_set.reader.save_all(preds[::-1], str(tmp_path / 'run'))     # any order in, record order out
    assert path == str(tmp_path / 'run' / 'predictions.csv')
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['image', 'label', 'pred1', 'pred2', 'pred3', 'pred4', 'pred5']
    assert len(rows) == 15
    assert rows[1] == ['val/n00/p.png', '0'] + [str(c) for c in top5[0]]
    assert rows[14] == ['val/n06/q.JPEG', '6'] + [str(c) for c in top5[6]]
    with pytest.raises(DatasetError) as e:
        val_set.reader.evaluate_predictions([])
    one_line_error(e, 'no predictions')


# ----------------------------------------------------------------------------- metric

def test_topk_accuracy():
    topk = np.array([[3, 1, 2],
                     [0, 2, 1],
                     [2, 0, 3],
                     [1, 3, 0]])
    labels = np.array([3, 2, 1, 0])
    assert metrics.topk_accuracy(topk, labels, 1) == pytest.approx(25.0)
    assert metrics.topk_accuracy(topk, labels, 2) == pytest.approx(50.0)
    assert metrics.topk_accuracy(topk, labels, 3) == pytest.approx(75.0)
    assert isinstance(metrics.topk_accuracy(topk, labels, 1), float)
    assert metrics.topk_accuracy(topk[:, :1], labels, 1) == pytest.approx(25.0)
    for bad in [(topk, labels, 4), (topk, labels, 0), (topk, labels[:3], 1), (topk[0], labels, 1),
                (topk[:0], labels[:0], 1)]:
        with pytest.raises(ValueError):
            metrics.topk_accuracy(*bad)


def test_classification_hrnet_trains_tests_and_feeds_the_pose_hrnet(tmp_path):
    """The whole path from the command line: a tiny ClassificationHRNet trains one epoch on the
    folder, -test reproduces its recorded Top-1 from the checkpoint alone, and the checkpoint is
    an ImageNet initialisation for the pose HRNet's --pretrained (HigherHRNet's first step)."""
    import main as main_module
    from models import build_model
    root = small_tree(tmp_path / 'data')
    run = ['--dataset', 'ImageNet', '--dataDir', str(root), '--model', 'ClassificationHRNet', '--hrnetWidth', '4',
           '--nClasses', '3', '--inputRes', '64', '--data_loader_size', '4', '--nThreads', '0', '--progress', 'false',
           '--nEpochs', '1', '--optimizer_type', 'SGD', '--LR', '0.01', '--momentum', '0.9', '--nesterov',
           '--expDir', str(tmp_path), '--expID', 'cls']
    result = main_module.main(run)
    assert set(result['table']) == {'Top-1', 'Top-5'} and 0 <= result['headline'] <= 100
    best = tmp_path / 'cls' / 'model_best.pth'
    ckpt = torch.load(best, weights_only=True)
    assert ckpt['meta']['codec'] == {'target': 'classification', 'num_classes': 3, 'topk': 5}
    again = main_module.main(['-test', '--loadModel', str(best), '--progress', 'false'])
    assert again['headline'] == pytest.approx(ckpt['headline'])
    assert (tmp_path / 'cls' / 'predictions.csv').is_file()
    pose = build_model(options.parse(['--model', 'HRNet', '--hrnetWidth', '4', '--nJoints', '17',
                                      '--inputRes', '64', '--outputRes', '16', '--pretrained', str(best)]))
    assert torch.equal(pose.state_dict()['stage4.0.branches.0.0.conv1.weight'],
                       ckpt['state_dict']['stage4.0.branches.0.0.conv1.weight'])
