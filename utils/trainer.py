"""The one trainer: device, optimiser and schedule, mixed precision, distributed data parallel,
checkpoints, resume, evaluation and logging.

It knows a model only through the registry contract (a list of outputs), a codec only through the
codec contract (named targets, a dict of loss terms, its accuracy, its decoding) and a dataset
only through its reader's evaluation; it never indexes a batch by position and never asks what
kind of target a codec makes. Prediction itself lives in ``utils.predictor``.
"""
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import opts as options
from models import fused
from datasets.pipeline import transform_points
from utils import checkpoint, distributed
from utils.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from utils.io import write_json, write_text
from utils.cpu import cache_cpu_memory, keep_freed_memory, native_bfloat16
from utils.optim import FlatAdam
from utils.predictor import Predictor, pick_device, to_device


def lr_at(opts, epoch, progress=0.0):
    """Learning rate at (0-based) ``epoch`` plus ``progress`` in [0, 1) of it: a linear warm-up over
    warmupEpochs, then the step policy (multi-step LRSteps or every dropLR epochs, constant within
    an epoch) or the cosine policy (a half cosine from LR to 0 over nEpochs)."""
    t = epoch + progress
    if opts.LRPolicy == 'cosine':
        lr = 0.5 * opts.LR * (1.0 + math.cos(math.pi * min(t / max(opts.nEpochs, 1), 1.0)))
    elif opts.LRSteps:
        lr = opts.LR * opts.dropMag ** sum(epoch >= s for s in opts.LRSteps)
    elif opts.dropLR > 0:
        lr = opts.LR * opts.dropMag ** (epoch // opts.dropLR)
    else:
        lr = opts.LR
    if t < opts.warmupEpochs:
        lr *= t / opts.warmupEpochs
    return lr


def build_optimizer(opts, params, flat=False):
    """The optimiser for the model's parameters (all on one device). Adam and SGD use the fused
    kernels (CPU and CUDA; on the quick hourglass an Adam step takes 2 ms instead of 11 on the CPU),
    RMSprop, which has none, the multi-tensor one. ``flat`` (single-process CPU training): Adam
    steps its parameters as one buffer (``utils.optim.FlatAdam``: the same numbers, 0.6 ms instead
    of 2.7-3.8 on the quick hourglass)."""
    if opts.optimizer_type == 'RMSprop':
        return torch.optim.RMSprop(params, lr=opts.LR, alpha=0.99, eps=1e-8, momentum=opts.momentum,
                                   weight_decay=opts.weightDecay, foreach=True)
    if opts.optimizer_type == 'Adam':
        if flat:
            return FlatAdam(params, lr=opts.LR, weight_decay=opts.weightDecay)
        return torch.optim.Adam(params, lr=opts.LR, weight_decay=opts.weightDecay, fused=True)
    return torch.optim.SGD(params, lr=opts.LR, momentum=opts.momentum, weight_decay=opts.weightDecay,
                           nesterov=opts.nesterov, fused=True)


class EpochSampler(torch.utils.data.Sampler):
    """The sample order of one training epoch, from batch ``start`` on (a resumed epoch goes on
    where it stopped).

    Shuffled: the permutation torch's RandomSampler draws from a generator seeded with
    seed * 100003 + epoch (after the DataLoader's one base-seed draw), the same order a plain
    shuffled DataLoader with that generator gives. Distributed: each rank takes every
    ``world``-th index of the permutation seeded with seed + epoch, padded by repetition to a
    multiple of ``world`` (as torch's DistributedSampler).
    """

    def __init__(self, n, seed, epoch, shuffle=True, start=0, rank=0, world=1):
        self.n, self.seed, self.epoch, self.shuffle = int(n), int(seed), int(epoch), bool(shuffle)
        self.start, self.rank, self.world = int(start), int(rank), int(world)

    def order(self):
        if self.world > 1:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            total = -(-self.n // self.world) * self.world
            idx += idx[:total - len(idx)]
            return idx[self.rank:total:self.world]
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)        # the DataLoader's base seed
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self):
        return max(0, len(self.order()) - self.start)


