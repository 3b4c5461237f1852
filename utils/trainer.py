"""The one trainer: device, optimiser and schedule, mixed precision, distributed data parallel,
checkpoints, resume, evaluation and logging. It knows models only through the registry contract
(a list of outputs, ``target``) and datasets only through their reader."""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from datasets.pipeline import to_original
from utils import metrics

CHECKPOINT_FORMAT = 1
# Options that change a model's layout: a checkpoint records them so that loading it into a
# different model gives one line naming what differs.
ARCH_KEYS = ('model', 'nJoints', 'nStack', 'nModules', 'nChannels', 'nReductions', 'baseName',
             'nStages', 'modelName', 'ohKernel', 'hhKernel', 'baseWidth', 'cardinality',
             'LRNSize', 'IterSize', 'TargetType', 'stemChannels')


class TrainingError(SystemExit):
    def __init__(self, message):
        super().__init__(f'error: {message}')


def pick_device(gpuid):
    """CUDA device ``gpuid`` when CUDA is present and gpuid >= 0, else the CPU."""
    if gpuid >= 0 and torch.cuda.is_available():
        local = int(os.environ.get('LOCAL_RANK', gpuid))
        return torch.device('cuda', local)
    return torch.device('cpu')


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


def build_optimizer(opts, params):
    """The optimiser for the model's parameters (all on one device). Adam and SGD use the fused
    kernels (CPU and CUDA; on the quick hourglass an Adam step takes 2 ms instead of 11 on the CPU),
    RMSprop, which has none, the multi-tensor one."""
    if opts.optimizer_type == 'RMSprop':
        return torch.optim.RMSprop(params, lr=opts.LR, alpha=0.99, eps=1e-8, momentum=opts.momentum,
                                   weight_decay=opts.weightDecay, foreach=True)
    if opts.optimizer_type == 'Adam':
        return torch.optim.Adam(params, lr=opts.LR, weight_decay=opts.weightDecay, fused=True)
    return torch.optim.SGD(params, lr=opts.LR, momentum=opts.momentum, weight_decay=opts.weightDecay, fused=True)


def arch_of(opts):
    return {k: getattr(opts, k) for k in ARCH_KEYS}


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write keeps the previous file."""
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise TrainingError(f'--loadModel {path}: no such file')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle with code in it
        raise TrainingError(f'--loadModel {path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})')
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise TrainingError(f'--loadModel {path}: not a checkpoint of this framework (no state_dict)')
    return ckpt


def check_compatible(ckpt, opts, path):
    """One line naming what differs between the checkpoint's model and the configured one."""
    saved = ckpt.get('arch', {})
    want = arch_of(opts)
    relevant = ['model', 'nJoints'] + [k for k in ARCH_KEYS if k not in ('model', 'nJoints')]
    diffs = [f'{k} {saved[k]!r} vs {want[k]!r}' for k in relevant
             if k in saved and saved[k] != want[k] and (k in ('model', 'nJoints') or saved.get('model') == want['model'])]
    if diffs:
        raise TrainingError(f'--loadModel {path}: checkpoint does not fit this model: ' + ', '.join(diffs[:4])
                            + ' (checkpoint vs configured)')


def load_weights(model, state, path):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f'{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})')
        if missing:
            parts.append(f'{len(missing)} missing tensors (e.g. {missing[0]})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})')
        raise TrainingError(f'--loadModel {path}: weights do not fit this model: ' + '; '.join(parts))
    model.load_state_dict(state)


