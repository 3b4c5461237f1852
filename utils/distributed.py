"""Distributed runs under ``torchrun``: the process group, which rank writes, sharded evaluation,
and a rank that dies.

* ``setup(opts)`` starts the process group (NCCL on CUDA, gloo on the CPU) when torchrun's
  ``WORLD_SIZE`` says there are several processes, with ``--distTimeout`` on every collective, and
  a heartbeat: every rank stamps the time in torchrun's key-value store every second.
* Only rank 0 writes files (the run folder's lock, config.defconf, log, checkpoints, metrics,
  plots, predictions); ``agree`` runs a step on rank 0 and gives the other ranks its outcome, so an
  error there stops every rank with the same line instead of leaving them at a barrier.
* Evaluation is sharded by whole batches (rank r predicts batches r, r + world, ...) and the
  predictions are gathered: the batches are those of a single process, so the gathered
  predictions equal a single-process evaluation's exactly.
* A collective that fails because a peer died becomes one line naming the ranks whose heartbeat
  stopped (``lost_peer``), within the time a collective needs to notice a closed connection, or at
  worst ``--distTimeout``.
"""
import datetime
import os
import re
import threading
import time

import torch
import torch.distributed as dist

from utils.errors import PoseError, TrainingError

BEAT = 1.0          # seconds between two heartbeats of a rank


class Dist:
    """rank, world (1 when not distributed), the process's device, and the key-value store."""

    def __init__(self, rank=0, world=1, store=None):
        self.rank, self.world, self.store = rank, world, store
        self.stop = threading.Event()
        self.beat = None            # the heartbeat thread

    @property
    def on(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def start_beat(self):
        """Stamp this rank's time in the store every ``BEAT`` seconds until ``close``."""
        self.beat = threading.Thread(target=_beat, args=(self,), daemon=True)
        self.beat.start()

    def barrier(self):
        if self.on:
            guard(dist.barrier, self)

    def close(self, wait=True):
        """Stop the heartbeat and leave the process group together (a rank that exits while another
        is still in a collective would make that one's gloo abort). The heartbeat ends first: a
        store call still running while the process group and the store are torn down at exit
        aborted the process now and then ('terminate called without an active exception')."""
        self.stop.set()
        if self.beat is not None and self.beat is not threading.current_thread():
            self.beat.join(timeout=BEAT + 10)
        if self.on and dist.is_initialized():
            try:
                if wait:
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 -- the others are gone already: nothing left to leave
                pass


NOT_DISTRIBUTED = Dist()


def setup(opts, device):
    """The process group of a torchrun launch (or ``NOT_DISTRIBUTED``)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return NOT_DISTRIBUTED
    if not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        timeout = datetime.timedelta(seconds=opts.distTimeout)
        if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
            dist.init_process_group(backend, store=_attempt_store(world, timeout), rank=int(os.environ['RANK']),
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    rank = dist.get_rank()
    try:            # the process group's key-value store (torchrun's agent holds it: it outlives a rank)
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 -- no heartbeat then; the collectives' errors still stop the run
        store = None
    d = Dist(rank, world, store)
    if store is not None:
        d.start_beat()
    return d


def _attempt_store(world, timeout):
    """torchrun's agent store under a prefix of its own for this attempt.

    torchrun (2.4 on) keeps one key-value store for the whole launch; a restarted attempt
    (``--max-restarts``) would read the previous attempt's gloo / NCCL addresses from it and fail
    to connect (pytorch/pytorch#135712). On one node the agent's restart count numbers the attempts
    consistently; across nodes each agent counts its own restarts, so there the ranks number the
    attempts by counting the ranks that have joined so far (the world size is fixed)."""
    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous('env://', timeout=timeout))
    store.set_timeout(timeout)
    if int(os.environ.get('GROUP_WORLD_SIZE', '1')) == 1:
        attempt = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
    else:
        attempt = (store.add('posekit/joined', 1) - 1) // world
    return dist.PrefixStore(f'posekit/attempt{attempt}/', store)


def _beat(d):
    while not d.stop.is_set():
        try:
            d.store.set(f'posekit/beat/{d.rank}', repr(time.time()))
        except Exception:  # noqa: BLE001 -- the store went away with the launcher
            return
        d.stop.wait(BEAT)


def silent_ranks(d, now=None):
    """Ranks whose heartbeat is older than a few beats (or missing)."""
    if d.store is None:
        return []
    now = now or time.time()
    out = []
    for r in range(d.world):
        if r == d.rank:
            continue
        try:
            last = float(d.store.get(f'posekit/beat/{r}').decode())
        except Exception:  # noqa: BLE001
            last = 0.0
        if now - last > 3 * BEAT + 1:
            out.append(r)
    return out


def lost_peer(d, exc):
    """The one-line error of a collective that failed because another rank stopped."""
    time.sleep(3 * BEAT + 1.5)          # let a dead rank's heartbeat go stale
    silent = silent_ranks(d)
    who = (f'rank {", ".join(map(str, silent))} of {d.world} stopped' if silent else
           f'another of the {d.world} ranks stopped')
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r'^\[[^\]]*\]\s*', '', first)[:100]        # gloo's source location
    return TrainingError(f'rank {d.rank}: {who} ({first}); stopping this rank too (torchrun --max-restarts with '
                         f'--loadModel auto resumes from the last checkpoint)')


def guard(fn, d, *args, **kwargs):
    """Run a collective; a failure (a peer gone) is ``lost_peer``'s one line."""
    try:
        return fn(*args, **kwargs)
    except PoseError:
        raise
    except (RuntimeError, ConnectionError) as exc:
        raise lost_peer(d, exc) from None


def broadcast_buffers(d, model):
    """Give every rank rank 0's buffers (BatchNorm running statistics: DDP hands them out at the
    start of a forward pass, and each rank's own batch moves them after that)."""
    for buf in model.buffers():
        guard(dist.broadcast, d, buf, src=0)


def agree(d, step):
    """Run ``step()`` on rank 0 and hand its outcome to every rank: the other ranks raise rank 0's
    error (``PoseError``) too, instead of waiting for it at a barrier. Returns step's value on
    rank 0 (None elsewhere)."""
    value, message = None, None
    if d.main:
        try:
            value = step()
        except PoseError as exc:
            message = (type(exc).__name__, str(exc))
            if not d.on:
                raise
    if d.on:
        box = [message]
        guard(dist.broadcast_object_list, d, box, src=0)
        message = box[0]
    if message is not None:
        from utils import errors
        raise getattr(errors, message[0], errors.PoseError)(message[1])
    return value


def gather(d, items):
    """Every rank's list -> the concatenation on every rank (rank order)."""
    if not d.on:
        return list(items)
    parts = [None] * d.world
    guard(dist.all_gather_object, d, parts, list(items))
    return [x for part in parts for x in part]


class BatchShard(torch.utils.data.Sampler):
    """The indices of the whole batches b = rank, rank + world, ... of an n-sample split in
    batches of ``batch`` (the last one possibly short): a rank's share of a sharded evaluation."""

    def __init__(self, n, batch, rank, world):
        self.n, self.batch, self.rank, self.world = int(n), int(batch), int(rank), int(world)

    def __iter__(self):
        for b in range(self.rank, -(-self.n // self.batch), self.world):
            yield from range(b * self.batch, min(self.n, (b + 1) * self.batch))

    def __len__(self):
        return sum(min(self.n, (b + 1) * self.batch) - b * self.batch
                   for b in range(self.rank, -(-self.n // self.batch), self.world))
