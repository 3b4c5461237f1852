"""Every option of the framework, declared once (default, type, help, range or choices).

Options come from, in rising priority: the defaults below, ``-DataConfig``, ``-ModelConfig``
(configargparse files: ``key: value`` or ``key = value``, ``#`` comments, a repeated key's last
value wins), and the command line. The option names are the public interface inherited from the
older framework our users come from, and keep their spelling.
"""
import difflib
import sys

import configargparse

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


def _int_list(v):
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    s = str(v).strip().strip('[]')
    return [int(x) for x in s.replace(',', ' ').split()] if s else []


def _ranged(kind, lo=None, hi=None):
    def parse(v):
        x = kind(v)
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise configargparse.ArgumentTypeError(f'{x} is outside [{lo}, {hi}]')
        return x
    parse.__name__ = kind.__name__
    return parse


class _CheckedConfigParser(configargparse.DefaultConfigFileParser):
    """configargparse's ``key: value`` / ``key = value`` parser, which also rejects unknown keys
    with one line naming the file, the key and the closest valid key."""
    known = set()

    def parse(self, stream):
        items = super().parse(stream)
        name = getattr(stream, 'name', '<config>')
        for key in items:
            if key not in self.known:
                close = difflib.get_close_matches(key, self.known, n=1)
                hint = f'; did you mean {close[0]!r}?' if close else ''
                sys.exit(f'error: {name}: unknown key {key!r}{hint}')
        return items


