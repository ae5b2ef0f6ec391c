"""Input pipeline for FD: DALI first, a torch DataLoader with the same semantics, a synthetic loader.

    loader = build_fd_loader(cfg.data, image_size=224, mean=teacher_mean, std=teacher_std, batch_size=64)
    images = next(loader)  # float32 [B, 3, S, S], normalised with the teacher's mean / std

Augmentation (METHOD.md): RandomResizedCrop(S, scale=data.scale, ratio=data.ratio) + horizontal flip
(p = data.hflip) + normalisation. Files are listed and checked once (cached), ordered by `EpochOrder`
(seeded, reshuffled per epoch, equal disjoint shards per rank) and resumable via state_dict().
data.path may also name WebDataset tar shards (``fdfast.data.shards``: brace patterns, "::" lists, a folder of
.tar files): indexed once (cached), ordered by `ShardOrder` (the same rules, shard by shard), read by both loaders.
Without data.path the loaders read the default named source (``fdfast.data.sources``, filled by plugins).
Labelled images (class folders, or shards with .cls members: ``list_images`` / ``list_shards`` with labeled=True)
are read by fine-tuning's own pipeline (``fdfast.finetune.data`` / ``fdfast.finetune.loader``).
"""
from __future__ import annotations

import importlib.util
import logging
import typing

from fdfast.data.base import FDLoader, check_augmentation, write_summary
from fdfast.data.files import EpochOrder, list_images
from fdfast.data.shards import ShardOrder, list_shards, shard_paths
from fdfast.data.sources import DEFAULT_SOURCE, register_source, source_dir, source_names, source_rows
from fdfast.config import Loader
from fdfast.errors import FDFastError
from fdfast.runtime import mix_seed

__all__ = ["build_fd_loader", "write_summary", "resolve_loader", "list_images",
           "list_shards", "shard_paths", "FDLoader", "DEFAULT_SOURCE", "register_source", "source_dir",
           "source_names", "source_rows"]

log = logging.getLogger("fdfast.data")
LOADERS = typing.get_args(Loader)  # data.loader's choices (fdfast.config)
SYNTHETIC_IMAGES = 1_000_000  # "files" of the synthetic loader's epoch (only the epoch length depends on it)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader(name: str) -> str:
    """data.loader -> the loader used: auto -> dali when nvidia-dali is installed, else torch."""
    if name not in LOADERS:
        raise FDFastError(f"data.loader must be one of {', '.join(LOADERS)}, got {name!r}")
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise FDFastError("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                          "(or set data.loader=torch)")
    return name


def _data_path(data_cfg) -> str:
    if data_cfg.path:
        return data_cfg.path
    return str(source_dir(DEFAULT_SOURCE))  # prepared by the plugin that registered it (the demo photos)


def build_fd_loader(data_cfg, *, image_size: int, mean: tuple, std: tuple, batch_size: int,
                    device: str = "cpu", rank: int = 0, world_size: int = 1, seed: int = 0) -> FDLoader:
    """An infinite iterator of augmented, normalised image batches (float32 [B, 3, S, S]) for FD.

    DALI on "cuda*" devices decodes on the GPU ("mixed") and returns tensors on `device`; every other
    loader returns CPU tensors. ``loader.name`` says which loader runs ("auto" resolved).
    """
    kind = resolve_loader(data_cfg.loader)
    check_augmentation(image_size, mean, std, data_cfg.scale, data_cfg.ratio, data_cfg.hflip)
    # data.seed and the run's seed both move the order; numpy seeds must be >= 0
    order_seed = mix_seed(data_cfg.seed, seed)
    if kind == "synthetic":
        order = EpochOrder(SYNTHETIC_IMAGES, batch_size, seed=order_seed, rank=rank, world_size=world_size)
        from fdfast.data.synthetic import SyntheticFDLoader
        return SyntheticFDLoader(order, image_size=image_size, device=device)

    path = _data_path(data_cfg)
    shards = shard_paths(path)
    place = dict(seed=order_seed, rank=rank, world_size=world_size)
    if shards is not None:
        files = list_shards(shards, check=data_cfg.check, cache_dir=data_cfg.cache_dir)
        order = ShardOrder(files.starts, batch_size, **place)
    else:
        files = list_images(path, check=data_cfg.check, cache_dir=data_cfg.cache_dir)
        order = EpochOrder(len(files), batch_size, **place)
    common = dict(image_size=image_size, mean=tuple(mean), std=tuple(std), scale=tuple(data_cfg.scale),
                  ratio=tuple(data_cfg.ratio), hflip=float(data_cfg.hflip), num_workers=int(data_cfg.num_workers),
                  device=device)
    if kind == "dali":
        from fdfast.data.dali_loader import DaliFDLoader, DaliShardLoader
        return (DaliFDLoader if shards is None else DaliShardLoader)(files, order, **common)
    from fdfast.data.torch_loader import TorchFDLoader
    return TorchFDLoader(files, order, **common)
