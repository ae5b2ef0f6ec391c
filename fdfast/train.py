"""`fdfast train`: the Feature Distillation loop, readable top to bottom.

    images -> frozen teacher -> target tokens ; images -> student -> projection ; loss = whitened smooth-L1
    AdamW (no decay on 1-D params / tokens / position tables), cosine lr per step with warmup, grad clip,
    grad accumulation, AMP (bf16; fp16 + GradScaler on CUDA), atomic checkpoints with exact resume.

`train_step()` is one optimizer step; `train()` around it only sets up, logs, checkpoints and handles signals.
Everything that can be wrong with the input (config, teacher weights, data folder) is checked before the
run directory is touched, so a failed start never overwrites what a previous run wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from fdfast import checkpoint as ckpt
from fdfast import distributed, hostmem, signals
from fdfast.config import Config, add_run_arguments, config_from_cli, load_config, validate
from fdfast.data import build_fd_loader, write_summary
from fdfast.errors import FDFastError
from fdfast.io import run_dir_lock

if TYPE_CHECKING:
    from fdfast.distill import FeatureDistiller


# ----------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    loss: float  # mean over the micro-batches and ranks; not finite when the update was skipped
    grad_norm: float | None  # total gradient norm before clipping; None: update skipped (non-finite loss)
    images: int  # images this step consumed, all ranks together
    stop: bool = False  # a rank got SIGINT / SIGTERM: every rank stops after this step (one collective decision)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
               batches: Iterator[torch.Tensor], step: int, *, info: distributed.DistInfo, accum_steps: int = 1,
               clip_grad: float | None = None, autocast: Callable[[], Any] = contextlib.nullcontext,
               stop: signals.StopRequest | None = None) -> StepResult:
    """One optimizer step: accum_steps micro-batches -> gradients -> skip if non-finite -> unscale, clip -> update.

    ``model(images)`` is the scalar loss of a micro-batch (the FeatureDistiller, maybe DDP- or FSDP2-wrapped: only
    the last micro-batch reduces gradients); ``batches`` yields images [B, 3, H, W], moved to ``info.device`` (rank,
    world size, device; ``DistInfo()`` is a world of one on the CPU). Every rank takes the same skip
    decision (the loss is averaged over ranks first), and the same stop decision: ``result.stop`` is true on
    every rank when any rank's ``stop`` request was set by then. ``scheduler.step_update(step)`` sets the lr
    of the next step, after a skipped update too, so the schedule follows the step count.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum, images = 0.0, 0
    for micro in range(accum_steps):
        x = next(batches).to(info.device, non_blocking=True)
        # DDP's no_sync / FSDP2's set_requires_gradient_sync: gradients are reduced on the last micro-batch only
        with distributed.gradient_sync(model, sync=micro == accum_steps - 1):  # forward AND backward inside
            with autocast():
                loss = model(x) / accum_steps
            scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach().double()  # fp64 on the device: one host sync per step, not per micro
        images += x.shape[0] * info.world_size
    loss, stopping = signals.all_reduce_step(float(loss_sum), stop is not None and stop.requested, info)
    if not math.isfinite(loss):
        scheduler.step_update(step)
        return StepResult(loss, None, images, stopping)
    scaler.unscale_(optimizer)
    # the optimizer's parameters are the trainable ones (model.parameters() walks the frozen teacher's modules too:
    # 2.9 -> 2.35 ms per demo step)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step_update(step)
    return StepResult(loss, float(grad_norm), images, stopping)


# ----------------------------------------------------------------------------- parts
def cpu_flags() -> dict:
    """What this CPU offers for bf16 math, as torch sees it (for the precision choice, summary.json, benches)."""
    from fdfast.kernels.utils import cpu_bf16_features
    return {"capability": torch.backends.cpu.get_cpu_capability(), **cpu_bf16_features(),
            "threads": torch.get_num_threads()}


