"""The paper's ablations at this machine's scale: each FD switch flipped alone, 3 seeds, judged against seed noise.

    python bench/ablate.py --plan                     # the cells, which are done, the estimated time of the rest
    nohup python bench/ablate.py > ablate.log 2>&1 &  # run what is not done yet (stop and rerun at will)
    python bench/ablate.py --report                   # ablations.md / .jsonl / .png from the finished cells

The same experiment and runner as bench/repro.py (its docstring: teacher, student, data, cells, keys, resume), at
the scaling curve's second-largest FD budget: for each switch and seed, an FD run, then the probe and the
fine-tune of its student. The default's cells are the curve's own cells at that budget (same config, same key):
they are read from bench/results/repro and run once for both. Per switch: mean +- std over seeds of the fine-tune
top-1 (final epoch), k-NN and linear-probe top-1, the final FD loss (its kind and target differ between switches:
not comparable) and the attention-distance spread of the deep layers; the difference from the default is marked
where it exceeds 2 standard errors (sqrt(se_switch^2 + se_default^2)). Writes DIR/ablations.jsonl (one row per
switch), DIR/ablations.md and DIR/ablations.png (DIR: bench/results/ablations).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.repro import (RESULTS as CURVE_RESULTS, Cell, Runner, Setup, add_arguments, collect,  # noqa: E402
                         mean_se, run_grid, setup_from_args, student_cells)

RESULTS = ROOT / "bench" / "results" / "ablations"
SEPARATES = 2.0  # standard errors of a difference that count as a difference


@dataclass(frozen=True)
class Ablation:
    name: str
    overrides: dict = field(default_factory=dict)  # FD config keys flipped from the experiment's default
    paper: str = ""  # what the paper found for this switch (fine-tuning accuracy)


GRID = (
    Ablation("default", {}, "full feature map, whitened, smooth-L1, shared RPB, teacher drop path 0"),
    Ablation("whiten_off", {"loss.whiten": False}, "worse than whitening"),
    Ablation("target_cls", {"loss.target": "cls"}, "worse than the full feature map"),
    Ablation("pos_bias_per_block", {"model.pos_bias": "per_block"}, "worse than one shared RPB"),
    Ablation("kind_l2", {"loss.kind": "l2"}, "worse than smooth-L1"),
    Ablation("teacher_drop_path", {"teacher.drop_path": 0.1}, "worse than the asymmetric 0 (student 0.1)"),
)


def ablation_cells(setup: Setup, steps: int, grid=GRID) -> list[Cell]:
    """Seed by seed (a partial grid compares every switch on fewer seeds): each switch's FD run, probe, fine-tune."""
    cells = []
    for seed in setup.seeds:
        for a in grid:
            cells += student_cells(setup, steps, seed, a.overrides, tags={"switch": a.name})
    return cells


# ----------------------------------------------------------------------------- report
def compare(stats: dict, base: dict) -> dict | None:
    """Difference of means from the default, its standard error and whether it exceeds SEPARATES of them."""
    if not stats or not base:
        return None
    diff = stats["mean"] - base["mean"]
    se = math.sqrt(stats["se"] ** 2 + base["se"] ** 2)
    return {"diff": diff, "se": se, "separates": bool(se > 0 and abs(diff) > SEPARATES * se)}


def verdict(row: dict) -> str:
    """Where the paper's ordering (every switch is worse than the default) holds for the fine-tune top-1 here."""
    c = row.get("vs_default", {}).get("ft_top1")
    if c is None:
        return "not measured yet"
    if not c["separates"]:
        return f"no difference beyond {SEPARATES:g} SE: the paper's ordering is not resolved here"
    return "worse: the paper's ordering holds" if c["diff"] < 0 else "better: the paper's ordering does not hold"


def rows_of(cells: list[Cell], runner: Runner, grid=GRID) -> list[dict]:
    per = collect(cells, runner, lambda c: c.tags.get("switch"))
    stats = {name: {k: mean_se(v) for k, v in m.items() if k != "wall_s"} for name, m in per.items()}
    base = stats.get("default", {})
    rows = []
    for a in grid:
        s = stats.get(a.name, {})
        row = {"switch": a.name, "settings": a.overrides, "paper": a.paper, "stats": s,
               "wall_s": round(per.get(a.name, {}).get("wall_s", 0.0), 1)}
        if a.name != "default":
            row["vs_default"] = {k: compare(s.get(k), base.get(k)) for k in ("ft_top1", "knn_top1", "linprobe_top1")}
            row["verdict"] = verdict(row)
        rows.append(row)
    return rows


