"""bench/gpu_check.sh --dry-run walks its steps on this CPU machine: order, $OUT, budget; the import shim."""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["gpu_tests", "compile_report", "bench_loss", "bench_attention", "bench_e2e", "plan_check"]


def _results_state():
    folder = ROOT / "bench" / "results"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def test_dry_run_walks_every_step_in_order_into_out(tmp_path):
    before = _results_state()
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_BUDGET_S="470")
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    positions = [log.index(f"gpu_check: {step} (") for step in STEPS]
    assert positions == sorted(positions)  # tests, then the compile report, then the benches
    for step in STEPS:
        assert (tmp_path / f"{step}.log").read_text().startswith("dry-run: ")
    assert f"--junitxml={tmp_path}/gpu_tests.xml" in log and log.count(f"--out {tmp_path}") == 2
    assert log.count(f"--results {tmp_path}") == 3  # every bench row goes to $OUT, not bench/results
    limits = [int(line.split("(<= ")[1].split("s)")[0]) for line in log.splitlines() if "(<= " in line]
    assert sum(limits) <= 470  # under 8 minutes for the steps with start-up, inside one 540 s command
    summary = (tmp_path / "summary.txt").read_text()
    assert all(f"{step} " in summary and "dry-run" in summary for step in STEPS)
    assert "torch" in (tmp_path / "env.txt").read_text()
    assert _results_state() == before  # nothing written into the tree's bench/results


def test_shim_maps_fdfast_kernels_onto_the_kernels_folder():
    """Without an install, `fdfast.kernels` must resolve to ./kernels as setup.py's package_dir makes it."""
    spec = importlib.util.spec_from_file_location("fdfast_shim", ROOT / "bench" / "_shim" / "sitecustomize.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    found = shim._KernelsFinder().find_spec("fdfast.kernels")
    assert Path(found.origin) == ROOT / "kernels" / "__init__.py"
    assert found.submodule_search_locations == [str(ROOT / "kernels")]
    assert shim._KernelsFinder().find_spec("fdfast.train") is None
    import sys
    sys.meta_path.remove(next(f for f in sys.meta_path if isinstance(f, shim._KernelsFinder)))