def native_bf16(device: torch.device) -> bool:
    """bf16 runs at the hardware's full matmul rate: CUDA, or a CPU with AMX tiles or AVX512-BF16 (measured on
    AVX512-BF16, 1 core: bf16 linear 4x the fp32 rate; the demo step 2.6x faster)."""
    if device.type == "cuda":
        return True
    flags = cpu_flags()
    return flags["amx"] or flags["avx512_bf16"]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). auto: bf16 where it runs natively (``native_bf16``), else fp32."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise FDFastError("runtime.precision=fp16 needs CUDA (a GradScaler); on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_summary(setting: str, amp_dtype: torch.dtype | None, device: torch.device) -> dict:
    """What runs and why, as printed at start and written to summary.json."""
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    if setting != "auto":
        why = f"runtime.precision={setting}"
    elif device.type == "cuda":
        why = "auto: CUDA"
    else:
        flags = cpu_flags()
        has = "AMX" if flags["amx"] else "AVX512-BF16" if flags["avx512_bf16"] else "no native bf16"
        why = f"auto: this CPU has {has}"
    if amp_dtype is not None:
        why += "; --set runtime.precision=fp32 for full fp32"
    out = {"precision": name, "why": why}
    if device.type == "cpu":
        from fdfast.kernels.cpu_linear import packed_linear_available
        out["cpu"] = cpu_flags()
        out["teacher_linear"] = ("oneDNN-packed bf16 (packed once, bias and GELU in the GEMM)"
                                 if amp_dtype == torch.bfloat16 and packed_linear_available() else "F.linear")
    return out


def build_distiller(cfg: Config, device: torch.device) -> FeatureDistiller:
    """Teacher + student (fast attention patched in) + projection on `device`; checks the teacher's weights."""
    from fdfast.attention import FAST_ATTENTION, patch_model
    from fdfast.distill import FeatureDistiller, teacher_from_config  # imports the Triton kernels: only when training
    from fdfast.fastpath import fuse_residuals, pack_linears
    from fdfast.models.student import build_student

    teacher = teacher_from_config(cfg)  # loss.target=embedding keeps its head; teacher.drop_path
    student = patch_model(build_student(cfg.model), backend=cfg.model.attention)
    fuse_residuals(student)  # layer scale + drop path + residual add as one op per branch (same math, same RNG)
    if any(type(m) in FAST_ATTENTION for m in teacher.modules()):  # the teacher's timm attention, when fdfast has it
        patch_model(teacher)  # auto: on the CPU in bf16 2x faster than SDPA's flash kernel at 65-197 tokens
    if device.type == "cpu":  # the frozen teacher's bf16 linears on weights packed once (F.linear where that can't run)
        pack_linears(teacher)
    return FeatureDistiller(student, teacher, cfg.loss, cfg.teacher.align).to(device)


def build_optimizer(distiller: FeatureDistiller, cfg: Config, global_batch: int, device: torch.device):
    """AdamW with the paper's no-decay rules; lrs scaled by global_batch / lr_batch_ref."""
    from timm.optim import param_groups_weight_decay
    from timm.scheduler import CosineLRScheduler

    o = cfg.optim
    scale = global_batch / o.lr_batch_ref
    student = distiller.student
    skip = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    groups = param_groups_weight_decay(student, o.weight_decay, skip)
    groups += param_groups_weight_decay(distiller.fd_loss, o.weight_decay)  # proj weight decays, bias not
    # fused AdamW: one kernel over all tensors (CPU, 5.5M params: 3.9 ms vs 11.8 ms for the default loop)
    fused = device.type in ("cuda", "cpu") if o.fused == "auto" else o.fused == "true"
    optimizer = torch.optim.AdamW(groups, lr=o.base_lr * scale, betas=o.betas, fused=fused or None)
    scheduler = CosineLRScheduler(optimizer, t_initial=o.steps, lr_min=o.min_lr * scale,
                                  warmup_t=o.warmup_steps, warmup_lr_init=o.warmup_lr * scale, t_in_epochs=False)
    return optimizer, scheduler


