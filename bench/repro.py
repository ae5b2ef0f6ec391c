"""The paper's claim at this machine's scale, in one command: FD student vs its teacher vs random init.

    python bench/repro.py            # ~60 min on 2 cores -> bench/results/repro/
    python bench/repro.py --quick    # ~2 min smoke run of every step -> runs/repro-quick/results/

1. FD: the real pretrained DINOv2-S/14 of the demo (teacher: demo-dinov2-s14) distilled into a ViT-S/14 student
   with one shared relative position bias (the same family and size) on the training images of the
   demo-labelled set (real animal silhouettes, labels unused), at 56 px (4x4 patches).
2. Fine-tune (fdfast finetune, recipe ft_demo: layer decay, RandAugment, random erasing, ...) (a) the teacher,
   (b) the FD student and (c) a random init of the student's architecture, with --seeds seeds each, on a
   low-shot slice of the demo-labelled train split; top-1 on its full val split after every epoch.
3. k-NN and linear probe (fdfast knn / linprobe: frozen features, full splits) of the same three models.
4. The attention distance of teacher and student (fdfast diagnose) on val images.
Writes results.json (every number, the seeds, wall times), table.md (mean +- std over seeds),
learning_curves.png and attention_distance.png/.json. The paper's direction: FD student > teacher after
fine-tuning, FD student < teacher in linear probing; the table says what came out here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEACHER = "demo-dinov2-s14"
IMG = 56  # 4 x 4 patches of 14 px: the 28 px silhouettes upsampled x2
FULL = dict(fd_steps=300, fd_batch=32, epochs=5, per_class=100, val_per_class=0, batch=32, seeds=3,
            probe_per_class=0, diag_images=16)
QUICK = dict(fd_steps=2, fd_batch=8, epochs=1, per_class=4, val_per_class=3, batch=8, seeds=2,
             probe_per_class=6, diag_images=2)


def distil(data_train: Path, out: Path, p: dict) -> Path:
    """FD run (fdfast.train) of a ViT-S/14 shared-RPB student from the demo DINOv2-S/14 teacher."""
    from fdfast.config import load_config
    from fdfast.train import train
    steps = p["fd_steps"]
    cfg = load_config("demo", {
        "model.size": "small", "model.patch_size": 14, "model.img_size": IMG, "model.drop_path": 0.1,
        "teacher.name": TEACHER, "data.path": str(data_train), "data.batch_size": p["fd_batch"],
        "data.scale": [0.35, 1.0], "data.num_workers": 1, "optim.steps": steps,
        "optim.warmup_steps": max(1, steps // 10), "ckpt.every": 0, "runtime.tensorboard": False,
        "runtime.log_every": max(1, steps // 20)})
    import yaml
    saved = out / "config.yaml"
    done = (out / "student.safetensors").is_file() and saved.is_file() and \
        yaml.safe_load(saved.read_text()) == cfg.to_dict()  # an earlier run of exactly this FD: reuse it
    if not done:
        shutil.rmtree(out, ignore_errors=True)
        train(cfg, out)
    return out


def random_student(fd_run: Path, out: Path, seed: int) -> Path:
    """The FD student's architecture, randomly initialised (seeded): the baseline, as a student file."""
    import torch
    from fdfast.checkpoint import STUDENT_META_KEY, read_student
    from fdfast.io import atomic_save_safetensors
    from fdfast.models.export import model_config
    from fdfast.models.student import build_student
    model_cfg, _ = read_student(fd_run)
    torch.manual_seed(seed)
    student = build_student(model_config(model_cfg))
    path = out / f"random-s{seed}.safetensors"
    atomic_save_safetensors(student.state_dict(), path, metadata={STUDENT_META_KEY: json.dumps(model_cfg)})
    return path


def finetune_one(spec: str, out: Path, seed: int, p: dict) -> dict:
    from fdfast.finetune import finetune, load_finetune_config
    cfg = load_finetune_config("ft_demo", {
        "data.img_size": IMG, "data.train_per_class": p["per_class"], "data.val_per_class": p["val_per_class"],
        "data.batch_size": p["batch"], "data.seed": seed, "runtime.seed": seed, "optim.epochs": p["epochs"],
        "runtime.progress": False})
    shutil.rmtree(out, ignore_errors=True)
    summary = finetune(cfg, spec, out)
    curve = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return dict(summary, curve=[{k: r[k] for k in ("epoch", "top1", "top5", "train_loss")} for r in curve])


def probes(spec: str, p: dict) -> dict:
    from fdfast.evaluate import extract_features, knn_top1, linear_probe
    t = time.perf_counter()
    f = extract_features(spec, img_size=IMG, train_per_class=p["probe_per_class"], val_per_class=p["probe_per_class"])
    lp = linear_probe(f)
    return {"knn_top1": knn_top1(f), "linprobe_top1": lp["top1"], "linprobe_wd": lp["wd"],
            "probe_train_images": len(f.train), "probe_val_images": len(f.val), "wall_s": time.perf_counter() - t}


