"""bench/repro.py's runner: cells keyed by their config, skipped when done, resumed after a kill -9, the plan printed.

Tiny settings throughout: a 2-block ViT teacher in a timm model folder, a 2-block student at 32 px, a labelled set
of 2 classes x 6 training / 3 val random images, 1 fine-tuning epoch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import repro
from bench.repro import Runner, Setup, curve_cells, run_grid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(teacher folder, labelled folder) shared by the module's tests."""
    import timm
    from timm.models import save_for_hf
    root = tmp_path_factory.mktemp("repro")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0), str(root / "teacher"))
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("cat", "dog"):
            (root / "labelled" / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(36, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / "labelled" / split / cls / f"{i}.png")
    return root / "teacher", root / "labelled"


def tiny_setup(tiny, work: Path, budgets=(0, 3), seeds=(0,), fd_steps_extra=None) -> Setup:
    teacher, labelled = tiny
    common = {"runtime.precision": "fp32", "runtime.progress": False}
    return Setup(
        teacher=f"local-dir:{teacher}", labelled=str(labelled), budgets=budgets, seeds=seeds, work=work,
        knn_train_per_class=0, attention_images=4,
        fd_overrides={**common, "model.size": "tiny", "model.patch_size": 16, "model.img_size": 32,
                      "model.kwargs": {"depth": 2}, "data.batch_size": 4, "data.num_workers": 0, "ckpt.every": 2,
                      "ckpt.keep": 1, "ckpt.async_save": False, "runtime.log_every": 1, "runtime.tensorboard": False,
                      **(fd_steps_extra or {})},
        ft_overrides={**common, "data.img_size": 32, "data.batch_size": 4, "data.num_workers": 0,
                      "data.train_per_class": 0, "optim.epochs": 1, "optim.warmup_epochs": 0})


def fake_calibration(setup: Setup, cells) -> None:
    """A cached calibration for these cells (tests that don't look at the estimates skip the timed steps)."""
    fd = next((c for c in cells if c.kind == "fd"), None)
    key = repro.calibration_key(setup, fd, next(c for c in cells if c.kind == "ft"))
    setup.work.mkdir(parents=True, exist_ok=True)
    cache = setup.work / "calibration.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    known[key] = {"fd_step_s": 1.0, "fd_setup_s": 1.0, "ft_step_s": 1.0, "ft_setup_s": 1.0, "eval_img_s": 0.01,
                  "load_avg": 0.0, "time": "test"}
    cache.write_text(json.dumps(known))


def done_files(results: Path) -> dict:
    return {f.name: f.stat().st_mtime_ns for f in (results / "cells").glob("*.json")}


@pytest.fixture(scope="module")
def grid_once(tiny, tmp_path_factory):
    """One finished tiny curve: (setup, cells, results folder, records of the first run)."""
    root = tmp_path_factory.mktemp("grid")
    setup = tiny_setup(tiny, root / "work")
    cells = curve_cells(setup)
    fake_calibration(setup, cells)
    records = run_grid(setup, cells, root / "results", say=lambda *a: None)
    return setup, cells, root / "results", records


def test_every_cell_runs_once_and_records_what_it_measured(grid_once):
    setup, cells, results, records = grid_once
    kinds = [c.kind for c in cells]
    assert kinds == ["probe", "ft", "probe", "ft", "fd", "probe", "ft"]  # teacher, random init, FD 3 steps
    assert [r["key"] for r in records] == [c.key for c in cells] and len({c.key for c in cells}) == len(cells)
    by_kind = {r["kind"]: r for r in records}
    fd = by_kind["fd"]["result"]
    assert fd["steps"] == 3 and fd["final_loss"] > 0 and [s for s, _ in fd["loss_curve"]] == [1, 2, 3]
    ft = records[1]["result"]
    assert ft["epochs"] == 1 and ft["val_images"] == 6 and 0 <= ft["top1"] <= 100 and ft["best_epoch"] == 1
    probe = records[0]["result"]
    assert probe["train_images"] == 12 and probe["val_images"] == 6 and 0 <= probe["knn_top1"] <= 100
    att = probe["attention"]
    assert len(att["distances"]) == 2 and len(att["distances"][0]) == 3  # 2 layers x 3 heads
    assert att["images"] == 4 and att["spread_deep"] >= 0 and -1 <= att["similarity_deep"] <= 1
    for r in records:  # the committed file is the record; configs name the labelled set by a placeholder
        f = results / "cells" / f"{r['kind']}-{r['key']}.json"
        assert json.loads(f.read_text()) == json.loads(json.dumps(r))
        assert str(setup.labelled) not in json.dumps(r["spec"].get("config")) and r["wall_s"] > 0
        assert r["env"]["git_sha"] and r["spec"]["labelled"] == setup.labelled
    fd_dir = setup.work / f"fd-{by_kind['fd']['key']}"
    assert (fd_dir / "student.safetensors").is_file() and not (fd_dir / "checkpoints").exists()  # pruned
    assert not list((setup.work / f"ft-{records[1]['key']}").glob("*.safetensors"))


