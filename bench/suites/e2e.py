"""End-to-end FD step (teacher forward + student forward/backward + loss + AdamW): img/s and peak memory.

CPU (issue 11): fdfast with its DEFAULTS against honest plain-PyTorch baselines written here without any fdfast
code -- a timm teacher, a timm Beit student with one shared relative position bias, ``F.layer_norm`` +
``F.smooth_l1_loss`` on a linear projection, ``torch.optim.AdamW`` -- in four settings (eager / compiled x fp32 /
bf16 autocast). fdfast's row IS ``fdfast train`` minus its files: the CLI's process settings
(``runtime.apply``: glibc keeps freed memory), the one builder (``fdfast.run.build_fd_run``) and the one loop
(``fdfast.train.fit``, which calls back after each step), deciding precision and compilation as for a run of
RUN_STEPS steps.

Process-wide settings must not leak from one provider to another, so each group runs in its own process,
started fresh: the four baselines (glibc's default malloc, as a plain user has it; the process never imports
fdfast), fdfast, and one reference baseline -- "timm compiled bf16" with the same malloc settings fdfast makes,
given the plain way (``GLIBC_TUNABLES``) -- that shows how much of fdfast's lead the allocator alone explains.
The parent still times them interleaved (one step of each provider per round, in turn; the others wait on a
pipe), so a machine shared with other work slows them alike; the table gives the median step, the ratio to the
best of the four baselines, and the ratio to the reference.

CUDA (issue 12): "reference" (plain-PyTorch attention and loss) vs "fdfast" (Triton kernels), same models.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fdfast.config import Config

# (name, teacher timm name, img, student size, patch, batch)
SHAPES_CPU = [("demo: dinov2-s/14 -> vit-ti/14 @112", "vit_small_patch14_dinov2", 112, "tiny", 14, 32),
              ("vit-ti/16 -> vit-ti/16 @224", "vit_tiny_patch16_224", 224, "tiny", 16, 16)]
# --quick (a dry run proving the suite runs): fdfast and the eager baselines, at a shape that steps in seconds
SHAPE_CPU_QUICK = ("quick: vit-ti/16 -> vit-ti/16 @64", "vit_tiny_patch16_224", 64, "tiny", 16, 8)
SHAPES_CUDA = [("vit-b/16 <- vit-b/16 @224", "vit_base_patch16_224", 224, "base", 16, 128),
               ("vit-s/16 <- vit-s/16 @224", "vit_small_patch16_224", 224, "small", 16, 256)]
RUN_STEPS = 300  # the run length fdfast's auto settings plan for (the demo's)
STUDENT_WIDTH = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # (width, heads), depth 12
BASELINES = [(f"timm {'compiled' if c else 'eager'} {'bf16' if b else 'fp32'}", c, b)
             for c in (False, True) for b in (False, True)]
# the reference: the best plain setting with fdfast's malloc settings (fdfast.hostmem), set as a user would
TUNED = "timm compiled bf16 + GLIBC_TUNABLES malloc"
TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


# ----------------------------------------------------------------------------- plain timm (no fdfast code)
def plain_step(teacher_name: str, img: int, size: str, patch: int, compiled: bool, bf16: bool):
    """One FD optimizer step as a user writes it with timm + torch alone; returns step()."""
    import timm
    from timm.models.beit import Beit

    teacher = timm.create_model(teacher_name, pretrained=False, img_size=img, num_classes=0).eval()
    teacher.requires_grad_(False)
    width, heads = STUDENT_WIDTH[size]
    student = Beit(img_size=img, patch_size=patch, embed_dim=width, depth=12, num_heads=heads, qkv_bias=True,
                   init_values=0.1, drop_path_rate=0.1, num_classes=0, use_abs_pos_emb=False,
                   use_shared_rel_pos_bias=True)
    proj = torch.nn.Linear(width, teacher.num_features)
    params = list(student.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def loss_fn(x):
        with torch.no_grad():
            target = teacher.forward_features(x)
        pred = proj(student.forward_features(x))
        target = F.layer_norm(target.float(), target.shape[-1:], eps=1e-5)
        return F.smooth_l1_loss(pred.float(), target, beta=2.0)

    if compiled:
        loss_fn = torch.compile(loss_fn)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(x):
        with autocast():
            loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()
    return step


# ----------------------------------------------------------------------------- fdfast, defaults
def fdfast_config(teacher_name: str, img: int, size: str, patch: int, batch: int, device: str) -> "Config":
    """The run ``fdfast train`` makes of this shape with default settings (precision, compile and malloc auto,
    fused AdamW), on fdfast's synthetic loader (random teacher weights: the speed is the same)."""
    from fdfast.config import Config
    return Config.from_dict({
        "model": {"size": size, "patch_size": patch, "img_size": img},
        "teacher": {"name": teacher_name, "weights": "random"},
        "data": {"loader": "synthetic", "batch_size": batch},
        "optim": {"steps": RUN_STEPS}, "runtime": {"device": device, "progress": False, "tensorboard": False}})


