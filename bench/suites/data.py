"""Input pipeline throughput: DALI vs the torch DataLoader (same workers, same augmentation), img/s.

The data: real-size JPEGs (~500x375, quality 90) cut from the photos scikit-image ships (random crops,
rescales and flips of real pictures, so the decoder sees natural-image entropy), written to a temp dir.
Each loader makes FD batches at 224 px: RandomResizedCrop(0.08-1) + flip + normalise; DALI decodes on
the CPU here and with nvJPEG ("mixed") on a GPU. A synthetic row shows the loop's own ceiling.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fdfast.config import DataConfig
from fdfast.data import build_fd_loader, resolve_loader

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


def measure(kind: str, folder: Path, *, device: str, batch_size: int, workers: int, seconds: float) -> dict:
    """Steady-state img/s: two warm-up batches (worker start, pipeline build), then `seconds` of batches."""
    cfg = DataConfig(path=str(folder), loader=kind, num_workers=workers)
    loader = build_fd_loader(cfg, image_size=IMAGE_SIZE, mean=MEAN, std=STD, batch_size=batch_size, device=device)
    try:
        for _ in range(2):
            next(loader)
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            x = next(loader)
            images += x.shape[0]
        if device == "cuda":
            import torch
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return dict(loader=loader.name, out_device=str(x.device), images=images, wall_s=round(wall, 2),
                    img_per_s=images / wall)
    finally:
        loader.close()


def run(ctx) -> None:
    n_files = 384 if ctx.quick else 2048
    seconds = 12.0 if ctx.quick else 45.0
    batch_size = 64
    workers = max(1, min(os.cpu_count() or 1, 8 if ctx.device == "cuda" else 2))
    with tempfile.TemporaryDirectory(prefix="fdfast-bench-data-") as tmp:
        folder = write_jpegs(Path(tmp) / "jpegs", n_files)
        common = dict(image_size=IMAGE_SIZE, batch=batch_size, workers=workers, files=n_files)
        results = {}
        kinds = ["torch"] + (["dali"] if resolve_loader("auto") == "dali" else [])
        for kind in kinds:
            results[kind] = measure(kind, folder, device=ctx.device, batch_size=batch_size, workers=workers,
                                    seconds=seconds)
            speedup = results[kind]["img_per_s"] / results["torch"]["img_per_s"]
            ctx.record(case=f"{kind}_{'mixed' if ctx.device == 'cuda' and kind == 'dali' else 'cpu'}",
                       **common, **results[kind], vs_torch=round(speedup, 3))
        synthetic = measure("synthetic", folder, device=ctx.device, batch_size=batch_size, workers=workers,
                            seconds=2.0)
        ctx.record(case="synthetic", **common, **synthetic,
                   vs_torch=round(synthetic["img_per_s"] / results["torch"]["img_per_s"], 3))