def test_an_identical_config_is_skipped_a_changed_one_runs(grid_once, tiny, tmp_path):
    setup, cells, results, _ = grid_once
    before = done_files(results)
    assert run_grid(setup, curve_cells(setup), results, say=lambda *a: None) == []
    assert done_files(results) == before  # nothing rewritten
    # the same experiment built anew (a new process would) has the same keys
    again = tiny_setup(tiny, setup.work)
    assert [c.key for c in curve_cells(again)] == [c.key for c in cells]
    # one fine-tune setting changed: the three fine-tunes run again, the FD run and the probes do not
    longer = tiny_setup(tiny, setup.work)
    longer.ft_overrides = dict(longer.ft_overrides, **{"optim.epochs": 2})
    new = run_grid(longer, curve_cells(longer), results, say=lambda *a: None)
    assert [r["kind"] for r in new] == ["ft", "ft", "ft"] and all(r["result"]["epochs"] == 2 for r in new)
    # an FD setting changed: that FD run, and the probe and fine-tune of its student
    switched = tiny_setup(tiny, setup.work, fd_steps_extra={"loss.whiten": False})
    fake_calibration(switched, curve_cells(switched))
    new = run_grid(switched, curve_cells(switched), results, say=lambda *a: None)
    assert [r["kind"] for r in new] == ["fd", "probe", "ft"]
    assert new[0]["spec"]["config"]["loss"]["whiten"] is False