def _cell(s: dict | None, c: dict | None = None, digits: int = 2) -> str:
    if not s:
        return "--"
    text = f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}" + (f" (n={s['n']})" if s["n"] != 3 else "")
    if c is not None:
        text += f", {c['diff']:+.2f}" + (" **" if c["separates"] else "")
    return text


def write_report(rows: list[dict], steps: int, out: Path) -> str:
    from fdfast.io import atomic_write_text
    lines = [f"| switch | setting | fine-tune top-1 (end), diff | k-NN top-1, diff | linear probe top-1, diff | "
             f"final FD loss | attn spread, last 3 layers (px) | paper | here (fine-tune top-1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, vs = r["stats"], r.get("vs_default", {})
        setting = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(the curve's default)"
        lines.append(f"| {r['switch']} | {setting} | {_cell(s.get('ft_top1'), vs.get('ft_top1'))} | "
                     f"{_cell(s.get('knn_top1'), vs.get('knn_top1'))} | "
                     f"{_cell(s.get('linprobe_top1'), vs.get('linprobe_top1'))} | "
                     f"{_cell(s.get('fd_loss'), digits=4)} | {_cell(s.get('attn_spread_deep'))} | "
                     f"{r['paper']} | {r.get('verdict', '')} |")
    lines += ["", f"{steps} FD steps per run; mean +- std over seeds (n=3 unless marked); diff: switch minus default; "
              f"** marks a difference beyond {SEPARATES:g} standard errors (sqrt(se^2 + se_default^2)). FD losses "
              f"of different kinds or targets are not comparable.",
              f"{sum(r['wall_s'] for r in rows) / 3600:.1f} h of wall time in the cells (the default's shared with "
              f"the curve)."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "ablations.md", text)
    atomic_write_text(out / "ablations.jsonl", "".join(json.dumps(dict(r, steps=steps)) + "\n" for r in rows))
    plot(rows, out / "ablations.png")
    return text


def plot(rows: list[dict], path: Path) -> Path:
    from fdfast.diagnostics.plots import _plt, _save
    plt = _plt()
    panels = [("fine-tune top-1, final epoch (%)", "ft_top1"), ("k-NN top-1 (%)", "knn_top1"),
              ("attention-distance spread,\nlast 3 layers (px)", "attn_spread_deep")]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, (title, key) in zip(axes, panels):
        means = [r["stats"].get(key, {}).get("mean", math.nan) for r in rows]
        errs = [2 * r["stats"].get(key, {}).get("se", 0.0) for r in rows]
        colours = ["#1f5fa8" if r["switch"] == "default" else "#8a8a8a" for r in rows]
        ax.barh(range(len(rows)), means, xerr=errs, color=colours, capsize=3)
        finite = [m for m in means if not math.isnan(m)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_xlim(max(0.0, lo - (hi - lo) - 2 * max(errs) - 1), hi + 2 * max(errs) + 1)
        ax.set_title(title + "\n(+- 2 SE)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(rows)), [r["switch"] for r in rows])
    axes[0].invert_yaxis()
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p, RESULTS)
    p.add_argument("--steps", type=int, help="FD steps of every run (default: the curve's second-largest budget, "
                   f"{Setup.budgets[-2]})")
    p.add_argument("--only", nargs="+", choices=[a.name for a in GRID], help="only these switches (and the default)")
    args = p.parse_args(argv)
    setup, results = setup_from_args(args, "ablations")
    results = results or RESULTS
    steps = args.steps or (setup.budgets[-1] if args.quick else setup.budgets[-2])
    grid = [a for a in GRID if not args.only or a.name == "default" or a.name in args.only]
    from fdfast import runtime
    from fdfast.config import RuntimeConfig
    runtime.apply(RuntimeConfig())  # the process settings `fdfast train` makes (glibc malloc), once
    cells = ablation_cells(setup, steps, grid)
    also = [] if args.quick else [CURVE_RESULTS]
    if not args.report:
        run_grid(setup, cells, results, also_read=also, budget_min=args.budget_min, plan_only=args.plan,
                 recalibrate=args.recalibrate, keep_runs=args.keep_runs)
    if not args.plan:
        rows = rows_of(cells, Runner(setup, results, also), grid)
        print(write_report(rows, steps, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
