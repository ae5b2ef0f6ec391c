"""End-to-end FD step (teacher forward + student forward/backward + fused loss + AdamW): img/s and peak memory.

Providers: "reference" (plain-PyTorch attention and loss) vs "fdfast" (backend auto: Triton kernels on CUDA,
the fastest measured CPU paths on the CPU), same models, same synthetic batch, in one run.
"""
from __future__ import annotations

import statistics
import time

import torch

from fdfast.config import Config
from fdfast.distributed import DistInfo
from fdfast.train import build_optimizer, build_parts

# (name, teacher timm name, teacher kwargs, student size, patch, img, batch)
SHAPES_CPU = [("vit-ti/16 <- vit-s/16 @112", "vit_small_patch16_224", 112, "tiny", 16, 8)]
SHAPES_CUDA = [("vit-b/16 <- vit-b/16 @224", "vit_base_patch16_224", 224, "base", 16, 128),
               ("vit-s/16 <- vit-s/16 @224", "vit_small_patch16_224", 224, "small", 16, 256)]


def step_time(cfg: Config, device: torch.device, repeats: int) -> tuple[list[float], float | None]:
    info = DistInfo(device=device)
    torch.manual_seed(0)
    distiller, loader = build_parts(cfg, info)
    optimizer, _ = build_optimizer(distiller, cfg, cfg.data.batch_size, device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    images = next(loader).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 2):  # two warm-up steps
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = distiller(images)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    loader.close()
    return times, peak


def run(ctx) -> None:
    device = torch.device(ctx.device)
    shapes = SHAPES_CUDA if ctx.device == "cuda" else SHAPES_CPU
    repeats = 3 if ctx.quick else 10
    for name, teacher, img, size, patch, batch in shapes:
        results = {}
        for provider, backend in (("reference", "reference"), ("fdfast", "auto")):
            cfg = Config.from_dict({
                "model": {"size": size, "patch_size": patch, "img_size": img, "attention": backend},
                "teacher": {"name": teacher, "weights": "random"},
                "data": {"loader": "synthetic", "batch_size": batch},
                "loss": {"backend": backend}, "runtime": {"device": ctx.device}})
            times, peak = step_time(cfg, device, repeats)
            med = statistics.median(times)
            results[provider] = med
            ctx.record(shape=name, provider=provider, batch=batch, step_ms=med * 1e3,
                       img_per_s=batch / med, peak_mib=peak,
                       speedup_vs_reference=(results["reference"] / med) if "reference" in results else None)
