"""bench/gpu_check.sh on this CPU machine: the dry run proves every step (GPU tests collected, one config of every
kernel compiled for sm_90, plan_check and each bench --quick on the CPU path, the estimate under the GPU budget,
the archive within the 8 files that come back) and fails when something is missing; the run mode stops at once
without CUDA; the import shim for a bare tree."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
DRY_STEPS = ["gpu_tests_collect", "gpu_tests_extra_collect", "compile_report", "plan_check", "bench_loss",
             "bench_attention", "bench_e2e"]


def _results_state():
    folder = ROOT / "bench" / "results"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def run_check(out: Path, *args, timeout=5400, **env):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=timeout)


def archive(out: Path) -> dict:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow  # every bench --quick on the CPU: 15-60 minutes on 2 cores (e2e is most of it)
def test_dry_run_proves_every_step_and_fits_the_window(tmp_path):
    before = _results_state()
    res = run_check(tmp_path, "--dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]  # <= 8 come back
    files = archive(tmp_path)
    log = files["gpu_check.log"]
    positions = [log.index(f"gpu_check: {step} (") for step in DRY_STEPS]
    assert positions == sorted(positions)
    budget = json.loads(files["budget.json"])
    assert 0 < budget["estimate_s"] <= 420 and f"estimate: {budget['estimate_s']} s" in log
    assert budget["steps"]["gpu_tests"]["compiles"] > 20
    kernels = {r["kernel"] for name, text in files.items() if name.startswith("compile_report_triton-")
               and name.endswith(".json") for r in json.loads(text)["configs"]}
    assert len(kernels) == 8  # one sm_90 config of every kernel
    loss = [json.loads(line) for line in files["loss.jsonl"].splitlines()]
    assert {r["backend"] for r in loss if r["provider"] == "fdfast"} == {"torch"}  # what really ran on the CPU
    assert {r["teacher_dtype"] for r in loss} == {"bfloat16"}
    attention = [json.loads(line) for line in files["attention.jsonl"].splitlines()]
    assert {r["path"] for r in attention if r["provider"] == "fdfast"} == {"sdpa"}
    cost = {(r["mode"], r["provider"]): r["path"] for r in attention if r["provider"].startswith("bias_cost")}
    assert set(cost) == {("fwd", "bias_cost:bias"), ("fwd", "bias_cost:no_bias"), ("bwd", "bias_cost:dbias"),
                         ("bwd", "bias_cost:no_dbias")} and set(cost.values()) == {"triton"}
    assert "plan_check_dry_run.json" in files and "e2e.jsonl" in files
    summary = (tmp_path / "summary.txt").read_text()
    assert all(f"{step} " in summary for step in DRY_STEPS) and "archive layout: ok" in summary
    assert _results_state() == before  # nothing written into the tree's bench/results


def test_dry_run_fails_when_triton_is_missing(tmp_path):
    broken = tmp_path / "site"
    (broken / "triton").mkdir(parents=True)
    (broken / "triton" / "__init__.py").write_text("raise ImportError('triton is not installed here')\n")
    out = tmp_path / "out"
    res = run_check(out, "--dry-run", timeout=300, PYTHONPATH=f"{broken}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert res.returncode == 2, res.stdout[-2000:]
    assert "triton is missing" in res.stdout
    assert "gpu_check.tar.gz" in {p.name for p in out.iterdir()}  # what it found still comes back


def test_run_on_a_machine_without_cuda_stops_at_once(tmp_path):
    res = run_check(tmp_path, timeout=300)
    assert res.returncode == 2
    assert "no CUDA device visible to torch" in res.stdout
    assert "gpu_tests" not in archive(tmp_path)["gpu_check.log"]  # nothing was started


def test_budget_counts_every_step_and_fits_the_window():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_budget.py")], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    from bench.gpu_budget import OPTIONAL, STEPS, budget
    result = budget()
    assert list(result["steps"]) == list(STEPS)
    assert result["estimate_s"] <= 420
    assert result["estimate_s"] == sum(r["estimate_s"] for n, r in result["steps"].items() if n not in OPTIONAL)
    tests = result["steps"]["gpu_tests"]
    assert tests["compiles"] > 20 and tests["autotune_keys"] > 0
    assert {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_small", "_fd_loss_fwd_kernel"} <= set(tests["kernels"])
    assert result["steps"]["bench_loss"]["compiles"] == 0  # the tests compiled ViT-B's loss already (disk cache)


def test_shim_maps_fdfast_kernels_onto_the_kernels_folder():
    """Without an install, `fdfast.kernels` must resolve to ./kernels as setup.py's package_dir makes it."""
    spec = importlib.util.spec_from_file_location("fdfast_shim", ROOT / "bench" / "_shim" / "sitecustomize.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    found = shim._KernelsFinder().find_spec("fdfast.kernels")
    assert Path(found.origin) == ROOT / "kernels" / "__init__.py"
    assert found.submodule_search_locations == [str(ROOT / "kernels")]
    assert shim._KernelsFinder().find_spec("fdfast.train") is None
    sys.meta_path.remove(next(f for f in sys.meta_path if isinstance(f, shim._KernelsFinder)))
