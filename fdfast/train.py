"""`fdfast train`: the Feature Distillation loop, readable top to bottom.

    images -> frozen teacher -> target tokens ; images -> student -> projection ; loss = whitened smooth-L1
    AdamW (no decay on 1-D params / tokens / position tables), cosine lr per step with warmup, grad clip,
    grad accumulation, AMP (bf16; fp16 + GradScaler on CUDA), atomic checkpoints with exact resume.

Everything that can be wrong with the input (config, teacher weights, data folder) is checked before the
run directory is touched, so a failed start never overwrites what a previous run wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from fdfast import checkpoint as ckpt
from fdfast import distributed
from fdfast.config import Config, apply_overrides, load_config, parse_override
from fdfast.data import build_fd_loader, write_summary
from fdfast.errors import FDFastError

if TYPE_CHECKING:
    from fdfast.distill import FeatureDistiller

CHOICES = {
    "runtime.precision": ("auto", "fp32", "bf16", "fp16"),
    "data.loader": ("auto", "dali", "torch", "synthetic"),
    "loss.backend": ("auto", "triton", "torch", "reference"),
    "model.attention": ("auto", "triton", "reference", "sdpa"),
    "teacher.align": ("bilinear", "area"),
    "optim.fused": ("auto", "true", "false"),
}


# ----------------------------------------------------------------------------- checks
def validate(cfg: Config) -> None:
    """Values a dataclass type cannot check; each error names the key and the fix."""
    o = cfg.optim
    if o.steps < 1:
        raise FDFastError(f"the step count must be >= 1, got {o.steps} (--steps N)")
    if o.warmup_steps < 0:
        raise FDFastError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.warmup_steps >= o.steps:  # e.g. --steps 20 on a recipe with 30 warmup steps
        warmup = o.steps // 10
        print(f"fdfast train: optim.warmup_steps={o.warmup_steps} >= steps={o.steps}; warming up over {warmup} "
              f"steps (10% of the run) instead", file=sys.stderr)
        o.warmup_steps = warmup
    for key, value in (("data.batch_size", cfg.data.batch_size), ("optim.accum_steps", o.accum_steps),
                       ("runtime.log_every", cfg.runtime.log_every)):
        if value < 1:
            raise FDFastError(f"{key} must be >= 1, got {value}")
    if o.base_lr <= 0:
        raise FDFastError(f"optim.base_lr must be > 0, got {o.base_lr}")
    if cfg.ckpt.every < 0 or cfg.ckpt.keep < 1:
        raise FDFastError(f"ckpt.every must be >= 0 and ckpt.keep >= 1, got {cfg.ckpt.every} / {cfg.ckpt.keep}")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = str(getattr(getattr(cfg, section), name)).lower()
        if value not in allowed:
            raise FDFastError(f"{key} must be one of {allowed}, got {value!r}")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise FDFastError("runtime.precision=fp16 needs CUDA (a GradScaler); on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------- parts
def build_optimizer(distiller: FeatureDistiller, cfg: Config, global_batch: int, device: torch.device):
    """AdamW with the paper's no-decay rules; lrs scaled by global_batch / lr_batch_ref."""
    from timm.optim import param_groups_weight_decay

    o = cfg.optim
    scale = global_batch / o.lr_batch_ref
    student = distiller.student
    skip = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    groups = param_groups_weight_decay(student, o.weight_decay, skip)
    groups += param_groups_weight_decay(distiller.fd_loss, o.weight_decay)  # proj weight decays, bias not
    fused = device.type == "cuda" if o.fused == "auto" else o.fused == "true"
    optimizer = torch.optim.AdamW(groups, lr=o.base_lr * scale, betas=o.betas, fused=fused or None)

    from timm.scheduler import CosineLRScheduler
    scheduler = CosineLRScheduler(optimizer, t_initial=o.steps, lr_min=o.min_lr * scale,
                                  warmup_t=o.warmup_steps, warmup_lr_init=o.warmup_lr * scale, t_in_epochs=False)
    return optimizer, scheduler


