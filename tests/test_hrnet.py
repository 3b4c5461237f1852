"""HRNet (pose) and ClassificationHRNet: sizes, the authors' names, ImageNet weights, training.

Tiny widths (--hrnetWidth 4) and 64x64 crops keep the file fast on a CPU; the paper-sized models
are only counted, on the meta device. The authors' layout (``pose_hrnet.py`` of
deep-high-resolution-net.pytorch, ``cls_hrnet.py`` of HRNet-Image-Classification) is written out
here independently of ``models/hrnet.py``: ``authors_state_shapes`` lists their state-dict names
and shapes, ``authors_forward`` runs their graph with torch.nn.functional on such a state dict.
"""
import pytest
import torch
import torch.nn.functional as F

import opts
from datasets.codecs import HeatmapCodec
from models import build_model, count_parameters
from models.hrnet import ClassificationHRNet, HighResolutionNet, HRNet
from test_resnet_family import batch
from utils.errors import CheckpointError, ConfigError

RES = 64
TINY = ['--hrnetWidth', '4']
# The authors' PRETRAINED_LAYERS: the top-level modules ImageNet weights fill
BACKBONE = ['conv1', 'bn1', 'conv2', 'bn2', 'layer1', 'transition1', 'stage2', 'transition2',
            'stage3', 'transition3', 'stage4']


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads on shared cores: one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pose_opts(joints=17, res=RES, extra=()):
    res = str(res)
    out = 'x'.join(str(int(v) // 4) for v in res.split('x'))
    return opts.parse(['--model', 'HRNet', '--nJoints', str(joints), '--inputRes', res, '--outputRes', out,
                       *TINY, *extra])


def cls_opts(classes=10, extra=()):
    return opts.parse(['--model', 'ClassificationHRNet', '--nClasses', str(classes), '--inputRes', str(RES),
                       *TINY, *extra])


def tiny(o, seed=0):
    torch.manual_seed(seed)
    return build_model(o)


def meta_count(argv):
    with torch.device('meta'):
        return count_parameters(build_model(opts.parse(argv)))


# --------------------------------------------------------------------------- the authors' layout

def authors_state_shapes(width, joints=17, classes=None):
    """{name: shape} of the authors' state dict: pose_hrnet (classes None) or cls_hrnet."""
    shapes = {}
    w = [width, 2 * width, 4 * width, 8 * width]

    def conv(name, cout, cin, k, bias=False):
        shapes[f'{name}.weight'] = (cout, cin, k, k)
        if bias:
            shapes[f'{name}.bias'] = (cout,)

    def bn(name, c):
        for s in ('weight', 'bias', 'running_mean', 'running_var'):
            shapes[f'{name}.{s}'] = (c,)
        shapes[f'{name}.num_batches_tracked'] = ()

    def bottleneck(name, cin, planes):
        conv(f'{name}.conv1', planes, cin, 1), bn(f'{name}.bn1', planes)
        conv(f'{name}.conv2', planes, planes, 3), bn(f'{name}.bn2', planes)
        conv(f'{name}.conv3', 4 * planes, planes, 1), bn(f'{name}.bn3', 4 * planes)
        if cin != 4 * planes:
            conv(f'{name}.downsample.0', 4 * planes, cin, 1), bn(f'{name}.downsample.1', 4 * planes)

    def basic(name, c):
        conv(f'{name}.conv1', c, c, 3), bn(f'{name}.bn1', c)
        conv(f'{name}.conv2', c, c, 3), bn(f'{name}.bn2', c)

    conv('conv1', 64, 3, 3), bn('bn1', 64), conv('conv2', 64, 64, 3), bn('bn2', 64)
    for b in range(4):
        bottleneck(f'layer1.{b}', 64 if b == 0 else 256, 64)
    conv('transition1.0.0', w[0], 256, 3), bn('transition1.0.1', w[0])
    conv('transition1.1.0.0', w[1], 256, 3), bn('transition1.1.0.1', w[1])
    for t in (2, 3):  # transition t adds branch t from branch t - 1; the others pass (None)
        conv(f'transition{t}.{t}.0.0', w[t], w[t - 1], 3), bn(f'transition{t}.{t}.0.1', w[t])
    for stage, modules, branches in (('stage2', 1, 2), ('stage3', 4, 3), ('stage4', 3, 4)):
        for m in range(modules):
            p = f'{stage}.{m}'
            for b in range(branches):
                for k in range(4):
                    basic(f'{p}.branches.{b}.{k}', w[b])
            outputs = 1 if (classes is None and stage == 'stage4' and m == modules - 1) else branches
            for i in range(outputs):
                for j in range(branches):
                    if j > i:
                        conv(f'{p}.fuse_layers.{i}.{j}.0', w[i], w[j], 1), bn(f'{p}.fuse_layers.{i}.{j}.1', w[i])
                    for k in range(i - j):
                        cout = w[i] if k == i - j - 1 else w[j]
                        conv(f'{p}.fuse_layers.{i}.{j}.{k}.0', cout, w[j], 3)
                        bn(f'{p}.fuse_layers.{i}.{j}.{k}.1', cout)
    if classes is None:
        conv('final_layer', joints, w[0], 1, bias=True)
        return shapes
    head = [32, 64, 128, 256]
    for b in range(4):
        bottleneck(f'incre_modules.{b}.0', w[b], head[b])
    for b in range(3):
        conv(f'downsamp_modules.{b}.0', 4 * head[b + 1], 4 * head[b], 3, bias=True)
        bn(f'downsamp_modules.{b}.1', 4 * head[b + 1])
    conv('final_layer.0', 2048, 1024, 1, bias=True), bn('final_layer.1', 2048)
    shapes['classifier.weight'], shapes['classifier.bias'] = (classes, 2048), (classes,)
    return shapes


def random_state(shapes, seed=0):
    """A state dict of the given names and shapes with values that keep activations moderate."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith('num_batches_tracked'):
            state[k] = torch.tensor(7)
        elif k.endswith('running_var'):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1 and k.endswith('weight'):          # BN scale
            state[k] = torch.rand(shape, generator=g) * 0.3 + 0.2
        elif len(shape) == 1:                                    # BN shift, mean, conv / linear bias
            state[k] = torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = torch.Size(shape[1:]).numel()
            state[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def authors_forward(sd, x, classify=False):
    """The authors' forward pass, functional, on a state dict of their names (eval-mode BN)."""
    relu = F.relu

    def conv(p, x, stride=1):
        weight = sd[f'{p}.weight']
        return F.conv2d(x, weight, sd.get(f'{p}.bias'), stride, weight.shape[-1] // 2)

    def bn(p, x):
        return F.batch_norm(x, sd[f'{p}.running_mean'], sd[f'{p}.running_var'], sd[f'{p}.weight'],
                            sd[f'{p}.bias'], False, 0.0, 1e-5)

    def block(p, x):
        out = relu(bn(f'{p}.bn1', conv(f'{p}.conv1', x)))
        out = bn(f'{p}.bn2', conv(f'{p}.conv2', out))
        if f'{p}.conv3.weight' in sd:
            out = bn(f'{p}.bn3', conv(f'{p}.conv3', relu(out)))
        residual = bn(f'{p}.downsample.1', conv(f'{p}.downsample.0', x)) if f'{p}.downsample.0.weight' in sd else x
        return relu(out + residual)

    def cbr(p, x, stride):
        return relu(bn(f'{p}.1', conv(f'{p}.0', x, stride)))

    def fuse(p, j, i, x):
        if j > i:
            return F.interpolate(bn(f'{p}.1', conv(f'{p}.0', x)), scale_factor=2 ** (j - i), mode='nearest')
        for k in range(i - j):
            x = bn(f'{p}.{k}.1', conv(f'{p}.{k}.0', x, 2))
            x = relu(x) if k < i - j - 1 else x
        return x

    x = relu(bn('bn2', conv('conv2', relu(bn('bn1', conv('conv1', x, 2))), 2)))
    for b in range(4):
        x = block(f'layer1.{b}', x)
    xs = [cbr('transition1.0', x, 1), cbr('transition1.1.0', x, 2)]
    for stage, modules, branches in (('stage2', 1, 2), ('stage3', 4, 3), ('stage4', 3, 4)):
        if stage != 'stage2':
            t = branches - 1
            xs = xs + [cbr(f'transition{t}.{t}.0', xs[-1], 2)]
        for m in range(modules):
            p = f'{stage}.{m}'
            for b in range(branches):
                for k in range(4):
                    xs[b] = block(f'{p}.branches.{b}.{k}', xs[b])
            outputs = [i for i in range(branches) if any(k.startswith(f'{p}.fuse_layers.{i}.') for k in sd)]
            fused = []
            for i in outputs:
                y = xs[0] if i == 0 else fuse(f'{p}.fuse_layers.{i}.0', 0, i, xs[0])
                for j in range(1, branches):
                    y = y + (xs[j] if j == i else fuse(f'{p}.fuse_layers.{i}.{j}', j, i, xs[j]))
                fused.append(relu(y))
            xs = fused
    if not classify:
        return conv('final_layer', xs[0])
    y = block('incre_modules.0.0', xs[0])
    for b in range(3):
        y = block(f'incre_modules.{b + 1}.0', xs[b + 1]) + cbr(f'downsamp_modules.{b}', y, 2)
    y = cbr('final_layer', y, 1).mean((2, 3))
    return F.linear(y, sd['classifier.weight'], sd['classifier.bias'])


# --------------------------------------------------------------------------- sizes

def test_paper_parameter_counts():
    assert meta_count(['-ModelConfig', 'conf/models/hrnet_w32.defconf', '--nJoints', '17']) == 28_536_113
    assert meta_count(['-ModelConfig', 'conf/models/hrnet_w48.defconf', '--nJoints', '17']) == 63_595_745
    assert meta_count(['--model', 'HRNet', '--nJoints', '17', '--hrnetWidth', '48']) == 63_595_745
    # HRNet-W32-C of HRNet-Image-Classification (README: 41.2M)
    assert meta_count(['-ModelConfig', 'conf/models/cls_hrnet_w32.defconf']) == 41_232_680
    # the parameters of the authors' layout (their state dict without the BN buffers) add up the same
    buffers = ('running_mean', 'running_var', 'num_batches_tracked')
    for w, joints in ((32, 17), (48, 16)):
        with torch.device('meta'):
            pose = HRNet(joints, w)
        layout = authors_state_shapes(w, joints)
        assert count_parameters(pose) == sum(torch.Size(s).numel() for k, s in layout.items()
                                             if k.split('.')[-1] not in buffers)


def test_output_shapes_at_256x192_and_square():
    o = pose_opts(17, '256x192')
    model = tiny(o).eval()
    assert model.target == 'heatmap' and model.stride == 4
    assert model.arch == {'model': 'HRNet', 'nJoints': 17, 'hrnetWidth': 4}
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 192))
    assert isinstance(out, list) and [tuple(t.shape) for t in out] == [(1, 17, 64, 48)]
    with torch.no_grad():
        out = tiny(pose_opts(16)).eval()(torch.randn(2, 3, RES, RES))
    assert [tuple(t.shape) for t in out] == [(2, 16, 16, 16)] and torch.isfinite(out[0]).all()


def test_classifier_outputs_logits():
    model = tiny(cls_opts(10)).eval()
    assert model.target == 'classification'
    with torch.no_grad():
        out = model(torch.randn(3, 3, RES, RES))
    assert isinstance(out, list) and [tuple(t.shape) for t in out] == [(3, 10)]
    with torch.no_grad():   # a 224 crop, as in the paper
        assert tuple(ClassificationHRNet(7, 4).eval()(torch.randn(1, 3, 224, 224))[0].shape) == (1, 7)


def test_shared_backbone_features():
    x = torch.randn(1, 3, RES, 96)
    pose, cls = HRNet(5, 4), ClassificationHRNet(10, 4)
    with torch.no_grad():
        assert [tuple(t.shape) for t in pose.features(x)] == [(1, 4, 16, 24)]
        assert [tuple(t.shape) for t in cls.features(x)] == [(1, 4, 16, 24), (1, 8, 8, 12), (1, 16, 4, 6), (1, 32, 2, 3)]
    assert pose.out_channels == [4] and cls.out_channels == [4, 8, 16, 32]
    assert isinstance(pose, HighResolutionNet) and isinstance(cls, HighResolutionNet)
    # a bottom-up model (HigherHRNet) builds the same 1/4 backbone from the base class
    base = HighResolutionNet(4, multi_scale_output=False)
    assert set(base.state_dict()) == {k for k in pose.state_dict() if not k.startswith('final_layer')}


def test_input_not_divisible_by_32_is_one_line():
    with pytest.raises(ConfigError) as e:
        build_model(pose_opts(17, '80x48'))
    assert '--inputRes 80x48' in str(e.value) and '32' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ConfigError) as e:
        HRNet(5, 4)(torch.randn(1, 3, 64, 48))
    assert '64x48' in str(e.value)