class Logger:
    """Prints to stdout and appends to the run's log.txt (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.path = path
        self.enabled = enabled

    def __call__(self, msg):
        if not self.enabled:
            return
        print(msg, flush=True)
        with open(self.path, 'a') as f:
            f.write(msg + '\n')


class Trainer:
    def __init__(self, opts, model, codec, train_set, val_set, exp_dir):
        self.opts = opts
        self.codec = codec
        self.train_set = train_set
        self.val_set = val_set
        self.exp_dir = exp_dir
        self.distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
        self.device = pick_device(opts.gpuid)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')
        self.rank = dist.get_rank() if self.distributed else 0
        self.main = self.rank == 0
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        # channels-last runs the convolutions 1.3-1.5x faster on the CPU (oneDNN) and on tensor cores
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.net = self.model
        if self.distributed:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(opts, self.model.parameters())
        # --amp: float16 with loss scaling on CUDA; bfloat16 (no scaling needed) on the CPU
        self.amp = bool(opts.amp)
        self.amp_dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp and self.device.type == 'cuda')
        self.epoch = 0          # epochs completed
        self.best = -math.inf
        self.best_epoch = -1
        self.history = []
        self.log = Logger(os.path.join(exp_dir, 'log.txt'), enabled=self.main)
        self.flip_perm = torch.as_tensor(val_set.reader.joint_set.flip_permutation() if val_set else
                                         np.arange(opts.nJoints))

    # ----------------------------------------------------------------- checkpoints
    def state(self, headline=None):
        return {
            'format': CHECKPOINT_FORMAT,
            'arch': arch_of(self.opts),
            'state_dict': {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict(),
            'epoch': self.epoch,
            'best': self.best,
            'best_epoch': self.best_epoch,
            'headline': headline,
            'history': self.history,
            'torch_rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self, name, headline=None):
        if self.main:
            path = os.path.join(self.exp_dir, name)
            save_atomic(self.state(headline), path)
            return path

    def resume(self, path, finetune=False):
        """Restore a run from ``path``: everything, or with ``finetune`` the weights alone."""
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, self.opts, path)
        load_weights(self.model, ckpt['state_dict'], path)
        if finetune:
            self.log(f'loaded weights from {path} (fine-tuning: new optimiser and schedule)')
            return ckpt
        try:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise TrainingError(f'--loadModel {path}: optimiser state does not fit --optimizer_type {self.opts.optimizer_type} ({e}); use --finetune to load the weights alone')
        if ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        self.epoch = int(ckpt['epoch'])
        self.best = float(ckpt['best'])
        self.best_epoch = int(ckpt['best_epoch'])
        self.history = list(ckpt.get('history', []))
        torch.set_rng_state(ckpt['torch_rng'])
        if ckpt.get('cuda_rng') and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt['cuda_rng'])
        self.log(f'resumed from {path} after epoch {self.epoch} (best {self.best:.2f} at epoch {self.best_epoch})')
        return ckpt

    # ----------------------------------------------------------------- loops
    def loader(self, dataset, train):
        opts = self.opts
        sampler, shuffle, gen = None, False, None
        if train and self.distributed:
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=opts.shuffle, seed=opts.seed)
            sampler.set_epoch(dataset.epoch)
        elif train and opts.shuffle:
            shuffle = True
            gen = torch.Generator().manual_seed(opts.seed * 100003 + dataset.epoch)
        return DataLoader(dataset, batch_size=opts.data_loader_size, shuffle=shuffle, sampler=sampler,
                          generator=gen, num_workers=opts.nThreads, drop_last=False,
                          pin_memory=self.device.type == 'cuda' and not opts.dont_pin_memory,
                          persistent_workers=False, worker_init_fn=_worker_init if opts.nThreads else None)

    def forward(self, images, net=None):
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = (net or self.net)(images)
        return [o.float() for o in out]

    def train_epoch(self):
        opts = self.opts
        self.net.train()
        lr = epoch_lr = lr_at(opts, self.epoch)
        self.train_set.epoch = self.epoch
        loader = self.loader(self.train_set, train=True)
        bar = self._bar(loader, f'epoch {self.epoch + 1}/{opts.nEpochs} train')
        total_loss, total_acc, n_seen, n_acc = 0.0, 0.0, 0, 0
        start = time.time()
        self.optimizer.zero_grad(set_to_none=True)
        steps = len(loader)
        for it, (images, target, weight, _) in enumerate(bar):
            lr = lr_at(opts, self.epoch, it / steps)
            for group in self.optimizer.param_groups:
                group['lr'] = lr
            images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
            target = target.to(self.device, non_blocking=True)
            weight = weight.to(self.device, non_blocking=True)
            outputs = self.forward(images)
            loss = self.codec.loss(outputs, target, weight)
            if not torch.isfinite(loss):
                last = os.path.join(self.exp_dir, 'model_last.pth')
                kept = f'; the last good checkpoint is {last}' if os.path.exists(last) else '; no checkpoint was written yet'
                raise TrainingError(f'loss is {loss.item()} at epoch {self.epoch + 1}, iteration {it + 1}: stopping '
                                    f'(try a lower --LR){kept}')
            self.scaler.scale(loss / opts.mini_batch_count).backward()
            if (it + 1) % opts.mini_batch_count == 0 or it + 1 == steps:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            n = images.shape[0]
            total_loss += loss.item() * n
            n_seen += n
            if self.codec.target == 'heatmap':
                _, acc, cnt = metrics.heatmap_accuracy(outputs[-1].detach().cpu().numpy(), target.cpu().numpy())
                if cnt > 0:
                    total_acc += acc * n
                    n_acc += n
            if bar is not loader:
                bar.set_postfix(loss=f'{total_loss / n_seen:.3g}', acc=f'{total_acc / max(n_acc, 1):.3f}',
                                ips=f'{n_seen / (time.time() - start):.1f}', lr=f'{lr:.2g}', refresh=False)
        return dict(loss=total_loss / max(n_seen, 1), acc=total_acc / max(n_acc, 1) if n_acc else None,
                    lr=epoch_lr, seconds=time.time() - start, images_per_s=n_seen / max(time.time() - start, 1e-9))

    @torch.no_grad()
    def predict(self, dataset, flip_test=False):
        """Run the model over ``dataset`` (no augmentation). Returns preds (N, K, 2) in original
        image pixels, scores (N, K), indices (N,), crop-frame preds (N, K, 2), accuracy."""
        # the bare model, not the DDP wrapper: evaluation runs on rank 0 alone, and a DDP
        # forward would wait for the other ranks to broadcast buffers
        self.model.eval()
        loader = self.loader(dataset, train=False)
        bar = self._bar(loader, 'evaluate')
        preds, scores, crops, indices, accs = [], [], [], [], []
        for images, target, weight, meta in bar:
            images = images.to(self.device, memory_format=torch.channels_last)
            out = self.forward(images, self.model)[-1]
            if flip_test:
                flipped = self.forward(images.flip(-1), self.model)[-1]
                out = (out + self.codec.flip_back(flipped, self.flip_perm.to(out.device))) / 2
            if self.codec.target == 'heatmap':
                _, acc, cnt = metrics.heatmap_accuracy(out.cpu().numpy(), target.numpy())
                if cnt:
                    accs.append((acc, images.shape[0]))
            coords, sc = self.codec.decode(out)
            crops.append(coords)
            preds.append(to_original(coords, meta['affine'].numpy()))
            scores.append(sc)
            indices.append(meta['index'].numpy())
        acc = sum(a * n for a, n in accs) / sum(n for _, n in accs) if accs else None
        return (np.concatenate(preds), np.concatenate(scores), np.concatenate(indices),
                np.concatenate(crops), acc)

    def evaluate(self, flip_test=None):
        flip_test = self.opts.flipTest if flip_test is None else flip_test
        preds, scores, indices, crops, acc = self.predict(self.val_set, flip_test)
        table, headline = self.val_set.reader.evaluate(preds, scores, indices)
        return dict(table=table, headline=float(headline), acc=acc, preds=preds, scores=scores,
                    indices=indices, crops=crops)

    def fit(self):
        opts = self.opts
        self.log(f'training {opts.model} on {opts.dataset} ({len(self.train_set)} train / '
                 f'{len(self.val_set)} val samples) on {self.device}, epochs {self.epoch + 1}..{opts.nEpochs}')
        result = None
        while self.epoch < opts.nEpochs:
            train = self.train_epoch()
            self.epoch += 1
            record = dict(epoch=self.epoch, train_loss=train['loss'], train_acc=train['acc'], lr=train['lr'],
                          train_seconds=round(train['seconds'], 2), train_images_per_s=round(train['images_per_s'], 2))
            msg = f'epoch {self.epoch}: loss {train["loss"]:.4g}'
            if train['acc'] is not None:
                msg += f', acc {train["acc"]:.3f}'
            msg += f', {train["images_per_s"]:.1f} img/s, lr {train["lr"]:.3g}'
            headline = None
            if self.main and (self.epoch % opts.valInterval == 0 or self.epoch == opts.nEpochs):
                result = self.evaluate()
                headline = result['headline']
                record.update(val=result['table'], val_headline=headline, val_acc=result['acc'])
                msg += f' | val {headline:.2f}'
            self.history.append(record)
            if headline is not None:
                if headline > self.best:
                    self.best, self.best_epoch = headline, self.epoch
                    self.save('model_best.pth', headline)
                self.write_vis(result)
            if self.main:
                self.log(msg)
                with open(os.path.join(self.exp_dir, 'metrics.json'), 'w') as f:
                    json.dump(self.history, f, indent=1, default=_jsonable)
                if self.epoch % opts.saveInterval == 0 or self.epoch == opts.nEpochs:
                    self.save('model_last.pth', headline)
            if self.distributed:
                dist.barrier()
        return result

    # ----------------------------------------------------------------- helpers
    def write_vis(self, result):
        if self.opts.visCount <= 0:
            return
        from vis.draw import save_prediction_grid
        n = min(self.opts.visCount, len(result['indices']))
        items = [self.val_set[int(i)] for i in result['indices'][:n]]
        save_prediction_grid(os.path.join(self.exp_dir, 'vis.png'), [it[0] for it in items],
                             result['crops'][:n], [it[3]['joints'] for it in items],
                             [it[3]['visible'] for it in items], self.val_set.reader.joint_set)

    def _bar(self, loader, desc):
        if not (self.opts.progress and self.main):
            return loader
        from tqdm import tqdm
        return tqdm(loader, desc=desc, unit='batch', leave=False, dynamic_ncols=True, file=sys.stdout,
                    mininterval=0.5 if sys.stdout.isatty() else 10.0)


def _worker_init(_):
    # one thread per loader worker: the workers already run in parallel with each other
    import cv2
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
