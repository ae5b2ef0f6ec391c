"""What every FD loader shares: the infinite iterator over epochs, its resumable position and its stats."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from fdfast.errors import FDFastError
from fdfast.data.files import BAD_FILES_SHOWN, EpochOrder, FileList
from fdfast.io import atomic_write_json

log = logging.getLogger("fdfast.data")

class FDLoader:
    """Base: yields batches at positions (epoch, batch) of an `EpochOrder`; subclasses make the batches.

    ``next(loader)`` -> float32 [B, 3, H, W] (FD's loaders), or (images, labels [B] int64) for a labeled loader
    (fine-tuning's ``fdfast.finetune.loader.LabelledLoader``). It never ends: after the last batch of an epoch it
    moves on to the next, reshuffled epoch.
    """
    name = "base"

    def __init__(self, files: FileList | None, order: EpochOrder, *, labeled: bool = False):
        self.files, self.order, self.labeled = files, order, labeled
        self.epoch, self.batch = 0, 0  # position of the NEXT batch handed out
        self.images_seen = 0  # in this process (a resumed run starts again at 0)
        self._bad: dict[str, None] = dict.fromkeys(files.bad if files else [])  # ordered set of bad paths

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        out = self._next_batch()
        images = out[0] if self.labeled else out
        self.images_seen += images.shape[0]
        self.batch += 1
        if self.batch >= self.order.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return out

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.order.batches_per_epoch

    def _next_batch(self):
        raise NotImplementedError

    def _restart(self) -> None:
        """Re-position the underlying producer at (self.epoch, self.batch), e.g. after load_state_dict."""

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        o = self.order
        # The same on every rank (equal shards move in step): rank 0's state restores all ranks.
        return dict(loader=self.name, epoch=self.epoch, batch=self.batch, seed=o.seed,
                    world_size=o.world_size, batch_size=o.batch_size, n_files=o.n_files)

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise FDFastError(f"data loader state needs integer 'epoch' and 'batch', got {state!r}") from None
        o = self.order
        now = dict(seed=o.seed, world_size=o.world_size, batch_size=o.batch_size, n_files=o.n_files)
        changed = {k: (state.get(k), v) for k, v in now.items() if k in state and state[k] != v}
        if changed:
            log.warning("resuming the data loader with changed %s (saved, now): the batch order differs "
                        "from the interrupted run", changed)
        if batch >= o.batches_per_epoch:  # the data set shrank: continue with the next epoch
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch = epoch, batch  # images_seen stays this process's count (its img/s)
        self._restart()

    # -- reporting ---------------------------------------------------------------------------------
    def _note_bad(self, paths) -> None:
        new = [p for p in paths if p not in self._bad]
        if new:
            self._bad.update(dict.fromkeys(new))
            log.warning("skipped %d unreadable image(s) (substituted the next readable file): %s",
                        len(new), ", ".join(new[:BAD_FILES_SHOWN]))

    def stats(self) -> dict:
        bad = list(self._bad)
        return dict(loader=self.name, images_seen=self.images_seen, images_skipped=len(bad),
                    bad_files=bad[:BAD_FILES_SHOWN])

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_summary(out_dir: str | Path, loader: FDLoader, steps: int, wall_s: float, **extra) -> dict:
    """Write OUT_DIR/summary.json: the loader's stats + steps, wall time and images per second."""
    summary = dict(loader.stats(), steps=int(steps), wall_s=round(float(wall_s), 3),
                   img_per_s=round(loader.images_seen / wall_s, 2) if wall_s > 0 else None, **extra)
    atomic_write_json(Path(out_dir) / "summary.json", summary, indent=2)
    return summary


def check_augmentation(image_size: int, mean, std, scale, ratio, hflip: float) -> None:
    """Bad augmentation settings fail here, with the key to fix, before any worker or pipeline starts."""
    if image_size < 1:
        raise FDFastError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise FDFastError(f"mean and std need 3 values each (std > 0), got mean={mean}, std={std}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise FDFastError(f"data.scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise FDFastError(f"data.ratio must be [lo, hi] with 0 < lo <= hi, got {list(ratio)}")
    if not 0 <= hflip <= 1:
        raise FDFastError(f"data.hflip is a probability in [0, 1], got {hflip}")


def sample_crop(width: int, height: int, seed: int, scale, ratio, hflip: float) -> tuple[int, int, int, int, bool]:
    """RandomResizedCrop window (top, left, height, width) and flip of one image of width x height pixels, drawn
    from the sample's own seed.

    Every loader crops with it (on the size the image header or a shard index declares), so a sample's crop
    depends on (image, seed) only: not on the loader, its worker count or pipeline, and a resumed run sees
    exactly the crops the interrupted run would have seen.
    """
    from torchvision.transforms import RandomResizedCrop
    shape_only = torch.empty((0, int(height), int(width)), device="meta")  # get_params reads the size only
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        top, left, h, w = RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
        flip = torch.rand(()).item() < hflip
    return top, left, h, w, flip


def normalizer(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std in [0, 1] units -> ([1,3,1,1], [1,3,1,1]) in 0-255 units, for uint8 batches."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    return m, s