def test_initialisation_is_the_authors():
    pose = HRNet(5, 4)
    convs = [m for m in pose.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert 0.0008 < weights.std().item() < 0.0012
    assert torch.equal(pose.final_layer.bias, torch.zeros(5))
    bns = [m for m in pose.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in bns)
    # the classifier: He (fan_out) convolutions as the authors' cls init
    cls = ClassificationHRNet(10, 4)
    assert cls.conv1.weight.std().item() > 0.05


# --------------------------------------------------------------------------- the authors' names

def test_state_dict_has_the_authors_names_and_shapes():
    for w in (4, 32):
        with torch.device('meta'):
            pose, cls = HRNet(17, w), ClassificationHRNet(1000, w)
        assert {k: tuple(v.shape) for k, v in pose.state_dict().items()} == authors_state_shapes(w, 17)
        assert {k: tuple(v.shape) for k, v in cls.state_dict().items()} == authors_state_shapes(w, classes=1000)
    sd, cls_keys = pose.state_dict(), cls.state_dict()      # W32
    assert len(authors_state_shapes(32)) == len(sd) == 1754
    assert len(authors_state_shapes(32, classes=1000)) == len(cls_keys) == 1956
    assert [name for name, _ in pose.named_children() if name != 'relu'] == BACKBONE + ['final_layer']
    for key, shape in [('stage4.2.fuse_layers.0.3.0.weight', (32, 256, 1, 1)),
                       ('stage4.2.fuse_layers.0.3.1.running_var', (32,)),
                       ('stage3.0.fuse_layers.2.0.0.0.weight', (32, 32, 3, 3)),
                       ('stage3.0.fuse_layers.2.0.1.0.weight', (128, 32, 3, 3)),
                       ('stage4.0.fuse_layers.3.2.0.1.num_batches_tracked', ()),
                       ('transition1.0.0.weight', (32, 256, 3, 3)), ('transition3.3.0.0.weight', (256, 128, 3, 3)),
                       ('layer1.0.downsample.0.weight', (256, 64, 1, 1)), ('layer1.3.bn3.bias', (256,)),
                       ('stage2.0.branches.1.3.conv2.weight', (64, 64, 3, 3)), ('final_layer.bias', (17,))]:
        assert tuple(sd[key].shape) == shape, key
    # the last module of stage 4 keeps only the highest resolution; the classifier keeps all four
    assert not any(k.startswith('stage4.2.fuse_layers.1.') for k in sd)
    assert 'stage4.2.fuse_layers.3.2.0.0.weight' in cls_keys and 'transition2.0.0.weight' not in sd
    # classifier head
    for key, shape in [('incre_modules.0.0.downsample.0.weight', (128, 32, 1, 1)),
                       ('downsamp_modules.2.0.bias', (1024,)), ('final_layer.0.weight', (2048, 1024, 1, 1)),
                       ('final_layer.1.running_mean', (2048,)), ('classifier.weight', (1000, 2048))]:
        assert tuple(cls_keys[key].shape) == shape, key


@pytest.mark.parametrize('classify', [False, True])
def test_a_state_dict_with_the_authors_names_loads_strictly_and_runs_their_graph(classify):
    shapes = authors_state_shapes(4, 5, classes=10 if classify else None)
    state = random_state(shapes)
    make = (lambda: ClassificationHRNet(10, 4)) if classify else (lambda: HRNet(5, 4))
    torch.manual_seed(1)
    a = make()
    a.load_state_dict(state, strict=True)
    torch.manual_seed(2)
    b = make()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, RES, RES)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b, ref = a(x)[0], b(x)[0], authors_forward(state, x, classify)
    assert torch.equal(out_a, out_b)
    assert out_a.shape == ref.shape and out_a.abs().mean() > 1e-3
    torch.testing.assert_close(out_a, ref, rtol=1e-5, atol=1e-6)