def attention_figure(teacher: str, student: Path, val_dir: Path, out: Path, p: dict) -> None:
    from fdfast.cli import main
    diag = out / "diagnose"
    rc = main(["diagnose", teacher, str(student), "--data", str(val_dir), "--img-size", str(IMG),
               "--images", str(p["diag_images"]), "--landscape-loss", "none", "--out", str(diag), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"repro: fdfast diagnose failed (exit {rc})")
    for name in ("attention_distance.png", "attention_distance.json"):
        if (diag / name).is_file():
            shutil.copy(diag / name, out / name)
    shutil.rmtree(diag, ignore_errors=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_table(res: dict, out: Path) -> str:
    rows = ["| model | fine-tune top-1 | fine-tune top-5 | k-NN top-1 | linear probe top-1 |",
            "|---|---|---|---|---|"]
    for name, label in (("teacher", "DINOv2-S/14 teacher"), ("fd", "FD student (ViT-S/14, shared RPB)"),
                        ("random", "random init (same architecture)")):
        r = res["models"][name]
        t1 = mean_std([s["top1"] for s in r["finetune"]])
        t5 = mean_std([s["top5"] for s in r["finetune"]])
        rows.append(f"| {label} | {t1[0]:.2f} +- {t1[1]:.2f} | {t5[0]:.2f} +- {t5[1]:.2f} | "
                    f"{r['probes']['knn_top1']:.2f} | {r['probes']['linprobe_top1']:.2f} |")
    text = "\n".join(rows) + "\n"
    (out / "table.md").write_text(text)
    return text


def plot_curves(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("teacher", "teacher"), ("fd", "FD student"), ("random", "random init")):
        curves = [[c["top1"] for c in s["curve"]] for s in res["models"][name]["finetune"]]
        epochs = list(range(1, len(curves[0]) + 1))
        stats = [mean_std([c[i] for c in curves]) for i in range(len(epochs))]
        m = [s[0] for s in stats]
        sd = [s[1] for s in stats]
        ax.plot(epochs, m, marker="o", label=label)
        ax.fill_between(epochs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"demo-labelled, {res['params']['per_class']} images/class, mean +- std of "
                 f"{res['params']['seeds']} seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~2 minute smoke run of every step")
    ap.add_argument("--out", help="results folder (default: bench/results/repro; --quick: runs/repro-quick/results)")
    ap.add_argument("--work", help="runs folder (default: runs/repro[-quick])")
    ap.add_argument("--seeds", type=int, help="fine-tuning seeds per model")
    ap.add_argument("--fd-steps", type=int)
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "fd_steps", "epochs"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    work = Path(args.work or ROOT / ("runs/repro-quick" if args.quick else "runs/repro"))
    out = Path(args.out or (work / "results" if args.quick else ROOT / "bench/results/repro"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    from fdfast import runtime
    from fdfast.config import RuntimeConfig
    from fdfast.data.sources import source_dir
    runtime.apply(RuntimeConfig())  # the process settings `fdfast train` makes (glibc malloc), once
    t0 = time.perf_counter()
    data = source_dir("demo-labelled")
    res = {"params": dict(p, img_size=IMG, teacher=TEACHER, quick=args.quick), "wall_s": {}, "models": {},
           "torch_threads": torch.get_num_threads()}

    def stage(name, fn):
        t = time.perf_counter()
        print(f"repro: {name} ...", file=sys.stderr, flush=True)
        value = fn()
        res["wall_s"][name] = round(time.perf_counter() - t, 1)
        print(f"repro: {name} done in {res['wall_s'][name]:.0f}s", file=sys.stderr, flush=True)
        return value

    fd_run = stage("fd", lambda: distil(data / "train", work / "fd", p))
    seeds = list(range(p["seeds"]))
    specs = {"teacher": lambda s: f"teacher:{TEACHER}", "fd": lambda s: str(fd_run),
             "random": lambda s: str(random_student(fd_run, work, s))}
    for name, spec in specs.items():
        runs = stage(f"finetune-{name}", lambda: [finetune_one(spec(s), work / f"ft-{name}-s{s}", s, p) for s in seeds])
        probe = stage(f"probes-{name}", lambda: probes(spec(0), p))
        res["models"][name] = {"spec": spec(0), "seeds": seeds, "finetune": runs, "probes": probe}
    stage("attention", lambda: attention_figure(f"teacher:{TEACHER}", fd_run, data / "val", out, p))
    res["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot_curves(res, out)
    table = write_table(res, out)
    print(table + f"\nrepro: {res['wall_s']['total']:.0f}s in all -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