def build_parts(cfg: Config, info: distributed.DistInfo):
    """Teacher, student, distiller and data: everything that validates user input, before any file is written."""
    from fdfast.distill import FeatureDistiller  # imports the Triton kernels: only when training
    from fdfast.models.student import build_student
    from fdfast.models.teachers import build_teacher

    teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights, img_size=cfg.teacher.img_size or cfg.model.img_size,
                            **cfg.teacher.kwargs)
    student = build_student(cfg.model)
    try:
        from fdfast.attention import patch_model
    except ModuleNotFoundError:
        patch_model = None
    if patch_model is not None:
        patch_model(student, backend=cfg.model.attention)
    if cfg.dist.activation_checkpointing:
        distributed.apply_activation_checkpointing(student)
    if cfg.dist.compile:
        distributed.compile_blocks(student)
    distiller = FeatureDistiller(student, teacher, cfg.loss, cfg.teacher.align).to(info.device)
    loader = build_fd_loader(cfg.data, image_size=cfg.model.img_size, mean=teacher.mean, std=teacher.std,
                             batch_size=cfg.data.batch_size, device=info.device.type, rank=info.rank,
                             world_size=info.world_size, seed=cfg.runtime.seed)
    return distiller, loader


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard scalars, written by rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a crashed run logged after its last committed checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict:
    """Run FD for cfg.optim.steps optimizer steps; returns the run summary (also in DIR/summary.json)."""
    validate(cfg)
    out_dir = Path(out_dir)
    info = distributed.init_distributed(cfg.runtime.device)
    device = info.device
    amp_dtype = resolve_precision(cfg.runtime.precision, device)
    resume_from = ckpt.resolve_resume(out_dir, resume)
    if resume_from is None and info.is_main and any((out_dir / n).exists() for n in ("config.yaml", "checkpoints")):
        raise FDFastError(f"{out_dir} already holds a run; pass --resume auto to continue it, or choose a new --out")
    torch.manual_seed(cfg.runtime.seed)  # the same initial student on every rank (FSDP shards it as is)
    distiller, loader = build_parts(cfg, info)
    torch.manual_seed(cfg.runtime.seed + 1000003 * info.rank)  # per-rank drop path from here on
    o = cfg.optim
    global_batch = cfg.data.batch_size * o.accum_steps * info.world_size
    model = distributed.wrap_distributed(distiller, cfg.dist.strategy, info)  # before the optimizer: FSDP2
    optimizer, scheduler = build_optimizer(distiller, cfg, global_batch, device)  # swaps in sharded params
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_step = 0
    if resume_from is not None:
        tensors, state = ckpt.load_checkpoint(resume_from)
        distributed.load_full_state(distiller, optimizer, tensors, state["optimizer"], info, cfg.dist.strategy)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)], device)
        start_step = int(state["step"])

    # Input is valid: now the run directory may be written.
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics = MetricsLog(out_dir, start_step, cfg.runtime.tensorboard, info.is_main)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def save(step: int) -> dict:
        tensors, optim_state = distributed.full_state(distiller, optimizer, info, cfg.dist.strategy)
        state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng": [rng_state(device)],
                 "config": cfg.to_dict()}
        if info.is_main:
            ckpt.save_checkpoint(out_dir, step, tensors, state, _model_meta(cfg), cfg.ckpt.keep)
        return tensors

    progress = _progress(cfg, start_step, info.is_main)
    stop = _StopRequest()  # Ctrl-C / SIGTERM (preemption): finish the step, commit it, then stop
    distiller.train()
    t_run = t_log = time.perf_counter()
    images_since_log, bad_steps, done, loss_sum, loss_n, last_loss = 0, 0, start_step, 0.0, 0, None
    try:
        for step in range(start_step + 1, o.steps + 1):
            if stop.signum is not None:
                if done > start_step:
                    save(done)
                raise KeyboardInterrupt(f"stopped by signal {stop.signum} after step {done} (committed)")
            # one optimizer step = accum_steps micro-batches
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(o.accum_steps):
                images = next(loader).to(device, non_blocking=True)
                sync = micro == o.accum_steps - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                    loss = model(images) / o.accum_steps
                scaler.scale(loss).backward()
                step_loss += loss.item()
                images_since_log += images.shape[0] * info.world_size
            step_loss = distributed.all_reduce_mean(step_loss, info)  # every rank takes the same skip decision
            if not math.isfinite(step_loss):
                bad_steps += 1  # skip the update; a run that keeps diverging stops with its checkpoints intact
                if bad_steps >= 3:
                    last = ckpt.latest_committed(out_dir)
                    raise FDFastError(f"loss is {step_loss} for 3 steps in a row (step {step}); last committed "
                                      f"checkpoint: {last}; lower optim.base_lr or use runtime.precision=bf16/fp32")
                scheduler.step_update(step)
                done = step
                continue
            bad_steps = 0
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(distiller.parameters(), o.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(step)  # the lr for the NEXT step
            loss_sum, loss_n, done = loss_sum + step_loss, loss_n + 1, step

            if step % cfg.runtime.log_every == 0 or step == o.steps:
                now = time.perf_counter()
                row = {"step": step, "loss": loss_sum / loss_n,  # already averaged over ranks
                       "lr": optimizer.param_groups[0]["lr"], "img_per_s": images_since_log / (now - t_log),
                       "grad_norm": float(grad_norm), "elapsed_s": now - t_run}
                metrics.log(row)
                progress.update(step, row)
                last_loss = row["loss"]
                t_log, images_since_log, loss_sum, loss_n = now, 0, 0.0, 0
            if cfg.ckpt.every and step % cfg.ckpt.every == 0 and step != o.steps:
                save(step)
    finally:
        stop.restore()
        progress.close()
        metrics.close()

    final_tensors = save(o.steps)
    wall = time.perf_counter() - t_run
    if info.is_main:
        student_state, _ = ckpt.split_trainable(final_tensors)
        ckpt.atomic_save_safetensors(student_state, out_dir / "student.safetensors",
                                     metadata={ckpt.STUDENT_META_KEY: json.dumps(_model_meta(cfg))})
        summary = write_summary(out_dir, loader, o.steps - start_step, wall, final_loss=last_loss)
    else:
        summary = dict(loader.stats(), steps=o.steps - start_step, wall_s=wall, img_per_s=None)
    loader.close()
    distributed.shutdown()
    return summary


class _StopRequest:
    """The first SIGINT / SIGTERM only asks the loop to stop at the next step boundary (so no optimizer update
    is cut in half); a second one interrupts at once."""

    def __init__(self):
        import signal
        import threading
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"fdfast train: signal {signum}: stopping after this step (again to abort now)", file=sys.stderr)

    def restore(self) -> None:
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _model_meta(cfg: Config) -> dict:
    return cfg.to_dict()["model"]


