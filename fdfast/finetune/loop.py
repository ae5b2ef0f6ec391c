"""The fine-tuning loop: epochs of timm-recipe training, top-1/top-5 on the val split after each, best/last saved.

    images -> Mixup/CutMix -> model (drop path) -> SoftTargetCrossEntropy (label smoothing inside Mixup)
    AdamW with layer-wise lr decay (timm param_groups_layer_decay: the scale lives in each group's lr_scale and
    timm's scheduler applies it once), cosine per step with warmup, AMP, grad clipping, optional ModelEmaV3.

Everything that can be wrong with the input (config, data folders, MODEL, image size) is checked before the run
directory is touched. The last epoch is a committed checkpoint (fdfast.checkpoint: atomic, COMMITTED marker);
``--resume auto`` continues from it exactly: every epoch reseeds all RNGs from (seed, epoch).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fdfast import checkpoint as ckpt
from fdfast import hostmem
from fdfast.errors import FDFastError
from fdfast.finetune.config import FinetuneConfig, validate
from fdfast.finetune.data import Splits, build_transforms, eval_loader, load_splits, train_loader
from fdfast.finetune.model import Classifier, build_classifier, classifier_metadata, resolve_model
from fdfast.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, run_dir_lock

EPOCH_SEED = 1_000_003  # mixes the epoch into the run seed


@dataclass
class Parts:
    clf: Classifier
    splits: Splits
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    mixup: object | None
    criterion: nn.Module
    ema: object | None
    steps_per_epoch: int


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, steps_per_epoch: int):
    """AdamW over layer-decay groups (no decay on 1-D params / tokens / tables) + per-step cosine with warmup."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    o = cfg.optim
    scale = cfg.data.batch_size / o.lr_batch_ref
    optimizer = create_optimizer_v2(model, "adamw", lr=o.base_lr * scale, weight_decay=o.weight_decay,
                                    layer_decay=cfg.model.layer_decay, betas=tuple(o.betas))
    total = o.epochs * steps_per_epoch
    warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=o.min_lr * scale, warmup_t=warmup,
                                  warmup_lr_init=o.warmup_lr * scale, warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


