"""The paper's ablation grid on the demo: each FD switch flipped alone from the paper's default, same seed and budget.

    python bench/ablate.py [--budget-min 45] [--steps N] [--only NAME ...] [--out DIR] [--runs DIR] [--quick]

Teacher: the demo's real DINOv2 ViT-S/14, distilled into the demo's ViT-Ti/14 on the real scikit-image photos
(fdfast/recipes/demo.yaml). Every run gets the same seed and the same number of steps; without --steps the
step count is what fits --budget-min for the whole grid, from a short timed calibration run. Per run:
- final FD loss: the mean logged loss over the last 10% of steps. Losses of different kinds (smooth-L1, L2,
  cosine) or targets are not comparable with each other; the two columns below are;
- k-NN top-1 (%) of the student's pooled features on the demo-labelled set (fdfast.evaluate, k=20, T=0.07):
  the whole val split against the first 400 training images of each class;
- attention-distance spread of the last 3 layers: the std over heads of each head's mean attention distance
  (px, fdfast.diagnostics), averaged over those layers, on the first 16 demo photos. FD's claim: wider spread.
Writes DIR/ablations.jsonl (one row per switch, with device and versions), DIR/ablations.md and DIR/ablations.png
(DIR: bench/results/ablations; --quick: runs/ablations-quick, 2 steps, a k-NN subset: a pipeline test).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = "demo"
RESULTS = ROOT / "bench" / "results" / "ablations"
LAST_LAYERS = 3  # "the last layers" of the attention-distance spread
ATTENTION_IMAGES = 16
KNN_TRAIN_PER_CLASS = 400  # k-NN reference images per class (of ~780; the full val split is scored): measured,
# the full set costs ~180 CPU-s per run on this machine, this subset about half
EVAL_S = 75  # per-run evaluation seconds assumed when sizing the budget (k-NN ~6,000 images + attention)


@dataclass(frozen=True)
class Ablation:
    name: str
    overrides: dict = field(default_factory=dict)  # --set keys flipped from the recipe
    paper: str = ""  # what the paper found for this switch


GRID = (
    Ablation("default", {}, "FD: full feature map, whitened, smooth-L1, shared RPB, teacher drop path 0"),
    Ablation("whiten_off", {"loss.whiten": False}, "worse than whitening"),
    Ablation("target_cls", {"loss.target": "cls"}, "worse than the full feature map"),
    Ablation("target_embedding", {"loss.target": "embedding"}, "worse than the full feature map"),
    Ablation("kind_l2", {"loss.kind": "l2"}, "smooth-L1 best"),
    Ablation("kind_cosine", {"loss.kind": "cosine"}, "smooth-L1 best"),
    Ablation("pos_bias_per_block", {"model.pos_bias": "per_block"}, "shared RPB best"),
    Ablation("pos_bias_abs", {"model.pos_bias": "abs"}, "shared RPB best"),
    Ablation("teacher_drop_path", {"teacher.drop_path": 0.1}, "asymmetric (teacher 0) best"),  # student's: 0.1
)


# ----------------------------------------------------------------------------- one run
def run_config(ablation: Ablation, steps: int, quick: bool):
    from fdfast.config import load_config
    common = {"optim.steps": steps, "optim.warmup_steps": max(1, steps // 10), "ckpt.every": 0, "ckpt.keep": 1,
              "runtime.progress": False, "runtime.tensorboard": False, "runtime.log_every": 1 if quick else 10}
    if quick:
        common.update({"data.batch_size": 4, "data.num_workers": 0})
    return load_config(RECIPE, {**common, **ablation.overrides})


def unavailable(cfg) -> str | None:
    """Why a switch cannot run with this recipe's teacher (None: it can)."""
    from fdfast.models.teachers import get_entry
    if cfg.loss.target == "embedding" and not get_entry(cfg.teacher.name).head_dim:
        return (f"{cfg.teacher.name} has no head or projection (a self-supervised backbone): nothing to distill; "
                f"demo-efficientnet-lite0 (ImageNet logits) can: --set teacher.name=demo-efficientnet-lite0")
    return None


