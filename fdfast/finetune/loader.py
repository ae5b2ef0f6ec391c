"""Fine-tuning's batches: training (images, labels) epoch after epoch, resumable at any step, disjoint per rank;
evaluation batches of a rank's part of the val split. Workers of both ignore a group SIGTERM (fdfast.signals).

The training order is ``fdfast.data.files.EpochOrder`` (seeded, reshuffled per epoch, equal disjoint shards per
rank, the last step of an epoch filled by wrapping around the rank's own shard) over STEP batches of
``batch_size x accum_steps`` images per rank, handed out as ``accum_steps`` micro-batches. So an optimizer step
sees the same images whatever the split into ranks and micro-batches: 2 ranks x 4 images = 1 rank x 2
micro-batches of 4 (each rank takes every world_size-th image of the epoch's permutation). Every sample is
augmented from its own seed (drawn per position of the permutation), so batches depend neither on the number of
DataLoader workers nor on where a run was interrupted.

A shard set (``fdfast.data.shards.ShardList``) is ordered like FD's shards (``ShardOrder``: each epoch the shards in a
seeded order, each shard's samples in a seeded order, so reads stay within a shard or two), dealt to ranks by the
same every-world_size-th rule, so the guarantees above hold for shards too.
"""
from __future__ import annotations

import functools
import os

import torch

from fdfast.data.base import FDLoader
from fdfast.data.files import EpochOrder, FileList, positions
from fdfast.data.shards import ShardList, ShardOrder
from fdfast.finetune.data import LabelledImages
from fdfast.signals import ignore_stop_signals, stop_signals_blocked


class MicroBatches:
    """An EpochOrder of step batches seen as ``accum`` micro-batches per step (what FDLoader walks)."""

    def __init__(self, order: EpochOrder, accum: int):
        self.order, self.accum = order, accum
        self.batch_size = order.batch_size // accum  # images per micro-batch
        self.batches_per_epoch = order.batches_per_epoch * accum
        self.seed, self.world_size, self.n_files = order.seed, order.world_size, order.n_files

    def batch(self, epoch: int, micro: int):
        index, seeds = self.order.epoch(epoch)
        s = slice(micro * self.batch_size, (micro + 1) * self.batch_size)
        return index[s], seeds[s]

    def positions(self, epoch: int = 0, batch: int = 0):
        return positions(self.batches_per_epoch, epoch, batch)


class ShardSteps(ShardOrder):
    """`ShardOrder`'s epoch sequence (shard by shard) dealt to ranks as `EpochOrder` deals a folder's: rank r takes
    every world_size-th position from r, so a step's images are the same whatever the split into ranks and
    micro-batches (FD's contiguous parts would give each rank other images)."""
    _rank_part = EpochOrder._rank_part


def step_order(files: FileList, step_batch: int, **place) -> EpochOrder:
    """The order of optimizer-step batches over ``files``: `ShardSteps` for a shard set, else `EpochOrder`."""
    if isinstance(files, ShardList):
        return ShardSteps(files.starts, step_batch, **place)
    return EpochOrder(len(files), step_batch, **place)


def _own_generator() -> torch.Generator:
    """A DataLoader's own generator: starting its iterator then draws the workers' base seed from it, not from the
    global RNG, so a loader (re)started on resume or for an evaluation never moves the drop-path / Mixup stream
    (every sample is seeded on its own anyway)."""
    return torch.Generator().manual_seed(0)


def _protected(loader: torch.utils.data.DataLoader):
    """Iterate a DataLoader whose workers start with SIGINT / SIGTERM blocked (then ignore them)."""
    with stop_signals_blocked():
        it = iter(loader)
    yield from it


class LabelledLoader(FDLoader):
    """An infinite iterator of (float32 [B, 3, S, S] normalised by ``transform``, int64 [B]) micro-batches;
    ``steps_per_epoch`` optimizer steps of ``accum_steps`` micro-batches make one epoch."""
    name = "finetune"

    def __init__(self, files: FileList, transform, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, accum_steps: int = 1):
        steps = step_order(files, batch_size * accum_steps, seed=seed, rank=rank, world_size=world_size)
        super().__init__(files, MicroBatches(steps, accum_steps), labeled=True)
        self.steps_per_epoch = steps.batches_per_epoch
        self.dataset, self.num_workers = LabelledImages(files, transform), num_workers
        self._iter = None

    def _batches(self):
        for epoch, micro in self.order.positions(self.epoch, self.batch):
            index, seeds = self.order.batch(epoch, micro)
            yield [(int(i), int(s)) for i, s in zip(index, seeds)]

    def _restart(self) -> None:
        self.close()
        self._iter = _protected(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._batches(), num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None, generator=_own_generator(),
            worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid())))

    def _next_batch(self):
        if self._iter is None:
            self._restart()
        return next(self._iter)

    def close(self) -> None:
        self._iter = None  # dropping the iterator shuts its workers down


class EvalBatches:
    """(images, labels) batches of ``files`` in order, once per iteration; workers protected like training's."""

    def __init__(self, files: FileList, transform, batch_size: int, num_workers: int):
        self.loader = torch.utils.data.DataLoader(
            LabelledImages(files, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
            generator=_own_generator(), worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid()))

    def __iter__(self):
        return _protected(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
