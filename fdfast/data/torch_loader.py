"""The torch DataLoader path: PIL decode + torchvision RandomResizedCrop + flip in worker processes.

Workers return uint8 [3, H, W] crops (4x less inter-process traffic than float); the main process
stacks them and normalises with the teacher's mean/std. Every sample's crop and flip come from its own
seed (drawn by `EpochOrder`), so batches do not depend on the number of workers and a resumed run
sees exactly the batches the interrupted run would have seen.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from fdfast.data.base import FDLoader, normalizer, sample_crop
from fdfast.data.files import EpochOrder, FileList, load_rgb
from fdfast.errors import FDFastError
from fdfast.signals import ignore_stop_signals, start_forkserver, stop_signals_blocked

MAX_SUBSTITUTES = 16  # bad files in a row tried before giving up on a sample


def _worker_context():
    """How DataLoader workers start: fork, unless DALI is loaded in this process.

    A fork taken while DALI's threads hold locks deadlocks the worker (seen in our tests when a DALI
    pipeline was alive); then workers fork from a clean forkserver instead (which, like spawn, needs
    the usual ``if __name__ == "__main__":`` guard in a user's script). Plain fork otherwise keeps
    torch-only scripts working as they always have.
    """
    import multiprocessing
    if "nvidia.dali" not in sys.modules:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # the server imports torch + PIL once, workers fork ready
    start_forkserver()  # one that a group SIGTERM cannot kill
    return ctx


class CropDataset(torch.utils.data.Dataset):
    """Item (file index, sample seed) -> (uint8 [3, S, S] crop, [paths that failed to decode])."""

    def __init__(self, files: FileList, image_size: int, scale, ratio, hflip: float):
        self.files = files
        self.size, self.scale, self.ratio, self.hflip = image_size, scale, ratio, hflip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        failed = []
        # A file that passed the cheap check can still fail to decode: substitute the next file.
        for k in range(min(MAX_SUBSTITUTES, len(self.files))):
            i = (index + k) % len(self.files)
            try:
                img = load_rgb(self.files.source(i))  # the full decode inside the guard; grey / 16-bit / RGBA -> RGB
            except Exception:  # noqa: BLE001 - any decode failure means "skip this file"
                failed.append(self.files.paths[i])
                continue
            return TF.pil_to_tensor(self._augment(img, seed)), failed
        raise FDFastError(f"{len(failed)} image files in a row failed to decode, e.g. {failed[0]!r}; the data "
                          f"looks damaged: replace it, or find every bad file at start with data.check=full")

    def _augment(self, img: Image.Image, seed: int) -> Image.Image:
        top, left, h, w, flip = sample_crop(img.width, img.height, seed, self.scale, self.ratio, self.hflip)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR,
                              antialias=True)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def _collate(items):
    crops, failed = zip(*items)
    return torch.stack(crops), [p for f in failed for p in f]


class _BatchSampler:
    """Infinite (epoch, batch) walk of an EpochOrder from a start position: lists of (index, seed)."""

    def __init__(self, order: EpochOrder, epoch: int, batch: int):
        self.order, self.epoch, self.batch = order, epoch, batch

    def __iter__(self):
        for epoch, batch in self.order.positions(self.epoch, self.batch):
            index, seeds = self.order.batch(epoch, batch)
            yield [(int(i), int(s)) for i, s in zip(index, seeds)]


def _worker_message(text: str) -> str:
    """The one-line FDFastError message inside torch's "Caught FDFastError in DataLoader worker ..." text."""
    lines = [line.split("FDFastError: ", 1)[1] for line in text.splitlines() if "FDFastError: " in line]
    return lines[-1] if lines else text.strip().splitlines()[0]


class TorchFDLoader(FDLoader):
    name = "torch"

    def __init__(self, files: FileList, order: EpochOrder, *, image_size: int, mean, std, scale, ratio,
                 hflip: float, num_workers: int, device: str = "cpu"):
        super().__init__(files, order)
        self.dataset = CropDataset(files, image_size, scale, ratio, hflip)
        self.num_workers = num_workers
        self.pin = str(device).startswith("cuda")
        self.mean255, self.std255 = normalizer(mean, std, "cpu")
        self._loader = None
        self._iter = None

    def _restart(self) -> None:
        self.close()
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_BatchSampler(self.order, self.epoch, self.batch),
            num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.pin,
            multiprocessing_context=_worker_context() if self.num_workers else None,
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid()))
        with stop_signals_blocked():  # workers (and a forkserver) start with SIGINT / SIGTERM blocked
            self._iter = iter(self._loader)

    def _next_batch(self):
        if self._iter is None:
            self._restart()
        try:
            crops, failed = next(self._iter)  # uint8 [B, 3, S, S]
        except FDFastError as e:  # from a worker: torch puts the worker's traceback into the message
            raise FDFastError(_worker_message(str(e))) from None
        if failed:
            self._note_bad(failed)
        return crops.float().sub_(self.mean255).div_(self.std255)  # float32 [B, 3, S, S], normalised

    def close(self) -> None:
        # Dropping the iterator shuts its worker processes down.
        self._iter = None
        self._loader = None
