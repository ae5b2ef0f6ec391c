"""`fdfast finetune MODEL [RECIPE]`: fine-tune any model fdfast reads on a labelled image set, METHOD.md's recipe.

    fdfast finetune runs/demo                       # the demo FD student on the demo-labelled set (ft_demo)
    fdfast finetune teacher:demo-dinov2-s14 ft_demo --set data.img_size=56
    fdfast finetune RUN ft_dino_b16 --data /imagenet --out runs/ft --resume auto

Writes DIR/config.yaml, DIR/model.json (what was fine-tuned, classes, normalisation), DIR/metrics.jsonl (one row
per epoch: train_loss, lr, top1, top5, ...), DIR/checkpoints/step-<epoch>/ (committed "last"),
DIR/best.safetensors and DIR/model.safetensors (timm exports of the best and the final classifier) and
DIR/summary.json (top1, top5, best_epoch).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from fdfast import runtime
from fdfast.config import add_run_arguments, config_from_cli
from fdfast.finetune.config import FinetuneConfig, load_finetune_config, validate

__all__ = ["FinetuneConfig", "load_finetune_config", "finetune", "register"]

FLAG_KEYS = {"data": "data.path", "val": "data.val_path", "epochs": "optim.epochs", "batch_size": "data.batch_size",
             "img_size": "data.img_size", "device": "runtime.device"}


def finetune(cfg: FinetuneConfig, model_spec: str, out_dir: str | Path | None, resume: str | None = None) -> dict:
    """Fine-tune MODEL for cfg.optim.epochs on the shared run (fdfast.run.build_finetune_run) and loop
    (fdfast.train.fit); returns the summary (also DIR/summary.json). A library call: no process-wide settings, the
    signal handlers it installs are put back; set-up and checkpoints follow ``fdfast.train.train``'s rules."""
    from fdfast.run import build_finetune_run
    from fdfast.train import RunDir, fit, setup_signals
    with setup_signals("fdfast finetune") as stop:  # a signal in set-up: exit 130, nothing new committed
        validate(cfg)
        rt = runtime.resolve(cfg.runtime)
        stop.announce = rt.info.is_main
        with RunDir(out_dir, resume, rt.info, "fdfast finetune") as run_dir:
            return fit(build_finetune_run(cfg, model_spec, rt), run_dir, stop=stop)


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a student / teacher / timm model on labelled images",
                              description="Fine-tune MODEL (FD run dir, checkpoints/step-N dir, student file, timm "
                                          "export, teacher:NAME[@WEIGHTS], or a timm name for random init) with a "
                                          "fine-tune recipe (ft_*). Without --data: the demo-labelled set.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("recipe", nargs="?", default="ft_demo", help="fine-tune recipe name or YAML path (default: ft_demo)")
    p.add_argument("--data", help="training set: class subfolders or labelled tar shards (`fdfast shards`: "
                                  "'DIR/train-{000000..000127}.tar', '::' lists, a folder of .tar), or a folder "
                                  "holding train/ and val/")
    p.add_argument("--val", help="validation set, class subfolders or labelled shards (default: DATA/val)")
    p.add_argument("--out", help="run directory (default: runs/ft-<recipe>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--img-size", type=int, help="input size (default: the model's own)")
    add_run_arguments(p)
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> tuple[FinetuneConfig, Path]:
    return config_from_cli(args, FLAG_KEYS, FinetuneConfig, load_finetune_config, f"runs/ft-{Path(args.recipe).stem}")


def run_cli(args: argparse.Namespace) -> int:
    cfg, out = config_from_args(args)
    runtime.apply(cfg.runtime)  # the process-wide settings, here at the edge (glibc malloc on CPU runs)
    s = finetune(cfg, args.model, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"fdfast finetune: top-1 {s['top1']:.2f}  top-5 {s['top5']:.2f} (best of {s['epochs']} epochs: epoch "
          f"{s['best_epoch']}) in {s['wall_s']:.0f}s -> {out / 'best.safetensors'}")
    return 0
