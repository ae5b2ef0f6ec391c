"""Scale-out in one place: torchrun init, DDP / FSDP2 wrapping, activation checkpointing, per-block compile.

Applied by the trainer in a fixed order: activation checkpointing -> compile (per block) -> DDP / FSDP2.
A plain ``python -m fdfast train`` (no torchrun) is a world of one and wraps nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fdfast.errors import FDFastError


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
    if name not in ("cpu", "cuda"):
        raise FDFastError(f"runtime.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ViT (``.blocks``) or a Swin (``.layers[i].blocks``): the units of FSDP / compile."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    if hasattr(model, "layers") and all(hasattr(layer, "blocks") for layer in model.layers):
        return [b for layer in model.layers for b in layer.blocks]
    raise FDFastError(f"{type(model).__name__} has neither .blocks nor .layers[i].blocks to shard or compile")


def compile_blocks(student: nn.Module) -> None:
    """torch.compile each transformer block on its own: short compiles, reused across identical blocks."""
    for block in transformer_blocks(student):
        block.compile()  # in place: parameter names (and checkpoints) stay unchanged


def wrap_distributed(distiller: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP (replicated student) or FSDP2 (each block sharded) over the process group."""
    if info.world_size == 1 or strategy == "none":
        return distiller
    if strategy in ("auto", "ddp"):
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(distiller, device_ids=ids)
    if strategy == "fsdp":
        # one FSDP2 unit per student block, one for the frozen teacher (large teachers shard too), and the
        # distiller as root (student stem / norm + projection); the student runs through forward_features,
        # so its blocks, not the timm model itself, carry the hooks.
        from torch.distributed.fsdp import fully_shard
        for block in transformer_blocks(distiller.student):
            fully_shard(block)
        fully_shard(distiller.teacher)
        fully_shard(distiller)
        return distiller
    raise FDFastError(f"dist.strategy must be auto, none, ddp or fsdp, got {strategy!r}")


def full_state(distiller: nn.Module, optimizer, info: DistInfo, strategy: str) -> tuple[dict, dict]:
    """(trainable tensors, optimizer state) as full, unsharded CPU tensors; a collective under FSDP."""
    if info.world_size == 1 or strategy != "fsdp":
        return distiller.trainable_state(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(distiller.student, options=opts)
    tensors = {f"student.{k}": v for k, v in student.items()}
    tensors.update(get_model_state_dict(distiller.fd_loss, options=opts))  # "proj.*", the checkpoint's keys
    return tensors, get_optimizer_state_dict(distiller, optimizer, options=opts)


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


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while rank 0 still writes the final
    files aborts ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
