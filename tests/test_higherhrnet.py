"""HigherHRNet: sizes, the authors' names and graph, ImageNet weights, gradients, options.

Tiny widths (--hrnetWidth 4) and 64x64 inputs keep the file fast on a CPU; the paper-sized models
are only counted and run on the meta device. The authors' layout (``pose_higher_hrnet.py`` of
HRNet/HigherHRNet-Human-Pose-Estimation with ``w32_512_adam_lr1e-3.yaml``: ``TAG_PER_JOINT``,
one deconvolution with ``CAT_OUTPUT``, 4 BasicBlocks, 1x1 final convs, ``WITH_AE_LOSS [True,
False]``) is written out here independently of ``models/higherhrnet.py``: their backbone is
``pose_hrnet``'s (``test_hrnet.authors_state_shapes`` without its ``final_layer``), the head is
listed and run below with torch.nn.functional.
"""
import pytest
import torch
import torch.nn.functional as F

import opts
from models import build_model, count_parameters
from models.hrnet import HighResolutionNet
from models.higherhrnet import HigherHRNet
from test_hrnet import BACKBONE, authors_forward, authors_state_shapes, imagenet_file, random_state
from utils import checkpoint
from utils.errors import CheckpointError, ConfigError

RES = 64
TINY = ['--hrnetWidth', '4']
BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads on shared cores: one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hh_opts(joints=17, res=RES, extra=()):
    res = str(res)
    out = 'x'.join(str(int(v) // 4) for v in res.split('x'))
    return opts.parse(['--model', 'HigherHRNet', '--nJoints', str(joints), '--inputRes', res, '--outputRes', out,
                       *TINY, *extra])


def tiny(o, seed=0):
    torch.manual_seed(seed)
    return build_model(o)


def meta_model(argv):
    with torch.device('meta'):
        return build_model(opts.parse(argv))


# --------------------------------------------------------------------------- the authors' layout

def authors_shapes(width, joints=17):
    """{name: shape} of the authors' PoseHigherResolutionNet state dict."""
    shapes = {k: v for k, v in authors_state_shapes(width, joints).items() if not k.startswith('final_layer')}

    def conv(name, cout, cin, k, bias=False):
        shapes[f'{name}.weight'] = (cout, cin, k, k)
        if bias:
            shapes[f'{name}.bias'] = (cout,)

    def bn(name, c):
        for s in ('weight', 'bias', 'running_mean', 'running_var'):
            shapes[f'{name}.{s}'] = (c,)
        shapes[f'{name}.num_batches_tracked'] = ()

    conv('final_layers.0', 2 * joints, width, 1, bias=True)          # K heatmaps + K tags
    conv('final_layers.1', joints, width, 1, bias=True)              # K heatmaps
    # ConvTranspose2d weights are (in, out, k, k); its input: features + the first output
    shapes['deconv_layers.0.0.0.weight'] = (width + 2 * joints, width, 4, 4)
    bn('deconv_layers.0.0.1', width)
    for b in range(1, 5):
        p = f'deconv_layers.0.{b}.0'
        conv(f'{p}.conv1', width, width, 3), bn(f'{p}.bn1', width)
        conv(f'{p}.conv2', width, width, 3), bn(f'{p}.bn2', width)
    return shapes


def authors_head_forward(sd, x):
    """The authors' graph on a state dict of their names (eval-mode BN): both outputs."""
    c = sd['transition1.0.0.weight'].shape[0]
    backbone = {k: v for k, v in sd.items() if not k.startswith(('final_layers', 'deconv_layers'))}
    backbone['final_layer.weight'] = torch.eye(c).view(c, c, 1, 1)    # authors_forward's head: identity
    features = authors_forward(backbone, x)

    def conv(p, x):
        w = sd[f'{p}.weight']
        return F.conv2d(x, w, sd.get(f'{p}.bias'), 1, w.shape[-1] // 2)

    def bn(p, x):
        return F.batch_norm(x, sd[f'{p}.running_mean'], sd[f'{p}.running_var'], sd[f'{p}.weight'],
                            sd[f'{p}.bias'], False, 0.0, 1e-5)

    low = conv('final_layers.0', features)
    y = torch.cat((features, low), 1)
    y = F.relu(bn('deconv_layers.0.0.1', F.conv_transpose2d(y, sd['deconv_layers.0.0.0.weight'], stride=2, padding=1)))
    for b in range(1, 5):
        p = f'deconv_layers.0.{b}.0'
        out = F.relu(bn(f'{p}.bn1', conv(f'{p}.conv1', y)))
        y = F.relu(bn(f'{p}.bn2', conv(f'{p}.conv2', out)) + y)
    return [low, conv('final_layers.1', y)]


# --------------------------------------------------------------------------- sizes

def test_paper_parameter_counts():
    w32 = meta_model(['-ModelConfig', 'conf/models/higherhrnet_w32.defconf', '--nJoints', '17'])
    w48 = meta_model(['-ModelConfig', 'conf/models/higherhrnet_w48.defconf', '--nJoints', '17'])
    assert count_parameters(w32) == 28_645_331 and count_parameters(w48) == 63_827_139
    assert count_parameters(meta_model(['--model', 'HigherHRNet', '--nJoints', '17', '--hrnetWidth', '48',
                                        '--inputRes', '640', '--outputRes', '160'])) == 63_827_139
    # the parameters of the authors' layout (their state dict without the BN buffers) add up the same
    for w in (32, 48):
        layout = authors_shapes(w, 17)
        assert sum(torch.Size(s).numel() for k, s in layout.items() if k.split('.')[-1] not in BUFFERS) == \
            {32: 28_645_331, 48: 63_827_139}[w]


def test_output_shapes_at_512_and_tiny_sizes():
    model = meta_model(['-ModelConfig', 'conf/models/higherhrnet_w32.defconf', '--nJoints', '17'])
    assert model.target == 'associative_embedding' and model.stride == 4 and model.strides == (4, 2)
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 512, 512, device='meta'))
    assert isinstance(out, list) and [tuple(t.shape) for t in out] == [(2, 34, 128, 128), (2, 17, 256, 256)]
    w48 = meta_model(['-ModelConfig', 'conf/models/higherhrnet_w48.defconf', '--nJoints', '17'])
    with torch.no_grad():
        assert [tuple(t.shape) for t in w48(torch.zeros(1, 3, 640, 640, device='meta'))] == \
            [(1, 34, 160, 160), (1, 17, 320, 320)]

    small = tiny(hh_opts(5)).eval()
    assert small.arch == {'model': 'HigherHRNet', 'nJoints': 5, 'hrnetWidth': 4}
    with torch.no_grad():
        out = small(torch.randn(2, 3, RES, RES))
        assert [tuple(t.shape) for t in out] == [(2, 10, 16, 16), (2, 5, 32, 32)]
        assert all(torch.isfinite(t).all() for t in out)
        # non-square, as the contract test runs every model (256x192, 17 joints)
        out = tiny(hh_opts(17, '256x192')).eval()(torch.randn(1, 3, 256, 192))
    assert [tuple(t.shape) for t in out] == [(1, 34, 64, 48), (1, 17, 128, 96)]


def test_config_files_set_the_bottom_up_recipe():
    o = opts.parse(['-ModelConfig', 'conf/models/higherhrnet_w32.defconf'])
    assert (o.inputRes, o.outputRes, o.hrnetWidth, o.hmGauss) == ((512, 512), (128, 128), 32, 2.0)
    assert (o.optimizer_type, o.LR, o.weightDecay, o.LRSteps, o.nEpochs, o.data_loader_size, o.flipTest) == \
        ('Adam', 1e-3, 0.0, [200, 260], 300, 12, True)
    o = opts.parse(['-ModelConfig', 'conf/models/higherhrnet_w48.defconf'])
    assert (o.inputRes, o.outputRes, o.hrnetWidth, o.nEpochs, o.data_loader_size) == ((640, 640), (160, 160), 48, 300, 10)


def test_inputs_not_divisible_by_32_and_wrong_output_size_are_one_line():
    with pytest.raises(ConfigError) as e:
        build_model(hh_opts(17, '80x48'))
    assert '--inputRes 80x48' in str(e.value) and '32' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_model(opts.parse(['--model', 'HigherHRNet', '--inputRes', '512', '--outputRes', '256', *TINY]))
    msg = str(e.value)
    assert 'outputRes must be inputRes/4 = 128' in msg and '\n' not in msg
    with pytest.raises(ConfigError) as e:
        HigherHRNet(5, 4)(torch.randn(1, 3, 64, 48))
    assert '64x48' in str(e.value) and '\n' not in str(e.value)


def test_initialisation_is_the_authors():
    model = HigherHRNet(5, 4)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert 0.0008 < weights.std().item() < 0.0012
    assert 0.0005 < model.deconv_layers[0][0][0].weight.std().item() < 0.0015     # the transposed conv too
    assert not model.final_layers[0].bias.any() and not model.final_layers[1].bias.any()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in bns)


