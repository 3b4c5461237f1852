"""Train, resume, test or summarise a pose model chosen by two config files.

    python main.py -DataConfig conf/datasets/mpii.defconf -ModelConfig conf/models/hourglass.defconf
    python main.py -test --loadModel exp/<id>/model_best.pth          (the checkpoint describes itself)

Library code raises ``utils.errors.PoseError``; this entry point prints it as one line,
``error: <message>``, and exits with status 1.
"""
import os
import sys

import torch

import opts as options
from datasets import build_dataset, build_reader
from datasets.codecs import build_codec
from models import build_model, count_parameters
from utils import checkpoint, distributed, metrics
from utils.errors import ConfigError, DatasetError, PoseError, TrainingError
from utils.io import RunFolder, write_json, write_text
from utils.predictor import Predictor, options_namespace, pick_device
from utils.trainer import Trainer, evaluate, make_loader, write_vis


def gflops(model, input_res):
    """Multiply-accumulates of one forward pass, in billions (the 'GFLOPs' of pose papers'
    tables, e.g. SimpleBaseline-R50 at 256x192 = 8.9). input_res: (height, width)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, 3, input_res[0], input_res[1])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    return counter.get_total_flops() / 2e9, out


def summary(opts):
    model = build_model(options_namespace(opts, pretrained=None)).eval()
    params = count_parameters(model)
    g, out = gflops(model, opts.inputRes)
    what = f'classes: {opts.nClasses}' if model.target == 'classification' else f'joints: {opts.nJoints}'
    print(f'model: {opts.model} ({type(model).__name__}), target: {model.target}, {what}')
    print(f'parameters: {params}')
    print(f'GFLOPs: {g:.3f} (multiply-accumulates for one {opts.inputRes.height}x{opts.inputRes.width} input)')
    for i, o in enumerate(out):
        print(f'output {i}: {tuple(o.shape)}')
    return params


def check_data_fits(opts, reader):
    classes = getattr(reader, 'num_classes', None)
    if classes is not None and classes != opts.nClasses:
        raise ConfigError(f'--nClasses {opts.nClasses} does not match dataset {opts.dataset} ({classes} classes)')
    if reader.joint_set is None:          # not a keypoint dataset (classification)
        return
    k = reader.joint_set.num_joints
    if k != opts.nJoints:
        raise ConfigError(f'--nJoints {opts.nJoints} does not match dataset {opts.dataset} ({k} joints)')


def check_images(*readers):
    """Every image file of the splits exists (before any work: a missing validation image would
    otherwise end the run at its first evaluation)."""
    for reader in readers:
        missing = reader.missing_images()
        if missing:
            raise DatasetError(f'{reader.registry_name} {reader.split}: {len(missing)} image file'
                               f'{"s" if len(missing) > 1 else ""} not found, e.g. {missing[0]}')


RUN_FILES = ('config.defconf', 'log.txt', 'metrics.json', 'model_last.pth', 'model_best.pth', 'vis.png', 'curves.png')


def written(folder, names):
    return [n for n in names if os.path.isfile(os.path.join(folder, n))]


def print_table(title, table):
    print(metrics.format_table(table, title=title))
    if 'per_joint' in table:
        print(metrics.format_per_joint(table))


def resolve(argv):
    """-> (opts, checkpoint or None). With --loadModel, the checkpoint's recorded options are the
    defaults: the config files and the command line still win over them. ``--loadModel auto``:
    the run folder's model_last.pth when there is one, else a fresh start."""
    opts = canonical(options.parse(argv))
    path = opts.loadModel
    if path == 'auto':
        last = os.path.join(opts.expDir, opts.expID or 'default', 'model_last.pth')
        path = last if os.path.isfile(last) else None
        opts.loadModel = path
    if not path:
        return opts, None
    ckpt = checkpoint.load(path)
    defaults = checkpoint.config_defaults(ckpt)
    if defaults:
        for key in ('expDir', 'expID'):        # the run folder follows the checkpoint (see run_folder)
            defaults.pop(key, None)
        if opts.demo:                          # the training run's detections are not the demo's
            defaults.pop('detFile', None)
        opts = canonical(options.parse(argv, defaults=defaults))
        opts.loadModel = path
    return opts, ckpt


def canonical(opts):
    """Model and dataset names in their registered spelling (matched case-insensitively)."""
    import datasets
    import models
    opts.model = models.canonical_name(opts.model)
    opts.dataset = datasets.canonical_name(opts.dataset)
    return opts


