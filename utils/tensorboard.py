"""TensorBoard logging of a run (``--tensorboard``): the scalars of every epoch's history record
and the validation grid (vis.png), written with ``torch.utils.tensorboard.SummaryWriter`` into the
run folder's ``tb/`` (``tensorboard --logdir exp/<id>/tb``).

The ``tensorboard`` package is optional (not in requirements.txt): without it, constructing the
writer is a ConfigError of one line saying how to install it.
"""
import math
import os

from utils.errors import ConfigError

INSTALL = '--tensorboard needs the tensorboard package: pip install tensorboard (or run without --tensorboard)'


def _finite(value):
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def require():
    """torch's SummaryWriter class; a ConfigError of one line when the tensorboard package is
    missing (callable before a run starts, so that --tensorboard fails before any work)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(INSTALL) from None
    return SummaryWriter


class TensorBoardWriter:
    """Event files in ``run_dir/tb``. ``epoch(record)`` writes a history record (the trainer's
    per-epoch dict) at step ``record['epoch']``:

    * ``train/loss``, ``train/loss_<term>`` (when the loss has several terms), ``train/acc``,
      ``train/lr``, ``train/images_per_s``, ``train/seconds``;
    * after an evaluation ``val/headline``, ``val/acc`` and every scalar column of the table
      (``val/Mean``, ``val/Head``, ... or ``val/AP``, ``val/AP .5``, ...), and the PCK per joint
      as ``val_joint/<name>``.

    ``image(tag, png_path, epoch)`` adds a PNG (the vis.png grid) as an image; a missing file is
    skipped (returns False). Use as a context manager, or call ``close()``.
    """

    def __init__(self, run_dir, flush_secs=30):
        SummaryWriter = require()
        self.log_dir = os.path.join(run_dir, 'tb')
        self.writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)

    def scalar(self, tag, value, step):
        value = _finite(value)
        if value is not None:
            self.writer.add_scalar(tag, value, step)
        return value is not None

    def epoch(self, record):
        step = int(record['epoch'])
        self.scalar('train/loss', record.get('train_loss'), step)
        for name, value in (record.get('train_loss_terms') or {}).items():
            self.scalar(f'train/loss_{name}', value, step)
        self.scalar('train/acc', record.get('train_acc'), step)
        self.scalar('train/lr', record.get('lr'), step)
        self.scalar('train/images_per_s', record.get('train_images_per_s'), step)
        self.scalar('train/seconds', record.get('train_seconds'), step)
        if 'val_headline' in record:
            self.scalar('val/headline', record.get('val_headline'), step)
            self.scalar('val/acc', record.get('val_acc'), step)
        table = record.get('val') or {}
        for name, value in table.items():
            if isinstance(value, dict):
                if name == 'per_joint':
                    for joint, v in value.items():
                        self.scalar(f'val_joint/{joint}', v, step)
                continue
            self.scalar(f'val/{name}', value, step)
        self.writer.flush()

    def image(self, tag, png_path, epoch):
        """The PNG at ``png_path`` as image ``tag`` at step ``epoch``; False when there is none."""
        import cv2
        if not png_path or not os.path.isfile(png_path):
            return False
        bgr = cv2.imread(png_path, cv2.IMREAD_COLOR)
        if bgr is None:
            return False
        self.writer.add_image(tag, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), int(epoch), dataformats='HWC')
        self.writer.flush()
        return True

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
