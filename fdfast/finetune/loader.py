"""Fine-tuning's training batches: (images, labels) epoch after epoch, resumable at any batch, disjoint per rank.

The order is ``fdfast.data.files.EpochOrder`` (seeded, reshuffled per epoch, equal disjoint shards per rank, the
last batch of an epoch filled by wrapping around the rank's own shard) and every sample is augmented from its
own seed (``LabelledImages``), so the batches depend neither on the number of DataLoader workers nor on where a
run was interrupted. Workers start with the stop signals blocked and ignore a group SIGTERM (fdfast.signals),
as the FD loaders' do.
"""
from __future__ import annotations

import functools
import os

import torch

from fdfast.data.base import FDLoader
from fdfast.data.files import EpochOrder, FileList
from fdfast.finetune.data import LabelledImages
from fdfast.signals import ignore_stop_signals, stop_signals_blocked


class LabelledLoader(FDLoader):
    """An infinite iterator of (float32 [B, 3, S, S] normalised by ``transform``, int64 [B]) training batches."""
    name = "finetune"

    def __init__(self, files: FileList, transform, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        order = EpochOrder(len(files), batch_size, seed=seed, rank=rank, world_size=world_size, train=True)
        super().__init__(files, order, labeled=True, train=True)
        self.dataset, self.num_workers = LabelledImages(files, transform), num_workers
        self._iter = None

    def _batches(self):
        for epoch, batch in self.order.positions(self.epoch, self.batch):
            index, seeds = self.order.batch(epoch, batch)
            yield [(int(i), int(s)) for i, s in zip(index, seeds)]

    def _restart(self) -> None:
        self.close()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._batches(), num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid()))
        with stop_signals_blocked():  # workers start with SIGINT / SIGTERM blocked
            self._iter = iter(loader)

    def _next_batch(self):
        if self._iter is None:
            self._restart()
        return next(self._iter)

    def close(self) -> None:
        self._iter = None  # dropping the iterator shuts its workers down