def schedule_changes(opts, ckpt):
    """Warning lines for a resume whose schedule differs from the one the checkpoint was trained
    under (a cosine or warm-up schedule depends on --nEpochs and the LR options)."""
    saved = checkpoint.config_defaults(ckpt) or {}
    keys = ['LR', 'LRPolicy', 'warmupEpochs']
    if opts.LRPolicy == 'cosine' or opts.warmupEpochs > 0 or saved.get('LRPolicy') == 'cosine':
        keys.append('nEpochs')
    now = options.as_text(opts)
    changed = [k for k in keys if k in saved and saved[k] != now.get(k)]
    if not changed:
        return []
    what = ', '.join(f'--{k} {saved[k]} -> {now.get(k)}' for k in changed)
    return [f'warning: resuming with another schedule ({what}): the learning rate from epoch '
            f'{int(ckpt.get("epoch", 0)) + 1} on follows the new one, so the run will differ from an '
            f'uninterrupted run of either']


def check_data(opts):
    """--checkData: decode every image of both splits; list the unreadable ones (exit 1 if any)."""
    from tqdm import tqdm
    model = build_model(options_namespace(opts, pretrained=None))
    codec = build_codec(opts, model)
    bad, total = [], 0
    for split in ('train', 'val'):
        reader = build_reader(opts, split, codec)
        records = [r for r in reader.records if r.get('image')]
        paths = sorted({r['image'] for r in records})
        total += len(paths)
        by_path = {r['image']: r for r in records}
        for path in tqdm(paths, desc=f'{opts.dataset} {split}', unit='image', disable=not opts.progress):
            try:
                reader.load_image(by_path[path])
            except DatasetError as exc:
                bad.append(str(exc))
    for line in bad:
        print(line)
    print(f'{opts.dataset}: {total} images decoded, {len(bad)} unreadable')
    if bad:
        raise DatasetError(f'{opts.dataset}: {len(bad)} of {total} images are unreadable (listed above)')
    return total


def run_folder(opts):
    """expDir/expID; without --expID, the checkpoint's own folder when one is loaded (-test, resume)."""
    if opts.expID is None:
        if opts.loadModel and not opts.finetune:
            folder = os.path.dirname(os.path.abspath(opts.loadModel))
            opts.expDir, opts.expID = os.path.dirname(folder), os.path.basename(folder)
            return folder
        opts.expID = 'default'
    return os.path.join(opts.expDir, opts.expID)


def build(opts, ckpt, split='val'):
    """Model (with the checkpoint's weights when one is loaded), codec and the reader of ``split``."""
    torch.manual_seed(opts.seed)
    # a checkpoint's weights replace the ImageNet ones: do not read --pretrained then
    model = build_model(options_namespace(opts, pretrained=None) if ckpt is not None else opts)
    codec = build_codec(opts, model)
    reader = build_reader(opts, split, codec)
    check_data_fits(opts, reader)
    return model, codec, reader


def run_test(opts, ckpt):
    """Evaluate the checkpoint on the validation split (scored with the official protocol), or
    predict the test split (``--testSplit test``: no ground truth, predictions only)."""
    if ckpt is None:
        raise ConfigError('-test needs --loadModel PATH (a checkpoint to evaluate)')
    exp_dir = run_folder(opts)
    os.makedirs(exp_dir, exist_ok=True)
    split = opts.testSplit
    model, codec, reader = build(opts, ckpt, split)
    checkpoint.check_compatible(ckpt, model, opts.loadModel)
    checkpoint.load_weights(model, ckpt['state_dict'], opts.loadModel)
    check_images(reader)
    dataset = build_dataset(opts, split, codec, reader)
    device = pick_device(opts.gpuid)
    d = distributed.setup(opts, device)                 # under torchrun: sharded, gathered, rank 0 writes
    try:
        return _test(opts, d, device, model, codec, reader, dataset, exp_dir, split)
    finally:
        d.close()