class _progress:
    """tqdm bar (loss, lr, img/s, ETA) on a terminal; one plain line per logged step otherwise (CI logs)."""

    def __init__(self, cfg: Config, start: int, enabled: bool):
        self.enabled, self.total = enabled and cfg.runtime.progress, cfg.optim.steps
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=start, desc="fd", unit="step", dynamic_ncols=True)
        self.start = self.last = start

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.1f}")
        else:
            eta = row["elapsed_s"] / max(step - self.start, 1) * (self.total - step)
            print(f"step {step}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row['img_per_s']:.1f} img/s  {row['elapsed_s']:.0f}s  eta {eta:.0f}s", file=sys.stderr, flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- CLI
FLAG_KEYS = {"steps": "optim.steps", "data": "data.path", "teacher": "teacher.name",
             "teacher_weights": "teacher.weights", "batch_size": "data.batch_size", "device": "runtime.device"}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distill a teacher into a student (default recipe: the CPU demo)",
                              description="Feature Distillation training. RECIPE is a name from fdfast/recipes or a YAML file.")
    p.add_argument("recipe", nargs="?", default="demo", help="recipe name or YAML path (default: demo)")
    p.add_argument("--out", help="run directory (default: runs/<recipe>)")
    p.add_argument("--steps", type=int, help="optimizer steps of the whole run")
    p.add_argument("--data", help="image folder (class subfolders or flat)")
    p.add_argument("--teacher", help="teacher registry name or timm model name")
    p.add_argument("--teacher-weights", help="local teacher weights file")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resume", help="'auto' (newest committed checkpoint in --out) or a checkpoint path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> tuple[Config, Path]:
    overrides = dict(parse_override(s) for s in args.set)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    saved = out / "config.yaml"
    if args.resume and saved.is_file():  # continue the run as it was configured (+ explicit overrides)
        cfg = Config.from_dict(apply_overrides(yaml.safe_load(saved.read_text()), overrides))
    else:
        cfg = load_config(args.recipe, overrides)
    return cfg, out


def run_cli(args: argparse.Namespace) -> int:
    cfg, out = config_from_args(args)
    summary = train(cfg, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fdfast train: {summary['steps']} steps in {summary['wall_s']:.0f}s "
              f"({summary['img_per_s'] or 0:.1f} img/s) -> {out / 'student.safetensors'}")
    return 0
