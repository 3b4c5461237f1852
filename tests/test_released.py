"""Released weight files as their authors publish them (a bare state dict, or one under
'state_dict' / 'model', with or without DataParallel's 'module.' prefix) load with --loadModel,
give exactly what the framework's own model gives with the same weights, and a file of another
configuration says which option differs."""
import numpy as np
import pytest
import torch

import main as main_module
import opts as options
from datasets import build_dataset
from datasets.codecs import build_codec
from models import build_model
from utils import checkpoint
from utils.errors import CheckpointError
from utils.predictor import Predictor
from utils.trainer import evaluate

BASE = ['--dataset', 'Synthetic', '--nTrainSamples', '8', '--nValSamples', '6', '--syntheticRes', '64',
        '--inputRes', '64', '--outputRes', '16', '--hmGauss', '1', '--model', 'SimpleBaseline',
        '--baseName', 'resnet18', '--data_loader_size', '3', '--nThreads', '0', '--progress', 'false',
        '--visCount', '0', '--flipTest']


pytestmark = pytest.mark.usefixtures('one_thread')   # torch on one thread (conftest)


def pose_resnet_layout(depth_blocks, bottleneck, joints, deconv=256):
    """{name: shape} of the authors' pose_resnet (SimpleBaselines' lib/models/pose_resnet.py),
    written out here from their layout: torchvision's trunk names, then deconv_layers.{0,1,3,4,6,7}
    (ConvTranspose2d 4x4 without bias, BatchNorm2d) and final_layer (1x1 conv with bias)."""
    shapes = {'conv1.weight': (64, 3, 7, 7)}
    bn = lambda name, c: shapes.update({f'{name}.weight': (c,), f'{name}.bias': (c,), f'{name}.running_mean': (c,),
                                        f'{name}.running_var': (c,), f'{name}.num_batches_tracked': ()})
    bn('bn1', 64)
    channels, expansion = 64, 4 if bottleneck else 1
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), depth_blocks), 1):
        for b in range(blocks):
            p = f'layer{layer}.{b}'
            convs = ([(planes, channels, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)] if bottleneck
                     else [(planes, channels, 3, 3), (planes, planes, 3, 3)])
            for i, shape in enumerate(convs, 1):
                shapes[f'{p}.conv{i}.weight'] = shape
                bn(f'{p}.bn{i}', shape[0])
            if b == 0 and (layer > 1 or channels != planes * expansion):
                shapes[f'{p}.downsample.0.weight'] = (planes * expansion, channels, 1, 1)
                bn(f'{p}.downsample.1', planes * expansion)
            channels = planes * expansion
    for i in range(3):
        shapes[f'deconv_layers.{3 * i}.weight'] = (channels, deconv, 4, 4)
        bn(f'deconv_layers.{3 * i + 1}', deconv)
        channels = deconv
    shapes['final_layer.weight'] = (joints, deconv, 1, 1)
    shapes['final_layer.bias'] = (joints,)
    return shapes


def authors_file(layout, seed=0):
    """A state dict with the authors' names and shapes, random values (as a released file holds)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        if name.endswith('num_batches_tracked'):
            state[name] = torch.tensor(100)
        elif name.endswith('running_var'):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.05
    return state


def test_pose_resnet_layout_is_ours():
    o = options.parse(BASE + ['--nJoints', '17', '--baseName', 'resnet50'])
    with torch.device('meta'):
        model = build_model(o)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == pose_resnet_layout((3, 4, 6, 3), True, 17)
    assert sum(int(np.prod(s)) for k, s in ours.items() if 'running' not in k and 'num_batches' not in k) == 33_999_697


@pytest.mark.parametrize('wrap', ['bare', 'module', 'state_dict', 'model'])
def test_released_file_loads_and_gives_exactly_our_models_predictions(tmp_path, wrap):
    state = authors_file(pose_resnet_layout((2, 2, 2, 2), False, 16))
    stored = {'module.' + k: v for k, v in state.items()} if wrap != 'bare' else state
    if wrap in ('state_dict', 'model'):
        stored = {wrap: stored, 'epoch': 140}
    path = tmp_path / 'pose_resnet_18_64x64.pth'
    torch.save(stored, path)
    # the framework's own model with the same weights, evaluated in memory
    o = options.parse(BASE)
    model = build_model(o)
    model.load_state_dict(state)
    codec = build_codec(o, model)
    val = build_dataset(o, 'val', codec)
    own = evaluate(Predictor(model, codec, flip_test=True, joint_set=val.reader.joint_set), val, o)
    result = main_module.main(BASE + ['-test', '--loadModel', str(path), '--expDir', str(tmp_path), '--expID', 't'])
    assert result['headline'] == own['headline']
    for a, b in zip(result['predictions'], own['predictions']):
        assert a['index'] == b['index'] and np.array_equal(a['keypoints'], b['keypoints'])
        assert np.array_equal(a['scores'], b['scores'])
    assert checkpoint.load(str(path))['released'] is True


def test_released_file_fine_tunes_from_its_weights(tmp_path):
    state = authors_file(pose_resnet_layout((2, 2, 2, 2), False, 16))
    torch.save(state, tmp_path / 'released.pth')
    main_module.main(BASE + ['--loadModel', str(tmp_path / 'released.pth'), '--nEpochs', '1', '--LR', '0',
                             '--expDir', str(tmp_path), '--expID', 'ft'])
    ckpt = torch.load(tmp_path / 'ft' / 'model_last.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and torch.equal(ckpt['state_dict']['final_layer.weight'], state['final_layer.weight'])


def test_a_file_of_another_configuration_names_the_option(tmp_path):
    cases = [(pose_resnet_layout((2, 2, 2, 2), False, 17), '--nJoints 17 (configured: 16)'),
             (pose_resnet_layout((3, 4, 6, 3), False, 16), '--baseName resnet34 (configured: resnet18)')]
    for layout, expected in cases:
        path = tmp_path / 'other.pth'
        torch.save(authors_file(layout), path)
        with pytest.raises(CheckpointError) as e:
            main_module.main(BASE + ['-test', '--loadModel', str(path), '--expDir', str(tmp_path), '--expID', 'x'])
        msg = str(e.value)
        assert 'weights do not fit this model' in msg and expected in msg and '\n' not in msg
    torch.save({'weights': [1, 2]}, tmp_path / 'junk.pth')
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(str(tmp_path / 'junk.pth'))
    assert 'neither a checkpoint of this framework nor a state dict' in str(e.value)
    with pytest.raises(CheckpointError) as e:
        Predictor.from_checkpoint(str(path))
    assert 'released weight file' in str(e.value)
