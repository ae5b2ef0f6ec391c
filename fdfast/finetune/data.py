"""Labelled images for fine-tuning and evaluation: class-folder or WebDataset-shard splits, timm transforms.

A split is a folder of class subfolders (label = sorted folder index) or labelled tar shards (``fdfast shards``:
a .cls member per sample, class names in shards.json; any spec ``fdfast.data.shards.shard_paths`` reads); both
are listed and checked once (cached), unreadable files / members skipped and counted.

Train: RandomResizedCrop + flip + RandAugment + normalise + random erasing (timm ``create_transform``); eval:
resize + centre crop + normalise. Both normalise with the MODEL's own mean/std (the published FD code trains
and evaluates with different ones; METHOD.md lists that as a pitfall). Every sample's augmentation is a pure
function of its seed (drawn by the epoch order, ``fdfast.finetune.loader``), so a resumed run sees the very images
an uninterrupted run sees.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdfast.data.files import FileList, list_images, load_rgb
from fdfast.data.shards import list_shards, shard_paths
from fdfast.errors import FDFastError

LABELLED_SOURCE = "demo-labelled"  # data source of the demo plugin: ImageFolder with train/ and val/


@dataclass
class Splits:
    train: FileList
    val: FileList  # labels index train.classes
    classes: list[str]
    root: str


def resolve_split_dirs(path: str | None, val_path: str | None) -> tuple[str, str]:
    """(train, val): PATH + VAL, or PATH/train + PATH/val, or the demo-labelled set when PATH is None. Each is a
    class folder or a shard spec; a spec naming a missing shard fails here, in one line."""
    if path is None:
        if val_path is not None:
            raise FDFastError("--val needs --data: give the training folder too")
        from fdfast.data.sources import source_dir
        path = str(source_dir(LABELLED_SOURCE))
    if shard_paths(path) is not None:
        if val_path is None:
            raise FDFastError(f"--data {path!r} names training shards; pass the validation split with --val "
                              f"(shards written with `fdfast shards VAL_FOLDER --classes TRAIN/shards.json`, or a "
                              f"class folder)")
        return path, val_path
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FDFastError(f"--data {str(root)!r} is not a folder; pass a folder of class subfolders or labelled .tar "
                          f"shards (with --val), or a folder holding train/ and val/")
    if val_path is not None:
        return str(root), val_path
    if (root / "train").is_dir() and (root / "val").is_dir():
        return str(root / "train"), str(root / "val")
    raise FDFastError(f"--data {str(root)!r} has no train/ and val/ subfolders; pass the validation folder with "
                      f"--val DIR (class subfolders, the same class names)")


def list_labelled(spec: str, check: str = "fast") -> FileList:
    """One split: labelled shards when ``spec`` names .tar shards, else a folder of class subfolders."""
    shards = shard_paths(spec)
    if shards is not None:
        return list_shards(shards, labeled=True, check=check)
    return list_images(spec, labeled=True, check=check)


def load_splits(path: str | None, val_path: str | None = None, check: str = "fast", train_per_class: int = 0,
                val_per_class: int = 0) -> Splits:
    """Both splits listed and checked; val classes must all exist in train (labels follow train's order)."""
    train_dir, val_dir = resolve_split_dirs(path, val_path)
    train = list_labelled(train_dir, check)
    val = list_labelled(val_dir, check)
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise FDFastError(f"validation classes {unknown[:5]} of {str(val_dir)!r} are missing from the training set "
                          f"{str(train_dir)!r}; both splits need the same class subfolders")
    index = {c: i for i, c in enumerate(train.classes)}
    val.labels = [index[val.classes[label]] for label in val.labels]
    val.classes = list(train.classes)
    if train_per_class:
        train = _first_per_class(train, train_per_class)
    if val_per_class:
        val = _first_per_class(val, val_per_class)
    return Splits(train, val, list(train.classes), str(train.root.parent))


def _first_per_class(files: FileList, n: int) -> FileList:
    """The first ``n`` samples of each class, in the split's stored order (sorted paths; a shard set's member order)."""
    keep, seen = [], {}
    for i, label in enumerate(files.labels):
        if seen.get(label, 0) < n:
            keep.append(i)
            seen[label] = seen.get(label, 0) + 1
    return files.subset(keep)


def build_transforms(data_cfg, img_size: int, mean: tuple, std: tuple):
    """(train, eval) timm transforms; both normalise with ``mean`` / ``std``."""
    from timm.data import create_transform
    common = dict(input_size=img_size, mean=tuple(mean), std=tuple(std))
    train = create_transform(is_training=True, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip,
                             auto_augment=data_cfg.auto_augment, re_prob=data_cfg.reprob, re_mode=data_cfg.remode,
                             re_count=1, color_jitter=0.0,
                             interpolation=data_cfg.train_interpolation or data_cfg.interpolation,
                             **common)
    _posterize_keeps_one_bit(train)
    return train, create_transform(is_training=False, crop_pct=data_cfg.crop_pct,
                                   interpolation=data_cfg.interpolation, **common)


class _AtLeastOneBit:
    """timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (m9 + mstd 0.5 reaches it ~2% of the time);
    Pillow >= 10 refuses bits outside 1..8 and would stop the run, so those draws keep 1 bit (2 levels)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, img, bits, **kwargs):
        return self.fn(img, max(1, int(bits)), **kwargs)


def _posterize_keeps_one_bit(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize") and not isinstance(op.aug_fn, _AtLeastOneBit):
                op.aug_fn = _AtLeastOneBit(op.aug_fn)


@contextmanager
def seeded(seed: int):
    """Python, NumPy and torch RNGs seeded for one block, then restored (timm's transforms draw from all three)."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class LabelledImages(torch.utils.data.Dataset):
    """Item (index, seed) -> (image tensor, label); the seed fixes the sample's augmentation."""

    def __init__(self, files: FileList, transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        try:  # a file's path, or a shard member's bytes; the decode every fdfast reader shares (16-bit grey scaled)
            img = load_rgb(self.files.source(index))
        except OSError as e:
            raise FDFastError(f"cannot read image {self.files.paths[index]}: {e}; remove it from the data (or "
                              f"check every image at start with data.check=full)") from None
        with seeded(int(seed)):
            x = self.transform(img)
        return x, self.files.labels[index]


def eval_loader(files: FileList, transform, batch_size: int, num_workers: int):
    """Every file once, in list order."""
    return torch.utils.data.DataLoader(LabelledImages(files, transform), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers)
