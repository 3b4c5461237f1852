"""Tests of the hourglass family: StackedHourGlass, PyraNet, PoseAttention, SoftGatedHourglass.

Tiny widths and 64x64 inputs keep the file fast on a CPU; paper-sized models are only counted,
on the meta device (no memory, no forward).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import opts
from datasets.codecs import HeatmapCodec
from datasets.base import collate
from models import MODELS, build_model, count_parameters
from models.attention import MeanFieldAttention, PartAttention, PoseAttention
from models.hourglass import StackedHourglass
from models.pyranet import FractionalMaxPool2d, PyraNet
from models.softgated import SoftGatedHourglass, SoftGatedResidual

# tiny configurations: (class, constructor kwargs); PoseAttention with 3 reductions so that
# its hourglass has an HRU, and 2 stacks so that it has both head kinds
TINY = {
    'StackedHourGlass': (StackedHourglass, dict(num_stacks=2, channels=16, num_reductions=2)),
    'PyraNet': (PyraNet, dict(num_stacks=2, channels=16, num_reductions=2, base_width=4, cardinality=4)),
    'PoseAttention': (PoseAttention, dict(num_stacks=2, channels=16, num_reductions=3, lrn_size=3, iterations=2)),
    'SoftGatedHourglass': (SoftGatedHourglass, dict(num_stacks=2, channels=16, num_reductions=2)),
}
NAMES = sorted(TINY)
RES = 64


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and avoids the OpenMP spinning that
    makes them many times slower when the cores are shared (restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name, num_joints=16, seed=0):
    cls, kwargs = TINY[name]
    torch.manual_seed(seed)
    return cls(num_joints=num_joints, **kwargs)


def blob_batch(n=2, num_joints=16, seed=0):
    """Random images and Gaussian-blob targets from the project's codec, collated as the trainer
    gets them: (codec, batch dict)."""
    rng = np.random.default_rng(seed)
    codec = HeatmapCodec(RES, RES // 4, sigma=2.0)
    samples = []
    for _ in range(n):
        sample = dict(image=torch.from_numpy(rng.standard_normal((3, RES, RES)).astype(np.float32)),
                      keypoints=rng.uniform(8, RES - 8, size=(1, num_joints, 2)).astype(np.float32),
                      visible=np.ones((1, num_joints), np.float32))
        sample.update(codec.encode(sample))
        samples.append(sample)
    return codec, collate(samples)


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('num_joints', [16, 17, 14])
def test_output_list_shapes(name, num_joints):
    model = tiny(name, num_joints)
    assert model.target == 'heatmap' and model.stride == 4
    with torch.no_grad():
        out = model(torch.randn(2, 3, RES, RES))
    assert isinstance(out, list) and len(out) == 2
    for o in out:
        assert o.shape == (2, num_joints, RES // 4, RES // 4)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize('name', NAMES)
def test_non_square_input(name):
    model = tiny(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert all(o.shape == (1, 16, 16, 24) for o in out)


@pytest.mark.parametrize('name', NAMES)
def test_gradients_reach_first_conv(name):
    model = tiny(name)
    codec, batch = blob_batch()
    codec.loss(model(batch['image']), batch)['heatmap'].backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters()), 'a parameter got no gradient'


@pytest.mark.parametrize('name', NAMES)
def test_state_dict_roundtrip(name, tmp_path):
    model = tiny(name, seed=0)
    images = blob_batch()[1]['image']
    model(images)  # move the BN running statistics off their initial values
    model.eval()
    path = tmp_path / 'model.pth'
    torch.save(model.state_dict(), path)
    other = tiny(name, seed=1)
    other.load_state_dict(torch.load(path, weights_only=True))
    other.eval()
    with torch.no_grad():
        a, b = model(images), other(images)
        again = model(images)
    for x, y, z in zip(a, b, again):
        assert torch.equal(x, y)
        assert torch.equal(x, z)  # eval is deterministic (PyraNet's fractional pooling included)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('optimizer', ['SGD', 'RMSprop'])
def test_two_steps_lower_the_loss(name, optimizer):
    model = tiny(name)
    codec, batch = blob_batch()
    if optimizer == 'SGD':
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=2.5e-4)

    def loss():
        torch.manual_seed(123)  # same fractional-pooling draws for every evaluation
        return codec.loss(model(batch['image']), batch)['heatmap']

    start = loss()
    for _ in range(2):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        end = loss()
    assert end.item() < 0.97 * start.item()


@pytest.mark.parametrize('name', NAMES)
def test_from_opts_builds_the_named_class(name):
    cls, _ = TINY[name]
    o = opts.parse(['--model', name, '--nStack', '2', '--nChannels', '16', '--nReductions', '2',
                    '--nJoints', '17', '--baseWidth', '4', '--LRNSize', '3', '--IterSize', '2'])
    model = build_model(o)
    assert type(model) is cls
    assert MODELS[name] is cls and cls.registry_name == name
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, RES, RES))
    assert len(out) == 2 and out[-1].shape == (1, 17, 16, 16)


def test_stem_channels_narrow_only_the_stem():
    args = ['--nStack', '2', '--nChannels', '16', '--nReductions', '2']
    paper = build_model(opts.parse(args))
    narrow = build_model(opts.parse(args + ['--stemChannels', '8']))
    assert first_conv(paper).out_channels == 64 and first_conv(narrow).out_channels == 4
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}
    outside = lambda d: {k: v for k, v in d.items() if not k.startswith('stem.')}
    assert outside(shapes(narrow)) == outside(shapes(paper))
    assert shapes(narrow)['stem.block3.skip.weight'] == (16, 8, 1, 1)
    assert count_parameters(narrow) < count_parameters(paper)
    with torch.no_grad():
        out = narrow.eval()(torch.randn(1, 3, RES, RES))
    assert [o.shape for o in out] == [(1, 16, 16, 16)] * 2


def test_quick_start_config_builds_the_narrow_stem_hourglass():
    o = opts.parse(['-DataConfig', 'conf/datasets/synthetic.defconf',
                    '-ModelConfig', 'conf/models/hourglass_quick.defconf'])
    assert (o.stemChannels, o.nChannels, o.nStack, o.nReductions, o.inputRes, o.outputRes) == \
        (32, 96, 2, 2, (128, 128), (32, 32))
    with torch.device('meta'):
        quick = build_model(o)
        paper_stem = build_model(opts.parse(['--nStack', '2', '--nChannels', '96', '--nReductions', '2']))
        out = quick(torch.empty(1, 3, 128, 128))
    assert [tuple(y.shape) for y in out] == [(1, 16, 32, 32)] * 2
    # only the stem differs from the paper's layout, and it is the smaller part
    stem = count_parameters(quick.stem)
    assert count_parameters(quick) - stem == count_parameters(paper_stem) - count_parameters(paper_stem.stem)
    assert stem < count_parameters(paper_stem.stem) / 2
    assert count_parameters(quick) == 561_696       # the README's count


def test_pose_attention_is_not_the_plain_hourglass():
    o = opts.parse(['--model', 'PoseAttention', '--nStack', '2', '--nChannels', '16', '--nReductions', '2'])
    model = build_model(o)
    assert not isinstance(model, StackedHourglass)
    assert any(isinstance(m, MeanFieldAttention) for m in model.modules())
    assert any(isinstance(m, PartAttention) for m in model.modules())


@pytest.mark.parametrize('conf, cls', [
    ('hourglass', StackedHourglass), ('pyranet', PyraNet),
    ('attention', PoseAttention), ('softgated', SoftGatedHourglass)])
def test_defconf_names_its_model(conf, cls):
    o = opts.parse(['-ModelConfig', f'conf/models/{conf}.defconf'])
    assert MODELS[o.model] is cls
    # the sizes come from the dataset config: MPII's 256x256, COCO's published 256x192
    for data, size in (('mpii', ((256, 256), (64, 64))), ('coco', ((256, 192), (64, 48)))):
        o = opts.parse(['-DataConfig', f'conf/datasets/{data}.defconf', '-ModelConfig', f'conf/models/{conf}.defconf'])
        assert (o.inputRes, o.outputRes) == size


def paper_count(conf):
    """Parameters of the model a .defconf builds (16 joints), counted on the meta device."""
    o = opts.parse(['-ModelConfig', f'conf/models/{conf}.defconf', '--nJoints', '16'])
    with torch.device('meta'):
        return count_parameters(build_model(o))


def test_paper_parameter_counts():
    hourglass = paper_count('hourglass')
    assert 20e6 < hourglass < 30e6  # the paper: ~25M for 8 stacks
    assert hourglass == 25_434_112
    softgated = paper_count('softgated')
    assert softgated < hourglass / 2.5  # the paper: ~3x smaller than the 8-stack hourglass
    assert softgated == 8_373_064
    assert paper_count('pyranet') == 28_352_892
    assert paper_count('attention') == 58_312_088


def test_soft_gate_is_per_channel_and_batch_independent():
    block = SoftGatedResidual(16, 32)
    assert block.gate.shape == (1, 32, 1, 1)
    block.eval()
    for n in (1, 3):
        assert block(torch.randn(n, 16, 8, 8)).shape == (n, 32, 8, 8)
    with torch.no_grad():
        block.gate.zero_()
        x = torch.randn(2, 16, 8, 8)
        c1 = block.conv1(x)
        c2 = block.conv2(c1)
        c3 = block.conv3(c2)
        assert torch.allclose(block(x), torch.cat([c1, c2, c3], 1))  # gate 0: no skip at all


def test_fractional_pooling():
    pool = FractionalMaxPool2d(2 ** -0.25)
    x = torch.randn(2, 3, 16, 16)
    assert pool(x).shape == (2, 3, 13, 13)
    pool.eval()
    assert torch.equal(pool(x), pool(x))
    pool.train()
    torch.manual_seed(0)
    draws = {tuple(pool(x).flatten()[:50].tolist()) for _ in range(5)}
    assert len(draws) > 1  # random in training, as Torch's SpatialFractionalMaxPooling
    prm_ratios = sorted(m.ratio for m in tiny('PyraNet').stem[1].pyramid.pools)
    assert np.allclose(prm_ratios, [2 ** (-c / 4) for c in (4, 3, 2, 1)])


def test_part_attention_equals_one_branch_per_part():
    """The fused part attention computes conv1x1_k(f * Q_k) for each part k, as the code."""
    torch.manual_seed(0)
    part = PartAttention(8, 3, kernel_size=3, iterations=2).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        q = part.attention(x)
        out = part(x)
        for k in range(3):
            attended = x * q[:, k:k + 1]
            score = nn.functional.conv2d(attended, part.score.weight[k:k + 1], part.bias[k:k + 1])
            assert torch.allclose(out[:, k:k + 1], score, atol=1e-5)
