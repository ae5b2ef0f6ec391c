"""The composition layer: every part of a run, built from its config in ONE place.

    rt = runtime.resolve(cfg.runtime)                  # device, ranks, precision
    run = build_fd_run(cfg, rt)                        # or build_finetune_run(ft_cfg, "runs/demo", rt)
    fdfast.train.fit(run, run_dir)                     # the loop: train_step, log, evaluate, checkpoint, stop

``fdfast train``, ``fdfast finetune``, ``fdfast plan`` (``build_distiller`` on the meta device), the e2e bench,
the experiment runners and the diagnostics all build through here, so what is planned, benchmarked and trained
is the same model by construction: the teacher in the dtype it is stored in, the student with its fast paths,
the same optimizer groups and schedule. A ``Run`` is a plain record of parts; ``fdfast.step.train_step`` steps
it and ``fdfast.train.fit`` drives it.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fdfast import distributed
from fdfast.distributed import CompileWhenItPays
from fdfast.runtime import Runtime, mix_seed


@dataclass
class Run:
    """What one run trains, checkpoints and reports; built (and the user's input checked) before any file is
    written."""
    cfg: Any  # fdfast.config.Config or fdfast.finetune.config.FinetuneConfig
    rt: Runtime
    command: str  # "fdfast train" / "fdfast finetune": the name in messages and the run-dir lock
    task: nn.Module  # forward(batch) -> scalar loss; trained_model(), frozen_model(), checkpoint_layout()
    model: nn.Module  # the task as train_step calls it: DDP-wrapped, or FSDP2-sharded in place
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm CosineLRScheduler, stepped per optimizer step
    scaler: torch.amp.GradScaler  # active for fp16 only
    loader: Any  # infinite iterator of batches with state_dict() / load_state_dict() / stats() / close()
    compiler: CompileWhenItPays
    total_steps: int
    accum_steps: int
    clip_grad: float | None
    global_batch: int  # images per optimizer step, all ranks
    log_every: int  # steps between metrics rows
    ckpt_every: int  # steps between committed checkpoints (0: only the last)
    eval_every: int = 0  # steps between evaluations (0: none)
    evaluator: Any = None  # fine-tuning: Evaluator(step, model, ema, autocast) -> metrics row
    ema: Any = None  # timm ModelEmaV3 of task.trained_model(), updated after each optimizer step
    loss_key: str = "loss"  # the metrics name of the mean training loss
    meta: dict = field(default_factory=dict)  # safetensors metadata of checkpoint tensors (what they are)
    start: Callable | None = None  # start(out_dir): the run's own files once the run directory may be written
    finish: Callable | None = None  # finish(run, out_dir, tensors, summary) -> summary: the run's final files

    def checkpoint_layout(self) -> dict:
        """{key prefix: module} of every checkpointed tensor: the task's layout, plus the EMA's."""
        from fdfast.finetune.task import EMA_PREFIX
        layout = dict(self.task.checkpoint_layout())
        if self.ema is not None:
            layout[EMA_PREFIX] = self.ema.module
        return layout

    def batch_line(self) -> str:
        """The global batch and the lr scale, as printed at start (the paper's recipes assume a global batch)."""
        o, n = self.cfg.optim, self.rt.info.world_size
        return (f"global batch {self.global_batch} = {self.cfg.data.batch_size} per rank x {o.accum_steps} "
                f"accumulation step{'s' * (o.accum_steps > 1)} x {n} rank{'s' * (n > 1)}; lr = optim.base_lr x "
                f"{self.global_batch}/{o.lr_batch_ref}")

    def update_ema(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.task.trained_model(), step=step)


# ----------------------------------------------------------------------------- shared parts
def adamw(groups: list, lr: float, betas, fused_setting: str, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW; fused (one kernel over all tensors) on CUDA and the CPU unless optim.fused=false."""
    fused = device.type in ("cuda", "cpu") if fused_setting == "auto" else fused_setting == "true"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def cosine_schedule(optimizer, total: int, warmup: int, min_lr: float, warmup_lr: float, warmup_prefix: bool = False):
    """timm's per-step cosine with linear warmup over ``total`` steps (``step_update(n)`` sets the lr of step n + 1),
    ending at ``min_lr`` on the last step either way: ``warmup_prefix=False`` runs the warmup inside the cosine
    (timm's ``train.py``), ``warmup_prefix=True`` starts the cosine after it (the fine-tuning recipes of BEiT / FD)."""
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(optimizer, t_initial=total - warmup if warmup_prefix else total, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=warmup_lr,
                             warmup_prefix=warmup_prefix, t_in_epochs=False)


def _compose(cfg, rt: Runtime, command: str, task: nn.Module, loader, groups_fn, **run_fields) -> Run:
    """What every run does with its task: per-rank RNG, parallelism, optimizer, scaler, compile policy."""
    info = rt.info
    seed = mix_seed(info.rank, cfg.runtime.seed)  # per-rank drop path and Mixup draws from here on
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model = distributed.parallelize(task, cfg.dist, info)  # before the optimizer: FSDP2 swaps in shards
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * info.world_size
    optimizer, scheduler = groups_fn(global_batch)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    compiler = CompileWhenItPays(cfg.dist.compile, task, info, cfg.dist.strategy, announce=info.is_main)
    return Run(cfg=cfg, rt=rt, command=command, task=task, model=model, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, loader=loader, compiler=compiler, accum_steps=cfg.optim.accum_steps,
               clip_grad=cfg.optim.clip_grad, global_batch=global_batch, **run_fields)


# ----------------------------------------------------------------------------- Feature Distillation
def build_distiller(cfg, device: torch.device, amp_dtype: torch.dtype | None, *, weights=None,
                    planning: bool = False):
    """Teacher + student (fast attention patched in) + projection on ``device``, the teacher stored in the run's
    compute dtype (``amp_dtype``) as training keeps it; checks the teacher's weights.

    ``planning`` (fdfast plan, on the meta device): the same modules and dtypes, with attention on SDPA and the
    loss on the reference path (ATen ops that fake tensors follow; the Triton kernels launch real programs).
    ``weights="random"``: the teacher's shape without its weights.
    """
    from fdfast.attention import FAST_ATTENTION, patch_model
    from fdfast.distill import FeatureDistiller, teacher_from_config  # imports the Triton kernels: only here
    from fdfast.fastpath import pack_linears
    from fdfast.models.student import build_student

    with torch.device(device) if device.type == "meta" else contextlib.nullcontext():
        teacher = teacher_from_config(cfg, weights)  # loss.target=embedding keeps its head; teacher.drop_path
        # fdfast's attention and fused residual blocks (layer scale + drop path + add as one op, same math and RNG)
        student = build_student(cfg.model, fast=True)
    if planning:
        patch_model(student, backend="sdpa")
    if any(type(m) in FAST_ATTENTION for m in teacher.modules()):  # the teacher's timm attention, when fdfast has it
        patch_model(teacher, backend="sdpa" if planning else "auto")
    if device.type == "cpu":  # the frozen teacher's bf16 linears on weights packed once (F.linear where that can't run)
        pack_linears(teacher)
    loss_cfg = type(cfg.loss)(**{**asdict(cfg.loss), "backend": "reference"}) if planning else cfg.loss
    distiller = FeatureDistiller(student, teacher, loss_cfg, cfg.teacher.align).to(device)
    if amp_dtype is not None:  # the frozen teacher's weights once in the compute dtype, not cast every step
        distiller.set_teacher_dtype(amp_dtype)
    return distiller


def fd_optimizer(distiller, cfg, global_batch: int, device: torch.device):
    """AdamW with the paper's no-decay rules over the student and the projection; lrs x global_batch / 512."""
    from timm.optim import param_groups_weight_decay
    o = cfg.optim
    scale = global_batch / o.lr_batch_ref
    student = distiller.student
    skip = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    groups = param_groups_weight_decay(student, o.weight_decay, skip)
    groups += param_groups_weight_decay(distiller.fd_loss, o.weight_decay)  # proj weight decays, bias not
    optimizer = adamw(groups, o.base_lr * scale, o.betas, o.fused, device)
    return optimizer, cosine_schedule(optimizer, o.steps, o.warmup_steps, o.min_lr * scale, o.warmup_lr * scale)


def build_fd_run(cfg, rt: Runtime, loader=None) -> Run:
    """Every part of an FD run (``fdfast train``); ``loader``: batches to use instead of the config's."""
    from fdfast.checkpoint import save_student
    from fdfast.data import build_fd_loader
    from fdfast.distill import split_trainable
    info = rt.info
    torch.manual_seed(cfg.runtime.seed)  # the same initial student on every rank (FSDP shards it as is)
    distiller = build_distiller(cfg, rt.device, rt.amp_dtype)
    if loader is None:
        teacher = distiller.teacher
        loader = build_fd_loader(cfg.data, image_size=cfg.model.img_size, mean=teacher.mean, std=teacher.std,
                                 batch_size=cfg.data.batch_size, device=info.device.type, rank=info.rank,
                                 world_size=info.world_size, seed=cfg.runtime.seed)
    meta = cfg.to_dict()["model"]

    def finish(run: Run, out_dir, tensors: dict, summary: dict) -> dict:
        student, _ = split_trainable(tensors)
        save_student(out_dir, student, meta)  # + its size / CRC record (DIR/COMMITTED)
        return summary

    return _compose(cfg, rt, "fdfast train", distiller, loader,
                    lambda global_batch: fd_optimizer(distiller, cfg, global_batch, rt.device),
                    total_steps=cfg.optim.steps, log_every=cfg.runtime.log_every, ckpt_every=cfg.ckpt.every,
                    meta=meta, finish=finish)


# ----------------------------------------------------------------------------- fine-tuning
def build_finetune_run(cfg, model_spec: str, rt: Runtime) -> Run:
    """Every part of a fine-tuning run (``fdfast finetune MODEL``): data splits, classifier, loss, optimizer with
    layer decay, EMA, evaluation; the val split is divided across ranks without overlap."""
    from fdfast.finetune.data import build_transforms, load_splits
    from fdfast.finetune.loader import EvalBatches, LabelledLoader
    from fdfast.finetune.model import build_classifier, resolve_model
    from fdfast.finetune.task import ClassifierTask, Evaluator, build_loss, build_optimizer, write_model_json

    info, d = rt.info, cfg.data
    splits = load_splits(d.path, d.val_path, d.check, d.train_per_class, d.val_per_class)
    torch.manual_seed(cfg.runtime.seed)  # the head init, the same on every rank
    backbone = resolve_model(model_spec, d.img_size, cfg.model.kwargs)
    clf = build_classifier(backbone, len(splits.classes), d.img_size, cfg.model.drop_path, cfg.model.head_init_scale)
    clf.model.to(rt.device)
    mixup, criterion = build_loss(d, len(splits.classes))
    task = ClassifierTask(clf.model, mixup, criterion)
    train_tf, eval_tf = build_transforms(d, clf.img_size, clf.mean, clf.std)
    loader = LabelledLoader(splits.train, train_tf, d.batch_size, seed=mix_seed(d.seed, cfg.runtime.seed),
                            rank=info.rank, world_size=info.world_size, num_workers=d.num_workers,
                            accum_steps=cfg.optim.accum_steps)
    steps_per_epoch = loader.steps_per_epoch  # optimizer steps
    val = splits.val  # each rank scores every world_size-th image (folder or shards): no image twice, none dropped
    mine = val.subset(range(info.rank, len(val), info.world_size))
    evaluator = Evaluator(clf, splits.classes, EvalBatches(mine, eval_tf, d.batch_size, d.num_workers), info,
                          steps_per_epoch)
    ema = None
    if cfg.optim.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(clf.model, decay=cfg.optim.ema_decay)
    meta = {"timm_model": clf.timm_name, "timm_kwargs": clf.timm_kwargs, "classes": splits.classes}

    def finish(run: Run, out_dir, tensors: dict, summary: dict) -> dict:
        epochs, best = cfg.optim.epochs, evaluator.best
        evaluator.save(out_dir / "model.safetensors", clf.model, {"fdfast_epoch": epochs})
        return {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"], "epochs": epochs,
                **summary, "model": model_spec, "img_size": clf.img_size, "classes": len(splits.classes),
                "train_images": len(splits.train), "val_images": len(splits.val)}

    def start(out_dir) -> None:
        evaluator.out_dir = out_dir
        if info.is_main:
            write_model_json(out_dir, model_spec, clf, splits.classes, len(splits.train), len(splits.val))

    return _compose(cfg, rt, "fdfast finetune", task, loader,
                    lambda global_batch: build_optimizer(clf.model, cfg, steps_per_epoch, global_batch, rt.device),
                    total_steps=cfg.optim.epochs * steps_per_epoch,
                    log_every=cfg.runtime.log_every or steps_per_epoch, ckpt_every=cfg.ckpt.every or steps_per_epoch,
                    eval_every=steps_per_epoch, evaluator=evaluator, ema=ema, loss_key="train_loss", meta=meta,
                    start=start, finish=finish)
