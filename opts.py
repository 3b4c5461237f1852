"""Every option of the framework, declared once (default, type, help, range or choices).

Options come from, in rising priority: the defaults below, ``-DataConfig``, ``-ModelConfig``
(configargparse files: ``key: value`` or ``key = value``, ``#`` comments, a repeated key's last
value wins), and the command line. The option names are the public interface inherited from the
older framework our users come from, and keep their spelling.
"""
import io
import sys

import configargparse

from utils.errors import ConfigError, did_you_mean
from utils.io import write_text

# Keys that older config files hold and that no longer do anything: accepted with a warning.
DEAD_KEYS = {
    'visdom': 'visualisation is written to the experiment folder instead',
    'worldCoors': 'predictions are always written in original image pixels',
    'headSize': 'the head size comes from the dataset annotations',
}


def _bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ('1', 'true', 'yes', 'on', 't', 'y'):
        return True
    if s in ('0', 'false', 'no', 'off', 'f', 'n', 'none', ''):
        return False
    raise configargparse.ArgumentTypeError(f'expected a boolean, got {v!r}')


_bool.__name__ = 'boolean'


def _int_list(v):
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    s = str(v).strip().strip('[]')
    return [int(x) for x in s.replace(',', ' ').split()] if s else []


_int_list.__name__ = 'list of integers'


def _float_list(v):
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    s = str(v).strip().strip('[]')
    return [float(x) for x in s.replace(',', ' ').split()] if s else []


_float_list.__name__ = 'list of numbers'


def _scale_range(v):
    lo_hi = _float_list(v)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise configargparse.ArgumentTypeError(f'expected MIN,MAX with 0 < MIN <= MAX, got {v!r}')
    return lo_hi


_scale_range.__name__ = 'scale range'


class Resolution(tuple):
    """An image size (height, width), written as the papers write it: ``256x192`` (height x
    width) or one number for a square. ``.wh`` is (width, height), the order OpenCV takes."""

    def __new__(cls, height, width=None):
        return super().__new__(cls, (int(height), int(height if width is None else width)))

    @property
    def height(self):
        return self[0]

    @property
    def width(self):
        return self[1]

    @property
    def wh(self):
        return (self[1], self[0])

    def __str__(self):
        return str(self[0]) if self[0] == self[1] else f'{self[0]}x{self[1]}'

    __repr__ = __str__

    def __getnewargs__(self):       # pickling (a spawned loader worker gets the options this way)
        return (self[0], self[1])


def resolution(minimum):
    """Option type: 'HxW' or 'N' -> Resolution, each side at least ``minimum``."""
    def parse(v):
        if isinstance(v, (tuple, list)):
            parts = [int(x) for x in v]
        else:
            text = str(v).strip().lower().replace(' ', '')
            parts = text.replace(',', 'x').split('x')
            try:
                parts = [int(p) for p in parts]
            except ValueError:
                raise configargparse.ArgumentTypeError(f'expected HEIGHTxWIDTH or one number, got {v!r}') from None
        if len(parts) not in (1, 2):
            raise configargparse.ArgumentTypeError(f'expected HEIGHTxWIDTH or one number, got {v!r}')
        size = Resolution(*parts)
        if min(size) < minimum:
            raise configargparse.ArgumentTypeError(f'{size}: each side must be at least {minimum}')
        return size
    parse.__name__ = 'resolution'
    return parse


def _ranged(kind, lo=None, hi=None):
    def parse(v):
        x = kind(v)
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise configargparse.ArgumentTypeError(f'{x} is outside [{lo}, {hi}]')
        return x
    parse.__name__ = kind.__name__
    return parse