@dataclass
class Parts:
    """What a run trains and checkpoints; built (and the user's input checked) before any file is written."""
    distiller: FeatureDistiller  # the trainable state lives here (student + projection)
    model: nn.Module  # the distiller as the step calls it: DDP-wrapped, or sharded in place by FSDP2
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm CosineLRScheduler, stepped per optimizer step
    scaler: torch.amp.GradScaler  # active for fp16 only
    loader: Any  # fdfast.data loader: an infinite iterator of image batches with state_dict()
    saver: Any = None  # ckpt.ShardedSaver when checkpoints are DCP; set by train() once the run dir is locked


def build_parts(cfg: Config, info: distributed.DistInfo, amp_dtype: torch.dtype | None) -> Parts:
    torch.manual_seed(cfg.runtime.seed)  # the same initial student on every rank (FSDP shards it as is)
    distiller = build_distiller(cfg, info.device)
    if amp_dtype is not None:  # the frozen teacher's weights once in the compute dtype, not cast every step
        distiller.set_teacher_dtype(amp_dtype)
    teacher = distiller.teacher
    loader = build_fd_loader(cfg.data, image_size=cfg.model.img_size, mean=teacher.mean, std=teacher.std,
                             batch_size=cfg.data.batch_size, device=info.device.type, rank=info.rank,
                             world_size=info.world_size, seed=cfg.runtime.seed)
    torch.manual_seed(cfg.runtime.seed + 1000003 * info.rank)  # per-rank drop path from here on
    model = distributed.parallelize(distiller, cfg.dist, info)  # before the optimizer: FSDP2 swaps in shards
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * info.world_size
    optimizer, scheduler = build_optimizer(distiller, cfg, global_batch, info.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Parts(distiller, model, optimizer, scheduler, scaler, loader)


def save_state(p: Parts, step: int, cfg: Config, out_dir: Path, info: distributed.DistInfo) -> dict | None:
    """Checkpoint step-N (a collective). Full format: rank 0 writes the gathered state and commits it; returns
    the full trainable tensors (rank 0). DCP (p.saver): every rank writes its shards, maybe in the background,
    committed by p.saver.wait(); returns None."""
    state = {"step": step, "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(),
             "loader": p.loader.state_dict(), "world_size": info.world_size, "config": cfg.to_dict(),
             "rng": distributed.all_gather_object(rng_state(info.device), info)}  # one stream per rank
    if p.saver is not None:
        p.saver.save(step, distributed.sharded_state(p.distiller, p.optimizer), state if info.is_main else None)
        return None
    tensors, state["optimizer"] = distributed.full_state(p.distiller, p.optimizer, info, cfg.dist.strategy)
    if info.is_main:
        ckpt.save_checkpoint(out_dir, step, tensors, state, _model_meta(cfg), cfg.ckpt.keep)
    return tensors


def load_state(p: Parts, path: Path, cfg: Config, info: distributed.DistInfo) -> int:
    """Inverse of save_state, for either format and any world size: every part continues where step-N left it
    (exactly, on the world size that saved it); returns N."""
    path, state = Path(path), ckpt.load_train_state(path)
    if ckpt.is_dcp(path):  # each rank reads the pieces of its own shards, whatever world size wrote them
        sharded = distributed.sharded_state(p.distiller, p.optimizer)
        ckpt.load_sharded(path, sharded)
        distributed.load_sharded_state(p.distiller, p.optimizer, sharded)
    else:
        tensors = ckpt.load_model_tensors(path)
        distributed.load_full_state(p.distiller, p.optimizer, tensors, state["optimizer"], info, cfg.dist.strategy)
    p.scheduler.load_state_dict(state["scheduler"])
    p.scaler.load_state_dict(state["scaler"])
    p.loader.load_state_dict(state["loader"])
    restore_rng(state["rng"], path, info)
    return int(state["step"])


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rng(saved: list[dict], path: Path, info: distributed.DistInfo) -> None:
    """Rank r takes the stream rank r saved (drop-path masks as if never interrupted); on another world size
    the ranks beyond the saved ones keep their fresh seeds, and rank 0 says so in one line."""
    if info.rank < len(saved):
        set_rng_state(saved[info.rank], info.device)
    if len(saved) != info.world_size and info.is_main:
        n, w = len(saved), info.world_size
        span = (lambda a, b: f"rank {a}" if a == b else f"ranks {a}-{b}")(min(n, w), max(n, w) - 1)
        lost = f"{span} start fresh RNG streams" if w > n else f"the RNG streams of {span} are dropped"
        print(f"fdfast train: {path.name} was saved by {n} rank{'s' * (n > 1)}, resumed on {w}: weights, optimizer "
              f"and schedule are restored, {lost}, so drop-path masks and the data order differ from an "
              f"uninterrupted run", file=sys.stderr, flush=True)


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


class CompileWhenItPays:
    """dist.compile: "true" compiled before step 1 (``distributed.parallelize``); "false" never; "auto" times the
    first eager steps, then compiles when the rest of the run repays it: steps left x step seconds x the saving
    expected on this device > the compile seconds expected. A compile that fails falls back to eager with one
    warning. ``summary()`` goes into summary.json.

    Measured (1 CPU core, AVX512-BF16, bf16, demo shape): compiled student blocks save ~1-2% of a step and a
    frozen compiled teacher ~0% (fdfast's eager paths already run the matmuls at the bf16 rate), while a cold
    compile costs 30-250 s there: so auto compiles only very long CPU runs. On CUDA the saving is an estimate.
    CPU steps are timed in process CPU seconds per thread, so other work on a shared machine does not inflate
    them (the compile estimate is a quiet machine's).
    """
    TIMED_STEPS = 3  # eager steps timed before deciding; the first one (warm-up) is dropped
    SAVING = {"cpu": 0.02, "cuda": 0.15}  # expected fraction of an eager step that compiling saves
    COMPILE_S = {"cpu": 60.0, "cuda": 60.0}  # expected seconds of a cold compile (student blocks + teacher)

    def __init__(self, setting: str, distiller: nn.Module, info: distributed.DistInfo, strategy: str,
                 announce: bool = False):
        self.setting, self.distiller, self.info, self.announce = setting, distiller, info, announce
        self.decision = {"true": "compiled before step 1", "false": "off"}.get(setting)
        if setting == "auto" and info.world_size > 1 and strategy == "fsdp":
            self.decision = "eager (FSDP2: set dist.compile=true to compile before sharding)"
        self.untried = setting == "true"  # compiled, but no step has run it yet
        self.step_s: list[float] = []
        self.compile_s: float | None = None

    def _clock(self) -> float:
        if self.info.device.type == "cpu":
            return time.process_time() / max(torch.get_num_threads(), 1)
        return time.perf_counter()  # the step ends in a host sync (the loss)

    def run(self, step_fn: Callable[[], StepResult], steps_left: int) -> StepResult:
        """One training step, timed; the first compiled one may fail in the compiler: then eager, one warning."""
        t0, wall0, first_compiled = self._clock(), time.perf_counter(), self.untried
        self.untried = False
        try:
            result = step_fn()
        except Exception as e:  # any compiler error (Dynamo, Inductor, the C++ toolchain); eager errors re-raise
            if not first_compiled:
                raise
            import warnings
            warnings.warn(f"dist.compile: compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"running eager", stacklevel=2)
            distributed.uncompile(self.distiller)
            self.decision = f"eager (compile failed: {type(e).__name__})"
            return step_fn()
        seconds = self._clock() - t0
        if first_compiled:  # wall seconds: Inductor compiles C++ in worker processes
            eager = statistics.median(self.step_s[1:]) if len(self.step_s) > 1 else 0.0
            self.compile_s = round(max(time.perf_counter() - wall0 - eager, 0.0), 1)
        elif self.decision is None:
            self.step_s.append(seconds)
            if len(self.step_s) >= self.TIMED_STEPS:
                self._decide(statistics.median(self.step_s[1:]), steps_left)
        return result

    def _decide(self, step_s: float, steps_left: int) -> None:
        kind = self.info.device.type
        saving, cost = self.SAVING.get(kind, 0.0), self.COMPILE_S.get(kind, 60.0)
        saved = steps_left * step_s * saving
        estimate = f"{steps_left} steps x {step_s:.2f} s x {saving:.0%} = {saved:.0f} s vs ~{cost:.0f} s to compile"
        if saved > cost:
            distributed.compile_distiller(self.distiller, self.info.device)
            self.untried, self.decision = True, f"compiled ({estimate})"
        else:
            self.decision = f"eager ({estimate})"
        if self.announce:
            print(f"fdfast train: dist.compile=auto -> {self.decision}", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        return {"setting": self.setting, "decision": self.decision, "compile_s": self.compile_s}


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict:
    """Run FD for cfg.optim.steps optimizer steps; returns the run summary (also in DIR/summary.json).
    Rank 0 holds the run directory's lock (fdfast.io.run_dir_lock) from start to end."""
    with contextlib.ExitStack() as lock:
        return _train(cfg, Path(out_dir), resume, lock)


def _train(cfg: Config, out_dir: Path, resume: str | None, lock: contextlib.ExitStack) -> dict:
    validate(cfg)
    o = cfg.optim
    info = distributed.init_distributed(cfg.runtime.device)
    amp_dtype = resolve_precision(cfg.runtime.precision, info.device)
    precision = precision_summary(cfg.runtime.precision, amp_dtype, info.device)
    malloc = hostmem.configure(cfg.runtime.malloc, info.device)  # before the parts allocate
    locked = info.is_main and out_dir.is_dir()  # an existing run: a second process stops here, before any work
    if locked:
        lock.enter_context(run_dir_lock(out_dir, "fdfast train"))
    # rank 0 verifies the checkpoint (reads every byte once) and tells the others which one it chose
    resume_from = ckpt.resolve_resume(out_dir, resume) if info.is_main else None
    resume_from = distributed.all_gather_object(resume_from, info)[0]
    # --resume auto on a run stopped before its first checkpoint starts it over: nothing committed, nothing lost
    restart = resume == "auto" and not ckpt.committed_steps(out_dir)
    if resume_from is None and info.is_main and _holds_a_run(out_dir) and not restart:
        raise FDFastError(_no_resume(out_dir, resume))
    p = build_parts(cfg, info, amp_dtype)
    start_step = 0 if resume_from is None else load_state(p, resume_from, cfg, info)

    # Input is valid: now the run directory may be written.
    if info.is_main and not locked:  # a new run dir: created and locked only now
        lock.enter_context(run_dir_lock(out_dir, "fdfast train"))
        if resume_from is None and _holds_a_run(out_dir):  # another process started a run here meanwhile
            raise FDFastError(_no_resume(out_dir, resume))
    if _checkpoint_format(cfg, info) == "dcp":
        p.saver = ckpt.ShardedSaver(out_dir, info.rank, info.world_size, cfg.ckpt.keep, cfg.ckpt.async_save)
    if info.is_main:  # printed once the run really starts, so a refused start stays one line
        print(f"fdfast train: precision {precision['precision']} ({precision['why']})", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())  # a kill mid-write leaves the old one
    metrics = MetricsLog(out_dir, start_step, cfg.runtime.tensorboard, info.is_main)
    progress = _progress(cfg, start_step, info.is_main)
    autocast = (lambda: torch.autocast(info.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    stop = signals.StopRequest("fdfast train", announce=info.is_main)  # SIGINT / SIGTERM: stop after a step
    compiler = CompileWhenItPays(cfg.dist.compile, p.distiller, info, cfg.dist.strategy, announce=info.is_main)
    p.distiller.train()
    t_run = t_log = time.perf_counter()
    images_since_log, bad_steps, done, loss_sum, loss_n, last_loss = 0, 0, start_step, 0.0, 0, None
    saved, r = start_step, None
    try:
        for step in range(start_step + 1, o.steps + 1):
            if r is not None and r.stop:  # all ranks agreed in the last step: commit it (once), then exit 130
                if saved != done:
                    save_state(p, done, cfg, out_dir, info)
                raise KeyboardInterrupt(f"stopped by {stop.name} after step {done} (committed)")
            r = compiler.run(lambda: train_step(p.model, p.optimizer, p.scheduler, p.scaler, p.loader, step,
                                                accum_steps=o.accum_steps, clip_grad=o.clip_grad, autocast=autocast,
                                                info=info, stop=stop), steps_left=o.steps - step)
            images_since_log, done = images_since_log + r.images, step
            if r.grad_norm is None:  # update skipped; a run that keeps diverging stops with its checkpoints intact
                bad_steps += 1
                if bad_steps >= 3:
                    raise FDFastError(f"loss is {r.loss} for 3 steps in a row (step {step}); last committed "
                                      f"checkpoint: {ckpt.latest_committed(out_dir)}; lower optim.base_lr or use "
                                      f"runtime.precision=bf16/fp32")
                continue
            bad_steps, loss_sum, loss_n = 0, loss_sum + r.loss, loss_n + 1

            if step % cfg.runtime.log_every == 0 or step == o.steps:
                now = time.perf_counter()
                row = {"step": step, "loss": loss_sum / loss_n,  # already averaged over ranks
                       "lr": p.optimizer.param_groups[0]["lr"], "img_per_s": images_since_log / (now - t_log),
                       "grad_norm": r.grad_norm, "elapsed_s": now - t_run}
                metrics.log(row)
                progress.update(step, row)
                last_loss = row["loss"]
                t_log, images_since_log, loss_sum, loss_n = now, 0, 0.0, 0
            if cfg.ckpt.every and step % cfg.ckpt.every == 0 and step != o.steps:
                save_state(p, step, cfg, out_dir, info)
                saved = step
    finally:
        if p.saver is not None:  # commit a DCP save still being written (after a stop or an error, too)
            p.saver.wait()
        stop.restore()
        progress.close()
        metrics.close()

    final_tensors = save_state(p, o.steps, cfg, out_dir, info)
    if p.saver is not None:  # DCP: commit the last step; the student file is gathered as in the full format
        p.saver.wait()
        final_tensors, _ = distributed.full_state(p.distiller, None, info, cfg.dist.strategy)
    wall = time.perf_counter() - t_run
    if info.is_main:
        student_state, _ = ckpt.split_trainable(final_tensors)
        ckpt.save_student(out_dir, student_state, _model_meta(cfg))  # + its size / CRC record (DIR/COMMITTED)
        summary = write_summary(out_dir, p.loader, o.steps - start_step, wall, final_loss=last_loss,
                                **precision, compile=compiler.summary(), malloc=malloc)
    else:
        summary = dict(p.loader.stats(), steps=o.steps - start_step, wall_s=wall, img_per_s=None)
    p.loader.close()
    distributed.shutdown()
    return summary


def _holds_a_run(out_dir: Path) -> bool:
    return any((out_dir / n).exists() for n in ("config.yaml", "checkpoints"))


def _no_resume(out_dir: Path, resume: str | None) -> str:
    if resume is None:
        return f"{out_dir} already holds a run; pass --resume auto to continue it, or choose a new --out"
    return f"{out_dir} holds a run but no intact committed checkpoint to resume from; choose a new --out"


def _checkpoint_format(cfg: Config, info: distributed.DistInfo) -> str:
    """ckpt.format auto: DCP when FSDP2 really shards (strategy fsdp on more than one rank), else full."""
    if cfg.ckpt.format != "auto":
        return cfg.ckpt.format
    return "dcp" if cfg.dist.strategy == "fsdp" and info.world_size > 1 else "full"


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
    add_run_arguments(p)
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> tuple[Config, Path]:
    return config_from_cli(args, FLAG_KEYS, Config, load_config, f"runs/{Path(args.recipe).stem}")


def run_cli(args: argparse.Namespace) -> int:
    cfg, out = config_from_args(args)
    summary = train(cfg, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fdfast train: {summary['steps']} steps in {summary['wall_s']:.0f}s "
              f"({summary['img_per_s'] or 0:.1f} img/s) -> {out / 'student.safetensors'}")
    return 0