# --------------------------------------------------------------------------- the authors' names

def test_state_dict_has_the_authors_names_and_shapes():
    for w in (4, 32, 48):
        with torch.device('meta'):
            model = HigherHRNet(17, w)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == authors_shapes(w, 17)
    sd = model.state_dict()                                  # W48
    assert len(sd) == 1810
    assert [n for n, _ in model.named_children() if n != 'relu'] == BACKBONE + ['final_layers', 'deconv_layers']
    for key, shape in [('final_layers.0.weight', (34, 48, 1, 1)), ('final_layers.1.bias', (17,)),
                       ('deconv_layers.0.0.0.weight', (82, 48, 4, 4)), ('deconv_layers.0.0.1.running_var', (48,)),
                       ('deconv_layers.0.4.0.conv2.weight', (48, 48, 3, 3)),
                       ('stage4.2.fuse_layers.0.3.0.weight', (48, 384, 1, 1))]:
        assert tuple(sd[key].shape) == shape, key
    # the backbone is the pose HRNet's (the same names as pose_hrnet, built by the shared base class)
    assert isinstance(model, HighResolutionNet)
    assert not any(k.startswith('stage4.2.fuse_layers.1.') for k in sd)
    deconv = model.deconv_layers[0][0][0]
    assert (deconv.stride, deconv.padding, deconv.output_padding, deconv.bias) == ((2, 2), (1, 1), (0, 0), None)


