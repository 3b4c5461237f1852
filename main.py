"""Train, resume, test or summarise a pose model chosen by two config files.

    python main.py -DataConfig conf/datasets/mpii.defconf -ModelConfig conf/models/hourglass.defconf
"""
import json
import os
import sys

import torch

import opts as options
from datasets import build_dataset, build_reader
from datasets.codecs import build_codec
from models import build_model
from utils import metrics
from utils.trainer import Trainer, TrainingError, load_checkpoint, check_compatible, load_weights


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def gflops(model, input_res):
    """Multiply-accumulates of one forward pass, in billions (the 'GFLOPs' of pose papers'
    tables, e.g. SimpleBaseline-R50 at 256x192 = 8.9)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, 3, input_res, input_res)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    return counter.get_total_flops() / 2e9, out


def summary(opts):
    model = build_model(opts).eval()
    params = count_parameters(model)
    g, out = gflops(model, opts.inputRes)
    print(f'model: {opts.model} ({type(model).__name__}), target: {model.target}, joints: {opts.nJoints}')
    print(f'parameters: {params}')
    print(f'GFLOPs: {g:.3f} (multiply-accumulates for one {opts.inputRes}x{opts.inputRes} input)')
    for i, o in enumerate(out):
        print(f'output {i}: {tuple(o.shape)}')
    return params


def check_data_fits(opts, model, reader):
    k = reader.joint_set.num_joints
    if k != opts.nJoints:
        raise TrainingError(f'--nJoints {opts.nJoints} does not match dataset {opts.dataset} ({k} joints)')
    if model.target == 'heatmap' and opts.outputRes * model.stride != opts.inputRes:
        raise TrainingError(f'--inputRes {opts.inputRes} / --outputRes {opts.outputRes} does not match the output '
                            f'stride {model.stride} of {opts.model} (expected outputRes {opts.inputRes // model.stride})')


def print_table(title, table):
    print(metrics.format_table(table, title=title))
    if 'per_joint' in table:
        print(metrics.format_per_joint(table))


def run_test(opts, trainer, exp_dir):
    if not opts.loadModel:
        raise TrainingError('-test needs --loadModel PATH (a checkpoint to evaluate)')
    ckpt = load_checkpoint(opts.loadModel)
    check_compatible(ckpt, opts, opts.loadModel)
    load_weights(trainer.model, ckpt['state_dict'], opts.loadModel)
    result = trainer.evaluate()
    reader = trainer.val_set.reader
    pred_path = reader.save_predictions(result['preds'], result['scores'], result['indices'], exp_dir)
    with open(os.path.join(exp_dir, 'test_metrics.json'), 'w') as f:
        json.dump(dict(checkpoint=opts.loadModel, flipTest=opts.flipTest, headline=result['headline'],
                       table=result['table']), f, indent=1)
    text = metrics.format_table(result['table'], title=f'{opts.dataset} validation, {opts.loadModel}'
                                + (' (flip test)' if opts.flipTest else ''))
    with open(os.path.join(exp_dir, 'test_metrics.txt'), 'w') as f:
        f.write(text + '\n')
    print_table(f'{opts.dataset} validation, {opts.loadModel}' + (' (flip test)' if opts.flipTest else ''),
                result['table'])
    trainer.write_vis(result)
    print(f'predictions: {pred_path}')
    return result


def main(argv=None):
    opts = options.parse(argv)
    if opts.summary:
        summary(opts)
        return None
    torch.manual_seed(opts.seed)
    exp_dir = os.path.join(opts.expDir, opts.expID)
    os.makedirs(exp_dir, exist_ok=True)
    model = build_model(opts)
    codec = build_codec(model.target, opts)
    val_reader = build_reader(opts, 'val')
    check_data_fits(opts, model, val_reader)
    val_set = build_dataset(opts, 'val', codec, val_reader)
    if opts.test:
        trainer = Trainer(opts, model, codec, None, val_set, exp_dir)
        return run_test(opts, trainer, exp_dir)
    train_set = build_dataset(opts, 'train', codec)
    options.write_defconf(opts, os.path.join(exp_dir, 'config.defconf'))
    trainer = Trainer(opts, model, codec, train_set, val_set, exp_dir)
    if opts.loadModel:
        trainer.resume(opts.loadModel, finetune=opts.finetune)
    result = trainer.fit()
    if result is not None:
        print_table(f'{opts.dataset} validation after epoch {trainer.epoch} '
                    f'(best {trainer.best:.2f} at epoch {trainer.best_epoch})', result['table'])
        print(f'run folder: {exp_dir} (config.defconf, log.txt, metrics.json, model_last.pth, model_best.pth, vis.png)')
    return result


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        sys.exit('interrupted; the last checkpoint written is kept')