class _Stop(Exception):
    """The parent has timed enough steps: leave the loop."""


def _fdfast_worker(conn, shape: tuple) -> None:
    """fdfast exactly as ``fdfast train`` runs: the CLI's process settings (``runtime.apply``), the one builder
    (``build_fd_run``) and the one loop (``fit``) without file output. The loop calls back after every step:
    the first ones are auto-compile's timed eager steps (and its compile, when it decides so); then each
    callback reports the step just taken and waits for the parent's next request."""
    from fdfast import runtime
    from fdfast.run import build_fd_run
    from fdfast.train import RunDir, fit
    name, teacher, img, size, patch, batch = shape
    t0 = time.perf_counter()
    cfg = fdfast_config(teacher, img, size, patch, batch, "cpu")
    runtime.apply(cfg.runtime)
    rt = runtime.resolve(cfg.runtime)
    run = build_fd_run(cfg, rt)
    clock = {}

    def on_step(result) -> None:
        if run.compiler.decision is None or run.compiler.untried:
            return  # warm-up: auto-compile is still timing (or compiling)
        if not clock:  # warm: tell the parent what runs and how long setting it up took
            conn.send(({"fdfast default": time.perf_counter() - t0},
                       {"precision": rt.precision["precision"], "compile": run.compiler.summary(),
                        "fused_adamw": bool(run.optimizer.defaults.get("fused")), "malloc": rt.malloc}))
        else:
            conn.send((time.perf_counter() - clock["wall"], time.process_time() - clock["cpu"]))
        if conn.recv() is None:
            raise _Stop
        clock.update(wall=time.perf_counter(), cpu=time.process_time())

    with RunDir(None, None, rt.info, "fdfast train") as run_dir:
        try:
            fit(run, run_dir, on_step=on_step)
        except _Stop:
            pass
    run.loader.close()
    conn.close()


def _providers(group: str, shape: tuple, compiled: bool) -> tuple[dict, dict]:
    """({name: step(x)}, {name: setup seconds}) of a plain-timm group; ``compiled=False``: eager baselines only."""
    name, teacher, img, size, patch, batch = shape
    steps, setup = {}, {}
    chosen = [b for b in BASELINES if compiled or not b[1]] if group == "timm" else [(TUNED, True, True)]
    for label, compiled, bf16 in chosen:
        t0 = time.perf_counter()
        steps[label] = plain_step(teacher, img, size, patch, compiled, bf16)
        steps[label](torch.randn(batch, 3, img, img))  # the first call compiles
        setup[label] = time.perf_counter() - t0
    return steps, setup


def _worker(conn, group: str, shape: tuple, compiled: bool) -> None:
    """One provider group in its own process: build, report ready, then time one step per request."""
    torch.manual_seed(0)
    if group == "fdfast":
        return _fdfast_worker(conn, shape)
    x = torch.randn(shape[-1], 3, shape[2], shape[2])
    steps, setup = _providers(group, shape, compiled)
    conn.send((setup, None))
    while (name := conn.recv()) is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        steps[name](x)
        conn.send((time.perf_counter() - t0, time.process_time() - c0))
    conn.close()