def build_parser():
    p = configargparse.ArgumentParser(
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
    g.add_argument('--expDir', default='exp', help='root folder of experiments')
    g.add_argument('--expID', default='default', help='experiment name; the run folder is expDir/expID')
    g.add_argument('--loadModel', default=None, help='checkpoint to resume from (model, optimiser, schedule, epoch, best score, random state)')
    g.add_argument('--finetune', type=_bool, nargs='?', const=True, default=False, help='with --loadModel: load the model weights alone and start a new schedule')
    g.add_argument('--seed', type=int, default=0, help='random seed of weights, sampling and augmentation')
    g.add_argument('--gpuid', type=int, default=0, help='CUDA device index; -1 runs on the CPU (also the fallback when CUDA is absent)')
    g.add_argument('--amp', type=_bool, nargs='?', const=True, default=False, help='mixed precision: float16 with loss scaling on CUDA, bfloat16 autocast on the CPU (about 1.5x faster on CPUs with AVX512-BF16 or AMX, slower on older ones)')
    g.add_argument('--flipTest', type=_bool, nargs='?', const=True, default=False, help='average the output of the horizontally flipped image at evaluation')
    g.add_argument('--visCount', type=_ranged(int, 0), default=8, help='validation images drawn into vis.png after each evaluation')
    g.add_argument('--progress', type=_bool, nargs='?', const=True, default=True, help='show the live progress bar')

    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='Synthetic', help='registered dataset name (Synthetic, MPII, COCO, LSP, LIP)')
    g.add_argument('--dataDir', default='data', help='root folder of the dataset files')
    g.add_argument('--nJoints', type=_ranged(int, 1), default=16, help='number of keypoints the model predicts (must match the dataset)')
    g.add_argument('--inputRes', type=_ranged(int, 16), default=256, help='side of the square input crop in pixels')
    g.add_argument('--outputRes', type=_ranged(int, 4), default=64, help='side of the square output heatmap')
    g.add_argument('--hmGauss', type=_ranged(float, 0.1), default=2.0, help='sigma of the target Gaussian in heatmap pixels')
    g.add_argument('--maxScale', type=_ranged(float, 0.0, 0.9), default=0.25, help='scale augmentation: factor clipped to 1 +/- maxScale')
    g.add_argument('--maxRotate', type=_ranged(float, 0.0, 180.0), default=30.0, help='rotation augmentation in degrees (std; clipped at 2x)')
    g.add_argument('--maxTranslate', type=_ranged(float, 0.0, 1.0), default=0.0, help='centre shift augmentation, as a fraction of the box width')
    g.add_argument('--colorJitter', type=_ranged(float, 0.0, 1.0), default=0.2, help='per-channel colour gain augmentation: 1 +/- colorJitter')
    g.add_argument('--flipAug', type=_bool, nargs='?', const=True, default=True, help='random horizontal flip augmentation')
    g.add_argument('--nTrainSamples', type=_ranged(int, 1), default=4000, help='Synthetic: number of training people')
    g.add_argument('--nValSamples', type=_ranged(int, 1), default=500, help='Synthetic: number of validation people')
    g.add_argument('--syntheticRes', type=_ranged(int, 32), default=256, help='Synthetic: side of the rendered image in pixels')
    g.add_argument('--maxTrainSamples', type=_ranged(int, 0), default=0, help='use only the first N training records (0: all)')
    g.add_argument('--maxValSamples', type=_ranged(int, 0), default=0, help='use only the first N validation records (0: all)')
    g.add_argument('--detFile', default=None, help='COCO: person detections json for testing (default: ground-truth boxes)')
    g.add_argument('--detThreshold', type=_ranged(float, 0.0, 1.0), default=0.0, help='COCO: minimum detection score')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='StackedHourGlass', help='registered model name')
    g.add_argument('--nChannels', type=_ranged(int, 1), default=256, help='hourglass feature channels')
    g.add_argument('--nStack', type=_ranged(int, 1), default=8, help='number of stacked hourglasses')
    g.add_argument('--nModules', type=_ranged(int, 1), default=1, help='residual modules at each hourglass resolution')
    g.add_argument('--nReductions', type=_ranged(int, 1), default=4, help='downsamplings inside one hourglass')
    g.add_argument('--stemChannels', type=_ranged(int, 2), default=128, help="StackedHourGlass and SoftGatedHourglass: width of the stem's residuals before the first hourglass (the paper's 128; its 7x7 conv has half); PyraNet and PoseAttention keep their papers' stems")
    g.add_argument('--baseName', default='resnet50', help='ResNet backbone (resnet18/34/50/101/152)')
    g.add_argument('--pretrained', default=None, help="ImageNet weights for the backbone: a .pth path, or 'download'")
    g.add_argument('--TargetType', default='heatmap', choices=['heatmap', 'direct'], help='what the model regresses (DeepPose: direct)')
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
    g.add_argument('--weightDecay', type=_ranged(float, 0.0), default=0.0, help='weight decay')
    g.add_argument('--dropLR', type=_ranged(int, 0), default=0, help='multiply the LR by dropMag every dropLR epochs (0: never)')
    g.add_argument('--dropMag', type=_ranged(float, 0.0, 1.0), default=0.1, help='LR drop factor')
    g.add_argument('--LRSteps', type=_int_list, default=[], help='multi-step schedule: epochs (comma separated) at which the LR is multiplied by dropMag; overrides dropLR')
    g.add_argument('--LRPolicy', default='step', choices=['step', 'cosine'], help='step: LR constant within an epoch, dropped by LRSteps / dropLR; cosine: LR follows a half cosine from LR down to 0 over nEpochs, set at every iteration')
    g.add_argument('--warmupEpochs', type=_ranged(float, 0.0), default=0.0, help='raise the LR linearly from 0 over the first N epochs (fractions allowed), per iteration')
    g.add_argument('--nEpochs', type=_ranged(int, 0), default=100, help='training epochs')
    g.add_argument('--valInterval', type=_ranged(int, 1), default=1, help='evaluate every N epochs')
    g.add_argument('--saveInterval', type=_ranged(int, 1), default=1, help='write the last checkpoint every N epochs')
    g.add_argument('--data_loader_size', type=_ranged(int, 1), default=8, help='batch size')
    g.add_argument('--mini_batch_count', type=_ranged(int, 1), default=1, help='gradient accumulation: batches per optimiser step')
    g.add_argument('--nThreads', type=_ranged(int, 0), default=2, help='data loader worker processes')
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

    _CheckedConfigParser.known = {a.dest for a in p._actions if a.option_strings} - {'help', 'DataConfig', 'ModelConfig'}
    return p


def parse(argv=None):
    """Parse the command line (and the config files it names) into an options namespace."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    for key, why in DEAD_KEYS.items():
        if getattr(opts, key) is not None:
            print(f'warning: option {key!r} no longer does anything ({why}); ignoring it', file=sys.stderr)
    return opts


def write_defconf(opts, path):
    """Write the resolved options as one .defconf that reproduces the run on its own."""
    parser = build_parser()
    skip = {'help', 'DataConfig', 'ModelConfig', 'loadModel', 'test', 'summary'} | set(DEAD_KEYS)
    lines = ['# resolved options of this run; reproduce it with: python main.py -DataConfig <this file>']
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(opts, action.dest, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = ','.join(str(v) for v in value)
        if isinstance(value, bool):
            value = 'true' if value else 'false'
        lines.append(f'{action.dest}: {value}')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