class _CheckedConfigParser(configargparse.DefaultConfigFileParser):
    """configargparse's ``key: value`` / ``key = value`` parser that also checks every line: an
    unknown key (with the closest valid key) or a value of the wrong type is a ``ConfigError``
    naming the file and the line."""
    actions = {}

    def parse(self, stream):
        name = getattr(stream, 'name', '<config>')
        items = {}
        for line_no, line in enumerate(stream, 1):
            for key, value in super().parse(io.StringIO(line)).items():
                where = f'{name}: line {line_no}'
                if key not in self.actions:
                    raise ConfigError(f'{name}: unknown key {key!r}{did_you_mean(key, self.actions)}')
                self._check(where, key, value, bare=line.split('#')[0].strip() == key)
                items.pop(key, None)                # the last value of a repeated key wins
                items[key] = value
        return items

    def _check(self, where, key, value, bare=False):
        action = self.actions[key]
        kind = action.type
        if not isinstance(value, str):
            return
        if bare and kind is not _bool:
            raise ConfigError(f'{where}: {key} needs a value')
        converted = value
        if kind is not None:
            try:
                converted = kind(value)
            except (configargparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise ConfigError(f'{where}: {key}: invalid {kind.__name__} value {value!r} ({exc})') from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f'{where}: {key}: {value!r} is not one of {", ".join(map(str, action.choices))}')


class _Parser(configargparse.ArgumentParser):
    """Errors are raised as ``ConfigError`` (the entry points print them), never ``sys.exit``."""

    def error(self, message):
        raise ConfigError(message)


