"""`fdfast plan`: per-GPU memory, FLOPs, step time, largest batch and dist settings of an FD recipe, without a GPU.

The FD step (frozen teacher forward, student forward + backward, AdamW update) runs ONCE on fake tensors
(``FakeTensorMode``: shapes and dtypes, no data) built by the project's own builders on the meta device, so a
3-billion-parameter SwinV2-G costs no memory here. torch's own tools do the accounting:
- ``torch.distributed._tools.mem_tracker.MemTracker`` follows every storage the step allocates and frees, by
  category (parameters, gradients, optimizer states, activations, temporaries), and records the peak;
- ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs per module (teacher vs student).
What is divided by hand, and documented here: FSDP2 shards parameters, gradients and optimizer states evenly
over N GPUs (``fully_shard`` splits every tensor on dim 0), and holds one gathered unit at a time plus the
prefetched next one; the teacher is one FSDP unit, gathered whole for its forward (``distributed.wrap_distributed``).

The fake step runs on the CPU's ATen paths: attention through SDPA (the fused Triton kernel saves less: q, k,
v, out and the log-sum-exp, no [N, N] probabilities) and the loss through the reference path (the Triton loss
saves no [B, N, Ct] intermediates). Both only over-estimate; ``bench/plan_check.py`` measures the difference
on a GPU. Peaks are the allocator's ``max_memory_allocated``; the default budget (130 GiB of an H200's 140)
leaves room for the CUDA context, NCCL buffers and fragmentation.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fdfast.config import Config, load_config, parse_override
from fdfast.errors import FDFastError

GIB = 2 ** 30
PAPER_GLOBAL_BATCH = 2048  # METHOD.md: 2048 images per optimizer step
IMAGENET_TRAIN_IMAGES = 1_281_167  # one epoch (626 steps of 2048)
DEFAULT_MFU = 0.40  # model FLOPs utilisation assumed for the step time (no AC recompute counted)


@dataclass(frozen=True)
class GPU:
    """A target GPU: the dense tensor-core peak the step time assumes and its memory (GiB)."""
    name: str
    bf16_tflops: float  # dense, no 2:4 sparsity
    mem_gib: float  # what the device reports as total memory
    budget_gib: float  # default per-GPU budget for the plan (total minus context / NCCL / fragmentation)


# H200 and H100 SXM share the GH100 die: torch's datasheet (torch._inductor.analysis.device_info) lists
# H100 bf16 at 1979 TFLOP/s with sparsity = 989 dense. H200 reports ~140 GiB; A100 312 TFLOP/s bf16.
GPUS = {
    "h200": GPU("NVIDIA H200", 989.0, 140.0, 130.0),
    "h100": GPU("NVIDIA H100 80GB", 989.0, 79.2, 72.0),
    "a100": GPU("NVIDIA A100 80GB", 312.0, 79.2, 72.0),
}


# ----------------------------------------------------------------------------- the step both sides trace
def build_fd_parts(cfg: Config, device: str = "meta", planner_paths: bool = True, amp_dtype=None):
    """The FD distiller of a recipe, built by ``fdfast train``'s own builder (``fdfast.run.build_distiller``):
    the teacher stored in the run's compute dtype; ``device="meta"`` allocates nothing.

    The teacher is randomly initialised (its weights change no shape); attention runs on SDPA and the loss on
    the reference path: ATen ops that fake tensors can follow (the Triton kernels launch real programs, the
    row-chunked torch loss reads a scalar on the host). ``planner_paths=False``: the recipe's own backends.
    """
    from fdfast.run import build_distiller
    return build_distiller(cfg, torch.device(device), amp_dtype, weights="random", planning=planner_paths)


def make_optimizer(distiller: nn.Module, cfg: Config, fused: bool):
    """``fdfast train``'s AdamW (``fdfast.run.fd_optimizer``); fused as on CUDA (no foreach temporaries the size
    of all parameters)."""
    from fdfast.run import fd_optimizer
    optim_cfg = type(cfg.optim)(**{**asdict(cfg.optim), "fused": "true" if fused else "false"})
    return fd_optimizer(distiller, type(cfg)(**{**vars(cfg), "optim": optim_cfg}), PAPER_GLOBAL_BATCH,
                        torch.device("cpu"))[0]


def set_activation_checkpointing(task: nn.Module, on: bool) -> None:
    task.trained_model().set_grad_checkpointing(on)  # timm's switch, as distributed.apply_activation_checkpointing


def fd_step(task: nn.Module, optimizer, batch, amp_dtype: torch.dtype | None) -> None:
    """One optimizer step as ``fdfast train`` / ``finetune`` take it: ``task(batch)`` is the loss (no
    accumulation, no clipping: neither holds memory)."""
    images = batch[0] if isinstance(batch, tuple) else batch
    autocast = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with autocast:
        loss = task(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _inputs(batch: int, img_size: int, num_classes: int | None, device="cpu"):
    """The step's input: images [B, 3, S, S] (FD), or (images, labels [B]) for a classifier of num_classes."""
    images = torch.empty(batch, 3, img_size, img_size, device=device)
    return images if num_classes is None else (images, torch.zeros(batch, dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------- memory on fake tensors
class _NoHook:
    def remove(self) -> None:
        pass


@functools.cache
def _tracker_class():
    """MemTracker for one FD step: the global peak by category, and the peak while the teacher runs.

    Two adaptations of torch 2.14's MemTracker, both on its private hooks: it installs a gradient hook on
    every parameter a forward touches and refuses the frozen teacher's (they are marked as hooked), and it
    updates a per-module peak snapshot for every module on every op (quadratic: 6 min for SwinV2-G), where
    the planner needs only the global peak (seconds). Imported lazily: torch.distributed costs seconds.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        def __init__(self):
            super().__init__()
            self.in_teacher, self.teacher_peak = False, 0

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                total = snap["Total"]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = total, dict(snap)
                if self.in_teacher:
                    self.teacher_peak = max(self.teacher_peak, total)

    return StepTracker


@dataclass
class StepMemory:
    """Bytes at the peak of one FD step on one device (unsharded), by what holds them."""
    batch: int
    activation_checkpointing: bool
    student_params: int  # student + projection, fp32 master weights
    teacher_params: int
    buffers: int
    grads: int  # gradients alive at the peak
    optimizer: int  # AdamW exp_avg + exp_avg_sq (+ step)
    activations: int  # saved for backward (incl. recomputed blocks under AC)
    workspace: int  # temporaries: gradients of activations, the teacher's transient tokens, casts
    peak: int
    teacher_phase_peak: int  # the highest point while the frozen teacher runs

    def gib(self) -> dict:
        return {k: (round(v / GIB, 3) if type(v) is int and k != "batch" else v) for k, v in asdict(self).items()}


def _category(snap: dict, name: str) -> int:
    return sum(v for k, v in snap.items() if getattr(k, "value", k) == name)


def trace_memory(task: nn.Module, optimizer, batch: int, img_size: int, amp_dtype, ac: bool,
                 num_classes: int | None = None) -> StepMemory:
    """Peak memory of one step at ``batch`` (call inside FakeTensorMode with optimizer states created); a
    fine-tuning task (``num_classes``) has no teacher."""
    set_activation_checkpointing(task, ac)
    teacher = task.frozen_model()
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters()) if teacher is not None else 0
    tracker = _tracker_class()()
    inputs = _inputs(batch, img_size, num_classes)
    tracker.track_external(task, optimizer, inputs[0] if num_classes else inputs)
    hooks = [] if teacher is None else [
        teacher.register_forward_pre_hook(lambda *a: setattr(tracker, "in_teacher", True)),
        teacher.register_forward_hook(lambda *a: setattr(tracker, "in_teacher", False))]
    try:
        with tracker:
            fd_step(task, optimizer, inputs, amp_dtype)
    finally:
        for h in hooks:
            h.remove()
    (snap,) = tracker.get_tracker_snapshot("peak").values()
    params = _category(snap, "Parameter")
    return StepMemory(batch, ac, params - teacher_bytes, teacher_bytes, _category(snap, "Buffer"),
                      _category(snap, "Gradient"), _category(snap, "Optstate"), _category(snap, "Activation"),
                      _category(snap, "Temp") + _category(snap, "Other"), snap["Total"], tracker.teacher_peak)


@contextlib.contextmanager
def fake_parts(cfg: Config, amp_dtype=None):
    """(distiller, optimizer, FLOPs per image) on fake tensors; the FLOPs are counted on the warm-up step of
    one image that creates the optimizer states."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    distiller = build_fd_parts(cfg, "meta", amp_dtype=amp_dtype)
    # timm's initialisers call .item(), which fake mode refuses: the model is built on meta, then faked
    with FakeTensorMode(allow_non_fake_inputs=True):
        distiller = distiller.to_empty(device="cpu")
        distiller.train()
        optimizer = make_optimizer(distiller, cfg, fused=cfg.optim.fused != "false")
        flops = trace_flops(distiller, optimizer, cfg.model.img_size, amp_dtype)
        yield distiller, optimizer, flops


def _cpu_attention_flops() -> dict:
    """torch's SDPA FLOP formulas for the CPU flash-attention ops, which the counter does not map (torch 2.14):
    on fake CPU tensors an unpatched timm teacher's attention runs there and would count as zero."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def forward(query, key, value, *args, **kwargs):  # shapes: the counter passes tensor shapes
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def trace_flops(task: nn.Module, optimizer, img_size: int, amp_dtype, num_classes: int | None = None) -> dict:
    """FLOPs per image of one step: teacher forward, student (+ projection and loss) forward and backward (a
    fine-tuning task: its classifier's forward and backward, teacher 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    set_activation_checkpointing(task, False)  # model FLOPs: AC's recompute is reported apart
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        fd_step(task, optimizer, _inputs(1, img_size, num_classes), amp_dtype)  # AdamW has no FLOP formula: 0
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(task).__name__
    teacher = counts.get(f"{root}.teacher", 0)
    total = counts["Global"]
    student_fwd = counts.get(root, total) - teacher
    return dict(teacher_fwd=teacher, student_fwd=student_fwd, student_fwd_bwd=total - teacher, total=total,
                ac_recompute=student_fwd)


# ----------------------------------------------------------------------------- memory measured on a device
def _live_bytes(*tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what the allocator holds for them)."""
    storages = {}
    for t in tensors:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def measure_step_peak(task: nn.Module, optimizer, batch, amp_dtype) -> int:
    """Measured peak bytes of one real step (``batch``: images, or (images, labels)): ``max_memory_allocated`` on
    CUDA; on the CPU, the allocator's own events (torch.profiler with profile_memory: every allocation and free,
    in order) on top of what is alive when the step starts (parameters, buffers, optimizer states, the batch)."""
    inputs = batch if isinstance(batch, tuple) else (batch,)
    images = inputs[0]
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
        torch.cuda.reset_peak_memory_stats(images.device)
        fd_step(task, optimizer, batch, amp_dtype)
        torch.cuda.synchronize(images.device)
        return torch.cuda.max_memory_allocated(images.device)
    from torch.profiler import ProfilerActivity, profile

    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    start = _live_bytes(*task.parameters(), *task.buffers(), *states, *inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fd_step(task, optimizer, batch, amp_dtype)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return start + peak


def validate(cfg: Config, batch: int, ac: bool, amp_dtype=None, device: str = "cpu",
             planner_paths: bool = True) -> dict:
    """Planned (fake tensors) vs measured (real random weights on ``device``) peak of one FD step of ``cfg``."""
    with fake_parts(cfg, amp_dtype) as (distiller, optimizer, _):
        planned = trace_memory(distiller, optimizer, batch, cfg.model.img_size, amp_dtype, ac)
    distiller = build_fd_parts(cfg, device, planner_paths, amp_dtype).train()
    optimizer = make_optimizer(distiller, cfg, fused=cfg.optim.fused != "false")
    size = (3, cfg.model.img_size, cfg.model.img_size)
    fd_step(distiller, optimizer, torch.randn(1, *size, device=device), amp_dtype)  # optimizer states, workspaces
    set_activation_checkpointing(distiller, ac)
    measured = measure_step_peak(distiller, optimizer, torch.randn(batch, *size, device=device), amp_dtype)
    return dict(planned=planned.peak, measured=measured, ratio=planned.peak / measured, breakdown=planned.gib())


# ----------------------------------------------------------------------------- the plan
@dataclass
class Setting:
    """Memory of one (strategy, AC) choice at N GPUs: per-GPU bytes at the recipe batch, the largest batch."""
    strategy: str
    activation_checkpointing: bool
    per_gpu_bytes: int
    largest_batch: int
    breakdown: dict = field(default_factory=dict)


def _per_gpu(m: StepMemory, n: int, strategy: str, gathered: dict) -> tuple[int, dict]:
    """Per-GPU peak of a traced (unsharded) step under DDP / FSDP2 over n GPUs."""
    state = m.student_params + m.grads + m.optimizer
    if strategy != "fsdp" or n == 1:
        # DDP allocates gradient buckets as large as all gradients at wrap time (gradient_as_bucket_view=False)
        extra = m.student_params if strategy == "ddp" and n > 1 else 0
        parts = dict(student_params=m.student_params, grads=m.grads, optimizer=m.optimizer,
                     teacher=m.teacher_params, activations=m.activations, workspace=m.workspace + m.buffers)
        if strategy == "ddp":
            parts["ddp_buckets"] = extra
        return max(m.peak, m.teacher_phase_peak) + extra, parts
    # FSDP2: every tensor sharded on dim 0 over n ranks; one student block gathered + the next prefetched
    # (fp32, no mixed-precision policy), the block's unsharded gradient before its reduce-scatter.
    sharded = math.ceil((state + m.teacher_params) / n)
    block = gathered["largest_block"]
    student_phase = m.peak - state - m.teacher_params + sharded + 3 * block
    at_teacher = m.student_params + m.optimizer + m.teacher_params  # no gradients while the teacher runs
    teacher_phase = m.teacher_phase_peak - at_teacher + math.ceil(at_teacher / n) + gathered["teacher"]
    parts = dict(student_params=m.student_params // n, grads=m.grads // n, optimizer=m.optimizer // n,
                 teacher=m.teacher_params // n, activations=m.activations, workspace=m.workspace + m.buffers,
                 fsdp_gathered=3 * block, teacher_gathered_in_its_forward=gathered["teacher"])
    return max(student_phase, teacher_phase), parts


def _largest_batch(cost, budget: int, b0: int, b1: int, refine: int = 2) -> int:
    """Largest batch b with cost(b) <= budget, where cost(b) traces a per-GPU peak (convex in b).

    The peak of a step is the highest of its moments, each linear in b (fixed state + a per-image part), so it
    is convex and piecewise linear: a secant through two traced batches under-estimates it outside them and
    over-estimates it between them. So: extrapolate, trace the prediction (at most ``refine`` times), and answer
    by interpolating between a traced batch that fits and the next one that does not (conservative).
    """
    points = {b0: cost(b0), b1: cost(b1)}
    for _ in range(refine):
        lo, hi = _bracket(points, budget)
        if lo is not None and hi is not None:
            break
        x0, x1 = sorted(sorted(points, key=lambda b: abs(points[b] - budget))[:2])
        slope = (points[x1] - points[x0]) / (x1 - x0)
        guess = max(1, int(x0 + (budget - points[x0]) / slope)) if slope > 0 else 4 * x1
        if guess in points:
            break
        points[guess] = cost(guess)
    lo, hi = _bracket(points, budget)
    if lo is None:
        if 1 not in points:
            points[1] = cost(1)
        if points[1] > budget:
            return 0  # not even one image
        lo, hi = _bracket(points, budget)
    if hi is None:
        return lo  # every traced batch fits: the largest traced one is the safe answer
    slope = (points[hi] - points[lo]) / (hi - lo)
    return lo + int((budget - points[lo]) // slope)


def _bracket(points: dict, budget: int) -> tuple[int | None, int | None]:
    """(largest traced batch that fits, smallest traced batch above it that does not), None where missing."""
    fits = [b for b, c in points.items() if c <= budget]
    lo = max(fits) if fits else None
    above = [b for b, c in points.items() if c > budget and (lo is None or b > lo)]
    return lo, (min(above) if above else None)


def gathered_units(distiller: nn.Module) -> dict:
    """Bytes of the largest FSDP unit of the student (a block) and of the teacher (one unit)."""
    from fdfast.models.tokens import blocks
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    return dict(largest_block=max(size(b) for b in blocks(distiller.student)),
                teacher=size(distiller.teacher))


def amp_dtype_of(cfg: Config) -> torch.dtype | None:
    """The compute dtype the recipe trains in on a GPU (``fdfast.runtime.resolve_precision`` for CUDA)."""
    from fdfast.runtime import resolve_precision
    return resolve_precision(cfg.runtime.precision, torch.device("cuda"))


def plan(cfg: Config, gpus: int = 1, gpu: str = "h200", gpu_mem_gib: float | None = None,
         batch: int | None = None, mfu: float = DEFAULT_MFU, global_batch: int = PAPER_GLOBAL_BATCH) -> dict:
    """The plan of a recipe on ``gpus`` GPUs as a JSON-ready dict (see the module docstring for the method)."""
    if gpus < 1 or global_batch < 1 or not 0 < mfu <= 1:
        raise FDFastError(f"--gpus and --global-batch must be >= 1 and 0 < --mfu <= 1, got {gpus}, {global_batch}, {mfu}")
    if gpu not in GPUS:
        raise FDFastError(f"unknown --gpu {gpu!r}; choose one of {sorted(GPUS)}")
    spec = GPUS[gpu]
    budget = int((gpu_mem_gib or spec.budget_gib) * GIB)
    batch = cfg.data.batch_size if batch is None else batch
    if batch < 1:
        raise FDFastError(f"--batch must be >= 1, got {batch}")
    amp = amp_dtype_of(cfg)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with fake_parts(cfg, amp) as (distiller, optimizer, flops):
        n_student = sum(p.numel() for p in distiller.student.parameters())
        n_proj = sum(p.numel() for p in distiller.fd_loss.parameters())
        n_teacher = sum(p.numel() for p in distiller.teacher.parameters())
        units = gathered_units(distiller)
        traces: dict[tuple[bool, int], StepMemory] = {}

        def traced(ac: bool, b: int) -> StepMemory:
            if (ac, b) not in traces:
                traces[ac, b] = trace_memory(distiller, optimizer, b, cfg.model.img_size, amp, ac)
            return traces[ac, b]

        settings = []
        for strategy in (["none"] if gpus == 1 else ["ddp", "fsdp"]):
            for ac in (False, True):
                per_gpu, parts = _per_gpu(traced(ac, batch), gpus, strategy, units)
                largest = _largest_batch(lambda b: _per_gpu(traced(ac, b), gpus, strategy, units)[0], budget,
                                         batch, 2 * batch)
                settings.append(Setting(strategy, ac, per_gpu, largest, parts))
    rec = recommend(settings, gpus, batch, global_batch)
    return {
        "recipe": cfg.recipe, "gpus": gpus, "gpu": spec.name, "gpu_budget_gib": round(budget / GIB, 1),
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "params": {"student": n_student, "projection": n_proj, "teacher": n_teacher},
        "flops_per_image": {k: int(v) for k, v in flops.items()},
        "gflops_per_image": round(flops["total"] / 1e9, 1),
        "traced_one_gpu": [traces[k].gib() for k in sorted(traces)],
        "settings": [dict(strategy=s.strategy, activation_checkpointing=s.activation_checkpointing,
                          batch=batch, per_gpu_gib=round(s.per_gpu_bytes / GIB, 2), largest_batch=s.largest_batch,
                          breakdown_gib={k: round(v / GIB, 3) for k, v in s.breakdown.items()})
                     for s in settings],
        "recommended": rec,
        "time": step_time(flops, bool(rec and rec["dist.activation_checkpointing"]), gpus, spec, mfu, global_batch),
        "planner_seconds": round(time.perf_counter() - t0, 1),
        "planner_cpu_seconds": round(time.process_time() - cpu0, 1),  # differs from the above on a busy machine
    }


def step_time(flops: dict, ac: bool, gpus: int, spec: GPU, mfu: float, global_batch: int) -> dict:
    """Seconds per optimizer step and hours per ImageNet epoch at ``mfu`` of the GPU's dense bf16 peak.

    MFU counts model FLOPs (teacher forward + student forward/backward); AC's recompute is extra work on top.
    Communication is assumed hidden behind compute (not modelled).
    """
    work = flops["total"] + (flops["ac_recompute"] if ac else 0)
    step_s = work * global_batch / gpus / (mfu * spec.bf16_tflops * 1e12)
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / global_batch)
    return {"global_batch": global_batch, "mfu": mfu, "peak_tflops_bf16_dense": spec.bf16_tflops,
            "step_s": round(step_s, 3), "steps_per_epoch": steps_per_epoch,
            "epoch_h": round(step_s * steps_per_epoch / 3600, 3)}


def recommend(settings: list[Setting], gpus: int, batch: int, global_batch: int) -> dict | None:
    """dist.* settings: DDP before FSDP and no AC before AC, whichever first fits a useful micro-batch.

    A micro-batch is useful at min(recipe batch, global batch / GPUs): smaller ones leave tensor cores idle.
    AC costs one more student forward; FSDP adds all-gathers; so the first choice that fits wins.
    """
    want = max(1, min(batch, global_batch // gpus))
    order = sorted(settings, key=lambda s: (s.strategy == "fsdp", s.activation_checkpointing))
    for s in order:
        if s.largest_batch >= want:
            micro, accum = _micro_batch(s.largest_batch, gpus, global_batch)
            return {"dist.strategy": s.strategy, "dist.activation_checkpointing": s.activation_checkpointing,
                    "data.batch_size": micro, "optim.accum_steps": accum, "global_batch": micro * accum * gpus,
                    "largest_batch": s.largest_batch,
                    "set": f"--set dist.strategy={s.strategy} --set dist.activation_checkpointing="
                           f"{str(s.activation_checkpointing).lower()} --set data.batch_size={micro} "
                           f"--set optim.accum_steps={accum}"}
    return None


def _micro_batch(largest: int, gpus: int, global_batch: int) -> tuple[int, int]:
    """(micro-batch <= largest, accumulation steps) whose product with gpus is the global batch, exactly when
    the global batch divides over the GPUs (else the nearest above it)."""
    per_gpu = global_batch // gpus
    if per_gpu * gpus == global_batch:
        micro = max(d for d in range(1, min(largest, per_gpu) + 1) if per_gpu % d == 0)
        return micro, per_gpu // micro
    accum = math.ceil(global_batch / (min(largest, max(1, per_gpu)) * gpus))
    return math.ceil(global_batch / (accum * gpus)), accum


# ----------------------------------------------------------------------------- fine-tuning recipes
IMAGENET_CLASSES = 1000
PAPER_FT_GLOBAL_BATCH = 1024  # the paper's fine-tuning batch (official FD code: 8-16 GPUs)


def student_of(ft_recipe: str, model_recipe: str | None = None) -> dict:
    """The FD student (its ModelConfig dict) a fine-tune recipe fine-tunes: the student of ``model_recipe``, by
    default the FD recipe of the same name (ft_clip_b16 -> clip_b16)."""
    from fdfast.config import FINETUNE_PREFIX, recipe_names
    name = model_recipe or ft_recipe[len(FINETUNE_PREFIX):]
    if name not in recipe_names():
        raise FDFastError(f"fdfast plan {ft_recipe}: no FD recipe {name!r} names the student it fine-tunes; "
                          f"pass --model-recipe, one of {recipe_names()}")
    return load_config(name).to_dict()["model"]


def finetune_task(cfg, model_cfg: dict, num_classes: int, device: str = "meta"):
    """The classifier ``fdfast finetune`` builds from that student (``fdfast.finetune.model.build_classifier``:
    the timm export, fc_norm, a new head) as its task, on ``device`` (meta: no memory, random init elsewhere);
    Mixup left out (one image batch)."""
    from fdfast.finetune.model import Backbone, build_classifier
    from fdfast.finetune.task import ClassifierTask
    from fdfast.models.export import timm_export
    plain = dict(model_cfg, pos_bias="per_block" if model_cfg.get("pos_bias") == "shared" else model_cfg["pos_bias"])
    timm_name, kwargs, _ = timm_export(plain, {})  # the exported student: per-block tables, no weights needed
    backbone = Backbone(timm_name, kwargs, None, (0.5,) * 3, (0.5,) * 3, model_cfg["img_size"], True, "plan")
    with torch.device(device):
        clf = build_classifier(backbone, num_classes, cfg.data.img_size, cfg.model.drop_path,
                               cfg.model.head_init_scale)
    return ClassifierTask(clf.model, None, nn.CrossEntropyLoss()), clf.img_size


def plan_finetune(cfg, gpus: int = 8, gpu: str = "h100", gpu_mem_gib: float | None = None, batch: int | None = None,
                  mfu: float = DEFAULT_MFU, global_batch: int = PAPER_FT_GLOBAL_BATCH, model_recipe: str | None = None,
                  num_classes: int = IMAGENET_CLASSES, images: int = IMAGENET_TRAIN_IMAGES) -> dict:
    """Per-GPU memory, the largest batch, and the time per epoch and per run of a fine-tune recipe under DDP on
    ``gpus`` GPUs, traced on fake tensors like the FD plan, with the classifier, optimizer groups (layer decay)
    and precision ``fdfast finetune`` uses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fdfast.finetune.task import build_optimizer
    if gpus < 1 or global_batch < 1 or not 0 < mfu <= 1:
        raise FDFastError(f"--gpus and --global-batch must be >= 1 and 0 < --mfu <= 1, got {gpus}, {global_batch}, {mfu}")
    spec = GPUS[gpu]
    budget = int((gpu_mem_gib or spec.budget_gib) * GIB)
    batch = cfg.data.batch_size if batch is None else batch
    amp = amp_dtype_of(cfg)
    t0 = time.perf_counter()
    task, img_size = finetune_task(cfg, student_of(cfg.recipe, model_recipe), num_classes)
    with FakeTensorMode(allow_non_fake_inputs=True):
        task = task.to_empty(device="cpu").train()
        optimizer, _ = build_optimizer(task.model, cfg, steps_per_epoch=1000, global_batch=global_batch)
        flops = trace_flops(task, optimizer, img_size, amp, num_classes)
        traces = {}

        def traced(ac: bool, b: int) -> StepMemory:
            if (ac, b) not in traces:
                traces[ac, b] = trace_memory(task, optimizer, b, img_size, amp, ac, num_classes)
            return traces[ac, b]

        settings = []
        for ac in (False, True):
            strategy = "none" if gpus == 1 else "ddp"
            per_gpu, parts = _per_gpu(traced(ac, batch), gpus, strategy, {})
            largest = _largest_batch(lambda b: _per_gpu(traced(ac, b), gpus, strategy, {})[0], budget, batch,
                                     2 * batch)
            settings.append(Setting(strategy, ac, per_gpu, largest, parts))
        n_params = sum(p.numel() for p in task.parameters())
    rec = recommend(settings, gpus, batch, global_batch)
    ac = bool(rec and rec["dist.activation_checkpointing"])
    work = flops["total"] + (flops["ac_recompute"] if ac else 0)  # per image
    epoch_s = work * images / gpus / (mfu * spec.bf16_tflops * 1e12)
    return {
        "recipe": cfg.recipe, "kind": "finetune", "gpus": gpus, "gpu": spec.name,
        "gpu_budget_gib": round(budget / GIB, 1), "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "params": {"classifier": n_params}, "img_size": img_size, "num_classes": num_classes,
        "flops_per_image": {k: int(v) for k, v in flops.items()}, "gflops_per_image": round(flops["total"] / 1e9, 1),
        "settings": [dict(strategy=st.strategy, activation_checkpointing=st.activation_checkpointing, batch=batch,
                          per_gpu_gib=round(st.per_gpu_bytes / GIB, 2), largest_batch=st.largest_batch,
                          breakdown_gib={k: round(v / GIB, 3) for k, v in st.breakdown.items()}) for st in settings],
        "recommended": rec,
        "time": {"global_batch": global_batch, "mfu": mfu, "peak_tflops_bf16_dense": spec.bf16_tflops,
                 "images_per_epoch": images, "epoch_h": round(epoch_s / 3600, 3), "epochs": cfg.optim.epochs,
                 "run_h": round(epoch_s * cfg.optim.epochs / 3600, 2)},
        "planner_seconds": round(time.perf_counter() - t0, 1),
    }


def format_finetune_plan(p: dict) -> str:
    t, r = p["time"], p["recommended"]
    lines = [f"fdfast plan {p['recipe']}: fine-tune on {p['gpus']} x {p['gpu']} (budget {p['gpu_budget_gib']} GiB "
             f"each), {p['precision']}, DDP",
             f"classifier {p['params']['classifier'] / 1e6:,.1f} M parameters at {p['img_size']} px, "
             f"{p['num_classes']} classes; {p['gflops_per_image']:,.1f} GFLOP per image (forward + backward)", ""]
    for st in p["settings"]:
        lines.append(f"  AC {'on ' if st['activation_checkpointing'] else 'off'}: {st['per_gpu_gib']:.2f} GiB per GPU "
                     f"at batch {st['batch']}, largest batch {st['largest_batch']}")
    lines.append("")
    lines.append("nothing fits: use more GPUs, or a smaller model / image size" if r is None else
                 f"recommended: {r['set']}  (global batch {r['global_batch']})")
    lines.append(f"time: {t['epoch_h'] * 60:.1f} min per epoch of {t['images_per_epoch']:,} images at {t['mfu']:.0%} "
                 f"MFU of {t['peak_tflops_bf16_dense']:.0f} TFLOP/s; {t['run_h']:.1f} h for the recipe's "
                 f"{t['epochs']} epochs")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output + CLI
def format_plan(p: dict) -> str:
    lines = [f"fdfast plan {p['recipe']}: {p['gpus']} x {p['gpu']} (budget {p['gpu_budget_gib']} GiB each), "
             f"{p['precision']}",
             f"parameters: student {p['params']['student'] / 1e6:,.1f} M + projection "
             f"{p['params']['projection'] / 1e6:,.2f} M, teacher {p['params']['teacher'] / 1e6:,.1f} M",
             f"FLOPs per image: teacher fwd {p['flops_per_image']['teacher_fwd'] / 1e9:,.1f} G + student fwd/bwd "
             f"{p['flops_per_image']['student_fwd_bwd'] / 1e9:,.1f} G = {p['gflops_per_image']:,.1f} G "
             f"(+{p['flops_per_image']['ac_recompute'] / 1e9:,.1f} G with AC)", "",
             "per-GPU memory (GiB) at batch {}:".format(p["settings"][0]["batch"])]
    keys = list(dict.fromkeys(k for s in p["settings"] for k in s["breakdown_gib"]))
    head = ["strategy", "AC"] + keys + ["peak", "largest batch"]
    rows = [[s["strategy"], "on" if s["activation_checkpointing"] else "off"]
            + [f"{s['breakdown_gib'].get(k, 0):.2f}" for k in keys] + [f"{s['per_gpu_gib']:.2f}", str(s["largest_batch"])]
            for s in p["settings"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    r, t = p["recommended"], p["time"]
    lines.append("")
    if r is None:
        lines.append("nothing fits: use more GPUs (--gpus), or a smaller model / image size")
    else:
        lines.append(f"recommended: {r['set']}  (global batch {r['global_batch']}, largest micro-batch {r['largest_batch']})")
    lines.append(f"time: {t['step_s']:.2f} s/step of {t['global_batch']} images at {t['mfu']:.0%} MFU of "
                 f"{t['peak_tflops_bf16_dense']:.0f} TFLOP/s; {t['steps_per_epoch']} steps/epoch = "
                 f"{t['epoch_h'] * 60:.1f} min/epoch, {t['epoch_h'] * 300:.1f} h for 300 epochs")
    lines.append(f"(planned on fake tensors in {p['planner_seconds']:.0f} s, {p['planner_cpu_seconds']:.0f} s of CPU)")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory, FLOPs, step time and dist settings of a recipe (no GPU)",
                              description="Plan an FD recipe on fake tensors: memory by kind (parameters, gradients, "
                                          "optimizer states, activations with/without AC, teacher, workspace), FLOPs "
                                          "per image, step time at a stated MFU, the largest batch that fits and the "
                                          "dist.* settings to use. A fine-tune recipe (ft_*): memory per GPU under "
                                          "DDP, the largest batch, time per epoch and per run.")
    p.add_argument("recipe", help="recipe name or YAML path")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in the run (default 1)")
    p.add_argument("--gpu", default="h200", choices=sorted(GPUS), help="GPU model (peak FLOP/s, memory)")
    p.add_argument("--gpu-mem", type=float, help="per-GPU memory budget in GiB (default: 130 for an H200)")
    p.add_argument("--batch", type=int, help="per-GPU micro-batch to report (default: the recipe's data.batch_size)")
    p.add_argument("--global-batch", type=int,
                   help=f"images per optimizer step (default: the paper's, {PAPER_GLOBAL_BATCH} for FD, "
                        f"{PAPER_FT_GLOBAL_BATCH} for fine-tuning)")
    p.add_argument("--model-recipe", help="fine-tune recipes: the FD recipe whose student is fine-tuned "
                                          "(default: ft_NAME -> NAME)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for the step time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from fdfast.config import FINETUNE_PREFIX
    overrides = dict(parse_override(s) for s in args.set)
    if Path(args.recipe).stem.startswith(FINETUNE_PREFIX):  # a fine-tuning recipe
        from fdfast.finetune.config import load_finetune_config
        cfg = load_finetune_config(args.recipe, overrides)
        result = plan_finetune(cfg, gpus=args.gpus, gpu=args.gpu, gpu_mem_gib=args.gpu_mem, batch=args.batch,
                               mfu=args.mfu, global_batch=args.global_batch or PAPER_FT_GLOBAL_BATCH,
                               model_recipe=args.model_recipe)
        print(json.dumps(result, indent=1) if args.json else format_finetune_plan(result))
        return 0
    cfg = load_config(args.recipe, overrides)
    result = plan(cfg, gpus=args.gpus, gpu=args.gpu, gpu_mem_gib=args.gpu_mem, batch=args.batch, mfu=args.mfu,
                  global_batch=args.global_batch or PAPER_GLOBAL_BATCH)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0
