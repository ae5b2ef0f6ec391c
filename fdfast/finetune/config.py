"""The fine-tuning config: one dataclass tree (model/data/optim/ckpt/runtime) <-> YAML recipes ``ft_*.yaml``.

Built, overridden (``--set a.b=value``) and checked by fdfast.config's machinery, so an unknown key, a wrong
type or a bad choice is the same one-line error as for ``fdfast train``. Defaults are METHOD.md's
fine-tuning recipe; the per-teacher values (epochs, lr, layer decay, drop path) live in the recipes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


from fdfast.config import (CkptConfig, ConfigTree, DistConfig, RuntimeConfig, Tracker, apply_overrides,
                           check_choices, load_recipe)
from fdfast.errors import FDFastError

AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # RandAugment, magnitude 9, magnitude std 0.5, increasing ops (METHOD.md)


@dataclass
class FTModelConfig:
    drop_path: float = 0.1  # max of timm's linear ramp over depth
    layer_decay: float | None = 0.65  # lr scale of block k of L: decay^(L - k); embeddings decay^(L+1); None: off
    head_init_scale: float = 0.001  # new head: trunc_normal(std 0.02) x this, bias 0 (METHOD.md)
    kwargs: dict = field(default_factory=dict)  # extra timm kwargs (a timm-name MODEL, random init)


@dataclass
class FTDataConfig:
    path: str | None = None  # class-subfolder train set, or a folder with train/ and val/; None: demo-labelled
    val_path: str | None = None  # class-subfolder val set; None: PATH/val
    img_size: int | None = None  # None: the model's own input size
    batch_size: int = 64  # per step (even: Mixup mixes pairs)
    num_workers: int = 2
    check: Literal["fast", "full", "off"] = "fast"  # cached file check, as in fdfast train
    train_per_class: int = 0  # use only the first N training images of each class (0: all); low-shot runs
    val_per_class: int = 0  # evaluate on the first N validation images of each class (0: all); smoke runs
    seed: int = 0  # moves the epoch order and every augmentation
    # augmentation: timm create_transform, normalised with the MODEL's own mean/std in training AND evaluation
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    auto_augment: str | None = AUTO_AUGMENT
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # evaluation, and training unless set below
    train_interpolation: Literal["bicubic", "bilinear", "random"] | None = None  # None: `interpolation`; random:
    # bilinear or bicubic per image (timm train.py's default), in the crop and RandAugment's geometric ops
    crop_pct: float = 0.875  # evaluation: resize the short side to img_size / crop_pct, centre crop img_size
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_switch_prob: float = 0.5  # chance of CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1


@dataclass
class FTOptimConfig:
    epochs: int = 100
    warmup_epochs: float = 20  # linear warmup from warmup_lr, then cosine per step to min_lr
    base_lr: float = 1.25e-3  # x batch_size / lr_batch_ref
    lr_batch_ref: int = 512
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05  # none on 1-D params, biases, tokens, position tables
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 5.0
    accum_steps: int = 1  # micro-batches per optimizer step (the global batch: batch_size x accum_steps x ranks)
    fused: Literal["auto", "true", "false"] = "auto"  # fused AdamW; auto: on CUDA and the CPU
    ema: bool = False  # timm ModelEmaV3 beside the model (its top-1/top-5 logged too)
    ema_decay: float = 0.9999


@dataclass
class FTCkptConfig(CkptConfig):
    every: int = 0  # steps between committed checkpoints; 0: one at each epoch's end
    keep: int = 1  # committed checkpoints kept (the best model is best.safetensors)


@dataclass
class FTRuntimeConfig(RuntimeConfig):
    seed: int = 0  # model init (head), drop path and Mixup; data.seed moves the data
    log_every: int = 0  # steps between metrics rows; 0: one row per epoch, with its evaluation
    tracker: Tracker = "none"  # metrics.jsonl only; tensorboard or wandb add a tracker


@dataclass
class FinetuneConfig(ConfigTree):
    recipe: str = "ft_demo"
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    ckpt: FTCkptConfig = field(default_factory=FTCkptConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    runtime: FTRuntimeConfig = field(default_factory=FTRuntimeConfig)

    def checked(self) -> "FinetuneConfig":
        return validate(self)


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Choices and ranges; each error names the key."""
    check_choices(cfg)
    d, o = cfg.data, cfg.optim
    for key, value, low in (("optim.epochs", o.epochs, 1), ("data.batch_size", d.batch_size, 2),
                            ("data.num_workers", d.num_workers, 0), ("data.train_per_class", d.train_per_class, 0),
                            ("data.val_per_class", d.val_per_class, 0),
                            ("ckpt.keep", cfg.ckpt.keep, 1), ("ckpt.every", cfg.ckpt.every, 0),
                            ("optim.accum_steps", o.accum_steps, 1), ("runtime.log_every", cfg.runtime.log_every, 0),
                            ("optim.warmup_epochs", o.warmup_epochs, 0)):
        if value < low:
            raise FDFastError(f"{key} must be >= {low}, got {value}")
    if o.base_lr <= 0:
        raise FDFastError(f"optim.base_lr must be > 0, got {o.base_lr}")
    if cfg.model.layer_decay is not None and not 0 < cfg.model.layer_decay <= 1:
        raise FDFastError(f"model.layer_decay must be in (0, 1] (or null: off), got {cfg.model.layer_decay}")
    if (d.mixup > 0 or d.cutmix > 0) and d.batch_size % 2:
        raise FDFastError(f"Mixup/CutMix mix pairs: data.batch_size must be even, got {d.batch_size}")
    if not 0 < d.crop_pct <= 1:
        raise FDFastError(f"data.crop_pct must be in (0, 1], got {d.crop_pct}")
    return cfg


def load_finetune_config(recipe: str = "ft_demo", overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """A fine-tune recipe (fdfast/recipes/ft_NAME.yaml, or a YAML path) + overrides -> checked config."""
    d = load_recipe(recipe)
    if "teacher" in d or "loss" in d:
        raise FDFastError(f"recipe {recipe!r} is an FD training recipe (it has teacher/loss sections); "
                          f"fine-tuning takes an ft_* recipe, e.g. ft_demo")
    return FinetuneConfig.from_dict(apply_overrides(d, overrides or {}))
