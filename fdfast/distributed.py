"""Scale-out in one place: torchrun init, DDP / FSDP2 wrapping, activation checkpointing, compile.

``parallelize`` applies them in a fixed order: activation checkpointing -> compile (student blocks, teacher) ->
DDP / FSDP2.
A plain ``python -m fdfast train`` (no torchrun) is a world of one and wraps nothing.
"""
from __future__ import annotations

import contextlib
import os
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FDFastError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)  # "cpu" | "cuda": config.validate checked the choice


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); else a world of one."""
    device = resolve_device(device_name)
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


def apply_activation_checkpointing(student: nn.Module) -> None:
    """Recompute each block in backward (timm's own switch; the teacher runs without grad anyway)."""
    if not hasattr(student, "set_grad_checkpointing"):
        raise FDFastError(f"{type(student).__name__} has no activation-checkpointing switch")
    student.set_grad_checkpointing(True)


def compile_distiller(distiller: nn.Module, device: torch.device, freeze_teacher: bool = True) -> None:
    """torch.compile the student's blocks (short compiles, one graph reused by identical blocks) and the frozen
    teacher as an inference graph (on the CPU with Inductor's freezing: weights folded in as constants, oneDNN
    prepacking). In place (parameter names and checkpoints unchanged) and lazy: the next forward compiles.
    Inductor's FX graph cache (on by default) makes a second run with the same shapes start fast."""
    for block in tokens.blocks(distiller.student):
        block.compile()
    freeze = freeze_teacher and device.type == "cpu"  # freezing targets CPU inference (oneDNN weight packing)
    distiller.teacher.compile(options={"freezing": True} if freeze else None)


def uncompile(distiller: nn.Module) -> None:
    """Undo compile_distiller: every module back to its eager forward (after a compile failure)."""
    for module in distiller.modules():
        module._compiled_call_impl = None  # what nn.Module.compile() set


def parallelize(distiller: nn.Module, dist_cfg, info: DistInfo) -> nn.Module:
    """Apply the config's dist section (DistConfig) to a built distiller, in the one fixed order; returns the
    module the training step calls. dist.compile=auto is decided later, by the run (train.CompileWhenItPays)."""
    if dist_cfg.activation_checkpointing:
        apply_activation_checkpointing(distiller.student)
    if dist_cfg.compile == "true":  # before FSDP2 wraps the blocks; a sharded teacher is not frozen into constants
        compile_distiller(distiller, info.device, freeze_teacher=dist_cfg.strategy != "fsdp")
    return wrap_distributed(distiller, dist_cfg.strategy, info)


def wrap_distributed(distiller: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP (replicated student; strategy auto | ddp) or FSDP2 (each block sharded; fsdp) over the process group."""
    if info.world_size == 1 or strategy == "none":
        return distiller
    if strategy == "fsdp":
        # one FSDP2 unit per student block, one for the frozen teacher (large teachers shard too), and the
        # distiller as root (student stem / norm + projection); the student runs through forward_features,
        # so its blocks, not the timm model itself, carry the hooks.
        from torch.distributed.fsdp import fully_shard
        for block in tokens.blocks(distiller.student):
            fully_shard(block)
        fully_shard(distiller.teacher)
        fully_shard(distiller)
        return distiller
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(distiller, device_ids=ids)


def full_state(distiller: nn.Module, optimizer, info: DistInfo, strategy: str) -> tuple[dict, dict | None]:
    """(trainable tensors, optimizer state; None without an optimizer) as full, unsharded CPU tensors; a
    collective under FSDP, whose result only rank 0 holds."""
    if info.world_size == 1 or strategy != "fsdp":
        return distiller.trainable_state(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(distiller.student, options=opts)
    tensors = {f"student.{k}": v for k, v in student.items()}
    tensors.update(get_model_state_dict(distiller.fd_loss, options=opts))  # "proj.*", the checkpoint's keys
    return tensors, get_optimizer_state_dict(distiller, optimizer, options=opts) if optimizer is not None else None


def load_full_state(distiller: nn.Module, optimizer, tensors: dict, optim_state: dict, info: DistInfo,
                    strategy: str) -> None:
    """Inverse of full_state: every rank passes the full tensors; FSDP keeps its own shards."""
    if info.world_size == 1 or strategy != "fsdp":
        distiller.load_trainable_state(tensors)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from fdfast.checkpoint import split_trainable
    opts = StateDictOptions(full_state_dict=True, strict=True)
    student, loss = split_trainable(tensors)
    set_model_state_dict(distiller.student, student, options=opts)
    set_model_state_dict(distiller.fd_loss, loss, options=opts)
    set_optimizer_state_dict(distiller, optimizer, optim_state, options=opts)


def sharded_state(distiller: nn.Module, optimizer) -> dict:
    """{"model": student.* + proj.*, "optim": optimizer state by parameter name}: each rank's own part (DTensor
    shards under FSDP2, whole tensors otherwise), which DCP saves and loads in place; called on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model = {f"student.{k}": v for k, v in get_model_state_dict(distiller.student).items()}
    model.update(get_model_state_dict(distiller.fd_loss))  # "proj.*", the checkpoint's keys
    # before the first step AdamW has no moments yet: this fills zeros (a zero-lr step) for DCP to load into
    return {"model": model, "optim": get_optimizer_state_dict(distiller, optimizer)}


def load_sharded_state(distiller: nn.Module, optimizer, state: dict) -> None:
    """Apply a sharded_state() dict that DCP has filled from a checkpoint (strict: every key must match)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from fdfast.checkpoint import split_trainable
    student, loss = split_trainable(state["model"])
    opts = StateDictOptions(strict=True)
    set_model_state_dict(distiller.student, student, options=opts)
    set_model_state_dict(distiller.fd_loss, loss, options=opts)
    set_optimizer_state_dict(distiller, optimizer, state["optim"], options=opts)


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
