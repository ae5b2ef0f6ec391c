"""Synthetic batches for benchmarks: normal noise made once on the device, no I/O, no decode."""
from __future__ import annotations

import torch

from fdfast.data.base import FDLoader
from fdfast.data.files import EpochOrder
from fdfast.runtime import mix_seed

POOL = 4  # distinct batches cycled through (making fresh noise every step would cost real time)


class SyntheticFDLoader(FDLoader):
    name = "synthetic"

    def __init__(self, order: EpochOrder, *, image_size: int, device: str = "cpu"):
        super().__init__(None, order)
        g = torch.Generator().manual_seed(mix_seed(order.seed, order.rank))
        shape = (POOL, order.batch_size, 3, image_size, image_size)
        # Normalised images are roughly standard normal: [POOL, B, 3, S, S]
        self.pool = torch.randn(shape, generator=g).to(device)

    def _next_batch(self):
        k = (self.epoch * self.order.batches_per_epoch + self.batch) % POOL
        return self.pool[k]