def test_a_state_dict_with_the_authors_names_loads_strictly_and_runs_their_graph():
    state = random_state(authors_shapes(4, 5))
    torch.manual_seed(1)
    a = HigherHRNet(5, 4)
    a.load_state_dict(state, strict=True)
    torch.manual_seed(2)
    b = HigherHRNet(5, 4)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, RES, RES)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b, ref = a(x), b(x), authors_head_forward(state, x)
    assert all(torch.equal(p, q) for p, q in zip(out_a, out_b))
    for ours, theirs in zip(out_a, ref):
        assert ours.shape == theirs.shape and ours.abs().mean() > 1e-3
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # a released file (under 'state_dict', DataParallel's 'module.' prefix) goes through load_weights
    released = checkpoint.released_state({'state_dict': {'module.' + k: v for k, v in state.items()}})
    c = tiny(hh_opts(5), seed=3)
    checkpoint.load_weights(c, released, 'pose_higher_hrnet_w4.pth')
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(c.eval()(x), out_a))


def test_options_read_off_a_state_dict():
    with torch.device('meta'):
        assert HigherHRNet.options_from_state(HigherHRNet(17, 32).state_dict()) == {'nJoints': 17, 'hrnetWidth': 32}
        assert HigherHRNet.options_from_state(HigherHRNet(14, 48).state_dict()) == {'nJoints': 14, 'hrnetWidth': 48}
    assert HigherHRNet.options_from_state(random_state(authors_shapes(4, 5))) == \
        {'nJoints': 5, 'hrnetWidth': 4}
    # a file of another width and joint set: the error names the options it was made with
    model = tiny(hh_opts(17))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_weights(model, HigherHRNet(14, 8).state_dict(), 'w8.pth')
    msg = str(e.value)
    assert '--nJoints 14 (configured: 17)' in msg and '--hrnetWidth 8 (configured: 4)' in msg and '\n' not in msg


# --------------------------------------------------------------------------- --pretrained

def test_pretrained_fills_the_backbone_only(tmp_path):
    path = str(tmp_path / 'hrnet_w4-imagenet.pth')
    state = imagenet_file(path)                 # a ClassificationHRNet state dict, 'module.' under 'state_dict'
    plain = tiny(hh_opts(17), seed=0)
    model = tiny(hh_opts(17, extra=['--pretrained', path]), seed=0)
    own, fresh = model.state_dict(), plain.state_dict()
    backbone = [k for k in own if k.split('.')[0] in BACKBONE]
    head = [k for k in own if k.startswith(('final_layers', 'deconv_layers'))]
    assert len(backbone) + len(head) == len(own) and len(head) == 58
    for k in backbone:
        assert torch.equal(own[k], state[k]), k
    for k in head:                              # the head keeps its initialisation
        assert torch.equal(own[k], fresh[k]), k
    assert model.arch == plain.arch             # --pretrained is not part of the architecture
    # a checkpoint of this framework holding a ClassificationHRNet loads the same
    framework = str(tmp_path / 'cls_checkpoint.pth')
    torch.save({'format': 2, 'arch': {'model': 'ClassificationHRNet'}, 'state_dict': state, 'epoch': 3}, framework)
    again = tiny(hh_opts(17, extra=['--pretrained', framework]))
    assert torch.equal(again.stage4[2].branches[0][3].bn2.running_var, state['stage4.2.branches.0.3.bn2.running_var'])


def test_pretrained_of_another_width_or_absent_is_one_line(tmp_path):
    path = str(tmp_path / 'hrnet_w8.pth')
    imagenet_file(path, width=8)
    with pytest.raises(CheckpointError) as e:
        build_model(hh_opts(17, extra=['--pretrained', path]))
    assert str(e.value).startswith(f'{path}: ') and '--hrnetWidth 8' in str(e.value) and '\n' not in str(e.value)
    absent = str(tmp_path / 'absent.pth')
    with pytest.raises(CheckpointError) as e:
        build_model(hh_opts(17, extra=['--pretrained', absent]))
    assert 'no such file' in str(e.value) and '\n' not in str(e.value)


# --------------------------------------------------------------------------- training

def test_gradients_reach_conv1_from_both_outputs():
    torch.manual_seed(0)
    model = HigherHRNet(5, 4).train()
    x = torch.randn(2, 3, RES, RES)
    low, high = model(x)
    targets = torch.rand_like(low[:, :5]), torch.rand_like(high)
    loss = F.mse_loss(low[:, :5], targets[0]) + F.mse_loss(high, targets[1]) + low[:, 5:].pow(2).mean()
    loss.backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.final_layers.parameters())
    # the second output alone trains the first head too: its output is concatenated into the deconv
    model.zero_grad()
    model(x)[1].pow(2).mean().backward()
    assert model.final_layers[0].weight.grad.abs().sum() > 0 and model.conv1.weight.grad.abs().sum() > 0
