"""Fine-tuning parity: ``fdfast finetune`` against timm's own ``train.py`` on the same images, same hyperparameters.

    python bench/ft_parity.py --timm-train PATH/TO/pytorch-image-models/train.py [--out DIR] [--epochs 15]

Both trainers fine-tune the demo teacher (DINOv2-S/14, ``teacher:demo-dinov2-s14``, its converted timm weights)
on the same ImageFolder: the first ``--train-per-class`` training images of each class of the demo-labelled set
(the ones ``data.train_per_class`` picks) and its whole val split, linked into DIR/data. The settings are issue
26's: 112 px, batch 64, AdamW lr 1e-3 (fdfast: base_lr x 64 / lr_batch_ref), wd 0.05, layer decay 0.65, 2 warmup
epochs from 1e-5 into a cosine ending at 0, drop path 0.1, label smoothing 0.1, RandAugment rand-m9-n2, random
erasing 0.25, crop scale 0.08-1, no Mixup / CutMix, no clipping, a new head of trunc-normal std 0.02 (timm's init;
``--head-init-scale 0.001`` for the paper's), training interpolation random (timm's default), seed 0; bf16 autocast where the device computes
in bf16 natively (a GPU, a CPU with AMX / AVX512-BF16), fp32 otherwise. timm's train.py is not part of fdfast:
pass the file of a pytorch-image-models checkout (the installed timm package must be the one it belongs to).

Everything else is each trainer's own default: that is what the row compares. Appends one JSON line to
bench/results/ft_parity.jsonl (both top-1 curves, the final gap, the environment) and prints the curves; exits 1
when the final top-1 differ by more than ``--tolerance`` points (2 by default).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "ft_parity.jsonl"
TEACHER = "teacher:demo-dinov2-s14"


def matched_settings(a: argparse.Namespace) -> dict:
    """The shared hyperparameters, in timm train.py's units (lr per step, not per 512 images)."""
    return dict(img_size=112, batch_size=a.batch_size, lr=1e-3, weight_decay=0.05, layer_decay=0.65, epochs=a.epochs,
                warmup_epochs=2, warmup_lr=1e-5, min_lr=0.0, drop_path=0.1, smoothing=0.1, aa="rand-m9-n2",
                reprob=0.25, scale=(0.08, 1.0), head_init_scale=a.head_init_scale, train_interpolation=a.train_interpolation, seed=a.seed, train_per_class=a.train_per_class,
                val_per_class=a.val_per_class, precision=a.precision)


def link_image_folder(out: Path, train_per_class: int, val_per_class: int) -> Path:
    """DIR/data/{train,val}/<class>/ linking the very files ``fdfast finetune`` picks from demo-labelled."""
    from fdfast.finetune.data import load_splits
    from fdfast.plugins import load_plugins
    load_plugins()
    splits = load_splits(None, None, "fast", train_per_class, val_per_class)
    root = out / "data"
    for split, files in (("train", splits.train), ("val", splits.val)):
        for path, label in zip(files.paths, files.labels):
            link = root / split / splits.classes[label] / Path(path).name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(path).resolve())
    return root


def teacher_weights() -> Path:
    from fdfast.demo.dinov2_onnx import dinov2_s14_weights
    return dinov2_s14_weights()  # the native 518 px grid; both trainers resample it to 112 px the same way