def test_options_read_off_a_state_dict():
    with torch.device('meta'):
        assert HRNet.options_from_state(HRNet(16, 48).state_dict()) == {'nJoints': 16, 'hrnetWidth': 48}
        cls = ClassificationHRNet(1000, 32).state_dict()
    assert ClassificationHRNet.options_from_state(cls) == {'nClasses': 1000, 'hrnetWidth': 32}


# --------------------------------------------------------------------------- --pretrained

def imagenet_file(path, width=4, seed=3, wrap=True):
    """A ClassificationHRNet state dict with recognisable values, saved as a checkpoint would be
    (under 'state_dict', with DataParallel's 'module.' prefix): the file's state dict."""
    torch.manual_seed(seed)
    net = ClassificationHRNet(1000, width)
    state = random_state({k: tuple(v.shape) for k, v in net.state_dict().items()}, seed)
    saved = {'module.' + k: v for k, v in state.items()}
    torch.save({'state_dict': saved, 'epoch': 100} if wrap else saved, path)
    return state


def test_pretrained_fills_the_backbone_only(tmp_path):
    path = str(tmp_path / 'hrnet_w4-imagenet.pth')
    state = imagenet_file(path)
    plain = tiny(pose_opts(17), seed=0)
    model = tiny(pose_opts(17, extra=['--pretrained', path]), seed=0)
    own = model.state_dict()
    backbone = [k for k in own if k.split('.')[0] in BACKBONE]
    assert len(backbone) == len(own) - 2
    for k in backbone:
        assert torch.equal(own[k], state[k]), k
    # the head is untouched (as built), the classifier and the extra stage-4 fusions are ignored
    assert torch.equal(own['final_layer.weight'], plain.state_dict()['final_layer.weight'])
    assert 'classifier.weight' in state and 'classifier.weight' not in own
    assert 'stage4.2.fuse_layers.1.0.0.0.weight' in state and 'stage4.2.fuse_layers.1.0.0.0.weight' not in own
    # not part of the model's arch
    assert model.arch == plain.arch
    # a bare state dict loads the same
    bare = str(tmp_path / 'bare.pth')
    imagenet_file(bare, wrap=False)
    assert torch.equal(tiny(pose_opts(17, extra=['--pretrained', bare])).stage4[2].branches[0][3].bn2.running_var,
                       state['stage4.2.branches.0.3.bn2.running_var'])


