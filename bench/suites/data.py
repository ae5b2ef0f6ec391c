"""Input pipeline throughput: DALI vs the torch DataLoader (same workers, same augmentation), on an image folder
and on WebDataset shards of the same images: img/s and img/s per core.

The data: real-size JPEGs (~500x375, quality 90) cut from the photos scikit-image ships (random crops,
rescales and flips of real pictures, so the decoder sees natural-image entropy), written to a temp dir, and
the same files written into tar shards by `fdfast shards` (SHARD_SIZE images each). Each loader makes FD
batches at 224 px: RandomResizedCrop(0.08-1) + flip + normalise; DALI decodes on the CPU here and with nvJPEG
("mixed") on a GPU. "Per core" divides the images by the CPU seconds the loader used (this process's threads,
DALI's included, plus the torch worker processes) over the same window: what a core buys, however many run.
A synthetic row shows the loop's own ceiling.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fdfast.config import DataConfig
from fdfast.data import build_fd_loader, resolve_loader
from fdfast.data.shards import write_shards

IMAGE_SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "hubble_deep_field", "immunohistochemistry",
          "motorcycle_left", "motorcycle_right", "page", "retina", "grass", "gravel", "brick", "colorwheel",
          "logo", "cat", "text", "moon", "coins", "clock", "checkerboard", "microaneurysms", "stereo_motorcycle")


def write_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of 500x375 (a few portrait 375x500) from random crops of the scikit-image photos."""
    import skimage.data
    from PIL import Image

    photos = []
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download is simply left out
            continue
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        photos.append(Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = (500, 375) if rng.random() < 0.8 else (375, 500)
        zoom = rng.uniform(1.0, 1.6)  # upsample the small photos a little, then cut a window
        big = photo.resize((max(w, int(photo.width * zoom * max(w / photo.width, h / photo.height))),
                            max(h, int(photo.height * zoom * max(w / photo.width, h / photo.height)))))
        x0, y0 = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        tile = big.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tile.save(folder / f"img_{i:05d}.jpg", quality=90)
    return folder


SHARD_SIZE = 256  # images per shard (ImageNet-scale sets use ~1000: the same reads, more of them per shard)


def cpu_seconds() -> float | None:
    """CPU time (user + system) of this process (all its threads) and its live child processes (loader workers);
    None where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        pids = [str(os.getpid())]
        for task in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids += f.read().split()
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
    except (OSError, IndexError, ValueError):
        return None
    return total


def measure(kind: str, data: str, *, device: str, batch_size: int, workers: int, seconds: float) -> dict:
    """Steady-state img/s and img per CPU second: two warm-up batches (worker start, pipeline build, shard
    index), then `seconds` of batches."""
    cfg = DataConfig(path=data, loader=kind, num_workers=workers)
    loader = build_fd_loader(cfg, image_size=IMAGE_SIZE, mean=MEAN, std=STD, batch_size=batch_size, device=device)
    try:
        for _ in range(2):
            next(loader)
        load = os.getloadavg()[0]  # other work on the machine: wall-clock img/s means little when this is high
        images, cpu0, start = 0, cpu_seconds(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            x = next(loader)
            images += x.shape[0]
        if device == "cuda":
            import torch
            torch.cuda.synchronize()
        wall, cpu1 = time.perf_counter() - start, cpu_seconds()
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        return dict(loader=loader.name, out_device=str(x.device), images=images, wall_s=round(wall, 2),
                    img_per_s=images / wall, cpu_s=None if cpu is None else round(cpu, 2),
                    img_per_core_s=None if not cpu else images / cpu, load_1m=round(load, 2))
    finally:
        loader.close()


def run(ctx) -> None:
    n_files = 384 if ctx.quick else 2048
    seconds = 12.0 if ctx.quick else 45.0
    batch_size = 64
    workers = max(1, min(os.cpu_count() or 1, 8 if ctx.device == "cuda" else 2))
    with tempfile.TemporaryDirectory(prefix="fdfast-bench-data-") as tmp:
        folder = write_jpegs(Path(tmp) / "jpegs", n_files)
        shards = write_shards(folder, Path(tmp) / "shards", shard_size=SHARD_SIZE, labels="none")["data"]
        common = dict(image_size=IMAGE_SIZE, batch=batch_size, workers=workers, files=n_files)
        kinds = ["torch"] + (["dali"] if resolve_loader("auto") == "dali" else [])
        baseline = None
        for kind in kinds:
            for source, data in (("folder", str(folder)), ("shards", shards)):
                result = measure(kind, data, device=ctx.device, batch_size=batch_size, workers=workers, seconds=seconds)
                baseline = baseline or result["img_per_s"]  # torch on the folder
                decode = "mixed" if ctx.device == "cuda" and kind == "dali" else "cpu"
                ctx.record(case=f"{kind}_{decode}_{source}", source=source,
                           shard_size=SHARD_SIZE if source == "shards" else None, **common, **result,
                           vs_torch=round(result["img_per_s"] / baseline, 3))
        synthetic = measure("synthetic", str(folder), device=ctx.device, batch_size=batch_size, workers=workers,
                            seconds=2.0)
        ctx.record(case="synthetic", source="none", **common, **synthetic,
                   vs_torch=round(synthetic["img_per_s"] / baseline, 3))
