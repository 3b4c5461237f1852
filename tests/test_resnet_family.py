"""ResNet backbones and the models built on them: SimpleBaseline, DeepPose, ChainedPredictions.

Tiny settings throughout (resnet18, 64x64 crops) so the file runs in seconds on a CPU; nothing
touches the network (the download path is tested with the hub function replaced).
"""
import urllib.error

import numpy as np
import pytest
import torch

import opts
from datasets.base import collate
from datasets.codecs import CoordinateCodec, HeatmapCodec
from utils.errors import CheckpointError, ConfigError
from models import build_model
from models.chained import ChainedPredictions
from models.deeppose import DeepPose, crop_patches
from models.resnet import URLS, load_pretrained, resnet
from models.simplebaseline import SimpleBaseline

RES = 64
TINY = {  # model name -> (class, extra command-line options)
    'SimpleBaseline': (SimpleBaseline, ['--baseName', 'resnet18']),
    'DeepPose': (DeepPose, ['--baseName', 'resnet18', '--nStages', '2', '--TargetType', 'direct']),
    'ChainedPredictions': (ChainedPredictions, ['--modelName', 'resnet18']),
}


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy machine the waiting
    threads cost more than the work: run this file single-threaded, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_opts(name, joints=16, extra=()):
    argv = ['--model', name, '--nJoints', str(joints), '--inputRes', str(RES),
            '--outputRes', str(RES // 4)] + TINY[name][1] + list(extra)
    return opts.parse(argv)


def tiny_model(name, joints=16, extra=()):
    torch.manual_seed(0)
    return build_model(tiny_opts(name, joints, extra))


def count(module):
    return sum(p.numel() for p in module.parameters())


def first_conv(model):
    if isinstance(model, SimpleBaseline):
        return model.conv1
    if isinstance(model, DeepPose):
        return model.backbone.conv1
    return model.encoder.conv1


def codec_for(model):
    if model.target == 'coords':
        return CoordinateCodec(RES)
    return HeatmapCodec(RES, RES // 4, 2.0)


def batch(codec, joints, n=4, seed=0):
    """Random images with random keypoints (joint 0 unlabelled), encoded by the codec and
    collated as the trainer gets them: a batch dict."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        vis = np.ones((1, joints), np.float32)
        vis[0, 0] = 0
        sample = dict(image=torch.from_numpy(rng.standard_normal((3, RES, RES)).astype(np.float32)),
                      keypoints=rng.uniform(8, RES - 8, (1, joints, 2)).astype(np.float32), visible=vis)
        sample.update(codec.encode(sample))
        samples.append(sample)
    return collate(samples)


# --------------------------------------------------------------------------- ResNet backbones

@pytest.mark.parametrize('name, params', [
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032),
    ('resnet101', 44_549_160), ('resnet152', 60_192_808)])
def test_resnet_parameter_counts_match_torchvision(name, params):
    with torch.device('meta'):  # shapes only: no memory, no initialisation
        assert count(resnet(name, num_classes=1000)) == params


def test_resnet_uses_torchvision_names():
    keys = set(resnet('resnet50', num_classes=1000).state_dict())
    for k in ['conv1.weight', 'bn1.running_var', 'layer1.0.conv1.weight', 'layer1.0.downsample.0.weight',
              'layer1.0.downsample.1.num_batches_tracked', 'layer3.5.bn3.bias', 'layer4.2.conv3.weight',
              'fc.weight', 'fc.bias']:
        assert k in keys, k
    # v1.5: the stride of a bottleneck is on its 3x3 convolution
    block = resnet('resnet50').layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert set(resnet('resnet18').state_dict()) == set(resnet('resnet18', 1000).state_dict()) - {'fc.weight', 'fc.bias'}


def test_resnet_features_and_logits():
    x = torch.randn(2, 3, RES, RES)
    assert resnet('resnet18')(x).shape == (2, 512, 2, 2)
    assert resnet('resnet18', num_classes=10)(x).shape == (2, 10)


def test_unknown_resnet_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        resnet('resnet51')
    msg = str(e.value)
    assert "'resnet51'" in msg and 'resnet50' in msg and 'resnet152' in msg and '\n' not in msg
    with pytest.raises(ConfigError):
        build_model(tiny_opts('SimpleBaseline', extra=['--baseName', 'vgg16']))


def _save_imagenet_like(path, name='resnet18', drop_batches_tracked=False):
    """A torchvision-style classifier state dict (fc.* included) with recognisable values."""
    torch.manual_seed(1)
    net = resnet(name, num_classes=1000)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        net.bn1.running_mean.uniform_()
    state = net.state_dict()
    if drop_batches_tracked:  # as in the files saved before PyTorch 0.4.1
        state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    torch.save(state, path)
    return state


@pytest.mark.parametrize('name', sorted(TINY))
def test_pretrained_path_loads_into_every_model(tmp_path, name):
    path = str(tmp_path / 'resnet18-imagenet.pth')
    state = _save_imagenet_like(path)
    model = tiny_model(name, extra=['--pretrained', path])
    trunk = model if isinstance(model, SimpleBaseline) else (
        model.backbone if isinstance(model, DeepPose) else model.encoder)
    own = trunk.state_dict()
    for k in ['conv1.weight', 'bn1.running_mean', 'layer3.1.conv2.weight', 'layer4.0.downsample.1.weight']:
        assert torch.equal(own[k], state[k]), k
    assert 'fc.weight' not in own


def test_pretrained_without_num_batches_tracked_loads(tmp_path):
    path = str(tmp_path / 'old.pth')
    state = _save_imagenet_like(path, drop_batches_tracked=True)
    net = resnet('resnet18')
    load_pretrained(net, path)
    assert torch.equal(net.layer2[1].conv1.weight, state['layer2.1.conv1.weight'])


def test_pretrained_checkpoint_wrapping_is_accepted(tmp_path):
    state = resnet('resnet18', 1000).state_dict()
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'state_dict': {'module.' + k: v for k, v in state.items()}}, path)
    net = resnet('resnet18')
    load_pretrained(net, path)
    assert torch.equal(net.conv1.weight, state['conv1.weight'])


def test_pretrained_wrong_file_gives_one_line(tmp_path):
    path = str(tmp_path / 'resnet34.pth')
    _save_imagenet_like(path, 'resnet34')
    with pytest.raises(CheckpointError) as e:
        load_pretrained(resnet('resnet18'), path)
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and 'unexpected keys' in msg and 'layer1.2.' in msg
    assert '\n' not in msg
    # a trunk of the same depth but another block type: missing and unexpected keys
    with pytest.raises(CheckpointError) as e:
        load_pretrained(resnet('resnet50'), path)
    assert 'missing keys' in str(e.value) and '\n' not in str(e.value)
    # not a weights file at all, and no file
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a pickle')
    with pytest.raises(CheckpointError) as e:
        load_pretrained(resnet('resnet18'), str(junk))
    assert str(e.value).startswith(f'{junk}: ') and '\n' not in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(resnet('resnet18'), str(tmp_path / 'absent.pth'))
    assert 'no such file' in str(e.value)


def test_pretrained_download_without_network_says_what_to_do(monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(CheckpointError) as e:
        build_model(tiny_opts('SimpleBaseline', extra=['--pretrained', 'download']))
    msg = str(e.value)
    assert calls == [URLS['resnet18']]
    assert 'download' in msg and URLS['resnet18'] in msg
    assert '--pretrained' in msg and '\n' not in msg


def test_pretrained_download_uses_the_hub_file(monkeypatch):
    state = resnet('resnet18', 1000).state_dict()
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', lambda url, **kw: state)
    net = resnet('resnet18')
    load_pretrained(net, 'download')
    assert torch.equal(net.layer1[0].conv2.weight, state['layer1.0.conv2.weight'])


# --------------------------------------------------------------------------- the three models

@pytest.mark.parametrize('joints', [16, 17, 14])
@pytest.mark.parametrize('name', sorted(TINY))
def test_output_shapes(name, joints):
    model = tiny_model(name, joints)
    assert type(model) is TINY[name][0]
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, RES, RES))
    assert isinstance(out, list)
    if model.target == 'coords':
        assert len(out) == 2 and all(o.shape == (1, joints, 2) for o in out)
    else:
        assert model.stride == 4
        assert len(out) == 1 and out[0].shape == (1, joints, RES // 4, RES // 4)


@pytest.mark.parametrize('name', sorted(TINY))
def test_gradients_reach_the_first_layer(name):
    model = tiny_model(name, 5)
    codec = codec_for(model)
    b = batch(codec, 5, n=2)
    sum(codec.loss(model(b['image']), b).values()).backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and grad.abs().sum() > 0
    if isinstance(model, DeepPose):
        stem = model.refiners[0].stem[0].weight.grad
        assert stem is not None and stem.abs().sum() > 0


@pytest.mark.parametrize('name', sorted(TINY))
def test_state_dict_round_trip(tmp_path, name):
    model = tiny_model(name, 5)
    images = torch.randn(2, 3, RES, RES)
    model.train()
    model(images)  # move the BN statistics away from their initial values
    model.eval()
    path = tmp_path / 'model.pth'
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)
    other = build_model(tiny_opts(name, 5))
    other.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    other.eval()
    with torch.no_grad():
        for a, b in zip(model(images), other(images)):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('name', sorted(TINY))
def test_two_steps_lower_the_codec_loss(name):
    model = tiny_model(name, 5)
    codec = codec_for(model)
    b = batch(codec, 5)
    # 3e-4: on 4 noise images BN statistics of a 2x2 last stage make 1e-3 overshoot at times
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(3):
        loss = sum(codec.loss(model(b['image']), b).values())
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert losses[2] < losses[0], losses


# --------------------------------------------------------------------------- model specifics

def test_simplebaseline_resnet50_coco_parameter_count():
    with torch.device('meta'):
        model = SimpleBaseline(n_joints=17, base_name='resnet50')
    assert count(model) == 33_999_697


def test_simplebaseline_follows_the_authors_layout_and_init():
    model = tiny_model('SimpleBaseline', 17)
    keys = set(model.state_dict())
    assert {'deconv_layers.0.weight', 'deconv_layers.1.running_mean', 'deconv_layers.3.weight',
            'deconv_layers.7.weight', 'final_layer.weight', 'final_layer.bias'} <= keys
    deconv = model.deconv_layers[0]
    assert (deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding) == ((4, 4), (2, 2), (1, 1), (0, 0))
    assert deconv.bias is None and model.final_layer.bias is not None
    with torch.no_grad():
        assert float(model.deconv_layers[3].weight.std()) < 0.002
        assert float(model.final_layer.weight.std()) < 0.002 and float(model.final_layer.bias.abs().max()) == 0


def test_simplebaseline_rejects_an_output_size_it_cannot_make():
    with pytest.raises(ConfigError) as e:
        build_model(opts.parse(['--model', 'SimpleBaseline', '--baseName', 'resnet18', '--inputRes', '64',
                                '--outputRes', '32']))
    assert 'outputRes' in str(e.value)


def test_deeppose_one_stage_and_absolute_estimates():
    torch.manual_seed(0)
    one = DeepPose(16, 'resnet18', n_stages=1, patch_size=16).eval()
    with torch.no_grad():
        out = one(torch.randn(2, 3, RES, RES))
    assert len(out) == 1 and out[0].shape == (2, 16, 2)
    three = DeepPose(16, 'resnet18', n_stages=3, patch_size=16).eval()
    with torch.no_grad():
        out = three(torch.randn(2, 3, RES, RES))
    # a fresh refinement stage starts close to the identity correction
    assert len(out) == 3 and (out[2] - out[0]).abs().max() < 0.05


def test_crop_patches_cuts_around_each_point():
    image = torch.arange(2 * 40 * 40, dtype=torch.float32).view(2, 1, 40, 40)
    pixels = torch.tensor([[[10., 20.], [30., 5.]], [[3., 3.], [25., 33.]]])   # (N, K, 2) x, y
    centers = pixels / 40 - 0.5
    patches = crop_patches(image, centers, torch.tensor([5.0, 5.0]), 5)       # 1:1 sampling
    assert patches.shape == (2, 2, 1, 5, 5)
    for n in range(2):
        for k in range(2):
            x, y = pixels[n, k].long().tolist()
            expect = torch.zeros(5, 5)
            ys, xs = slice(max(y - 2, 0), y + 3), slice(max(x - 2, 0), x + 3)
            crop = image[n, 0, ys, xs]
            expect[5 - crop.shape[0]:, 5 - crop.shape[1]:] = crop              # zeros outside
            assert torch.allclose(patches[n, k, 0], expect), (n, k)
    # the crop is differentiable with respect to the image
    image.requires_grad_(True)
    crop_patches(image, centers, torch.tensor([5.0, 5.0]), 5).sum().backward()
    assert image.grad.abs().sum() > 0


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
def test_chained_works_at_any_input_size():
    torch.manual_seed(0)
    model = ChainedPredictions(5, 'resnet18', hh_kernel=1, oh_kernel=2, input_res=64, output_res=16).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 5, 16, 16)
        assert model(torch.randn(1, 3, 96, 128))[0].shape == (1, 5, 24, 32)
        assert model(torch.randn(1, 3, 100, 70))[0].shape == (1, 5, 25, 18)


def test_chained_later_joints_depend_on_earlier_predictions():
    torch.manual_seed(0)
    model = ChainedPredictions(3, 'resnet18', input_res=64, output_res=16).eval()
    seen = []
    model.output_to_hidden[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [(1, 2, 2, 2)]  # step 2 reads joints 0 and 1 at the hidden resolution


@pytest.mark.parametrize('conf, cls', [('simplebaseline', SimpleBaseline), ('deeppose', DeepPose),
                                       ('chained', ChainedPredictions)])
def test_model_configs_parse_and_name_the_model(conf, cls):
    o = opts.parse(['-ModelConfig', f'conf/models/{conf}.defconf', '--nJoints', '16'])
    from models import MODELS, available
    assert o.model in available() and MODELS[o.model] is cls
    if cls is DeepPose:
        assert o.TargetType == 'direct' and o.nStages == 3
    if cls is SimpleBaseline:
        assert (o.optimizer_type, o.LR, o.LRSteps, o.nEpochs, o.data_loader_size) == ('Adam', 1e-3, [90, 120], 140, 32)
        assert o.pretrained is None and o.inputRes == (256, 256) and o.outputRes == (64, 64)