def _start(ctx, group: str, shape: tuple, env: dict, compiled: bool):
    """A fresh process for ``group`` with ``env`` added to its environment (read by glibc at start)."""
    parent, child = ctx.Pipe()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = ctx.Process(target=_worker, args=(child, group, shape, compiled), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    child.close()
    return proc, parent


def time_interleaved(shape: tuple, repeats: int, warmup: int, compiled: bool = True) -> tuple[dict, dict, dict, dict]:
    """({name: [wall s]}, {name: [process CPU s]}, {name: setup s}, fdfast's settings): one step of each
    provider per round, each group in its own process, warm-up rounds dropped. ``compiled=False`` (--quick, a
    proof that the suite runs): the eager baselines only, no torch.compile."""
    ctx = multiprocessing.get_context("spawn")
    groups = {"timm": {}, "fdfast": {}, "tuned": {"GLIBC_TUNABLES": TUNABLES}}
    if not compiled:
        del groups["tuned"]
    workers, setup, settings = {}, {}, None
    try:
        for group, env in groups.items():  # one at a time: a build (compile) does not overlap another's
            workers[group] = _start(ctx, group, shape, env, compiled)
            got_setup, got_settings = workers[group][1].recv()
            setup.update({name: (group, s) for name, s in got_setup.items()})
            settings = settings or got_settings
        wall, cpu = {name: [] for name in setup}, {name: [] for name in setup}
        for i in range(warmup + repeats):
            for name, (group, _) in setup.items():
                conn = workers[group][1]
                conn.send(name)
                w, c = conn.recv()
                if i >= warmup:
                    wall[name].append(w)
                    cpu[name].append(c)
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return wall, cpu, {name: s for name, (_, s) in setup.items()}, settings


def run_cpu(ctx) -> None:
    from fdfast.runtime import cpu_flags
    repeats, warmup = (3, 1) if ctx.quick else (8, 2)
    shapes = [SHAPE_CPU_QUICK] if ctx.quick else SHAPES_CPU
    flags = " ".join(f"{k}={v}" for k, v in cpu_flags().items())
    for shape in shapes:
        wall, cpu, setup, settings = time_interleaved(shape, repeats, warmup, compiled=not ctx.quick)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        plain = [label for label, _, _ in BASELINES if label in med]
        best = min(plain, key=med.get)
        best_cpu = min(plain, key=med_cpu.get)
        for provider, m in med.items():
            ctx.record(shape=shape[0], provider=provider, batch=shape[-1], step_ms=m * 1e3, img_per_s=shape[-1] / m,
                       vs_best_baseline=med[best] / m, best_baseline=best, vs_tuned_malloc_baseline=med[TUNED] / m if TUNED in med else None,
                       cpu_step_ms=med_cpu[provider] * 1e3, cpu_vs_best_baseline=med_cpu[best_cpu] / med_cpu[provider],
                       setup_s=setup[provider], steps_timed=len(wall[provider]), own_process=True,
                       fdfast_settings=settings if provider == "fdfast default" else None, cpu_flags=flags)


# ----------------------------------------------------------------------------- CUDA: reference vs fdfast kernels
H200_BF16_DENSE_FLOPS = 989e12  # the peak MFU is quoted against (dense bf16 tensor cores)


def step_time(cfg: Config, device: torch.device, repeats: int) -> tuple[list[float], float | None, float]:
    """(seconds per timed step, peak MiB, FLOPs of one step counted by torch's FlopCounterMode on the first
    warm-up step: exact for the reference provider; Triton kernels are invisible to the counter). The run is
    ``fdfast train``'s (``build_fd_run``: bf16 autocast on CUDA, the teacher stored in bf16) stepped by its
    ``train_step`` on one batch repeated."""
    import itertools

    from torch.utils.flop_counter import FlopCounterMode

    from fdfast.distributed import DistInfo
    from fdfast.run import build_fd_run
    from fdfast.runtime import Runtime, resolve_precision
    from fdfast.step import train_step
    torch.manual_seed(0)
    run = build_fd_run(cfg, Runtime(DistInfo(device=device), resolve_precision(cfg.runtime.precision, device)))
    batches = itertools.repeat(next(run.loader).to(device))
    run.task.train()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = FlopCounterMode(display=False)
    for i in range(repeats + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with counter if i == 0 else contextlib.nullcontext():
            train_step(run, batches, i + 1)  # ends in its one host sync
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    run.loader.close()
    return times, peak, counter.get_total_flops()


def run(ctx) -> None:
    if ctx.device != "cuda":
        return run_cpu(ctx)
    from fdfast.config import Config
    device = torch.device(ctx.device)
    repeats = 3 if ctx.quick else 10
    for name, teacher, img, size, patch, batch in SHAPES_CUDA[:1] if ctx.quick else SHAPES_CUDA:
        results, flops = {}, None
        for provider, backend in (("reference", "reference"), ("fdfast", "auto")):
            cfg = Config.from_dict({
                "model": {"size": size, "patch_size": patch, "img_size": img, "attention": backend},
                "teacher": {"name": teacher, "weights": "random"},
                "data": {"loader": "synthetic", "batch_size": batch},
                "loss": {"backend": backend}, "runtime": {"device": ctx.device}})
            times, peak, counted = step_time(cfg, device, repeats)
            flops = flops or counted  # the reference's count: the same math, all of it visible to the counter
            med = statistics.median(times)
            results[provider] = med
            ctx.record(shape=name, provider=provider, batch=batch, step_ms=med * 1e3,
                       img_per_s=batch / med, peak_mib=peak, step_tflop=flops / 1e12,
                       mfu_vs_h200_bf16=flops / med / H200_BF16_DENSE_FLOPS,
                       speedup_vs_reference=(results["reference"] / med) if "reference" in results else None)