def test_pretrained_of_another_width_names_the_option(tmp_path):
    path = str(tmp_path / 'hrnet_w8.pth')
    imagenet_file(path, width=8)
    with pytest.raises(CheckpointError) as e:
        build_model(pose_opts(17, extra=['--pretrained', path]))
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and '\n' not in msg
    assert '--hrnetWidth 8' in msg and 'transition1.0.0.weight' in msg


def test_pretrained_wrong_or_missing_file_is_one_line(tmp_path):
    absent = str(tmp_path / 'absent.pth')
    with pytest.raises(CheckpointError) as e:
        build_model(pose_opts(17, extra=['--pretrained', absent]))
    assert str(e.value).startswith(absent) and 'no such file' in str(e.value) and '\n' not in str(e.value)
    # weights of something else: fills none of the backbone
    other = str(tmp_path / 'other.pth')
    torch.save({'fc.weight': torch.zeros(3, 4), 'features.0.weight': torch.zeros(2)}, other)
    with pytest.raises(CheckpointError) as e:
        build_model(pose_opts(17, extra=['--pretrained', other]))
    msg = str(e.value)
    assert msg.startswith(f'{other}: ') and 'fills only 0 of' in msg and '--hrnetWidth' in msg and '\n' not in msg
    # a file that is not a weights file, and 'download' (there is no URL)
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a pickle')
    for spec in (str(junk), 'download'):
        with pytest.raises(CheckpointError) as e:
            build_model(pose_opts(17, extra=['--pretrained', spec]))
        assert '\n' not in str(e.value) and str(e.value).startswith(spec if spec != 'download' else '--pretrained')
    with pytest.raises(ConfigError):
        build_model(cls_opts(extra=['--pretrained', str(junk)]))


# --------------------------------------------------------------------------- training

def test_gradients_reach_conv1_and_two_steps_lower_the_loss():
    model = tiny(pose_opts(5)).train()
    codec = HeatmapCodec(RES, RES // 4, 2.0)
    b = batch(codec, 5, n=4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        optimiser.zero_grad()
        loss = sum(codec.loss(model(b['image']), b).values())
        loss.backward()
        if step == 0:
            grad = model.conv1.weight.grad
            assert grad is not None and grad.abs().sum() > 0
        losses.append(loss.item())
        optimiser.step()
    assert losses[2] < losses[0]


def test_classifier_trains():
    model = tiny(cls_opts(4)).train()
    x, y = torch.randn(4, 3, RES, RES), torch.tensor([0, 1, 2, 3])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(x)[0], y)
        loss.backward()
        if step == 0:
            assert model.conv1.weight.grad.abs().sum() > 0
        losses.append(loss.item())
        optimiser.step()
    assert losses[2] < losses[0]