def test_a_killed_grid_resumes_without_redoing_finished_cells(tiny, tmp_path):
    """kill -9 in the middle of an FD run: the cells finished before it stay; the FD run continues from its
    committed checkpoint; the rest of the grid runs once."""
    setup = tiny_setup(tiny, tmp_path / "work", budgets=(0, 8))
    results = tmp_path / "results"
    fake_calibration(setup, curve_cells(setup))
    args = json.dumps([str(tiny[0]), str(tiny[1]), str(tmp_path)])
    script = f"""
import json, os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import fdfast.train
from tests.test_repro import tiny_setup
from bench.repro import curve_cells, run_grid
teacher, labelled, tmp = json.loads({args!r})
setup = tiny_setup((Path(teacher), Path(labelled)), Path(tmp) / "work", budgets=(0, 8))
step_of = fdfast.train.train_step
def dying_step(run, batches, step, stop=False):
    if run.total_steps == 8 and step == 6:  # the grid's FD run (steps 2 and 4 committed): a kill -9 mid-run
        os.kill(os.getpid(), signal.SIGKILL)
    return step_of(run, batches, step, stop)
fdfast.train.train_step = dying_step
run_grid(setup, curve_cells(setup), Path(tmp) / "results", say=print)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr[-3000:]
    cells = curve_cells(setup)
    fd = next(c for c in cells if c.kind == "fd")
    first = done_files(results)
    assert sorted(first) == sorted(f"{c.name}.json" for c in cells[:cells.index(fd)])  # teacher, random init
    said = []
    records = run_grid(setup, cells, results, say=said.append)
    assert [r["key"] for r in records] == [c.key for c in cells[cells.index(fd):]]  # only what was left
    assert {k: v for k, v in done_files(results).items() if k in first} == first
    resumed = records[0]["result"]["resumed_from"]
    assert resumed and resumed["step"] == 4, resumed  # continued from the newest committed step, not step 0
    steps = [r["step"] for r in map(json.loads, (setup.work / fd.name / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 9))
    assert any("done " in line for line in said) and any("[1/3] fd 8 steps s0" in line for line in said)


def test_the_plan_prints_every_cell_and_its_estimate_before_running(grid_once, tiny, tmp_path, capsys):
    setup, _, results, _ = grid_once
    more = tiny_setup(tiny, setup.work, budgets=(0, 3, 40), seeds=(0, 1))
    cells = curve_cells(more)
    calibration = setup.work / "calibration.json"
    calibration.unlink(missing_ok=True)
    said = []
    assert run_grid(more, cells, results, plan_only=True, say=said.append) == []
    cal = json.loads(calibration.read_text())  # measured once, cached by config and machine
    (entry,) = cal.values()
    assert entry["fd_step_s"] > 0 and entry["ft_step_s"] > 0 and entry["eval_img_s"] > 0
    text = "\n".join(said)
    done = [c for c in cells if c.key in {k.split("-", 1)[1][:-5] for k in done_files(results)}]
    assert len(done) == 7 and text.count("  done ") == 7
    todo = [c for c in cells if c not in done and not any(c.key == d.key for d in done)]
    assert text.count("  run ") == len(todo) and "est " in text
    # a 40-step FD run costs 40 x the measured step (+ its set-up): its estimate is printed in minutes
    fd40 = next(c for c in todo if c.label == "fd 40 steps s0")
    est = entry["fd_setup_s"] + 40 * entry["fd_step_s"]
    assert f"fd 40 steps s0" in text and f"est {est / 60:.1f} min" in text
    # a budget: cells in order while their estimates fit; the rest (and what reads them) deferred, and said
    cal_file = calibration.read_text()
    fake = {k: dict(v, fd_step_s=30.0, fd_setup_s=0.0, ft_step_s=1.0, ft_setup_s=0.0, eval_img_s=0.1)
            for k, v in json.loads(cal_file).items()}
    calibration.write_text(json.dumps(fake))
    said.clear()
    run_grid(more, cells, results, plan_only=True, budget_min=10, say=said.append)
    text = "\n".join(said)
    assert "  deferred  fd 40 steps s0" in text and f"est {40 * 30 / 60:.1f} min" in text  # 20 min > 10
    assert "  deferred  probe fd 40 steps s0" in text  # reads a deferred FD run
    assert "past --budget-min 10" in text and "fd_step_s 30.0" in text
    assert not any(f.startswith(f"fd-{fd40.key}") for f in done_files(results))


def test_gap_closed_and_its_standard_error():
    fd, random, teacher = (repro.mean_se(v) for v in ([60, 62, 64], [20, 20, 20], [80, 80, 80]))
    g = repro.gap_closed(fd, random, teacher)
    assert g["fraction"] == pytest.approx(42 / 60)
    assert g["se"] == pytest.approx(fd["se"] / 60)  # the only uncertain mean
    assert repro.gap_closed(fd, teacher, teacher) is None  # no gap to close
    noisy = repro.gap_closed(repro.mean_se([62] * 3), repro.mean_se([18, 20, 22]), repro.mean_se([78, 80, 82]))
    se_r = se_t = 2 / 3 ** 0.5
    frac = 42 / 60
    assert noisy["se"] == pytest.approx(((1 - frac) ** 2 * se_r ** 2 + frac ** 2 * se_t ** 2) ** 0.5 / 60)


def test_the_curve_report_from_finished_cells(grid_once, tmp_path):
    setup, cells, results, _ = grid_once
    report = repro.curve_report(setup, cells, Runner(setup, results), tmp_path)
    stats = report["stats"]
    assert set(stats) == {"teacher", "0", "3"} and stats["3"]["ft_top1"]["n"] == 1
    gap = stats["teacher"]["ft_top1"]["mean"] - stats["0"]["ft_top1"]["mean"]
    want = (stats["3"]["ft_top1"]["mean"] - stats["0"]["ft_top1"]["mean"]) / gap if gap else None
    assert (stats["3"]["gap_closed"] or {}).get("fraction") == (pytest.approx(want) if gap else None)
    assert "fd_loss" in stats["3"] and "fd_loss" not in stats["0"]
    table = (tmp_path / "curve.md").read_text()
    assert "| random init | 0 |" in table and "| FD student | 3 |" in table and "7 of 7 cells done" in table
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_a_learning_curve_has_settled_when_its_last_third_moves_less_than_2_points():
    flat = repro.settled([30, 60, 75, 80, 84, 85, 86, 85.5, 86.9])  # last third: epochs 7-9
    assert flat["last_third_epochs"] == [7, 9] and flat["moves"] == pytest.approx(1.4) and flat["settled"]
    climbing = repro.settled([30, 60, 75, 80, 84, 85, 86, 88, 89, 90])  # last third: epochs 7-10
    assert climbing["last_third_epochs"] == [7, 10] and climbing["moves"] == 4 and not climbing["settled"]
    assert repro.settled([50, 50.5])["last_third_epochs"] == [2, 2]  # one epoch of two: nothing moves


def test_the_teacher_curve_runs_each_length_as_its_own_cell(tiny, tmp_path):
    setup = tiny_setup(tiny, tmp_path / "work")
    cells = repro.teacher_curve_cells(setup, [1, 2])
    assert [c.spec["config"]["optim"]["epochs"] for c in cells] == [1, 2] and cells[0].key != cells[1].key
    assert cells[0].label == "ft teacher s0 1 epochs" and all(c.spec["model"] == {"teacher": setup.teacher}
                                                              for c in cells)
