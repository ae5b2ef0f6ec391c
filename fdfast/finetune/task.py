"""Fine-tuning as a task of the shared run: the classifier's loss, its optimizer groups, its evaluation and files.

    images -> Mixup/CutMix -> classifier (drop path) -> SoftTargetCrossEntropy (label smoothing inside Mixup)
    AdamW with layer-wise lr decay (timm param_groups_layer_decay: the scale lives in each group's lr_scale and
    timm's scheduler applies it once), cosine per step with warmup, optional ModelEmaV3.

``fdfast.run.build_finetune_run`` composes these parts with the ones every run shares (runtime, parallelism,
step, checkpointer, loop). Evaluation (top-1 / top-5 on the val split) runs at each epoch's end, split across
ranks and reduced exactly; the best model is kept as DIR/best.safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fdfast.distributed import DistInfo
from fdfast.finetune.model import Classifier, classifier_metadata
from fdfast.io import atomic_save_safetensors, atomic_write_json

MODEL_PREFIX, EMA_PREFIX = "model.", "ema."  # fine-tuning's checkpoint key layout


class ClassifierTask(nn.Module):
    """The classifier and its training loss; ``forward((images, labels))`` -> scalar loss."""

    def __init__(self, model: nn.Module, mixup, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.mixup = mixup  # timm Mixup or None; mixes on the host RNGs (checkpointed per rank)

    def forward(self, batch) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self.criterion(self.model(x), y)

    def trained_model(self) -> nn.Module:
        return self.model

    def frozen_model(self) -> None:
        return None

    def checkpoint_layout(self) -> dict:
        return {MODEL_PREFIX: self.model}


def build_loss(data_cfg, num_classes: int):
    """(Mixup or None, criterion): soft targets with Mixup/CutMix, label-smoothed CE without."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    d = data_cfg
    if d.mixup > 0 or d.cutmix > 0:
        mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=1.0, switch_prob=d.mixup_switch_prob,
                      mode="batch", label_smoothing=d.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if d.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=d.label_smoothing)
    return None, nn.CrossEntropyLoss()


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """timm's groups: no decay on 1-D params / tokens / tables; with ``layer_decay`` each group's lr_scale is
    decay^(L + 1 - (k + 1)) for block k of L, decay^(L+1) for the embeddings, 1 for the head (METHOD.md)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is None:
        return param_groups_weight_decay(model, weight_decay, skip)
    return param_groups_layer_decay(model, weight_decay, skip, layer_decay=layer_decay)


def build_optimizer(model: nn.Module, cfg, steps_per_epoch: int, global_batch: int | None = None,
                    device: torch.device = torch.device("cpu")):
    """(AdamW over the layer-decay groups, per-step cosine with warmup); lrs x global_batch / lr_batch_ref."""
    from fdfast.run import adamw, cosine_schedule
    o = cfg.optim
    scale = (global_batch or cfg.data.batch_size * o.accum_steps) / o.lr_batch_ref
    optimizer = adamw(param_groups(model, o.weight_decay, cfg.model.layer_decay), o.base_lr * scale, o.betas,
                      o.fused, device)
    total = o.epochs * steps_per_epoch
    warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total - 1)
    return optimizer, cosine_schedule(optimizer, total, warmup, o.min_lr * scale, o.warmup_lr * scale,
                                      warmup_prefix=True)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, info: DistInfo, autocast) -> dict:
    """Top-1 / top-5 (%) and mean cross-entropy over the whole val split: each rank scores its own disjoint part
    (``loader``), the counts are summed over ranks exactly (no image counted twice or dropped)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # correct@1, correct@5, loss sum, images
    for x, y in loader:
        x, y = x.to(info.device), y.to(info.device)
        with autocast():
            out = model(x).float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices  # [B, k]
        hit = top.eq(y[:, None])
        sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                             nn.functional.cross_entropy(out, y, reduction="sum"),
                             torch.tensor(x.shape[0], device=info.device)]).double()
    if info.world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(sums)
    correct1, correct5, loss, n = sums.tolist()
    model.train(was_training)
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "val_loss": loss / n}


class Evaluator:
    """At each epoch's end: top-1/top-5 of the model (and its EMA), the best one kept as DIR/best.safetensors."""

    def __init__(self, clf: Classifier, classes: list[str], val_loader, info: DistInfo, steps_per_epoch: int):
        self.clf, self.classes, self.val, self.info = clf, classes, val_loader, info
        self.steps_per_epoch = steps_per_epoch
        self.best = {"top1": -1.0, "top5": 0.0, "epoch": 0}
        self.out_dir: Path | None = None  # set by the loop once the run directory may be written

    def __call__(self, step: int, model: nn.Module, ema, autocast) -> dict:
        epoch = -(-step // self.steps_per_epoch)
        row = {"epoch": epoch, **evaluate_classifier(model, self.val, self.info, autocast)}
        if ema is not None:
            e = evaluate_classifier(ema.module, self.val, self.info, autocast)
            row.update({"top1_ema": e["top1"], "top5_ema": e["top5"]})
        if row["top1"] > self.best["top1"]:
            self.best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch}
            if self.info.is_main and self.out_dir is not None:  # before the checkpoint: a resume never loses it
                self.save(self.out_dir / "best.safetensors", model, {"fdfast_epoch": epoch})
        return row

    def save(self, path: Path, model: nn.Module, extra: dict) -> None:
        """A classifier file that is a timm export (``fdfast.load_student`` / knn / linprobe read it back)."""
        meta = classifier_metadata(self.clf, self.classes)
        meta.update({k: json.dumps(v) for k, v in extra.items()})
        atomic_save_safetensors(model.state_dict(), path, metadata=meta)

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state["best"])


def write_model_json(out_dir: Path, model_spec: str, clf: Classifier, classes: list[str], n_train: int,
                     n_val: int) -> None:
    atomic_write_json(out_dir / "model.json", {"model": model_spec, "source": clf.source, "classes": classes,
                                               "img_size": clf.img_size, "mean": clf.mean, "std": clf.std,
                                               "train_images": n_train, "val_images": n_val}, indent=1)