def steps_per_epoch(opts, n, world=1):
    """Batches of a training epoch of n samples (per rank): the last incomplete batch is dropped
    when it would hold a single sample (BatchNorm cannot train on one), as the reference trainers do."""
    per_rank = -(-n // world)
    full, rest = divmod(per_rank, opts.data_loader_size)
    return full + (1 if rest > 1 else 0)


def make_loader(opts, dataset, device, train=False, distributed=False, start=0, shard=None):
    """The DataLoader of a split: for training the epoch's order (``EpochSampler``) from batch
    ``start`` on, for evaluation in order (the codec's ``eval_batch_size`` when it has one), under
    torchrun this rank's share of whole batches (``shard``: a ``utils.distributed.Dist``); batches
    collated by field name (``PoseDataset.collate``). No loader draws from the global random
    generator."""
    batch = opts.data_loader_size if train else getattr(dataset.codec, 'eval_batch_size', None) or opts.data_loader_size
    sampler, drop_last = None, False
    if train:
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        sampler = EpochSampler(len(dataset), opts.seed, dataset.epoch, opts.shuffle, start * batch, rank, world)
        drop_last = (len(sampler) % batch) == 1
    elif shard is not None and shard.on:
        from utils.distributed import BatchShard
        sampler = BatchShard(len(dataset), batch, shard.rank, shard.world)
    return DataLoader(dataset, batch_size=batch, shuffle=False, sampler=sampler, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(opts.seed), num_workers=opts.nThreads,
                      collate_fn=dataset.collate, pin_memory=device.type == 'cuda' and not opts.dont_pin_memory,
                      persistent_workers=False, worker_init_fn=_worker_init if opts.nThreads else None)


def evaluate(predictor, dataset, opts, keep=0, progress=None, dist_=distributed.NOT_DISTRIBUTED):
    """Predict the split and score it with its reader's official protocol. Under torchrun each
    rank predicts its share of whole batches and the predictions are gathered (every rank gets
    the table; the same predictions as one process).

    Returns dict(table, headline, acc, predictions, kept) (see ``Predictor.run``)."""
    loader = make_loader(opts, dataset, predictor.device, shard=dist_)
    out = predictor.run(loader, keep=keep if dist_.main else 0, progress=progress)
    if dist_.on:
        out['predictions'] = sorted(distributed.gather(dist_, out['predictions']), key=lambda p: p['index'])
        accs = distributed.gather(dist_, [(out['acc'], len(loader.sampler))] if out['acc'] is not None else [])
        out['acc'] = sum(a * n for a, n in accs) / sum(n for _, n in accs) if accs else None
    table, headline = dataset.reader.evaluate_predictions(out['predictions'])
    return dict(table=table, headline=float(headline), **out)


def total_loss(terms):
    """The sum of a codec's named loss terms (what the backward pass gets)."""
    total = None
    for term in terms.values():
        total = term if total is None else total + term
    return total


class Interrupted(TrainingError):
    """SIGTERM or SIGINT: a resumable checkpoint was written at the step the run had reached."""

    def __init__(self, signum, epoch, iteration, path):
        name = signal.Signals(signum).name
        super().__init__(f'stopped by {name} in epoch {epoch} after iteration {iteration}; the resumable checkpoint '
                         f'{path} continues it exactly (--loadModel auto, or --loadModel {path})')


class Logger:
    """Prints to stdout (or ``stream``) and keeps the run's log.txt (rank 0 only). The file is
    rewritten whole through the atomic write after every line, so a failed write (a full disk)
    leaves the previous log intact and names itself."""

    def __init__(self, path, enabled=True):
        self.path = path
        self.enabled = enabled
        self.lines = []
        if enabled and os.path.isfile(path):
            with open(path) as f:
                self.lines = f.read().splitlines()

    def __call__(self, msg, stream=None):
        if not self.enabled:
            return
        print(msg, file=stream or sys.stdout, flush=True)
        self.lines.append(msg)
        write_text(self.path, '\n'.join(self.lines) + '\n')


class Trainer:
    def __init__(self, opts, model, codec, train_set, val_set, exp_dir):
        self.opts = opts
        self.codec = codec
        self.train_set = train_set
        self.val_set = val_set
        self.exp_dir = exp_dir
        self.joint_set = val_set.reader.joint_set
        self.device = pick_device(opts.gpuid)
        self.dist = distributed.setup(opts, self.device)
        self.distributed = self.dist.on
        self.rank = self.dist.rank
        self.main = self.dist.main
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        fused.set_enabled(opts.fusedBNReLU)
        # --amp on a CPU without hardware bfloat16 would emulate it, several times slower than
        # float32: the run trains in float32 (the checkpoint keeps --amp as given)
        amp = bool(opts.amp) and (self.device.type != 'cpu' or native_bfloat16())
        if opts.amp and not amp and self.main:
            print('note: --amp: this CPU has no hardware bfloat16 (AVX-512 or AMX), where bfloat16 autocast runs '
                  'several times slower than float32: training in float32', file=sys.stderr, flush=True)
        if self.device.type == 'cpu':
            if opts.keepFreedMemory:
                keep_freed_memory()
            # the kernels run bfloat16 (--amp), and float32 on an AVX2 CPU (models.fused.DTYPES)
            if opts.fusedBNReLU and opts.channelsLast and (amp or torch.float32 in fused.DTYPES):
                # built here, before the first step, when this machine has no build yet
                if fused.load() and opts.keepFreedMemory:
                    cache_cpu_memory()      # freed blocks reused by size class (utils/cpu.py)
        # channels-last runs the convolutions 1.3-1.5x faster on the CPU (oneDNN) and on tensor cores;
        # the predictor holds the bare model: each rank evaluates its shard, and a DDP forward would
        # wait for the other ranks at every batch
        self.predictor = Predictor(model, codec, device=self.device, amp=opts.amp, flip_test=opts.flipTest,
                                   joint_set=self.joint_set, channels_last=opts.channelsLast)
        self.model = self.predictor.model
        self.net = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            train_model = self.model
            if opts.syncBN:             # statistics over every rank's batch (the shared modules' weights)
                if self.device.type != 'cuda':
                    raise ConfigError("--syncBN needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only (on the CPU "
                                      "each rank keeps its own BatchNorm statistics: drop --syncBN)")
                train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                self.model = self.predictor.model = train_model
            self.net = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
        self.optimizer = build_optimizer(opts, self.model.parameters(),
                                         flat=self.device.type == 'cpu' and not self.distributed)
        # --amp: float16 with loss scaling on CUDA; bfloat16 (no scaling needed) on the CPU
        self.amp = self.predictor.amp
        self.amp_dtype = self.predictor.amp_dtype
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp and self.device.type == 'cuda')
        self.epoch = 0          # epochs completed
        self.best = -math.inf
        self.best_epoch = -1
        self.history = []
        self.position = None    # where in the current epoch a resumed run goes on (see train_epoch)
        self._signal = None     # SIGTERM / SIGINT received: stop at the next step boundary
        self.log = Logger(os.path.join(exp_dir, 'log.txt'), enabled=self.main)
        self.tb = None
        if opts.tensorboard and self.main:
            from utils.tensorboard import TensorBoardWriter
            self.tb = TensorBoardWriter(exp_dir)

    # ----------------------------------------------------------------- checkpoints
    def state(self, headline=None):
        return {
            'format': checkpoint.FORMAT,
            'arch': dict(self.model.arch),
            'config': options.as_text(self.opts),
            'meta': checkpoint.make_meta(self.joint_set, self.codec, self.opts),
            'optimizer_type': self.opts.optimizer_type,
            'state_dict': {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict(),
            'epoch': self.epoch,
            'best': self.best,
            'best_epoch': self.best_epoch,
            'headline': headline,
            'history': self.history,
            'position': self.position,
            'torch_rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self, name, headline=None):
        if self.main:
            path = os.path.join(self.exp_dir, name)
            checkpoint.save(self.state(headline), path)
            return path

    def resume(self, ckpt, path, finetune=False):
        """Restore a run from the checkpoint ``ckpt`` (read from ``path``): everything, or with
        ``finetune`` the weights alone."""
        checkpoint.check_compatible(ckpt, self.model, path)
        checkpoint.load_weights(self.model, ckpt['state_dict'], path)
        if finetune:
            self.log(f'loaded weights from {path} (fine-tuning: new optimiser and schedule)')
            return ckpt
        saved = checkpoint.optimizer_type_of(ckpt)
        if saved is not None and saved != self.opts.optimizer_type:
            raise CheckpointError(f'--loadModel {path}: its optimiser state is {saved}\'s, not '
                                  f'--optimizer_type {self.opts.optimizer_type}\'s; resume with --optimizer_type '
                                  f'{saved}, or use --finetune to load the weights alone')
        try:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f'--loadModel {path}: optimiser state does not fit --optimizer_type '
                                  f'{self.opts.optimizer_type} ({e}); use --finetune to load the weights alone') from None
        if ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        self.epoch = int(ckpt['epoch'])
        self.best = float(ckpt['best'])
        self.best_epoch = int(ckpt['best_epoch'])
        self.history = list(ckpt.get('history', []))
        self.position = ckpt.get('position')
        torch.set_rng_state(ckpt['torch_rng'])
        if ckpt.get('cuda_rng') and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt['cuda_rng'])
        within = f', iteration {self.position["iteration"]} of epoch {self.epoch + 1}' if self.position else ''
        best = f'best {self.best:.2f} at epoch {self.best_epoch}' if self.best_epoch > 0 else 'not evaluated yet'
        self.log(f'resumed from {path} after epoch {self.epoch}{within} ({best})')
        return ckpt

    # ----------------------------------------------------------------- loops
    def forward(self, images):
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.net(images)
        return [o.float() for o in out]

    def train_epoch(self):
        """One epoch from ``self.position`` (a resumed epoch goes on at the batch it stopped at,
        with its running sums): -> the epoch's means. Writes a resumable checkpoint every
        ``--saveEvery`` optimiser steps, and one at the next step boundary after SIGTERM or SIGINT
        (then raises ``Interrupted``)."""
        opts = self.opts
        self.net.train()
        self.train_set.epoch = self.epoch
        pos = self.position or dict(iteration=0, total=0.0, terms={}, acc=0.0, seen=0, acc_seen=0, seconds=0.0,
                                    skipped=0)
        self.position = None
        world = dist.get_world_size() if self.distributed else 1
        steps = steps_per_epoch(opts, len(self.train_set), world)
        loader = make_loader(opts, self.train_set, self.device, train=True, distributed=self.distributed,
                             start=pos['iteration'])
        bar = self._bar(loader, f'epoch {self.epoch + 1}/{opts.nEpochs} train')
        start, group, lr = time.time() - pos['seconds'], opts.mini_batch_count, lr_at(opts, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        for it, batch in enumerate(bar, pos['iteration']):
            if it >= steps:
                break
            batch = self._usable(batch, pos)
            lr = lr_at(opts, self.epoch, it / steps)
            for g in self.optimizer.param_groups:
                g['lr'] = lr
            if batch is not None:
                distributed.guard(self._step, self.dist, batch, it, steps, group, pos)
            if (it + 1) % group == 0 or it + 1 == steps:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                stop = self._stop_requested()
                done = it + 1 < steps and (stop or (opts.saveEvery and (it + 1) % opts.saveEvery == 0))
                if done:
                    self.position = dict(pos, iteration=it + 1, seconds=time.time() - start)
                    self.save('model_last.pth')
                    if stop:
                        raise Interrupted(self._signal or signal.SIGTERM, self.epoch + 1, it + 1,
                                          os.path.join(self.exp_dir, 'model_last.pth'))
                    self.position = None
            if bar is not loader and pos['seen']:
                bar.set_postfix(loss=f'{pos["total"] / pos["seen"]:.3g}', acc=f'{pos["acc"] / max(pos["acc_seen"], 1):.3f}',
                                ips=f'{pos["seen"] / (time.time() - start):.1f}', lr=f'{lr:.2g}', refresh=False)
        seen, seconds = max(pos['seen'], 1), time.time() - start
        return dict(loss=pos['total'] / seen, terms={k: v / seen for k, v in pos['terms'].items()},
                    acc=pos['acc'] / pos['acc_seen'] if pos['acc_seen'] else None, lr=lr, seconds=seconds,
                    images_per_s=pos['seen'] / max(seconds, 1e-9), skipped=pos['skipped'])

    def _stop_requested(self):
        """A signal reached this process (or, under torchrun, any rank: they stop at the same step)."""
        stop = self._signal is not None
        if self.distributed:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            distributed.guard(dist.all_reduce, self.dist, flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def _usable(self, batch, pos):
        """The batch without the samples whose image could not be read (each named in a warning
        and counted; more than 1 % of the split stops the run); None when fewer than 2 remain."""
        errors = batch.get('errors') or []
        for message in errors:
            pos['skipped'] += 1
            self.log(f'warning: skipped a training sample: {message}', stream=sys.stderr)
        if errors and pos['skipped'] > max(1, 0.01 * len(self.train_set)):
            raise DatasetError(f'{pos["skipped"]} training images could not be read, more than 1 % of the '
                               f'{len(self.train_set)} of {self.opts.dataset}; the last: {errors[-1]}')
        if 'image' not in batch or batch['image'].shape[0] < 2 and errors:
            return None
        return batch

    def _step(self, batch, it, steps, group, pos):
        """Forward, loss and backward of one batch (the optimiser steps at the group's end);
        the running sums of ``pos`` updated."""
        batch = to_device(batch, self.device, self.opts.channelsLast)
        outputs = self.forward(batch['image'])
        terms = self.codec.loss(outputs, batch)
        loss = total_loss(terms)
        if not torch.isfinite(loss):
            last = os.path.join(self.exp_dir, 'model_last.pth')
            kept = f'; the last good checkpoint is {last}' if os.path.exists(last) else '; no checkpoint was written yet'
            raise TrainingError(f'loss is {loss.item()} at epoch {self.epoch + 1}, iteration {it + 1}: stopping '
                                f'(try a lower --LR){kept}')
        # gradient accumulation: each optimiser step averages its group of batches; the last
        # group of an epoch may hold fewer than mini_batch_count
        first = it - it % group
        self.scaler.scale(loss / min(group, steps - first)).backward()
        n = batch['image'].shape[0]
        pos['total'] += loss.item() * n
        for name, term in terms.items():
            pos['terms'][name] = pos['terms'].get(name, 0.0) + (term.item() if len(terms) > 1 else loss.item()) * n
        pos['seen'] += n
        acc = self.codec.accuracy(outputs, batch)
        if acc is not None:
            pos['acc'] += acc * n
            pos['acc_seen'] += n

    def evaluate(self, keep=None):
        keep = self.opts.visCount if keep is None else keep
        if self.distributed:        # every rank evaluates rank 0's weights and BatchNorm statistics (the checkpoint)
            distributed.broadcast_buffers(self.dist, self.model)
        return evaluate(self.predictor, self.val_set, self.opts, keep=keep,
                        progress=lambda loader: self._bar(loader, 'evaluate'), dist_=self.dist)

    def fit(self):
        """Train to --nEpochs, evaluating and writing checkpoints as the options say; SIGTERM and
        SIGINT stop it at the next step with a resumable checkpoint."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._fit()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.tb is not None:
                self.tb.close()

    def _on_signal(self, signum, frame):
        if self._signal is not None:              # a second one: stop at once
            raise KeyboardInterrupt
        self._signal = signum

    def _fit(self):
        opts = self.opts
        self.log(f'training {opts.model} on {opts.dataset} ({len(self.train_set)} train / '
                 f'{len(self.val_set)} val samples) on {self.device}, epochs {self.epoch + 1}..{opts.nEpochs}')
        result = None
        while self.epoch < opts.nEpochs:
            train = self.train_epoch()
            self.epoch += 1
            record = dict(epoch=self.epoch, train_loss=train['loss'], train_acc=train['acc'], lr=train['lr'],
                          train_seconds=round(train['seconds'], 2), train_images_per_s=round(train['images_per_s'], 2))
            if len(train['terms']) > 1:
                record['train_loss_terms'] = train['terms']
            msg = f'epoch {self.epoch}: loss {train["loss"]:.4g}'
            if len(train['terms']) > 1:
                msg += ' (' + ', '.join(f'{k} {v:.4g}' for k, v in train['terms'].items()) + ')'
            if train['acc'] is not None:
                msg += f', acc {train["acc"]:.3f}'
            msg += f', {train["images_per_s"]:.1f} img/s, lr {train["lr"]:.3g}'
            if train['skipped']:
                record['skipped_images'] = train['skipped']
                msg += f', {train["skipped"]} unreadable images skipped'
            self.history.append(record)
            last_due = self.epoch % opts.saveInterval == 0 or self.epoch == opts.nEpochs
            val_due = self.epoch % opts.valInterval == 0 or self.epoch == opts.nEpochs
            if self.main and last_due:
                self.save('model_last.pth')       # before evaluating: an evaluation that fails loses nothing
            if val_due:                            # every rank predicts its share
                result = self.evaluate()
                headline = result['headline']
                record.update(val=result['table'], val_headline=headline, val_acc=result['acc'])
                msg += f' | val {headline:.2f}'
                if headline > self.best:
                    self.best, self.best_epoch = headline, self.epoch
                    self.save('model_best.pth', headline)
                if self.main:
                    self.write_vis(result)
                if last_due:
                    self.save('model_last.pth', headline)     # now with the score and the best
            if self.main:
                self.log(msg)
                write_json(os.path.join(self.exp_dir, 'metrics.json'), self.history)
                if val_due:
                    from vis.plots import write_curves
                    write_curves(os.path.join(self.exp_dir, 'curves.png'), self.history)
                if self.tb is not None:
                    self.tb.epoch(record)
                    if val_due:
                        self.tb.image('val/vis', os.path.join(self.exp_dir, 'vis.png'), self.epoch)
            self.dist.barrier()
        return result

    # ----------------------------------------------------------------- helpers
    def write_vis(self, result, name='vis.png'):
        return write_vis(os.path.join(self.exp_dir, name), result, self.joint_set, self.codec.draw_threshold)

    def _bar(self, loader, desc):
        if not (self.opts.progress and self.main):
            return loader
        from tqdm import tqdm
        return tqdm(loader, desc=desc, unit='batch', leave=False, dynamic_ncols=True, file=sys.stdout,
                    mininterval=0.5 if sys.stdout.isatty() else 10.0)


def write_vis(path, result, joint_set, threshold=None):
    """The evaluated crops kept by the predictor, each with its predicted people (mapped back into
    the crop) over the ground truth; with a ``threshold``, only the people whose score and the
    joints whose scores reach it. None when nothing was kept."""
    if not result.get('kept'):
        return None
    from vis.draw import save_prediction_grid
    kept = result['kept']
    preds, shown = [], []
    for k in kept:
        pred = k['prediction']
        points = np.asarray(transform_points(pred['keypoints'], k['affine']), np.float64)
        points = points.reshape(-1, joint_set.num_joints, 2)
        joints = np.ones(points.shape[:2], bool)
        if threshold is not None:
            person = np.asarray(pred['score']).reshape(-1) >= threshold
            points = points[person]
            joints = np.asarray(pred['scores']).reshape(-1, joint_set.num_joints)[person] >= threshold
        preds.append(points)
        shown.append(joints)
    return save_prediction_grid(path, [k['image'] for k in kept], preds, [k['keypoints'] for k in kept],
                                [k['visible'] for k in kept], joint_set, pred_visibles=shown)


def _worker_init(_):
    # one thread per loader worker: the workers already run in parallel with each other
    import cv2
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    # SIGTERM / SIGINT are the main process's to handle (it writes the checkpoint, then ends the
    # workers); a worker that died of them first would turn a clean stop into a loader error
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
