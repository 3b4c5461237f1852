"""Run plots (curves.png, per_joint.png) and the TensorBoard writer."""
import builtins
import os
import sys

import cv2
import numpy as np
import pytest
import torch

from datasets.joints import COCO, MPII
from utils.errors import ConfigError, PoseError
from vis import plots

pytest.importorskip('matplotlib')


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

MPII_TABLE = {'Head': 95.1, 'Shoulder': 90.3, 'Elbow': 81.2, 'Wrist': 72.4, 'Hip': 88.0, 'Knee': 80.9, 'Ankle': 75.5,
              'Mean': 84.2, 'Mean@0.1': 31.0,
              'per_joint': {n: float(v) for n, v in zip(MPII.names, np.linspace(60, 98, 16))}}
COCO_TABLE = {'AP': 0.712, 'AP .5': 0.905, 'AP .75': 0.781, 'AP (M)': 0.679, 'AP (L)': 0.772,
              'AR': 0.754, 'AR .5': 0.927, 'AR .75': 0.815, 'AR (M)': 0.712, 'AR (L)': 0.813}


def history(epochs=6, terms=('heatmap_4', 'heatmap_2', 'push', 'pull'), val_every=2, table=COCO_TABLE):
    out = []
    for e in range(1, epochs + 1):
        record = dict(epoch=e, train_loss=1.0 / e, train_acc=None, lr=1e-3 if e <= 4 else 1e-4, train_seconds=10.0,
                      train_images_per_s=50.0 + e)
        if terms:
            record['train_loss_terms'] = {t: (i + 1) * 0.1 / e for i, t in enumerate(terms)}
            record['train_loss_terms']['pull'] = 0.0 if e == 1 else 0.01 / e      # a zero on a log axis
        if val_every and e % val_every == 0:
            record.update(val=dict(table, AP=0.3 + 0.05 * e), val_headline=0.3 + 0.05 * e, val_acc=None)
        out.append(record)
    return out


def read_png(path, min_size):
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    image = cv2.imread(str(path))
    assert image is not None and image.ndim == 3, path
    h, w = image.shape[:2]
    assert h >= min_size[0] and w >= min_size[1], (h, w)
    assert image.std() > 10                      # not a blank picture
    return image


@pytest.mark.parametrize('case', ['several-terms-and-validation', 'no-validation', 'one-epoch', 'nan-and-none', 'empty'])
def test_curves_are_a_png_for_every_kind_of_history(tmp_path, case):
    h = {'several-terms-and-validation': history(),
         'no-validation': history(terms=(), val_every=0),
         'one-epoch': history(epochs=1, terms=(), val_every=1, table=MPII_TABLE),
         'nan-and-none': [dict(epoch=1, train_loss=float('nan'), lr=None), dict(epoch=2, train_loss=0.5, lr=0.0,
                                                                              val_headline=None)],
         'empty': []}[case]
    path = plots.write_curves(str(tmp_path / 'curves.png'), h)
    assert path == str(tmp_path / 'curves.png')
    image = read_png(path, (300, 1000))
    assert image.shape[1] > 2.5 * image.shape[0]     # three panels side by side
    assert os.listdir(tmp_path) == ['curves.png']    # no temporary file left


def test_per_joint_is_a_png_for_pck_coco_and_other_tables(tmp_path):
    a = read_png(plots.write_per_joint(str(tmp_path / 'mpii.png'), MPII_TABLE, 'MPII validation, PCKh@0.5'), (300, 600))
    b = read_png(plots.write_per_joint(str(tmp_path / 'coco.png'), COCO_TABLE, 'COCO val2017'), (300, 600))
    c = read_png(plots.write_per_joint(str(tmp_path / 'top.png'), {'Top-1': 71.3, 'Top-5': 90.2}, 'ImageNet'), (300, 500))
    lsp = {'per_joint': {n: 50.0 for n in COCO.names}, 'Mean': 50.0}
    d = read_png(plots.write_per_joint(str(tmp_path / 'k17.png'), lsp), (300, 600))
    assert a.shape != b.shape and c.shape[1] < d.shape[1]
    # the MPII bars are coloured by side: blue (left) and orange (right) are both in the picture
    rgb = cv2.cvtColor(a, cv2.COLOR_BGR2RGB).reshape(-1, 3).astype(int)
    for colour in [(40, 120, 255), (255, 140, 0), (40, 200, 80)]:
        assert (np.abs(rgb - colour).sum(1) < 12).sum() > 500, colour


def test_a_failed_plot_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'curves.png')
    plots.write_curves(path, history())
    before = open(path, 'rb').read()

    def broken(fig, buffer, **kwargs):
        raise RuntimeError('disk full')
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, 'savefig', broken)
    with pytest.raises(RuntimeError):
        plots.write_curves(path, history(3))
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['curves.png']


def test_without_matplotlib_the_error_is_one_line(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError) as e:
        plots.write_curves(str(tmp_path / 'c.png'), history())
    assert str(e.value) == 'plots need the matplotlib package: pip install matplotlib'


# ----------------------------------------------------------------------------- TensorBoard

def hide_tensorboard(monkeypatch):
    """Imports of tensorboard (and of torch's writer, which needs it) fail as without the package."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == 'tensorboard' or name.startswith('tensorboard.') or name.startswith('torch.utils.tensorboard'):
            raise ModuleNotFoundError(f"No module named '{name.split('.')[0]}'")
        return real(name, *args, **kwargs)
    for name in [m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard'))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, '__import__', fake)


def test_tensorboard_missing_is_one_line_naming_the_install(tmp_path, monkeypatch):
    from utils.tensorboard import TensorBoardWriter, require
    hide_tensorboard(monkeypatch)
    with pytest.raises(ConfigError) as early:
        require()
    with pytest.raises(ConfigError) as e:
        TensorBoardWriter(str(tmp_path))
    assert str(early.value) == str(e.value)
    msg = str(e.value)
    assert isinstance(e.value, PoseError) and '\n' not in msg
    assert msg == '--tensorboard needs the tensorboard package: pip install tensorboard (or run without --tensorboard)'
    assert not (tmp_path / 'tb').exists()


def test_tensorboard_writes_the_epoch_scalars_and_the_vis_grid(tmp_path):
    pytest.importorskip('tensorboard', reason='the optional tensorboard package is not installed (pip install tensorboard)')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from utils.tensorboard import TensorBoardWriter
    from vis.draw import write_png
    png = str(tmp_path / 'vis.png')
    write_png(png, np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3)))
    with TensorBoardWriter(str(tmp_path)) as tb:
        for record in history(4):
            tb.epoch(record)
        tb.image('val/vis', png, 4)
        tb.image('val/missing', str(tmp_path / 'none.png'), 4)          # nothing to show: skipped
    events = EventAccumulator(str(tmp_path / 'tb'), size_guidance={'scalars': 0, 'images': 0})
    events.Reload()
    tags = events.Tags()
    scalars = set(tags['scalars'])
    assert {'train/loss', 'train/loss_heatmap_4', 'train/loss_push', 'train/lr', 'train/images_per_s',
            'val/headline', 'val/AP', 'val/AP .5', 'val/AR (L)'} <= scalars
    assert [e.step for e in events.Scalars('train/loss')] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars('val/headline')] == [2, 4]
    assert events.Scalars('val/headline')[-1].value == pytest.approx(0.5)
    assert events.Scalars('train/lr')[0].value == pytest.approx(1e-3)
    assert tags['images'] == ['val/vis']
    image = events.Images('val/vis')[0]
    assert (image.width, image.height, image.step) == (64, 32, 4)
