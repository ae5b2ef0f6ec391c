"""Scale-out in one place: torchrun init, DDP / FSDP2 wrapping, activation checkpointing, compile (and when).

``parallelize`` applies them to a task (fdfast.distill.FeatureDistiller, fdfast.finetune.task.ClassifierTask) in
a fixed order: activation checkpointing -> compile (trained blocks, frozen teacher) -> DDP / FSDP2. A task says
which model it trains (``trained_model()``) and which it only runs (``frozen_model()``: the teacher, or None).
A plain ``python -m fdfast train`` (no torchrun) is a world of one and wraps nothing.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fdfast.errors import FDFastError
from fdfast.models import tokens


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); else a world of one on
    ``device`` (fdfast.runtime.resolve_device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (timm's own switch; a frozen teacher runs without grad anyway)."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise FDFastError(f"{type(model).__name__} has no activation-checkpointing switch")
    model.set_grad_checkpointing(True)


def compile_task(task: nn.Module, device: torch.device, freeze_frozen: bool = True) -> None:
    """torch.compile the trained model's blocks (short compiles, one graph reused by identical blocks) and the
    frozen teacher, if any, as an inference graph (on the CPU with Inductor's freezing: weights folded in as
    constants, oneDNN prepacking). In place (parameter names and checkpoints unchanged) and lazy: the next
    forward compiles. Inductor's FX graph cache (on by default) makes a second run with the same shapes start fast."""
    for block in tokens.blocks(task.trained_model()):
        block.compile()
    frozen = task.frozen_model()
    if frozen is not None:
        freeze = freeze_frozen and device.type == "cpu"  # freezing targets CPU inference (oneDNN weight packing)
        frozen.compile(options={"freezing": True} if freeze else None)


def uncompile(task: nn.Module) -> None:
    """Undo compile_task: every module back to its eager forward (after a compile failure)."""
    for module in task.modules():
        module._compiled_call_impl = None  # what nn.Module.compile() set


def parallelize(task: nn.Module, dist_cfg, info: DistInfo) -> nn.Module:
    """Apply a dist config section to a built task (a FeatureDistiller, a fine-tuning task), in the one fixed
    order: activation checkpointing -> compile -> DDP / FSDP2; returns the module the training step calls.
    dist.compile=auto is decided later, by the run (``CompileWhenItPays``)."""
    if dist_cfg.activation_checkpointing:
        apply_activation_checkpointing(task.trained_model())
    if dist_cfg.compile == "true":  # before FSDP2 wraps the blocks; a sharded teacher is not frozen into constants
        compile_task(task, info.device, freeze_frozen=dist_cfg.strategy != "fsdp")
    return wrap_distributed(task, dist_cfg.strategy, info)


def wrap_distributed(task: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP (replicated model; strategy auto | ddp) or FSDP2 (each block sharded; fsdp) over the process group."""
    if info.world_size == 1 or strategy == "none":
        return task
    if strategy == "fsdp":
        # one FSDP2 unit per trained block, one for a frozen teacher (large teachers shard too), and the task as
        # root (stem / norm / head or projection); the model runs through forward_features, so its blocks, not the
        # timm model itself, carry the hooks.
        from torch.distributed.fsdp import fully_shard
        for block in tokens.blocks(task.trained_model()):
            fully_shard(block)
        if task.frozen_model() is not None:
            fully_shard(task.frozen_model())
        fully_shard(task)
        return task
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(task, device_ids=ids)


class CompileWhenItPays:
    """dist.compile: "true" compiled before step 1 (``parallelize``); "false" never; "auto" times the first eager
    steps, then compiles when the rest of the run repays it: steps left x step seconds x the saving expected on
    this device > the compile seconds expected. A compile that fails falls back to eager with one warning.
    ``summary()`` goes into summary.json.

    The expected saving is small on the CPU (fdfast's eager paths already run the matmuls at the bf16 rate) and a
    cold compile is long there, so auto compiles only very long CPU runs; on CUDA the saving is an estimate.
    CPU steps are timed in process CPU seconds per thread, so other work on a shared machine does not inflate
    them (the compile estimate is a quiet machine's).
    """
    TIMED_STEPS = 3  # eager steps timed before deciding; the first one (warm-up) is dropped
    SAVING = {"cpu": 0.02, "cuda": 0.15}  # expected fraction of an eager step that compiling saves
    COMPILE_S = {"cpu": 60.0, "cuda": 60.0}  # expected seconds of a cold compile (trained blocks + teacher)

    def __init__(self, setting: str, task: nn.Module, info: DistInfo, strategy: str, announce: bool = False):
        self.setting, self.task, self.info, self.announce = setting, task, info, announce
        self.decision = {"true": "compiled before step 1", "false": "off"}.get(setting)
        if setting == "auto" and info.world_size > 1 and strategy == "fsdp":
            self.decision = "eager (FSDP2: set dist.compile=true to compile before sharding)"
        self.untried = setting == "true"  # compiled, but no step has run it yet
        self.step_s: list[float] = []
        self.compile_s: float | None = None

    def _clock(self) -> float:
        if self.info.device.type == "cpu":
            return time.process_time() / max(torch.get_num_threads(), 1)
        return time.perf_counter()  # the step ends in a host sync

    def run(self, step_fn, steps_left: int):
        """One training step, timed; the first compiled one may fail in the compiler: then eager, one warning."""
        t0, wall0, first_compiled = self._clock(), time.perf_counter(), self.untried
        self.untried = False
        try:
            result = step_fn()
        except Exception as e:  # any compiler error (Dynamo, Inductor, the C++ toolchain); eager errors re-raise
            if not first_compiled:
                raise
            warnings.warn(f"dist.compile: compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"running eager", stacklevel=2)
            uncompile(self.task)
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
            compile_task(self.task, self.info.device)
            self.untried, self.decision = True, f"compiled ({estimate})"
        else:
            self.decision = f"eager ({estimate})"
        if self.announce:
            print(f"fdfast: dist.compile=auto -> {self.decision}", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        return {"setting": self.setting, "decision": self.decision, "compile_s": self.compile_s}


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Around a micro-batch's forward AND backward: no gradient collective unless ``sync`` (the last one).

    DDP: ``no_sync()``; FSDP2 has none: its own switch ``set_requires_gradient_sync(False)`` keeps the
    unsharded gradients accumulating and skips the reduce-scatter (read in post-backward, hence the backward
    must run inside)."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reduce_step(loss_sum: torch.Tensor, grad_norm: torch.Tensor, stop: bool, info: DistInfo
                ) -> tuple[float, float, bool]:
    """(loss averaged over ranks, gradient norm, whether ANY rank asked to stop): the step's one host sync.

    The three ride in one float64 tensor, so under torchrun the skip and stop decisions cost one all-reduce and
    every rank takes the same ones: a non-finite loss or gradient on any rank makes the sums non-finite on every
    rank (the collective skip); a rank whose signal arrives after it sent its flag stops one step later together
    with the others. The gradient norm is the same on every rank (DDP and FSDP2 reduce gradients first).
    """
    t = torch.stack([loss_sum.double(), grad_norm.detach().double().to(loss_sum.device),
                     torch.tensor(float(stop), dtype=torch.float64, device=loss_sum.device)])
    if info.world_size > 1:
        dist.all_reduce(t)  # SUM
    loss_total, norm_total, stopping = t.tolist()  # the one host sync
    return loss_total / info.world_size, norm_total / info.world_size, stopping > 0


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects: RNG states, file records)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while rank 0 still writes the final
    files aborts ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