def _test(opts, d, device, model, codec, reader, dataset, exp_dir, split):
    predictor = Predictor(model, codec, device=device, amp=opts.amp, flip_test=opts.flipTest,
                          joint_set=reader.joint_set, channels_last=opts.channelsLast)
    if split == 'test':
        result = predictor.run(make_loader(opts, dataset, predictor.device, shard=d))
        result['predictions'] = sorted(distributed.gather(d, result['predictions']), key=lambda p: p['index'])
        if d.main:
            pred_path = reader.save_all(result['predictions'], exp_dir)
            print(f'{opts.dataset} test split: {len(result["predictions"])} persons predicted; predictions: {pred_path}')
        return result
    result = evaluate(predictor, dataset, opts, keep=opts.visCount, dist_=d)
    if not d.main:
        return result
    pred_path = reader.save_all(result['predictions'], exp_dir)
    title = f'{opts.dataset} validation, {opts.loadModel}' + (' (flip test)' if opts.flipTest else '')
    write_json(os.path.join(exp_dir, 'test_metrics.json'),
               dict(checkpoint=opts.loadModel, flipTest=opts.flipTest, headline=result['headline'], table=result['table']))
    write_text(os.path.join(exp_dir, 'test_metrics.txt'), metrics.format_table(result['table'], title=title) + '\n')
    from vis.plots import write_per_joint
    write_per_joint(os.path.join(exp_dir, 'per_joint.png'), result['table'], title)
    print_table(title, result['table'])
    write_vis(os.path.join(exp_dir, 'test_vis.png'), result, reader.joint_set, codec.draw_threshold)
    print(f'predictions: {pred_path}; results in {exp_dir} '
          f'({", ".join(written(exp_dir, ("test_metrics.json", "test_metrics.txt", "per_joint.png", "test_vis.png")))})')
    return result


def run_train(opts, ckpt):
    if ckpt is not None and ckpt.get('released') and not opts.finetune:
        opts.finetune = True          # a released weight file holds no optimiser or schedule to resume
    exp_dir = run_folder(opts)
    resuming = ckpt is not None and not opts.finetune
    first = int(os.environ.get('RANK', '0')) == 0        # under torchrun only rank 0 speaks and writes
    if resuming and first:
        for line in schedule_changes(opts, ckpt):
            print(line, file=sys.stderr)
    if resuming and int(ckpt.get('epoch', 0)) >= opts.nEpochs:
        raise TrainingError(f'--loadModel {opts.loadModel} has already trained {int(ckpt["epoch"])} epochs and '
                            f'--nEpochs is {opts.nEpochs}: nothing to do (raise --nEpochs to train longer); '
                            f'nothing was changed')
    if opts.tensorboard:
        from utils.tensorboard import require
        require()
    d = distributed.setup(opts, pick_device(opts.gpuid))
    folder = RunFolder(exp_dir)
    distributed.agree(d, lambda: folder.claim(resume_from=opts.loadModel if resuming else None,
                                              overwrite=opts.overwrite))
    try:
        model, codec, val_reader = build(opts, ckpt)
        if ckpt is not None:
            checkpoint.check_compatible(ckpt, model, opts.loadModel)
        val_set = build_dataset(opts, 'val', codec, val_reader)
        train_set = build_dataset(opts, 'train', codec)
        check_images(train_set.reader, val_reader)
        if d.main:
            options.write_defconf(opts, os.path.join(exp_dir, 'config.defconf'))
        trainer = Trainer(opts, model, codec, train_set, val_set, exp_dir)
        if ckpt is not None:
            trainer.resume(ckpt, opts.loadModel, finetune=opts.finetune)
        result = trainer.fit()
    except BaseException:
        folder.release()
        d.close(wait=False)
        raise
    folder.release()
    d.close()
    if result is not None and d.main:
        print_table(f'{opts.dataset} validation after epoch {trainer.epoch} '
                    f'(best {trainer.best:.2f} at epoch {trainer.best_epoch})', result['table'])
        print(f'run folder: {exp_dir} ({", ".join(written(exp_dir, RUN_FILES))})')
    return result


def main(argv=None):
    opts, ckpt = resolve(argv)
    if opts.summary:
        summary(opts)
        return None
    if opts.checkData:
        return check_data(opts)
    if opts.demo:
        from utils.demo import run_demo
        return run_demo(opts, ckpt)
    if opts.export:
        from utils.export import run_export
        return run_export(opts, ckpt)
    if opts.test:
        return run_test(opts, ckpt)
    return run_train(opts, ckpt)


if __name__ == '__main__':
    try:
        main()
    except PoseError as exc:
        sys.exit(f'error: {exc}')
    except KeyboardInterrupt:
        sys.exit('interrupted; the last checkpoint written is kept')