def build_parser():
    p = _Parser(
        description='2D human pose estimation: train, resume, test and inspect pose models.',
        config_file_parser_class=_CheckedConfigParser,
        formatter_class=configargparse.ArgumentDefaultsHelpFormatter,
        args_for_setting_config_path=[], ignore_unknown_config_file_keys=False)
    add = p.add_argument

    g = p.add_argument_group('configuration and run mode')
    g.add_argument('-DataConfig', is_config_file=True, help='dataset .defconf file (conf/datasets/)')
    g.add_argument('-ModelConfig', is_config_file=True, help='model .defconf file (conf/models/)')
    g.add_argument('-test', action='store_true', help='evaluate the checkpoint given by --loadModel on the validation split and exit')
    g.add_argument('-summary', action='store_true', help='print parameter count, GFLOPs and output shapes of the model, then exit')
    g.add_argument('-demo', default=None, metavar='PATH', help="run the --loadModel checkpoint on an image, a folder of images, a video file or a camera ('cam:0'): skeletons drawn, keypoints.json written")
    g.add_argument('-export', default=None, metavar='FILE.onnx', help='write the --loadModel checkpoint\'s network as an ONNX graph (dynamic batch size) and exit')
    g.add_argument('--testSplit', default='val', choices=['val', 'test'], help="-test on the validation split (scored) or the test split (MPII: annot/test.json, predictions in the submission's pred.mat, no score)")
    g.add_argument('--out', default=None, metavar='DIR', help='-demo: output folder (default: the run folder)')
    g.add_argument('--kptThreshold', type=_ranged(float, 0.0), default=0.2, help='-demo: keypoints scoring below this are not drawn')
    g.add_argument('--heatmaps', type=_bool, nargs='?', const=True, default=False, help='-demo: add a panel of the predicted heatmaps (and tag maps for bottom-up models) beside each drawing')
    g.add_argument('--personModel', default=None, metavar='CKPT', help='-demo with a top-down model: a bottom-up checkpoint whose people (keypoint extents, padded) give the person boxes')
    g.add_argument('--tensorboard', type=_bool, nargs='?', const=True, default=False, help='also write the scalars, images/s and vis.png grid to the run folder\'s tb/ (needs the tensorboard package)')
    g.add_argument('--expDir', default='exp', help='root folder of experiments')
    g.add_argument('--expID', default=None, help="experiment name; the run folder is expDir/expID (default: 'default'; with --loadModel, the checkpoint's own folder)")
    g.add_argument('--loadModel', default=None, help="checkpoint to resume from (model, optimiser, schedule, epoch and position in it, best score, random state); its recorded options become the defaults, so -test and resuming need no config files; 'auto': the run folder's model_last.pth if there is one, else a fresh start (the same command line can simply be re-submitted)")
    g.add_argument('--overwrite', type=_bool, nargs='?', const=True, default=False, help="train into a run folder that already holds another run's checkpoints, replacing them")
    g.add_argument('--finetune', type=_bool, nargs='?', const=True, default=False, help='with --loadModel: load the model weights alone and start a new schedule')
    g.add_argument('--seed', type=int, default=0, help='random seed of weights, sampling and augmentation')
    g.add_argument('--gpuid', type=int, default=0, help='CUDA device index; -1 runs on the CPU (also the fallback when CUDA is absent)')
    g.add_argument('--amp', type=_bool, nargs='?', const=True, default=False, help='mixed precision: float16 with loss scaling on CUDA, bfloat16 autocast on the CPU (about 1.5x faster on CPUs with AVX512-BF16 or AMX, float32 on a CPU without hardware bfloat16, where it would be emulated several times slower)')
    g.add_argument('--channelsLast', type=_bool, nargs='?', const=True, default=True, help='run the convolutions channels-last (1.3-1.5x faster on the CPU and on tensor cores); false: NCHW, the layout of the reference implementations, for their heatmaps to the last float bit')
    g.add_argument('--fusedBNReLU', type=_bool, nargs='?', const=True, default=True, help='CPU training with --amp: each BatchNorm-ReLU pair of the hourglass family through one fused C++ kernel on channels-last bfloat16 tensors, and its residual sums, 2x2 max-poolings and 1x1 and 3x3 convolutions through C++ kernels (the same function; the convolutions need AVX-512 BF16 and keep their weight gradients in float); on an AVX2 CPU (no AVX-512) float32 training runs its BatchNorm-ReLU pairs, max-poolings and 3x3 weight gradients through them too; built once per machine on first use, about 30 s; without a C++ compiler the modules run unfused')
    g.add_argument('--keepFreedMemory', type=_bool, nargs='?', const=True, default=True, help="CPU training: keep freed memory in the process's heap for the next step instead of returning it to the system (glibc malloc thresholds; quick-start steps a median 1.1x faster, the resident memory stays at the step's peak)")
    g.add_argument('--flipTest', type=_bool, nargs='?', const=True, default=False, help='average the output of the horizontally flipped image at evaluation')
    g.add_argument('--visCount', type=_ranged(int, 0), default=8, help='validation images drawn into vis.png after each evaluation')
    g.add_argument('--progress', type=_bool, nargs='?', const=True, default=True, help='show the live progress bar')

    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='Synthetic', help='registered dataset name (Synthetic, MPII, COCO, LSP, LIP)')
    g.add_argument('--dataDir', default='data', help='root folder of the dataset files')
    g.add_argument('--nJoints', type=_ranged(int, 1), default=16, help='number of keypoints the model predicts (must match the dataset)')
    g.add_argument('--inputRes', type=resolution(16), default=Resolution(256), help='input crop size in pixels, HEIGHTxWIDTH (256x192) or one number for a square; the person box is extended to its aspect ratio (bottom-up: the image\'s shorter side onto the shorter input side)')
    g.add_argument('--outputRes', type=resolution(4), default=Resolution(64), help='heatmap size, HEIGHTxWIDTH (64x48) or one number for a square')
    g.add_argument('--hmGauss', type=_ranged(float, 0.1), default=2.0, help='sigma of the target Gaussian in heatmap pixels')
    g.add_argument('--maxScale', type=_ranged(float, 0.0, 0.9), default=0.25, help='scale augmentation: factor clipped to 1 +/- maxScale')
    g.add_argument('--maxRotate', type=_ranged(float, 0.0, 180.0), default=30.0, help='rotation augmentation in degrees (std; clipped at 2x)')
    g.add_argument('--maxTranslate', type=_ranged(float, 0.0, 1.0), default=0.0, help='centre shift augmentation, as a fraction of the box width')
    g.add_argument('--colorJitter', type=_ranged(float, 0.0, 1.0), default=0.2, help='per-channel colour gain augmentation: 1 +/- colorJitter')
    g.add_argument('--flipAug', type=_bool, nargs='?', const=True, default=True, help='random horizontal flip augmentation')
    g.add_argument('--nTrainSamples', type=_ranged(int, 1), default=4000, help='Synthetic: number of training people')
    g.add_argument('--nValSamples', type=_ranged(int, 1), default=500, help='Synthetic: number of validation people')
    g.add_argument('--syntheticRes', type=_ranged(int, 32), default=256, help='Synthetic: side of the rendered image in pixels')
    g.add_argument('--syntheticCacheMB', type=_ranged(int, 0), default=1024, help='Synthetic: keep up to this many MB of rendered images per split for the next epochs, shared with the loader workers (the same pixels, rendered once; 4000 people at 256 px take 786 MB; 0: render every time)')
    g.add_argument('--maxTrainSamples', type=_ranged(int, 0), default=0, help='use only the first N training records (0: all)')
    g.add_argument('--maxValSamples', type=_ranged(int, 0), default=0, help='use only the first N validation records (0: all)')
    g.add_argument('--detFile', default=None, help='COCO: person detections json for testing (default: ground-truth boxes)')
    g.add_argument('--detThreshold', type=_ranged(float, 0.0, 1.0), default=0.0, help='COCO: minimum detection score')
    g.add_argument('--halfBodyProb', type=_ranged(float, 0.0, 1.0), default=0.0, help="half-body augmentation (HRNet's COCO recipe: 0.3): probability of cropping a training person to the upper or the lower body")
    g.add_argument('--halfBodyJoints', type=_ranged(int, 0), default=8, help='half-body augmentation: only for people with more than this many labelled joints')
    g.add_argument('--maxPeople', type=_ranged(int, 1), default=30, help='bottom-up models: at most this many people per image in the targets and in the grouping')
    g.add_argument('--scaleRange', type=_scale_range, default=[0.75, 1.5], help="bottom-up training: the image's shorter side is scaled onto the input by a factor uniform in MIN,MAX (HigherHRNet: 0.75,1.5); --maxRotate is then a uniform bound and --maxTranslate a fraction of that box")
    g.add_argument('--testScales', type=_float_list, default=[1.0], help='bottom-up testing: the scales of the multi-scale test (e.g. 0.5,1,2; 1 must be among them): heatmaps averaged, tags concatenated')
    g.add_argument('--pushLoss', default='exp', choices=['exp', 'max'], help="bottom-up: the associative-embedding push loss between people's tags, exp(-d^2) ('exp', HigherHRNet's) or max(0, 1 - |d|) ('max': no flat start, for short schedules)")
    g.add_argument('--tagLossFactor', type=_ranged(float, 0.0), default=1e-3, help='bottom-up: weight of the associative-embedding push and pull losses (HigherHRNet: 1e-3)')
    g.add_argument('--nClasses', type=_ranged(int, 2), default=1000, help='classification models (ClassificationHRNet): number of classes (must match the dataset)')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='StackedHourGlass', help='registered model name')
    g.add_argument('--nChannels', type=_ranged(int, 1), default=256, help='hourglass feature channels')
    g.add_argument('--nStack', type=_ranged(int, 1), default=8, help='number of stacked hourglasses')
    g.add_argument('--nModules', type=_ranged(int, 1), default=1, help='residual modules at each hourglass resolution')
    g.add_argument('--nReductions', type=_ranged(int, 1), default=4, help='downsamplings inside one hourglass')
    g.add_argument('--stemChannels', type=_ranged(int, 2), default=128, help="StackedHourGlass and SoftGatedHourglass: width of the stem's residuals before the first hourglass (the paper's 128; its 7x7 conv has half); PyraNet and PoseAttention keep their papers' stems")
    g.add_argument('--baseName', default='resnet50', help='ResNet backbone (resnet18/34/50/101/152)')
    g.add_argument('--pretrained', default=None, help="ImageNet weights for the backbone: a .pth path, or 'download'")
    g.add_argument('--hrnetWidth', type=_ranged(int, 1), default=32, help='HRNet, HigherHRNet, ClassificationHRNet: width C of the highest-resolution branch (the branches have C, 2C, 4C, 8C channels; the papers: 32 or 48)')
    g.add_argument('--decode', default='quarter', choices=['quarter', 'dark'], help="heatmap decoding: 'quarter' (argmax and the quarter-pixel shift of HRNet / SimpleBaselines) or 'dark' (DARK: Gaussian modulation and a second-order Taylor step on the log-heatmap)")
    g.add_argument('--reducedDecode', type=_bool, nargs='?', const=True, default=True, help='training: decode a JPEG 2, 4 or 8 times smaller (libjpeg DCT scaling) when the crop shrinks the person box by at least that much, with the affine corrected for the reduced frame (evaluation always decodes the whole image)')
    g.add_argument('--udp', type=_bool, nargs='?', const=True, default=False, help='unbiased data processing (UDP): heatmaps encoded and decoded in pixel-size units (stride (input - 1) / (output - 1)), the affine of the same units, and the flip test without the one-pixel shift')
    g.add_argument('--TargetType', default=None, choices=['heatmap', 'direct'], help='accepted from older configs: the model decides what it predicts (heatmap for heatmap models, direct coordinates for DeepPose); a value that contradicts the model is an error')
    g.add_argument('--nStages', type=_ranged(int, 1), default=1, help='DeepPose: cascade stages')
    g.add_argument('--modelName', default='resnet34', help='ChainedPredictions: encoder')
    g.add_argument('--ohKernel', type=_ranged(int, 1), default=3, help='ChainedPredictions: output-to-hidden kernel')
    g.add_argument('--hhKernel', type=_ranged(int, 1), default=3, help='ChainedPredictions: hidden-to-hidden kernel')
    g.add_argument('--baseWidth', type=_ranged(int, 1), default=6, help='PyraNet: pyramid branch width divisor (branch width = nChannels // baseWidth)')
    g.add_argument('--cardinality', type=_ranged(int, 1), default=4, help='PyraNet: pyramid levels C')
    g.add_argument('--LRNSize', type=_ranged(int, 1), default=1, help='PoseAttention: CRF kernel size')
    g.add_argument('--IterSize', type=_ranged(int, 1), default=3, help='PoseAttention: CRF mean-field iterations')
    g.add_argument('--imageRes', type=_ranged(int, 16), default=None, help='accepted for older configs; inputRes is used')

    g = p.add_argument_group('optimisation')
    g.add_argument('--optimizer_type', default='RMSprop', choices=['RMSprop', 'Adam', 'SGD'], help='optimiser')
    g.add_argument('--LR', type=_ranged(float, 0.0), default=2.5e-4, help='learning rate')
    g.add_argument('--momentum', type=_ranged(float, 0.0, 1.0), default=0.0, help='momentum (SGD, RMSprop)')
    g.add_argument('--nesterov', type=_bool, nargs='?', const=True, default=False, help="SGD: Nesterov momentum (HRNet-Image-Classification's recipe)")
    g.add_argument('--weightDecay', type=_ranged(float, 0.0), default=0.0, help='weight decay')
    g.add_argument('--dropLR', type=_ranged(int, 0), default=0, help='multiply the LR by dropMag every dropLR epochs (0: never)')
    g.add_argument('--dropMag', type=_ranged(float, 0.0, 1.0), default=0.1, help='LR drop factor')
    g.add_argument('--LRSteps', type=_int_list, default=[], help='multi-step schedule: epochs (comma separated) at which the LR is multiplied by dropMag; overrides dropLR')
    g.add_argument('--LRPolicy', default='step', choices=['step', 'cosine'], help='step: LR constant within an epoch, dropped by LRSteps / dropLR; cosine: LR follows a half cosine from LR down to 0 over nEpochs, set at every iteration')
    g.add_argument('--warmupEpochs', type=_ranged(float, 0.0), default=0.0, help='raise the LR linearly from 0 over the first N epochs (fractions allowed), per iteration')
    g.add_argument('--nEpochs', type=_ranged(int, 0), default=100, help='training epochs')
    g.add_argument('--valInterval', type=_ranged(int, 1), default=1, help='evaluate every N epochs')
    g.add_argument('--saveInterval', type=_ranged(int, 1), default=1, help='write the last checkpoint every N epochs')
    g.add_argument('--saveEvery', type=_ranged(int, 0), default=0, help='also write a resumable model_last.pth every N optimiser steps within an epoch (0: only at epoch ends); SIGTERM and SIGINT write one at the current step')
    g.add_argument('--checkData', type=_bool, nargs='?', const=True, default=False, help='decode every image of both splits, list the unreadable ones, and exit')
    g.add_argument('--data_loader_size', type=_ranged(int, 1), default=8, help='batch size')
    g.add_argument('--mini_batch_count', type=_ranged(int, 1), default=1, help='gradient accumulation: batches per optimiser step')
    g.add_argument('--nThreads', type=_ranged(int, 0), default=2, help='data loader worker processes')
    g.add_argument('--syncBN', type=_bool, nargs='?', const=True, default=False, help='torchrun: BatchNorm statistics over the batches of all ranks (SyncBatchNorm), for small per-GPU batches')
    g.add_argument('--distTimeout', type=_ranged(int, 10), default=300, help='torchrun: seconds a collective may wait for the other ranks before the run stops')
    g.add_argument('--shuffle', type=_bool, nargs='?', const=True, default=True, help='shuffle the training set each epoch')

    g = p.add_argument_group('accepted from older configs')
    for key, kind, default, text in [
            ('loadOptim', _bool, True, 'kept for older configs; --finetune controls what --loadModel restores'),
            ('loadEpoch', _bool, True, 'kept for older configs; --finetune controls what --loadModel restores'),
            ('dropPreLoaded', _ranged(int, 0), 0, 'kept for older configs; not used'),
            ('dropMagPreLoaded', _ranged(float, 0.0), 0.0, 'kept for older configs; not used'),
            ('usedouble', _bool, False, 'kept for older configs; not used'),
            ('DEBUG', _ranged(int, 0), 0, 'kept for older configs; not used'),
            ('dont_pin_memory', _bool, False, 'do not pin host memory in the data loader')]:
        g.add_argument(f'--{key}', type=kind, default=default, help=text)
    for key, why in DEAD_KEYS.items():
        g.add_argument(f'--{key}', default=None, help=f'no longer does anything ({why})')

    _CheckedConfigParser.actions = {a.dest: a for a in p._actions if a.option_strings
                                    and a.dest not in ('help', 'DataConfig', 'ModelConfig')}
    return p