def final_loss(run_dir: Path, steps: int) -> float:
    """Mean logged loss over the last 10% of the steps (at least the last logged row)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = [r["loss"] for r in rows if r["step"] > steps - max(1, steps // 10)] or [rows[-1]["loss"]]
    return sum(tail) / len(tail)


def knn(run_dir: Path, data: Path) -> float:
    from fdfast.evaluate import extract_features, knn_top1
    return knn_top1(extract_features(str(run_dir), str(data), cache=False))


def attention_spread(run_dir: Path, count: int = ATTENTION_IMAGES) -> dict:
    """Std over heads of the mean attention distance (px), averaged over the last layers; and their mean distance."""
    from fdfast.diagnostics.inputs import image_paths, load_images, load_model_under_test, to_tensor
    from fdfast.diagnostics.run import attention_statistics
    mut = load_model_under_test(str(run_dir))
    images = to_tensor(load_images(image_paths(None, count), mut.image_size), mut.mean, mut.std)
    layers = attention_statistics(mut.model, images)["layers"][-LAST_LAYERS:]
    return {"attn_spread_px": sum(layer["spread"]["std"] for layer in layers) / len(layers),
            "attn_mean_px": sum(sum(layer["distances"]) / len(layer["distances"]) for layer in layers) / len(layers)}


def run_one(ablation: Ablation, steps: int, runs: Path, knn_data: Path | None, quick: bool) -> dict:
    from fdfast.train import train
    cfg = run_config(ablation, steps, quick)
    row = {"switch": ablation.name, "settings": ablation.overrides, "paper": ablation.paper, "steps": steps,
           "loss_kind": cfg.loss.kind, "loss_target": cfg.loss.target}
    why = unavailable(cfg)
    if why:
        return dict(row, skipped=why)
    run_dir = runs / ablation.name
    shutil.rmtree(run_dir, ignore_errors=True)  # same budget from scratch, every time
    t0 = time.perf_counter()
    train(cfg, run_dir)
    row.update(train_s=round(time.perf_counter() - t0, 1), final_loss=final_loss(run_dir, steps))
    t0 = time.perf_counter()
    row["knn_top1"] = knn(run_dir, knn_data) if knn_data else None
    row.update(attention_spread(run_dir, 4 if quick else ATTENTION_IMAGES), eval_s=round(time.perf_counter() - t0, 1))
    return row


# ----------------------------------------------------------------------------- budget
def calibrate_step_s(runs: Path) -> float:
    """Seconds per optimizer step of the default config (the median of steps 3..8 of a short run)."""
    from fdfast.train import train
    cfg = run_config(GRID[0], 8, quick=False)
    cfg.runtime.log_every = 1
    run_dir = runs / "_calibration"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = sorted(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[2:], rows[3:]))
    shutil.rmtree(run_dir, ignore_errors=True)
    return times[len(times) // 2]


def steps_for_budget(budget_min: float, n_runs: int, step_s: float, recipe_steps: int) -> int:
    """The most steps (<= the recipe's) that lets n_runs runs and their evaluations fit the budget (10% margin)."""
    train_s = budget_min * 60 / n_runs - EVAL_S
    steps = max(0, int(train_s / (1.1 * step_s)))
    if steps < 20:
        raise SystemExit(f"ablate: --budget-min {budget_min} leaves {steps} steps per run ({n_runs} runs at "
                         f"{step_s:.2f} s/step + ~{EVAL_S} s evaluation each); give more minutes or --steps N")
    return min(steps, recipe_steps)


def knn_subset(per_class: int, val_per_class: int, where: Path) -> Path:
    """A train/val ImageFolder of the first images per class of the demo-labelled set (symlinks; 0: all)."""
    from fdfast.data.sources import source_dir
    src = Path(source_dir("demo-labelled"))
    shutil.rmtree(where, ignore_errors=True)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (where / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n or None]:
                (where / split / cls.name / f.name).symlink_to(f)
    return where


# ----------------------------------------------------------------------------- report
def _fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def write_table(rows: list[dict], out: Path) -> Path:
    lines = ["| switch | setting | paper's finding | final FD loss (kind) | k-NN top-1 % | attn spread, last 3 "
             "layers (px) | attn mean (px) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(recipe default)"
        if r.get("skipped"):
            lines.append(f"| {r['switch']} | {setting} | {r['paper']} | not run: {r['skipped']} | | | |")
            continue
        lines.append(f"| {r['switch']} | {setting} | {r['paper']} | {_fmt(r['final_loss'], '.4f')} ({r['loss_kind']}, "
                     f"{r['loss_target']}) | {_fmt(r['knn_top1'], '.1f')} | {_fmt(r['attn_spread_px'], '.2f')} | "
                     f"{_fmt(r['attn_mean_px'], '.2f')} |")
    env = rows[0]
    lines += ["", f"{env['steps']} steps per run, seed 0, recipe `{RECIPE}` (DINOv2 ViT-S/14 -> ViT-Ti/14, real "
              f"photos); {env.get('device_name', '?')} x {env.get('cpu_count', '?')} cores, torch {env.get('torch')}, "
              f"git {env.get('git_sha')}, {env.get('time')}.",
              "FD losses of different kinds / targets are not comparable; k-NN and the attention spread are."]
    from fdfast.io import atomic_write_text
    return atomic_write_text(out / "ablations.md", "\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> Path:
    from fdfast.diagnostics.plots import _plt, _save
    plt = _plt()
    done = [r for r in rows if not r.get("skipped")]
    names = [r["switch"] for r in done]
    panels = [("k-NN top-1 (%)", "knn_top1"), ("attention-distance spread,\nlast 3 layers (px)", "attn_spread_px"),
              ("final FD loss (kinds differ:\nnot comparable)", "final_loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 0.35 * len(done) + 1.5), sharey=True)
    for ax, (title, key) in zip(axes, panels):
        values = [r.get(key) if r.get(key) is not None else math.nan for r in done]
        colours = ["#1f5fa8" if r["switch"] == "default" else "#8a8a8a" for r in done]
        ax.barh(range(len(done)), values, color=colours)
        ax.set_title(title)
    axes[0].set_yticks(range(len(done)), names)
    axes[0].invert_yaxis()
    return _save(fig, out / "ablations.png")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-min", type=float, default=45.0, help="wall minutes for the whole grid (default 45)")
    p.add_argument("--steps", type=int, help="steps per run (default: what fits --budget-min)")
    p.add_argument("--only", nargs="+", choices=[a.name for a in GRID], help="run only these switches")
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--runs", type=Path, help="run directories (default runs/ablations)")
    p.add_argument("--no-knn", action="store_true", help="skip the k-NN evaluation")
    p.add_argument("--quick", action="store_true", help="2 steps of 4 images, k-NN on 10+5 images per class, "
                   "attention on 4 photos: a test of the pipeline (~1-2 min on 2 quiet cores)")
    args = p.parse_args(argv)
    out = args.out or (ROOT / "runs" / "ablations-quick" if args.quick else RESULTS)
    runs = args.runs or ROOT / "runs" / ("ablations-quick" if args.quick else "ablations") / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    grid = [a for a in GRID if not args.only or a.name in args.only]
    knn_data = None if args.no_knn else knn_subset(*((10, 5) if args.quick else (KNN_TRAIN_PER_CLASS, 0)),
                                                   runs / "_knn_subset")

    from bench.run import environment
    from fdfast import runtime
    from fdfast.config import RuntimeConfig, load_config
    runtime.apply(RuntimeConfig())  # the process settings `fdfast train` makes (glibc malloc), once
    env = environment("cpu")
    if args.quick:
        steps = args.steps or 2
    else:
        runnable = sum(1 for a in grid if not unavailable(run_config(a, 1, False)))
        step_s = calibrate_step_s(runs) if not args.steps else None
        steps = args.steps or steps_for_budget(args.budget_min, runnable, step_s, load_config(RECIPE).optim.steps)
        print(f"ablate: {runnable} runs of {steps} steps" + (f" ({step_s:.2f} s/step measured)" if step_s else ""),
              file=sys.stderr, flush=True)
    rows, t0 = [], time.perf_counter()
    for a in grid:
        row = dict(run_one(a, steps, runs, knn_data, args.quick), **env)
        rows.append(row)
        print(f"ablate: {a.name}: " + (f"skipped ({row['skipped']})" if row.get("skipped") else
              f"loss {row['final_loss']:.4f}, k-NN {_fmt(row['knn_top1'], '.1f')}, spread "
              f"{row['attn_spread_px']:.2f} px, {row['train_s'] + row['eval_s']:.0f} s"), file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    from fdfast.io import atomic_write_text
    atomic_write_text(out / "ablations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_table(rows, out)
    plot(rows, out)
    print((out / "ablations.md").read_text())
    print(f"ablate: {time.perf_counter() - t0:.0f} s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