def build_loss(cfg: FinetuneConfig, num_classes: int):
    """(Mixup or None, criterion): soft targets with Mixup/CutMix, label-smoothed CE without."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    d = cfg.data
    if d.mixup > 0 or d.cutmix > 0:
        mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=1.0, switch_prob=d.mixup_switch_prob,
                      mode="batch", label_smoothing=d.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if d.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=d.label_smoothing)
    return None, nn.CrossEntropyLoss()


def build_parts(cfg: FinetuneConfig, model_spec: str, device: torch.device) -> Parts:
    """Data, classifier, optimizer, schedule, loss: everything that checks user input."""
    d = cfg.data
    splits = load_splits(d.path, d.val_path, d.check, d.train_per_class, d.val_per_class)
    torch.manual_seed(cfg.runtime.seed)  # the head init
    backbone = resolve_model(model_spec, cfg.data.img_size, cfg.model.kwargs)
    clf = build_classifier(backbone, len(splits.classes), cfg.data.img_size, cfg.model.drop_path,
                           cfg.model.head_init_scale)
    clf.model.to(device)
    steps_per_epoch = -(-len(splits.train) // cfg.data.batch_size)
    optimizer, scheduler = build_optimizer(clf.model, cfg, steps_per_epoch)
    mixup, criterion = build_loss(cfg, len(splits.classes))
    ema = None
    if cfg.optim.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(clf.model, decay=cfg.optim.ema_decay)
    from fdfast.train import resolve_precision
    scaler = torch.amp.GradScaler("cuda", enabled=resolve_precision(cfg.runtime.precision, device) == torch.float16)
    return Parts(clf, splits, optimizer, scheduler, scaler, mixup, criterion, ema, steps_per_epoch)


def seed_epoch(seed: int, epoch: int) -> None:
    """All RNGs of this process from (seed, epoch): Mixup (NumPy), drop path (torch), anything using random."""
    s = (seed * EPOCH_SEED + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def train_one_epoch(p: Parts, cfg: FinetuneConfig, epoch: int, device, autocast, progress) -> dict:
    """One pass over the training split; returns {"train_loss", "lr", "img_per_s"}."""
    model = p.clf.model.train()
    train_tf, _ = build_transforms(cfg.data, p.clf.img_size, p.clf.mean, p.clf.std)
    loader = train_loader(p.splits.train, train_tf, cfg.data.batch_size, epoch, cfg.data.seed, cfg.data.num_workers)
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    for i, (x, y) in enumerate(loader):
        step = epoch * p.steps_per_epoch + i
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if p.mixup is not None:
            x, y = p.mixup(x, y)
        with autocast():
            loss = p.criterion(model(x), y)
        if not math.isfinite(loss.item()):
            raise FDFastError(f"fine-tuning loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; lower "
                              f"optim.base_lr or use runtime.precision=fp32 (last epoch committed: --resume auto)")
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()
        p.scaler.unscale_(p.optimizer)
        if cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.scheduler.step_update(step + 1)  # the lr of the next step
        if p.ema is not None:
            p.ema.update(model, step=step + 1)
        seen, loss_sum = seen + x.shape[0], loss_sum + loss.item()
        progress.step(loss.item())
    return {"train_loss": loss_sum / max(len(loader), 1), "lr": max(g["lr"] for g in p.optimizer.param_groups),
            "img_per_s": seen / (time.perf_counter() - t0)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device, autocast=contextlib.nullcontext) -> dict:
    """Top-1 / top-5 (%) and mean cross-entropy on a labelled loader (timm.utils.accuracy)."""
    from timm.utils import accuracy
    model.eval()
    n, top1, top5, loss = 0, 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x).float()
        k = min(5, out.shape[1])
        a1, a5 = accuracy(out, y, topk=(1, k))
        b = x.shape[0]
        n, top1, top5 = n + b, top1 + a1.item() * b, top5 + a5.item() * b
        loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
    return {"top1": top1 / n, "top5": top5 / n, "val_loss": loss / n}


# ----------------------------------------------------------------------------- checkpoints
def _meta(p: Parts) -> dict:
    return {"timm_model": p.clf.timm_name, "timm_kwargs": p.clf.timm_kwargs, "classes": p.splits.classes}


def save_last(p: Parts, cfg: FinetuneConfig, out_dir: Path, epoch: int, best: dict) -> None:
    tensors = {f"model.{k}": v for k, v in p.clf.model.state_dict().items()}
    if p.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in p.ema.module.state_dict().items()})
    state = {"epoch": epoch, "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
             "scaler": p.scaler.state_dict(), "best": dict(best), "config": cfg.to_dict()}
    ckpt.save_checkpoint(out_dir, epoch, tensors, state, _meta(p), keep=cfg.ckpt.keep)


def load_last(p: Parts, path: Path) -> tuple[int, dict]:
    """Restore model, EMA, optimizer, schedule, scaler; returns (epochs done, best so far)."""
    tensors, state = ckpt.load_checkpoint(path)
    if "epoch" not in state:
        raise FDFastError(f"--resume {path}: not a fine-tuning checkpoint (it has no epoch); resume it with fdfast train")
    p.clf.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    if p.ema is not None:
        p.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    p.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), dict(state["best"])


def save_model(p: Parts, path: Path, model: nn.Module, extra: dict) -> None:
    """A classifier file that is a timm export (``fdfast.load_student`` / knn / linprobe read it back)."""
    meta = classifier_metadata(p.clf, p.splits.classes)
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    atomic_save_safetensors(model.state_dict(), path, metadata=meta)


# ----------------------------------------------------------------------------- the loop
def finetune(cfg: FinetuneConfig, model_spec: str, out_dir: str | Path, resume: str | None = None) -> dict:
    """Fine-tune MODEL for cfg.optim.epochs; returns the summary (also DIR/summary.json)."""
    from fdfast.train import resolve_precision
    validate(cfg)
    out_dir = Path(out_dir)
    resume_from = ckpt.resolve_resume(out_dir, resume)
    if resume_from is None and any((out_dir / n).exists() for n in ("config.yaml", "checkpoints")):
        raise FDFastError(f"{out_dir} already holds a run; pass --resume auto to continue it, or choose a new --out")
    device = _device(cfg.runtime.device)
    amp_dtype = resolve_precision(cfg.runtime.precision, device)
    malloc = hostmem.configure(cfg.runtime.malloc, device)  # before the parts allocate
    p = build_parts(cfg, model_spec, device)
    start, best = (0, {"top1": -1.0, "top5": 0.0, "epoch": 0})
    if resume_from is not None:
        start, best = load_last(p, resume_from)

    # Input is valid: now the run directory may be written, by this process only.
    with run_dir_lock(out_dir, "fdfast finetune"):
        return _run(p, cfg, model_spec, out_dir, start, best, device, amp_dtype, malloc)


def _run(p: Parts, cfg: FinetuneConfig, model_spec: str, out_dir: Path, start: int, best: dict, device,
         amp_dtype, malloc: dict) -> dict:
    """Epochs start+1 .. cfg.optim.epochs: train, evaluate, log, keep the best, commit the last."""
    from fdfast.train import MetricsLog
    atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    atomic_write_json(out_dir / "model.json", {"model": model_spec, "source": p.clf.source, "classes": p.splits.classes,
                                               "img_size": p.clf.img_size, "mean": p.clf.mean, "std": p.clf.std,
                                               "train_images": len(p.splits.train), "val_images": len(p.splits.val)},
                      indent=1)
    metrics = MetricsLog(out_dir, start * p.steps_per_epoch, cfg.runtime.tensorboard, True)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    _, eval_tf = build_transforms(cfg.data, p.clf.img_size, p.clf.mean, p.clf.std)
    val = eval_loader(p.splits.val, eval_tf, cfg.data.batch_size, cfg.data.num_workers)
    progress = _Progress(cfg, start, p.steps_per_epoch)
    t_run = time.perf_counter()
    try:
        for epoch in range(start, cfg.optim.epochs):
            seed_epoch(cfg.runtime.seed, epoch)
            row = train_one_epoch(p, cfg, epoch, device, autocast, progress)
            row.update(evaluate_classifier(p.clf.model, val, device, autocast))
            if p.ema is not None:
                ema = evaluate_classifier(p.ema.module, val, device, autocast)
                row.update({"top1_ema": ema["top1"], "top5_ema": ema["top5"]})
            row = {"epoch": epoch + 1, "step": (epoch + 1) * p.steps_per_epoch, **row,
                   "elapsed_s": time.perf_counter() - t_run}
            metrics.log(row)  # before the commit: a resume drops rows past its checkpoint, never misses one
            if row["top1"] > best["top1"]:
                best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch + 1}
                save_model(p, out_dir / "best.safetensors", p.clf.model, {"fdfast_epoch": epoch + 1})
            save_last(p, cfg, out_dir, epoch + 1, best)  # after best: a resume never loses a better model
            progress.epoch_done(row)
    finally:
        progress.close()
        metrics.close()
    save_model(p, out_dir / "model.safetensors", p.clf.model, {"fdfast_epoch": cfg.optim.epochs})
    summary = {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"], "epochs": cfg.optim.epochs,
               "last_top1": _last(out_dir, "top1"), "wall_s": time.perf_counter() - t_run, "model": model_spec,
               "img_size": p.clf.img_size, "classes": len(p.splits.classes), "train_images": len(p.splits.train),
               "val_images": len(p.splits.val), "malloc": malloc}
    atomic_write_json(out_dir / "summary.json", summary, indent=1)
    return summary


def _last(out_dir: Path, key: str):
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return lines[-1].get(key) if lines else None


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FDFastError("runtime.device=cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


class _Progress:
    """tqdm bar per run (loss, ETA) on a terminal; one plain line per epoch otherwise (CI logs)."""

    def __init__(self, cfg: FinetuneConfig, start_epoch: int, steps_per_epoch: int):
        self.enabled, self.epochs = cfg.runtime.progress, cfg.optim.epochs
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
                            desc="finetune", unit="step", dynamic_ncols=True)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def epoch_done(self, row: dict) -> None:
        if not self.enabled:
            return
        line = (f"epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.3f}  top1 {row['top1']:.2f}  "
                f"top5 {row['top5']:.2f}  {row['img_per_s']:.1f} img/s  {row['elapsed_s']:.0f}s")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
