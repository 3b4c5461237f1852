"""ONNX export: every registered model exports with a dynamic batch and gives the PyTorch outputs
in onnxruntime; ``-export`` on a trained checkpoint; the predictor on the ONNX file gives the
checkpoint's people."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main as main_module
import opts as options
from datasets import build_dataset
from datasets.base import collate
from models import available, build_model
from utils import export
from utils.errors import ConfigError
from utils.predictor import Predictor
from test_contract import TINY_MODELS
from test_main import TINY

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

# a small input per model (HRNet's and SimpleBaseline's need sides divisible by 32; the bottom-up
# one is square)
SIZES = {'HRNet': (64, 32), 'ClassificationHRNet': (64, 64), 'HigherHRNet': (128, 128), 'SimpleBaseline': (64, 32)}
# weight scale of ``realistic`` giving outputs of about the size of heatmaps (at most ~2.5): HRNet's
# branches add up, DeepPose's coordinates place its refinement patches (inside the image at 0.1)
GAINS = {'HRNet': 0.025, 'HigherHRNet': 0.02, 'DeepPose': 0.1}
# the bottom-up model also runs on whole images of other sizes: exported with dynamic H and W
OTHER_SIZES = {'HigherHRNet': [(128, 192), (192, 64)]}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def realistic(model, size, seed=0, gain=0.25):
    """Weights that give outputs of order 1 (the models' own inits make some outputs ~1e-10, which
    would make any absolute tolerance meaningless): every convolution and linear layer drawn with
    std gain/sqrt(fan_in) (outputs of about the size of heatmaps), batch-norm affine parameters
    drawn, running statistics measured on random images in training mode; then eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else \
                    m.weight.shape[0] * m.weight[0, 0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.reset_running_stats()
                m.momentum = None                 # cumulative average over the calibration batches
        model.train()
        model(torch.randn(4, 3, *size, generator=g))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def tiny(name, size):
    h, w = size
    joints = ['--nJoints', '17'] if name == 'HigherHRNet' else ['--nJoints', '16']
    o = options.parse(['--model', name, *joints, '--inputRes', f'{h}x{w}', '--outputRes', f'{h // 4}x{w // 4}',
                       *TINY_MODELS[name]])
    torch.manual_seed(0)
    return build_model(o)


def test_every_registered_model_has_a_size_here():
    assert set(available()) == set(TINY_MODELS)


@pytest.mark.parametrize('name', sorted(TINY_MODELS))
def test_every_model_exports_and_onnxruntime_gives_the_pytorch_outputs(name, tmp_path):
    size = SIZES.get(name, (64, 48))
    model = realistic(tiny(name, size), size, gain=GAINS.get(name, 0.25))
    path = export.export_onnx(model, str(tmp_path / f'{name}.onnx'), size)
    assert not model.training
    # nothing of the export stays behind: the modules' own forwards, torch's own functions
    assert not any('forward' in vars(m) for m in model.modules())
    assert F.adaptive_avg_pool2d is torch.nn.functional.adaptive_avg_pool2d and '__round__' not in vars(torch.Tensor)
    onnx_model = export.OnnxModel(path)
    assert onnx_model.target == model.target and onnx_model.registry_name == name
    assert onnx_model.input_shape[0] == 'batch'
    dynamic = name in OTHER_SIZES
    assert onnx_model.input_shape[2:] == (('height', 'width') if dynamic else size)
    worst = []
    for shape in [size] + OTHER_SIZES.get(name, []):
        for n in (1, 3):                                # the dynamic batch (traced with 2)
            x = torch.randn(n, 3, *shape, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                ref = model(x)
                # for the report: PyTorch float32's own error against float64
                exact = model.double()(x.double()) if n == 1 else [r.double() for r in ref]
            model.float()
            got = onnx_model(x)
            assert len(got) == len(ref) and onnx_model.output_names == [f'output{i}' for i in range(len(ref))]
            for i, (a, b) in enumerate(zip(got, ref)):
                assert a.shape == b.shape, (i, a.shape, b.shape)
                scale = float(b.abs().max())
                diff = float((a - b).abs().max())
                assert scale > 1e-2, f'output {i} of {name} is ~0 ({scale}): the comparison would prove nothing'
                assert diff < 1e-4, f'{name} output {i} at {n}x{shape}: max abs difference {diff} (outputs up to {scale})'
                worst.append((diff, scale, float((b.double() - exact[i]).abs().max())))
    diff, scale, _ = max(worst)
    own = max(w[2] for w in worst)
    print(f'{name}: max abs difference {diff:.2e} (outputs up to {scale:.2f}; PyTorch float32 vs float64: '
          f'{own:.2e})', file=sys.stderr)


def test_pyranet_fractional_pooling_equivalent_is_exact():
    """The export-only gather of PyraNet's fixed fractional max-pooling windows: the same values
    as F.fractional_max_pool2d, bit for bit, at every size and ratio the model uses."""
    from models.pyranet import FractionalMaxPool2d
    g = torch.Generator().manual_seed(0)
    for c in range(1, 5):
        pool = FractionalMaxPool2d(2.0 ** (-c / 4)).eval()
        for h, w in [(2, 2), (2, 7), (3, 3), (5, 8), (16, 12), (17, 31), (64, 48)]:
            x = torch.randn(2, 3, h, w, generator=g)
            assert torch.equal(export._fixed_fractional_max_pool(pool, x), pool(x)), (c, h, w)
    pool.eval_sample = 0.25
    x = torch.randn(1, 2, 23, 19, generator=g)
    assert torch.equal(export._fixed_fractional_max_pool(pool, x), pool(x))


class FractionalModel(nn.Module):
    """An operator ONNX has no counterpart for (random fractional max-pooling)."""
    target = 'heatmap'
    stride = 1

    def forward(self, x):
        return [F.fractional_max_pool2d(x, 2, output_size=(x.shape[-2] // 2, x.shape[-1] // 2))]


def test_a_model_the_exporter_cannot_export_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        export.export_onnx(FractionalModel(), str(tmp_path / 'x.onnx'), (16, 16))
    msg = str(e.value)
    assert msg.startswith('FractionalModel cannot be exported to ONNX (opset 17): UnsupportedOperatorError')
    assert "'aten::fractional_max_pool2d'" in msg and '\n' not in msg and len(msg) < 400
    assert not (tmp_path / 'x.onnx').exists() and os.listdir(tmp_path) == []
    # PyraNet without its export-only equivalent: the same one line, naming the model
    monkeypatch.setattr(export, '_module_adapters', lambda: {})
    with pytest.raises(ConfigError) as e:
        export.export_onnx(tiny('PyraNet', (64, 48)), str(tmp_path / 'p.onnx'), (64, 48))
    assert str(e.value).startswith('PyraNet cannot be exported to ONNX') and 'fractional_max_pool2d' in str(e.value)


def test_export_needs_a_checkpoint_and_onnx_model_checks_its_input(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        main_module.main(['-export', str(tmp_path / 'm.onnx')])
    assert str(e.value) == '-export needs --loadModel PATH (the checkpoint to export)'
    path = export.export_onnx(tiny('StackedHourGlass', (64, 48)).eval(), str(tmp_path / 'hg.onnx'), (64, 48))
    with pytest.raises(ConfigError) as e:
        export.OnnxModel(path)(torch.zeros(1, 3, 64, 64))
    assert str(e.value) == f'{path} takes inputs of N x 3 x 64 x 48, got 1 x 3 x 64 x 64'
    with pytest.raises(ConfigError) as e:
        export.OnnxModel(str(tmp_path / 'none.onnx'))
    assert 'no such ONNX file' in str(e.value)
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)          # the package missing
    with pytest.raises(ConfigError) as e:
        export.OnnxModel(path)
    assert str(e.value) == 'running an ONNX model needs the onnxruntime package: pip install onnx onnxruntime'


def test_export_from_the_command_line_and_the_predictor_on_onnx_gives_the_checkpoints_people(tmp_path, capsys):
    main_module.main(TINY + ['--expDir', str(tmp_path), '--expID', 'a', '--nEpochs', '1', '--visCount', '0'])
    ckpt = str(tmp_path / 'a' / 'model_best.pth')
    out = str(tmp_path / 'onnx' / 'hg.onnx')
    capsys.readouterr()
    assert main_module.main(['-export', out, '--loadModel', ckpt]) == out
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f'exported StackedHourGlass to {out} (ONNX opset 17, input N x 3 x 32 x 32 (N dynamic), '
                     f'outputs output0, output1)']
    meta = export.read_metadata(out)
    assert meta['checkpoint'] == os.path.abspath(ckpt) and meta['config']['nStack'] == '2'
    assert meta['meta']['codec']['target'] == 'heatmap' and meta['input_size'] == [32, 32]

    reference = Predictor.from_checkpoint(ckpt)
    val = build_dataset(reference.opts, 'val', reference.codec)
    loader = torch.utils.data.DataLoader(val, batch_size=3, collate_fn=collate)     # batches of 3, 3 and 2
    for flip in (False, True):
        reference.flip_test = flip
        expected = reference.run(loader)
        by_hand = Predictor(export.OnnxModel(out), reference.codec, joint_set=reference.joint_set, flip_test=flip)
        from_file = export.onnx_predictor(out, flip_test=flip)
        assert from_file.joint_set == reference.joint_set and from_file.codec.settings() == reference.codec.settings()
        for predictor in (by_hand, from_file):
            got = predictor.run(loader)
            assert len(got['predictions']) == len(expected['predictions']) == 8
            assert got['acc'] == pytest.approx(expected['acc'], abs=1e-9)
            for a, b in zip(got['predictions'], expected['predictions']):
                assert a['index'] == b['index']
                np.testing.assert_allclose(a['keypoints'], b['keypoints'], atol=1e-4)
                np.testing.assert_allclose(a['scores'], b['scores'], atol=1e-5)