def parse(argv=None, defaults=None):
    """Parse the command line (and the config files it names) into an options namespace.

    defaults: {option: value as text} that replace the built-in defaults (a checkpoint's recorded
    options); the config files and the command line still win over them.
    """
    parser = build_parser()
    if defaults:
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    opts = parser.parse_args(argv)
    for key, why in DEAD_KEYS.items():
        if getattr(opts, key) is not None:
            print(f'warning: option {key!r} no longer does anything ({why}); ignoring it', file=sys.stderr)
    return opts


# Options that describe how a run was started rather than what it is: not written to a run's
# config.defconf or a checkpoint's config.
RUN_MODE = ('help', 'DataConfig', 'ModelConfig', 'loadModel', 'finetune', 'test', 'summary', 'overwrite', 'demo', 'export',
            'testSplit', 'out', 'personModel', 'checkData', 'kptThreshold', 'heatmaps')


def _text(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, list):
        return ','.join(str(v) for v in value)
    return str(value)


def as_text(opts):
    """{option: value as text} for every resolved option (None values left out), in declaration
    order: what a run's config.defconf holds and what a checkpoint records."""
    out = {}
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in RUN_MODE or action.dest in DEAD_KEYS:
            continue
        value = getattr(opts, action.dest, None)
        if value is not None:
            out[action.dest] = _text(value)
    return out


def write_defconf(opts, path):
    """Write the resolved options as one .defconf that reproduces the run on its own."""
    lines = ['# resolved options of this run; reproduce it with: python main.py -DataConfig <this file> --expID <new name>']
    lines += [f'{k}: {v}' for k, v in as_text(opts).items()]
    write_text(path, '\n'.join(lines) + '\n')
