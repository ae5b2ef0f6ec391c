"""FD at the scale two cores reach, as a grid of durable cells: the scaling curve of the paper's claim (issue 26).

    python bench/repro.py --plan                     # the cells, which are done, the estimated time of the rest
    nohup python bench/repro.py > repro.log 2>&1 &   # run what is not done yet; stop (even kill -9) and rerun at will
    python bench/repro.py --budget-min 240           # only the cells whose estimates fit 4 hours, in plan order
    python bench/repro.py --report                   # curve.json / curve.md / curve.png from the finished cells
    python bench/repro.py --quick                    # a few-minute smoke run of every kind of cell

The experiment: the demo's real DINOv2-S/14 teacher (``demo-dinov2-s14``) distilled into a ViT-S/14 student with
one shared relative position bias, 112 px, on the TRAINING split of the demo-labelled set (7,775 real animal
silhouettes; labels unused), for each budget of FD steps (0: the student's random init) and each seed. Every
model -- teacher, random init, FD students -- is then measured the same way:
- fine-tune (``fdfast finetune``, recipe ft_demo, one recipe for every init) on 100 training images per class,
  top-1 on the whole val split after every epoch: the final and the best epoch;
- k-NN and linear probe (fdfast.evaluate) of its frozen features;
- attention distance per layer and head, and head similarity (fdfast.diagnostics), on val images.

The runner. A cell is one FD run, one fine-tune or one probe. Its key is a hash of everything that decides its
result: the resolved config dict (every default included), the seed, the keys of the cells it reads (an FD
student), the runner's own measurement settings and a per-kind version (``VERSIONS``, raised when the runner
measures a kind differently). A finished cell is one JSON file, written atomically, under the results folder
(``cells/<kind>-<key>.json``, committed); a rerun skips it, so a changed config runs anew and an identical one
never twice. Run directories live under the work folder (``runs/repro/<kind>-<key>``, not committed): an FD run or
fine-tune stopped mid-way -- SIGINT, SIGTERM or kill -9 -- continues from its last committed checkpoint
(``--resume auto``, exact). Before it starts, the runner prints every cell with its estimated time, from a
timed calibration (a few timed steps of each kind of cell, cached per config and machine in the work folder).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "repro"
ABLATION_RESULTS = ROOT / "bench" / "results" / "ablations"  # bench/ablate.py's cells: its default is the curve's
WORK = ROOT / "runs" / "repro"
LABELLED = "<labelled>"  # the labelled set's folder in stored configs: keys and results carry no machine path
VERSIONS = {"fd": 1, "ft": 1, "probe": 1}  # raise one when the runner measures that kind of cell differently
LAST_LAYERS = 3  # "the deep layers" whose attention-distance spread the curve plots
CAL_STEPS = 6  # timed steps per calibration (the first two are left out: warm-up)


# ----------------------------------------------------------------------------- the experiment's settings
@dataclass
class Setup:
    """What every cell of one experiment shares; a grid varies FD steps, seeds and switches on top of it."""
    teacher: str = "demo-dinov2-s14"  # teacher registry name (or a timm model folder, local-dir:DIR)
    labelled: str | None = None  # folder with train/ and val/ class subfolders; None: the demo-labelled set
    fd_recipe: str = "demo"
    fd_overrides: dict = field(default_factory=lambda: {
        "model.size": "small", "model.patch_size": 14, "model.img_size": 112, "data.scale": [0.35, 1.0],
        "ckpt.every": 100, "ckpt.keep": 1, "runtime.log_every": 10, "runtime.progress": False,
        "runtime.tensorboard": False})
    ft_recipe: str = "ft_demo"
    ft_overrides: dict = field(default_factory=lambda: {"data.img_size": 112, "data.train_per_class": 100,
                                                        "runtime.progress": False})
    knn_train_per_class: int = 200  # k-NN / linear-probe training images per class (0: all); the val split whole
    probe_val_per_class: int = 0  # 0: the whole val split
    attention_images: int = 50  # val images (the first of each class, in turn) for the attention statistics
    budgets: tuple = (0, 250, 750, 2000)  # FD steps of the curve; 0: the random init
    seeds: tuple = (0, 1, 2)
    work: Path = WORK

    def teacher_model(self) -> str:
        """The teacher as a MODEL argument of fdfast finetune / knn / diagnose."""
        from fdfast.models.teachers import MODEL_FOLDERS
        return self.teacher if self.teacher.startswith(MODEL_FOLDERS) else f"teacher:{self.teacher}"

    def labelled_dir(self) -> Path:
        if self.labelled is not None:
            return Path(self.labelled)
        from fdfast.data.sources import source_dir
        return Path(source_dir("demo-labelled"))


def fd_config(setup: Setup, steps: int, seed: int, switches: dict | None = None):
    """The resolved FD config of one run (data.path: the labelled set's train split, by its placeholder)."""
    from fdfast.config import load_config
    return load_config(setup.fd_recipe, {"teacher.name": setup.teacher, "data.path": f"{LABELLED}/train",
                                         **setup.fd_overrides, "optim.steps": steps,
                                         "optim.warmup_steps": max(1, steps // 10), "runtime.seed": seed,
                                         **(switches or {})})


def ft_config(setup: Setup, seed: int):
    """The resolved fine-tune config of one run: the same recipe for every init, seeded data order and draws."""
    from fdfast.finetune import load_finetune_config
    return load_finetune_config(setup.ft_recipe, {"data.path": None if setup.labelled is None else LABELLED,
                                                  **setup.ft_overrides, "data.seed": seed, "runtime.seed": seed})


# ----------------------------------------------------------------------------- cells
@dataclass(eq=False)
class Cell:
    """One durable unit of work: an FD run ("fd"), a fine-tune ("ft") or a probe ("probe") of one model."""
    kind: str
    label: str  # for people: "fd 750 steps s1"
    spec: dict  # JSON: everything that decides the result
    inputs: tuple = ()  # cells whose outputs this one reads (the FD run of a student)
    tags: dict = field(default_factory=dict)  # for the reports (model, steps, seed, switch); not part of the key

    @functools.cached_property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "version": VERSIONS[self.kind], "spec": self.spec,
                           "inputs": [c.key for c in self.inputs]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.key}"


def fd_cell(setup: Setup, steps: int, seed: int, switches: dict | None = None, tags: dict | None = None) -> Cell:
    cfg = fd_config(setup, steps, seed, switches)
    return Cell("fd", f"fd {steps} steps s{seed}" + "".join(f" {k}={v}" for k, v in (switches or {}).items()),
                {"config": cfg.to_dict(), "labelled": setup.labelled or "demo-labelled"}, tags=dict(tags or {}))


def model_cells(setup: Setup, model: str, seed: int, fd: Cell | None = None, tags: dict | None = None) -> list[Cell]:
    """The probe and the fine-tune of one model: "teacher", "random" (the student's architecture, init ``seed``) or
    "fd" (the student of the FD cell ``fd``)."""
    if model == "teacher":
        ref = {"teacher": setup.teacher}
    elif model == "random":
        ref = {"random": fd_config(setup, 1, seed).to_dict()["model"], "seed": seed}
    else:
        ref = {"fd": fd.key}
    inputs = (fd,) if fd is not None else ()
    name = {"teacher": "teacher", "random": f"random s{seed}"}.get(model) or fd.label
    tags = dict(tags or {}, model=model, seed=seed)
    probe = Cell("probe", f"probe {name}", {"model": ref, "labelled": setup.labelled or "demo-labelled",
                                           "img_size": setup.ft_overrides.get("data.img_size"),
                                           "knn_train_per_class": setup.knn_train_per_class,
                                           "val_per_class": setup.probe_val_per_class,
                                           "attention_images": setup.attention_images}, inputs, tags)
    epochs = f" {tags['epochs']} epochs" if "epochs" in tags else ""
    ft = Cell("ft", f"ft {name}" + (f" s{seed}" if model == "teacher" else "") + epochs,
              {"config": ft_config(setup, seed).to_dict(), "model": ref,
               "labelled": setup.labelled or "demo-labelled"}, inputs, tags)
    return [probe, ft]


def student_cells(setup: Setup, steps: int, seed: int, switches: dict | None = None,
                  tags: dict | None = None) -> list[Cell]:
    """FD for ``steps`` (0: none, the random init) + the probe and fine-tune of the student."""
    tags = dict(tags or {}, steps=steps)
    if steps == 0:
        return model_cells(setup, "random", seed, tags=tags)
    fd = fd_cell(setup, steps, seed, switches, dict(tags, model="fd", seed=seed))
    return [fd, *model_cells(setup, "fd", seed, fd, tags)]


def curve_cells(setup: Setup) -> list[Cell]:
    """Seed by seed (a partial grid is a whole curve of fewer seeds): the teacher, then each FD budget."""
    cells = model_cells(setup, "teacher", setup.seeds[0])[:1]  # the teacher's probe has no seed
    for seed in setup.seeds:
        cells.append(model_cells(setup, "teacher", seed)[1])
        for steps in setup.budgets:
            cells += student_cells(setup, steps, seed)
    return cells


def teacher_curve_cells(setup: Setup, epochs: list[int], seed: int = 0) -> list[Cell]:
    """Fine-tunes of the teacher for each length in ``epochs``: the measurement that picks the recipe's length."""
    cells = []
    for n in epochs:
        s = replace(setup, ft_overrides=dict(setup.ft_overrides, **{"optim.epochs": n}))
        cells.append(model_cells(s, "teacher", seed, tags={"epochs": n})[1])
    return cells


def settled(top1: list[float], tol: float = 2.0) -> dict:
    """Whether a run's top-1 over the last third of its epochs moves by less than ``tol`` points (max - min)."""
    last = top1[len(top1) - math.ceil(len(top1) / 3):]
    moves = max(last) - min(last)
    return {"last_third_epochs": [len(top1) - len(last) + 1, len(top1)], "moves": moves, "settled": moves < tol}


# ----------------------------------------------------------------------------- running a cell
class Runner:
    """Finds finished cells (``results/cells`` and any ``also_read`` folder) and runs the others in ``setup.work``."""

    def __init__(self, setup: Setup, results: Path, also_read=(), keep_runs: bool = False, say=print):
        self.setup, self.results, self.keep_runs, self.say = setup, Path(results), keep_runs, say
        self.folders = [self.results / "cells", *(Path(p) / "cells" for p in also_read)]

    def result(self, cell: Cell) -> dict | None:
        for folder in self.folders:
            f = folder / f"{cell.name}.json"
            if f.is_file():
                return json.loads(f.read_text())
        return None

    def run_dir(self, cell: Cell) -> Path:
        return self.setup.work / cell.name

    def run(self, cell: Cell) -> dict:
        """Run one cell (continuing its run directory where a stopped run left it) and commit its result."""
        from fdfast.io import atomic_write_json
        for needed in cell.inputs:  # an FD student whose result is committed but whose files are not here
            if not (self.run_dir(needed) / "student.safetensors").is_file():
                self.say(f"repro: {needed.label}: its student is not in {self.run_dir(needed)}; running it again")
                self._run_kind(needed)
        t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        result = self._run_kind(cell)
        record = {"kind": cell.kind, "label": cell.label, "key": cell.key, "version": VERSIONS[cell.kind],
                  "tags": cell.tags, "inputs": [c.key for c in cell.inputs], "result": result,
                  "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                  "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)], "env": environment(),
                  "spec": cell.spec}
        atomic_write_json(self.results / "cells" / f"{cell.name}.json", record, indent=1)
        if not self.keep_runs:
            self._prune(cell)
        return record

    def _run_kind(self, cell: Cell) -> dict:
        return {"fd": self._fd, "ft": self._ft, "probe": self._probe}[cell.kind](cell)

    def _config(self, tree_cls, config: dict):
        text = json.dumps(config).replace(LABELLED, str(self.setup.labelled_dir()))
        return tree_cls.from_dict(json.loads(text))

    def _fd(self, cell: Cell) -> dict:
        from fdfast.config import Config
        from fdfast.train import train
        out = self.run_dir(cell)
        if not _finished(out, "student.safetensors"):  # a run killed after its last write is not run again
            train(self._config(Config, cell.spec["config"]), out, resume=_resume(out))
        summary = json.loads((out / "summary.json").read_text())
        rows = _rows(out)
        steps = cell.spec["config"]["optim"]["steps"]
        tail = [r["loss"] for r in rows if r["step"] > steps - max(1, steps // 10) and r["loss"] is not None]
        every = max(1, len(rows) // 100)
        return {"final_loss": statistics.fmean(tail) if tail else rows[-1]["loss"], "steps": steps,
                "loss_curve": [[r["step"], r["loss"]] for r in rows[::every]],
                "train_wall_s": summary["wall_s"], "img_per_s": summary["img_per_s"],
                "compile": summary.get("compile"), "resumed_from": _resumed(summary)}

    def _ft(self, cell: Cell) -> dict:
        from fdfast.finetune import FinetuneConfig, finetune
        out = self.run_dir(cell)
        if not _finished(out):
            finetune(self._config(FinetuneConfig, cell.spec["config"]), self.model(cell), out, resume=_resume(out))
        summary = json.loads((out / "summary.json").read_text())
        curve = [{k: r.get(k) for k in ("epoch", "top1", "top5", "train_loss")} for r in _rows(out) if "top1" in r]
        return {"top1": curve[-1]["top1"], "top5": curve[-1]["top5"], "best_top1": summary["top1"],
                "best_epoch": summary["best_epoch"], "epochs": summary["epochs"], "curve": curve,
                "train_images": summary["train_images"], "val_images": summary["val_images"],
                "train_wall_s": summary["wall_s"], "resumed_from": _resumed(summary)}

    def _probe(self, cell: Cell) -> dict:
        from fdfast.evaluate import extract_features, knn_top1, linear_probe
        spec, model = cell.spec, self.model(cell)
        data = None if self.setup.labelled is None else self.setup.labelled
        f = extract_features(model, data, img_size=spec["img_size"], cache=False,
                             train_per_class=spec["knn_train_per_class"], val_per_class=spec["val_per_class"])
        lp = linear_probe(f)
        return {"knn_top1": knn_top1(f), "linprobe_top1": lp["top1"], "linprobe_wd": lp["wd"],
                "train_images": len(f.train), "val_images": len(f.val),
                "attention": attention(model, self.setup.labelled_dir() / "val", spec["attention_images"],
                                       spec["img_size"])}

    def model(self, cell: Cell) -> str:
        """The MODEL argument (fdfast finetune / knn / diagnose) of a probe or fine-tune cell's model."""
        ref = cell.spec["model"]
        if "teacher" in ref:
            return self.setup.teacher_model()
        if "fd" in ref:
            return str(self.run_dir(cell.inputs[0]))
        return str(random_student(ref["random"], ref["seed"], self.setup.work))

    def _prune(self, cell: Cell) -> None:
        """Keep what later cells read (an FD student) and the run's records; drop checkpoints and fine-tuned weights."""
        out = self.run_dir(cell)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if cell.kind == "ft":
            for f in out.glob("*.safetensors"):
                f.unlink()


def _resume(run_dir: Path) -> str | None:
    """--resume auto where a stopped run left its directory (it continues from the newest intact commit)."""
    return "auto" if run_dir.exists() else None


def _resumed(summary: dict) -> dict | None:
    """Where the run's last piece resumed from: step and branch (the path is this machine's, not a result)."""
    r = summary.get("resumed_from")
    return None if r is None else {k: r.get(k) for k in ("step", "branch")}


def _finished(run_dir: Path, *files: str) -> bool:
    return all((run_dir / f).is_file() for f in ("summary.json", *files))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def random_student(model_cfg: dict, seed: int, work: Path) -> Path:
    """The student's architecture at its seeded random init, as a student file (the curve's 0 steps)."""
    import torch
    from fdfast.checkpoint import save_student
    from fdfast.models.export import model_config
    from fdfast.models.student import build_student
    tag = hashlib.sha256(json.dumps([model_cfg, seed], sort_keys=True).encode()).hexdigest()[:12]
    out = work / f"init-{tag}"
    if not (out / "student.safetensors").is_file():
        torch.manual_seed(seed)
        save_student(out, build_student(model_config(model_cfg)).state_dict(), model_cfg)
    return out


def val_sample(val_dir: Path, count: int) -> list[Path]:
    """``count`` val images, the first of each class in turn (so every class is seen)."""
    from fdfast.diagnostics.inputs import IMAGE_SUFFIXES
    per_class = [sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                 for d in sorted(val_dir.iterdir()) if d.is_dir()]
    picked, i = [], 0
    while len(picked) < count and any(i < len(c) for c in per_class):
        picked += [c[i] for c in per_class if i < len(c)]
        i += 1
    return picked[:count]


def attention(model: str, val_dir: Path, count: int, img_size: int | None) -> dict:
    """Per layer: each head's mean attention distance (px), their spread (std over heads) and head similarity."""
    from fdfast.diagnostics.inputs import load_images, load_model_under_test, to_tensor
    from fdfast.diagnostics.run import attention_statistics
    mut = load_model_under_test(model, img_size)
    images = to_tensor(load_images(val_sample(val_dir, count), mut.image_size), mut.mean, mut.std)
    layers = attention_statistics(mut.model, images)["layers"]
    out = {"distances": [layer["distances"] for layer in layers], "spread": [layer["spread"]["std"] for layer in layers],
           "similarity": [layer["similarity"] for layer in layers], "images": len(images)}
    deep = slice(-LAST_LAYERS, None)
    out["spread_deep"] = statistics.fmean(out["spread"][deep])
    out["similarity_deep"] = statistics.fmean(out["similarity"][deep])
    out["mean_distance_deep"] = statistics.fmean(statistics.fmean(d) for d in out["distances"][deep])
    return out


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    from bench.run import environment as bench_environment
    return bench_environment("cpu")


# ----------------------------------------------------------------------------- calibration and the plan
def calibrate(setup: Setup, cells: list[Cell], recalibrate: bool = False, say=print) -> dict:
    """Seconds per FD step and per fine-tune step (CAL_STEPS timed steps each), per evaluated image, and the fixed
    costs, for this grid's configs on this machine; cached in ``setup.work / calibration.json`` by config and
    machine. A machine busy with other work measures slower: the load average is recorded beside."""
    from fdfast.io import atomic_write_json
    fd = next((c for c in cells if c.kind == "fd"), None)
    ft = next(c for c in cells if c.kind == "ft")
    key = calibration_key(setup, fd, ft)
    cache = setup.work / "calibration.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known and not recalibrate:
        return known[key]
    say(f"repro: calibrating ({CAL_STEPS} timed steps of each kind of cell; load average {os.getloadavg()[0]:.1f}) ...")
    runner = Runner(setup, setup.work)
    cal = {"load_avg": round(os.getloadavg()[0], 2), "time": environment()["time"]}
    if fd is not None:
        cfg = runner._config(_tree(fd), dict(fd.spec["config"], optim=dict(fd.spec["config"]["optim"],
                                                                          steps=CAL_STEPS, warmup_steps=1)))
        cal.update(_time_steps("fd", cfg, None))
    cfg = runner._config(_tree(ft), ft.spec["config"])
    cal.update(_time_steps("ft", cfg, setup.teacher_model()))
    known[key] = cal
    atomic_write_json(cache, known, indent=1)
    return cal


def calibration_key(setup: Setup, fd: Cell | None, ft: Cell) -> str:
    """What a calibration measured: the FD and fine-tune configs but their lengths and seeds, the machine."""
    import torch
    fd_cfg = dict(fd.spec["config"], optim=None, runtime=None) if fd else None  # steps and seed don't change speed
    ft_cfg = dict(ft.spec["config"], optim=None, runtime=None)
    blob = [fd_cfg, ft_cfg, setup.labelled or "demo-labelled", os.cpu_count(), torch.__version__]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _tree(cell: Cell):
    if cell.kind == "fd":
        from fdfast.config import Config
        return Config
    from fdfast.finetune import FinetuneConfig
    return FinetuneConfig


class _Timed(Exception):
    """The calibration has timed enough steps: leave the loop."""


def _time_steps(kind: str, cfg, model: str | None) -> dict:
    """{kind_step_s, kind_setup_s} (+ eval_img_s for "ft"): wall seconds per optimizer step (median of steps 3..),
    the seconds to build the run, and per image of a no-grad forward of the classifier at its batch size."""
    import torch
    from fdfast import runtime
    from fdfast.run import build_fd_run, build_finetune_run
    from fdfast.train import RunDir, fit
    t0 = time.perf_counter()
    rt = runtime.resolve(cfg.runtime)
    if kind == "ft":  # enough images that the timed steps stay inside the first epoch (no evaluation), where the
        # labelled set has them; enough epochs for the timed steps in any case (the loop is left after them)
        cfg.data.train_per_class = max(cfg.data.train_per_class, CAL_STEPS * cfg.data.batch_size)
        cfg.optim.epochs = CAL_STEPS + 1
    run = build_fd_run(cfg, rt) if kind == "fd" else build_finetune_run(cfg, model, rt)
    run.ckpt_every = run.eval_every = 0  # a run without files: steps only (evaluations are timed below)
    setup_s, stamps = time.perf_counter() - t0, []

    def on_step(result) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) > CAL_STEPS:
            raise _Timed

    with RunDir(None, None, rt.info, run.command) as run_dir:
        try:
            fit(run, run_dir, on_step=on_step)
        except _Timed:
            pass
    run.loader.close()
    gaps = sorted(b - a for a, b in zip(stamps[2:], stamps[3:]))
    out = {f"{kind}_step_s": round(gaps[len(gaps) // 2], 3), f"{kind}_setup_s": round(setup_s, 1)}
    if kind == "ft":
        model = run.task.trained_model().eval()
        size = cfg.data.img_size or 224
        x = torch.randn(cfg.data.batch_size, 3, size, size)
        with torch.no_grad():
            model(x)
            t = time.perf_counter()
            for _ in range(2):
                model(x)
        out["eval_img_s"] = round((time.perf_counter() - t) / (2 * len(x)), 5)
    return out


def _split_counts(setup: Setup, per_class: int, val_per_class: int = 0) -> tuple[int, int, int]:
    """(training images, val images, classes) a cell reads."""
    from fdfast.finetune.data import load_splits
    s = load_splits(str(setup.labelled_dir()), None, "fast", per_class, val_per_class)
    return len(s.train), len(s.val), len(s.classes)


def estimate_s(setup: Setup, cell: Cell, cal: dict, runner: Runner | None = None) -> float:
    """Estimated wall seconds of a cell (what is left of it, when its run directory holds a committed step)."""
    if cell.kind == "fd":
        steps = cell.spec["config"]["optim"]["steps"]
        done = _committed_step(runner.run_dir(cell)) if runner else 0
        return cal["fd_setup_s"] + (steps - done) * cal["fd_step_s"]
    if cell.kind == "ft":
        c = cell.spec["config"]
        train, val, _ = _split_counts(setup, c["data"]["train_per_class"], c["data"]["val_per_class"])
        steps_per_epoch = math.ceil(train / (c["data"]["batch_size"] * c["optim"]["accum_steps"]))
        epochs = c["optim"]["epochs"] - (_committed_step(runner.run_dir(cell)) // steps_per_epoch if runner else 0)
        return cal["ft_setup_s"] + epochs * (steps_per_epoch * cal["ft_step_s"] + val * cal["eval_img_s"])
    train, val, _ = _split_counts(setup, cell.spec["knn_train_per_class"], cell.spec["val_per_class"])
    return cal["ft_setup_s"] + (train + val + cell.spec["attention_images"]) * cal["eval_img_s"]


def _committed_step(run_dir: Path) -> int:
    from fdfast.checkpoint import committed_steps
    steps = committed_steps(run_dir) if (run_dir / "checkpoints").is_dir() else []
    return steps[-1][0] if steps else 0


def plan(setup: Setup, cells: list[Cell], runner: Runner, cal: dict | None, budget_min: float | None,
         say=print) -> list[Cell]:
    """Print every cell (done / to run / deferred) with its estimate; return the cells to run now, in order: those
    not done whose estimates fit ``budget_min`` (None: all), and whose inputs are done or planned before them."""
    todo, seen, total, deferred = [], set(), 0.0, 0.0
    lines = []
    for cell in cells:
        if cell.key in seen:
            continue
        seen.add(cell.key)
        done = runner.result(cell)
        if done is not None:
            lines.append(f"  done      {cell.label:<44} {cell.name}  ({done['wall_s'] / 60:.1f} min)")
            continue
        est = estimate_s(setup, cell, cal, runner) if cal else float("nan")
        ready = all(runner.result(c) is not None or c in todo for c in cell.inputs)
        fits = budget_min is None or total + est <= budget_min * 60
        if ready and fits:
            todo.append(cell)
            total += est
            state = "run"
        else:
            deferred += est
            state = "deferred"
        lines.append(f"  {state:<9} {cell.label:<44} {cell.name}  est {est / 60:.1f} min")
    say("\n".join(lines))
    if cal:
        what = ", ".join(f"{k} {v}" for k, v in cal.items() if k.endswith("_s"))
        say(f"repro: calibration: {what} (measured {cal['time']} at load average {cal['load_avg']})")
    say(f"repro: {len(seen)} cells: {_count(lines, 'done')} done, {len(todo)} to run (est. {_hours(total)}), "
        f"{_count(lines, 'deferred')} deferred (est. {_hours(deferred)})"
        + (f" past --budget-min {budget_min:g}" if budget_min is not None else ""))
    return todo


def _count(lines: list[str], state: str) -> int:
    return sum(1 for line in lines if line.split()[0] == state)


def _hours(seconds: float) -> str:
    return "?" if math.isnan(seconds) else f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def run_grid(setup: Setup, cells: list[Cell], results: Path, *, also_read=(), budget_min: float | None = None,
             plan_only: bool = False, recalibrate: bool = False, keep_runs: bool = False, say=print) -> list[dict]:
    """Plan, then run the planned cells in order; returns the records of the cells run now."""
    runner = Runner(setup, results, also_read, keep_runs, say)
    setup.work.mkdir(parents=True, exist_ok=True)
    pending = [c for c in cells if runner.result(c) is None]
    cal = calibrate(setup, cells, recalibrate, say) if pending else None
    todo = plan(setup, cells, runner, cal, budget_min, say)
    records = []
    if plan_only:
        return records
    for i, cell in enumerate(todo, 1):
        say(f"repro: [{i}/{len(todo)}] {cell.label} ({cell.name}) ...")
        rec = runner.run(cell)
        say(f"repro: [{i}/{len(todo)}] {cell.label}: {_headline(rec)} in {rec['wall_s'] / 60:.1f} min")
        records.append(rec)
    return records


def _headline(rec: dict) -> str:
    r = rec["result"]
    if rec["kind"] == "fd":
        return f"final loss {r['final_loss']:.4f}"
    if rec["kind"] == "ft":
        return f"top-1 {r['top1']:.2f} at the end, best {r['best_top1']:.2f} (epoch {r['best_epoch']})"
    return f"k-NN {r['knn_top1']:.2f}, linear probe {r['linprobe_top1']:.2f}, spread {r['attention']['spread_deep']:.2f} px"


# ----------------------------------------------------------------------------- statistics
def mean_se(values: list[float]) -> dict:
    """Mean, sample std, standard error and n (std / se 0 for one value)."""
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": sd, "se": sd / math.sqrt(n), "n": n}


def gap_closed(fd: dict, random: dict, teacher: dict) -> dict:
    """The fraction of the teacher-over-random gap FD closes, (F - R) / (T - R), with its standard error by the
    delta method from the three means' standard errors (independent seeds)."""
    gap = teacher["mean"] - random["mean"]
    if gap == 0:
        return None
    frac = (fd["mean"] - random["mean"]) / gap
    se = math.sqrt(fd["se"] ** 2 + ((1 - frac) * random["se"]) ** 2 + (frac * teacher["se"]) ** 2) / abs(gap)
    return {"fraction": frac, "se": se}


# ----------------------------------------------------------------------------- the curve's report
METRICS = {"ft_top1": ("ft", "top1"), "ft_best_top1": ("ft", "best_top1"), "knn_top1": ("probe", "knn_top1"),
           "linprobe_top1": ("probe", "linprobe_top1"), "fd_loss": ("fd", "final_loss"),
           "attn_spread_deep": ("probe", "spread_deep"), "head_similarity_deep": ("probe", "similarity_deep")}


def metric(rec: dict | None, name: str):
    if rec is None or rec["kind"] != METRICS[name][0]:
        return None
    r = rec["result"]
    key = METRICS[name][1]
    return r["attention"][key] if key in ("spread_deep", "similarity_deep") else r[key]


def collect(cells: list[Cell], runner: Runner, group) -> dict:
    """{group value: {metric: [per-seed values]}} over finished cells; ``group(cell)`` names a cell's row."""
    rows: dict = {}
    for cell in cells:
        g = group(cell)
        rec = runner.result(cell)
        if g is None or rec is None:
            continue
        for name in METRICS:
            value = metric(rec, name)
            if value is not None:
                rows.setdefault(g, {}).setdefault(name, {})[cell.tags.get("seed", 0)] = value
        rows.setdefault(g, {}).setdefault("wall_s", 0.0)
        rows[g]["wall_s"] += rec["wall_s"]
    return {g: {k: (list(v.values()) if isinstance(v, dict) else v) for k, v in m.items()} for g, m in rows.items()}


def curve_report(setup: Setup, cells: list[Cell], runner: Runner, out: Path) -> dict:
    """curve.json (every aggregate), curve.md (the table), curve.png (gap closed; attention spread) from what is done."""
    from fdfast.io import atomic_write_json, atomic_write_text
    rows = collect(cells, runner, lambda c: "teacher" if c.tags.get("model") == "teacher" else c.tags.get("steps"))
    stats = {g: {k: mean_se(v) for k, v in m.items() if k != "wall_s"} for g, m in rows.items()}
    teacher, random = stats.get("teacher", {}), stats.get(0, {})
    for steps, s in stats.items():
        if steps != "teacher" and "ft_top1" in s and "ft_top1" in teacher and "ft_top1" in random:
            s["gap_closed"] = gap_closed(s["ft_top1"], random["ft_top1"], teacher["ft_top1"])
            s["gap_closed_best"] = gap_closed(s["ft_best_top1"], random["ft_best_top1"], teacher["ft_best_top1"])
    layers = _per_layer_spread(cells, runner)
    wall = {str(g): round(m["wall_s"], 1) for g, m in rows.items()}
    fd = next((c for c in cells if c.kind == "fd"), None)
    report = {"budgets": list(setup.budgets), "fd_batch": fd.spec["config"]["data"]["batch_size"] if fd else None, "seeds": list(setup.seeds), "stats": {str(k): v for k, v in stats.items()},
              "spread_per_layer": layers, "wall_s": wall, "wall_s_total": round(sum(wall.values()), 1),
              "cells_done": sum(runner.result(c) is not None for c in cells), "cells": len(cells)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "curve.json", report, indent=1)
    atomic_write_text(out / "curve.md", curve_table(report))
    if stats:
        plot_curve(report, out / "curve.png")
    return report


def _per_layer_spread(cells: list[Cell], runner: Runner) -> dict:
    """{model row: per-layer attention-distance spread (px), mean over seeds} for the plot's third panel."""
    out: dict = {}
    for cell in cells:
        rec = runner.result(cell)
        if cell.kind == "probe" and rec is not None:
            g = "teacher" if cell.tags.get("model") == "teacher" else str(cell.tags.get("steps"))
            out.setdefault(g, []).append(rec["result"]["attention"]["spread"])
    return {g: [statistics.fmean(x) for x in zip(*v)] for g, v in out.items()}


def _pm(s: dict | None, digits: int = 2) -> str:
    if not s:
        return "--"
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}" + (f" (n={s['n']})" if s["n"] != 3 else "")


def curve_table(report: dict) -> str:
    lines = ["| model | FD steps | fine-tune top-1 (end) | best epoch's top-1 | gap closed (end) | k-NN top-1 | "
             "linear probe top-1 | final FD loss | attn spread, last 3 layers (px) | head similarity, last 3 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = ["teacher"] + [str(b) for b in report["budgets"]]
    for g in order:
        s = report["stats"].get(g)
        if s is None:
            continue
        name = "teacher (DINOv2-S/14)" if g == "teacher" else "random init" if g == "0" else "FD student"
        gc = s.get("gap_closed")
        gap = f"{gc['fraction']:.2f} +- {gc['se']:.2f}" if gc else ("1" if g == "teacher" else "--")
        lines.append(f"| {name} | {'' if g == 'teacher' else g} | {_pm(s.get('ft_top1'))} | {_pm(s.get('ft_best_top1'))} "
                     f"| {gap} | {_pm(s.get('knn_top1'))} | {_pm(s.get('linprobe_top1'))} | "
                     f"{_pm(s.get('fd_loss'), 4)} | {_pm(s.get('attn_spread_deep'))} | "
                     f"{_pm(s.get('head_similarity_deep'), 3)} |")
    lines += ["", "Mean +- std over seeds (n=3 unless marked); gap closed: (FD - random) / (teacher - random) of the "
              "final fine-tune top-1, +- its standard error (delta method).",
              f"{report['cells_done']} of {report['cells']} cells done; {report['wall_s_total'] / 3600:.1f} h of wall "
              f"time in the cells."]
    return "\n".join(lines) + "\n"


def plot_curve(report: dict, path: Path) -> Path:
    from fdfast.diagnostics.plots import _plt, _save
    plt = _plt()
    stats = report["stats"]
    budgets = [b for b in report["budgets"] if str(b) in stats]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    pts = [(b, stats[str(b)]["gap_closed"]) for b in budgets if stats[str(b)].get("gap_closed")]
    if pts:
        ax.errorbar([b for b, _ in pts], [g["fraction"] for _, g in pts], yerr=[2 * g["se"] for _, g in pts],
                    marker="o", capsize=4, label="fine-tune top-1 at the end (+- 2 SE)")
    ax.axhline(1.0, color="#888", ls="--", lw=1, label="teacher")
    ax.axhline(0.0, color="#bbb", ls=":", lw=1)
    steps_label = f"FD steps (batch {report['fd_batch']})"
    ax.set(xlabel=steps_label, ylabel="fraction of the teacher-over-random gap closed",
           title="What FD closes, by FD budget")
    ax.legend(fontsize=8)
    ax, key = axes[1], "attn_spread_deep"
    have = [b for b in budgets if key in stats[str(b)]]
    ax.errorbar(have, [stats[str(b)][key]["mean"] for b in have], yerr=[2 * stats[str(b)][key]["se"] for b in have],
                marker="o", capsize=4, label="students (+- 2 SE)")
    if key in stats.get("teacher", {}):
        ax.axhline(stats["teacher"][key]["mean"], color="#888", ls="--", lw=1, label="teacher")
    ax.set(xlabel=steps_label, ylabel="attention-distance spread over heads,\nlast 3 layers (px)",
           title="Do FD's heads spread over distances?")
    ax.legend(fontsize=8)
    ax = axes[2]
    for g, spread in report["spread_per_layer"].items():
        ax.plot(range(1, len(spread) + 1), spread, marker=".", ls="--" if g == "teacher" else "-",
                label="teacher" if g == "teacher" else ("random init" if g == "0" else f"FD {g} steps"))
    ax.set(xlabel="layer", ylabel="spread over heads (px)", title="Attention-distance spread per layer")
    ax.legend(fontsize=8)
    positive = [b for b in budgets if b > 0]
    for ax in axes[:2]:
        if positive:  # 0 (random init) on a linear stretch, the budgets on a log scale
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def teacher_curve_report(cells: list[Cell], runner: Runner, out: Path) -> str:
    """teacher_curve.md / .json: each length's top-1 per epoch, final, best epoch, and whether it settled."""
    from fdfast.io import atomic_write_json, atomic_write_text
    rows = []
    for cell in cells:
        rec = runner.result(cell)
        if rec is not None:
            r = rec["result"]
            top1 = [e["top1"] for e in r["curve"]]
            rows.append({"epochs": r["epochs"], "top1_per_epoch": top1, "top1": r["top1"], "best_top1": r["best_top1"],
                         "best_epoch": r["best_epoch"], **settled(top1), "wall_s": rec["wall_s"], "key": rec["key"],
                         "git_sha": rec["env"]["git_sha"], "load_avg": rec["load_avg"]})
    lines = ["| epochs | top-1 per epoch | end | best (epoch) | last third moves (points) | settled (< 2) | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epochs']} | {' '.join(f'{x:.1f}' for x in r['top1_per_epoch'])} | {r['top1']:.2f} | "
                     f"{r['best_top1']:.2f} ({r['best_epoch']}) | {r['moves']:.2f} (epochs {r['last_third_epochs'][0]}-"
                     f"{r['last_third_epochs'][1]}) | {'yes' if r['settled'] else 'no'} | {r['wall_s'] / 60:.0f} min |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "teacher_curve.json", rows, indent=1)
    atomic_write_text(out / "teacher_curve.md", text)
    return text


# ----------------------------------------------------------------------------- command line
def quick_setup(work: Path) -> Setup:
    """Every kind of cell on the real teacher in a few minutes: 2 FD steps, 1 epoch on 4 images per class."""
    s = Setup(budgets=(0, 2), seeds=(0,), knn_train_per_class=6, probe_val_per_class=3, attention_images=4, work=work)
    s.fd_overrides = dict(s.fd_overrides, **{"data.batch_size": 8, "ckpt.every": 1, "runtime.log_every": 1})
    s.ft_overrides = dict(s.ft_overrides, **{"data.train_per_class": 4, "data.val_per_class": 3, "optim.epochs": 1,
                                             "data.batch_size": 8})
    return s


def add_arguments(p: argparse.ArgumentParser, default_results: Path) -> None:
    p.add_argument("--plan", action="store_true", help="print the cells and their estimates, run nothing")
    p.add_argument("--budget-min", type=float, help="run only the cells (in order) whose estimates fit this many "
                   "minutes; the others wait for a later run")
    p.add_argument("--report", action="store_true", help="only write the tables and plots of the finished cells")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run of every kind of cell "
                   "(results: runs/<name>-quick/results)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the recipe's)")
    p.add_argument("--results", type=Path, help=f"results folder (default {default_results.relative_to(ROOT)})")
    p.add_argument("--work", type=Path, help=f"run directories (default {WORK.relative_to(ROOT)})")
    p.add_argument("--recalibrate", action="store_true", help="time the steps again (the cache is per config)")
    p.add_argument("--keep-runs", action="store_true", help="keep checkpoints and fine-tuned weights of finished cells")


def setup_from_args(args: argparse.Namespace, name: str) -> tuple[Setup, Path]:
    """(Setup, results folder) from the shared arguments."""
    if args.quick:
        work = args.work or ROOT / "runs" / f"{name}-quick"
        setup, results = quick_setup(work), args.results or work / "results"
    else:
        setup, results = Setup(work=args.work or WORK), args.results
    if args.seeds:
        setup.seeds = tuple(args.seeds)
    if args.epochs:
        setup.ft_overrides = dict(setup.ft_overrides, **{"optim.epochs": args.epochs})
    return setup, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p, RESULTS)
    p.add_argument("--budgets", type=int, nargs="+", help="FD steps of the curve (0: random init; default "
                   f"{' '.join(map(str, Setup.budgets))})")
    p.add_argument("--teacher-curve", type=int, nargs="+", metavar="EPOCHS", help="instead of the curve: fine-tune "
                   "the teacher (seed 0) for each of these lengths -> teacher_curve.md (picks the recipe's epochs)")
    args = p.parse_args(argv)
    setup, results = setup_from_args(args, "repro")
    results = results or RESULTS
    if args.budgets:
        setup.budgets = tuple(args.budgets)
    from fdfast import runtime
    from fdfast.config import RuntimeConfig
    runtime.apply(RuntimeConfig())  # the process settings `fdfast train` makes (glibc malloc), once
    also = [] if args.quick else [ABLATION_RESULTS]
    if args.teacher_curve:
        cells = teacher_curve_cells(setup, args.teacher_curve)
        if not args.report:
            run_grid(setup, cells, results, budget_min=args.budget_min, plan_only=args.plan,
                     recalibrate=args.recalibrate, keep_runs=args.keep_runs)
        if not args.plan:
            print(teacher_curve_report(cells, Runner(setup, results), results))
        return 0
    cells = curve_cells(setup)
    if not args.report:
        run_grid(setup, cells, results, also_read=also, budget_min=args.budget_min, plan_only=args.plan,
                 recalibrate=args.recalibrate, keep_runs=args.keep_runs)
    if not args.plan:
        report = curve_report(setup, cells, Runner(setup, results, also), results)
        print((results / "curve.md").read_text())
        print(f"repro: {report['cells_done']} of {report['cells']} cells done -> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
