"""`train_step()`: one optimizer step of any fdfast run (Feature Distillation and fine-tuning alike).

    micro-batches -> forward + backward (gradient sync on the last one only) -> unscale -> grad norm (clip)
    -> ONE host sync: loss, grad norm and the stop flag, all-reduced together -> skip or update -> lr of the next step

The step reads the run's parts (``fdfast.run.Run``): ``model(batch)`` is the scalar loss of a micro-batch (a
FeatureDistiller or a fine-tuning task, maybe DDP-wrapped or FSDP2-sharded), ``optimizer``, ``scheduler`` (timm,
stepped per update), ``scaler`` (active for fp16 only), ``rt`` (ranks, device, autocast), ``accum_steps``,
``clip_grad`` and ``update_ema(step)`` (fine-tuning's EMA after each update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from fdfast import distributed


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches and ranks
    grad_norm: float | None  # total gradient norm before clipping; None when the update was skipped
    images: int  # images this step consumed, all ranks together
    stop: bool = False  # a rank got SIGINT / SIGTERM: every rank stops after this step (one collective decision)
    skipped: bool = False  # the loss or the gradient was not finite on some rank: no update anywhere
    diverged: bool = False  # skipped for a reason the run must count (not an fp16 GradScaler overflow)


def _to_device(batch, device: torch.device):
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def _images(batch) -> int:
    return (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as the plain tensor of its full value; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_step(run, batches: Iterator, step: int, stop_requested: bool = False) -> StepResult:
    """One optimizer step of ``run`` on ``run.accum_steps`` micro-batches from ``batches``.

    Every rank takes the same decisions from one all-reduce: skip the update when the loss OR the gradient norm
    is not finite on any rank (weights and AdamW moments untouched; an fp16 overflow lowers the GradScaler's
    scale as GradScaler's own skip would), and stop after this step when any rank's ``stop_requested`` was set.
    ``run.scheduler.step_update(step)`` sets the lr of the next step after a skipped update too, so the schedule
    follows the step count. At most one host sync per step (the all-reduced values).
    """
    rt, model, optimizer, scaler = run.rt, run.model, run.optimizer, run.scaler
    info, accum = rt.info, run.accum_steps
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    images = 0
    for micro in range(accum):
        batch = _to_device(next(batches), info.device)
        # DDP's no_sync / FSDP2's set_requires_gradient_sync: gradients are reduced on the last micro-batch only
        with distributed.gradient_sync(model, sync=micro == accum - 1):  # forward AND backward inside
            with rt.autocast():
                loss = model(batch) / accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach().double()  # stays on the device: no sync per micro-batch
        images += _images(batch) * info.world_size
    scaler.unscale_(optimizer)
    # the optimizer's parameters are the trainable ones (model.parameters() would walk a frozen teacher too)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = _local(torch.nn.utils.clip_grad_norm_(params, run.clip_grad or float("inf")))
    loss, norm, stopping = distributed.reduce_step(loss_sum, grad_norm, stop_requested, info)  # the one sync
    if not (math.isfinite(loss) and math.isfinite(norm)):
        overflow = scaler.is_enabled() and math.isfinite(loss)  # fp16: the scaler's business, not a divergence
        if scaler.is_enabled():
            scaler.update()  # unscale_ recorded the inf: the scale goes down, as scaler.step's own skip does
        run.scheduler.step_update(step)
        return StepResult(loss, None, images, stopping, skipped=True, diverged=not overflow)
    scaler.step(optimizer)
    scaler.update()
    run.scheduler.step_update(step)
    run.update_ema(step)  # fine-tuning's EMA, when it has one
    return StepResult(loss, norm, images, stopping)