def resolve_precision(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device == "cuda":
        return "bf16"
    from fdfast.kernels.utils import native_bf16_cpu
    return "bf16" if native_bf16_cpu() else "fp32"


def run_timm(train_py: Path, data: Path, out: Path, s: dict, device: str, workers: int) -> dict:
    """timm's train.py in a subprocess; its summary.csv -> top-1 per epoch."""
    name = "timm"
    cmd = [sys.executable, str(train_py), str(data), "--train-split", "train", "--val-split", "val",
           "--model", "vit_small_patch14_dinov2", "--pretrained", "--pretrained-path", str(teacher_weights()),
           "--model-kwargs", f"img_size={s['img_size']}", "--num-classes", str(len(os.listdir(data / "train"))),
           "--gp", "avg", "--img-size", str(s["img_size"]), "-b", str(s["batch_size"]), "--opt", "adamw",
           "--lr", str(s["lr"]), "--weight-decay", str(s["weight_decay"]), "--layer-decay", str(s["layer_decay"]),
           "--sched", "cosine", "--sched-on-updates", "--epochs", str(s["epochs"]),
           "--warmup-epochs", str(s["warmup_epochs"]), "--warmup-lr", str(s["warmup_lr"]),
           "--min-lr", str(s["min_lr"]), "--drop-path", str(s["drop_path"]), "--smoothing", str(s["smoothing"]),
           "--aa", s["aa"], "--train-interpolation", s["train_interpolation"], "--reprob", str(s["reprob"]), "--scale", *map(str, s["scale"]),
           "--mixup", "0", "--cutmix", "0", "--seed", str(s["seed"]), "--device", device, "-j", str(workers),
           "--checkpoint-hist", "1", "--output", str(out), "--experiment", name]
    if s["precision"] == "bf16":
        cmd += ["--amp", "--amp-dtype", "bfloat16"]
    t0 = time.time()
    with open(out / "timm.log", "w") as log:
        subprocess.run(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT, check=True)
    return {"top1": timm_top1(out / name), "wall_s": round(time.time() - t0),
            "command": _portable(cmd[2:], {data: "DATA", out: "OUT", teacher_weights(): "WEIGHTS"})}


TIMM_ARGS = ("lr", "batch_size", "epochs", "weight_decay", "layer_decay", "warmup_epochs", "warmup_lr", "min_lr",
             "drop_path", "smoothing", "aa", "reprob", "scale", "seed", "img_size", "train_interpolation")
# matched_settings keys that train.py's args.yaml holds under the same name


def timm_top1(run: Path) -> list[float]:
    """Top-1 per epoch from a train.py output folder's summary.csv."""
    with open(run / "summary.csv") as f:
        return [round(float(r["eval_top1"]), 2) for r in csv.DictReader(f)]


def read_timm_run(run: Path, s: dict) -> dict:
    """A finished train.py run (its args.yaml and summary.csv) as this bench's timm side, after checking that it
    ran the matched settings: a 15-epoch CPU run takes hours, so one run serves several fdfast rows."""
    import yaml
    args = yaml.safe_load((run / "args.yaml").read_text())
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # YAML lists vs this bench's tuples
    wrong = {k: (args.get(k), s[k]) for k in TIMM_ARGS if plain(args.get(k)) != plain(s[k])}
    wrong.update({k: (args.get(k), v) for k, v in (("model", "vit_small_patch14_dinov2"), ("gp", "avg"),
                                                    ("opt", "adamw"), ("sched_on_updates", True), ("mixup", 0.0),
                                                    ("cutmix", 0.0), ("clip_grad", None)) if args.get(k) != v})
    amp = "bf16" if args.get("amp") and args.get("amp_dtype") == "bfloat16" else "fp16" if args.get("amp") else "fp32"
    if amp != s["precision"]:
        wrong["precision"] = (amp, s["precision"])
    if wrong:
        raise SystemExit(f"--timm-run {run.name}: not the matched settings (train.py's value, this bench's): {wrong}")
    top1 = timm_top1(run)
    if len(top1) != s["epochs"]:
        raise SystemExit(f"--timm-run {run.name}: {len(top1)} epochs in summary.csv, {s['epochs']} expected")
    return {"top1": top1, "wall_s": None, "reused_run": run.name}


def run_fdfast(data: Path, out: Path, s: dict, device: str, workers: int, recipe: str) -> dict:
    """``fdfast finetune`` (the CLI, in a subprocess) with the same values; metrics.jsonl -> top-1 per epoch."""
    ref = 512  # optim.lr_batch_ref: fdfast's lrs are per 512 images
    per_ref = ref / s["batch_size"]
    sets = {"data.img_size": s["img_size"], "data.batch_size": s["batch_size"], "data.train_per_class": 0,
            "data.val_per_class": 0, "data.auto_augment": s["aa"], "data.reprob": s["reprob"],
            "data.scale": list(s["scale"]), "data.mixup": 0.0, "data.cutmix": 0.0,
            "data.label_smoothing": s["smoothing"], "data.num_workers": workers, "data.seed": s["seed"],
            "model.drop_path": s["drop_path"], "model.layer_decay": s["layer_decay"],
            "model.head_init_scale": s["head_init_scale"], "data.train_interpolation": s["train_interpolation"],
            "optim.epochs": s["epochs"], "optim.warmup_epochs": s["warmup_epochs"], "optim.lr_batch_ref": ref,
            "optim.base_lr": s["lr"] * per_ref, "optim.warmup_lr": s["warmup_lr"] * per_ref,
            "optim.min_lr": s["min_lr"] * per_ref, "optim.weight_decay": s["weight_decay"],
            "optim.clip_grad": None, "runtime.seed": s["seed"], "runtime.precision": s["precision"],
            "runtime.progress": False}
    run_dir = out / "fdfast"
    cmd = [sys.executable, "-m", "fdfast", "finetune", TEACHER, recipe, "--data", str(data), "--out", str(run_dir),
           "--device", device]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    t0 = time.time()
    with open(out / "fdfast.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    top1 = [round(r["top1"], 2) for r in rows if "top1" in r]
    return {"top1": top1, "wall_s": round(time.time() - t0), "recipe": recipe,
            "command": _portable(cmd[3:], {data: "DATA", run_dir: "OUT/fdfast"})}


def _portable(cmd: list[str], names: dict) -> str:
    """The command line with this machine's paths replaced by placeholders (rows are committed)."""
    names = {str(k): v for k, v in names.items()}
    return " ".join(names.get(arg, arg) for arg in cmd)


def print_curves(row: dict) -> None:
    t, f = row["timm"]["top1"], row["fdfast"]["top1"]
    print(f"{'epoch':>5} {'timm':>7} {'fdfast':>7} {'gap':>6}")
    for e, (a, b) in enumerate(zip(t, f), 1):
        print(f"{e:>5} {a:>7.2f} {b:>7.2f} {b - a:>+6.2f}")
    print(f"final gap (fdfast - timm): {row['gap_final']:+.2f} points ({'within' if row['within_tolerance'] else 'OUTSIDE'}"
          f" {row['tolerance']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timm-train", type=Path, required=True, help="train.py of a pytorch-image-models checkout")
    p.add_argument("--timm-run", type=Path, default=None,
                   help="a finished train.py output folder with these settings (args.yaml, summary.csv): reused, "
                        "not rerun")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ft-parity", help="scratch dir (data links, runs)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=0, help="0: the whole val split")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (the lr stays 1e-3 per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-interpolation", choices=("random", "bicubic", "bilinear"), default="random",
                   help="fdfast's training interpolation: random is timm train.py's default (the matched value)")
    p.add_argument("--head-init-scale", type=float, default=1.0,
                   help="fdfast's head init: trunc-normal std 0.02 x this. 1: timm train.py's own init (the matched "
                        "value); 0.001: the paper's, fdfast's recipes' default")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--workers", type=int, default=1, help="data loader workers of each trainer")
    p.add_argument("--recipe", default="ft_demo", help="the fdfast fine-tune recipe under the matched values")
    p.add_argument("--tolerance", type=float, default=2.0, help="largest allowed |final top-1 gap| in points")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSONL file the row is appended to")
    a = p.parse_args(argv)
    if not a.timm_train.is_file():
        p.error(f"--timm-train {a.timm_train} is not a file: fetch pytorch-image-models and pass its train.py")
    import torch
    from bench.run import environment
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.precision = resolve_precision(a.precision, device)
    a.out.mkdir(parents=True, exist_ok=True)
    if (a.out / "timm").exists() or (a.out / "fdfast").exists():
        p.error(f"{a.out} holds runs of an earlier call; pass a new --out")
    s = matched_settings(a)
    data = link_image_folder(a.out, a.train_per_class, a.val_per_class)
    load = os.getloadavg()[0]
    timm_res = (read_timm_run(a.timm_run, s) if a.timm_run else
                run_timm(a.timm_train.resolve(), data, a.out, s, device, a.workers))
    fd_res = run_fdfast(data, a.out, s, device, a.workers, a.recipe)
    import timm
    gap = round(fd_res["top1"][-1] - timm_res["top1"][-1], 2)
    import hashlib
    row = {"bench": "ft_parity", "settings": s, "timm": timm_res, "fdfast": fd_res, "gap_final": gap,
           "tolerance": a.tolerance, "within_tolerance": abs(gap) <= a.tolerance, "timm_version": timm.__version__,
           "timm_train_py_sha1": hashlib.sha1(a.timm_train.read_bytes()).hexdigest(),
           "load_avg_start": round(load, 2), "load_avg_end": round(os.getloadavg()[0], 2), **environment(device)}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print_curves(row)
    return 0 if row["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
