"""bench/results/compile_report_triton-X.Y.json: every launch the kernels make at the training shapes, compiled for
sm_90 without a GPU under Triton 3.6 (the GPU image's) and 3.8 (the default venv's). The committed report of the
installed Triton covers today's launches of today's kernel sources; no bf16 config spills or exceeds the 227 KiB
of shared memory a block may use, and every bf16 matmul reaches the tensor cores (wgmma or mma.sync)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from bench.compile_report import STEM, collect, identity, row_key, source_hash  # noqa: E402
from fdfast.kernels.utils import SM90_MAX_SHARED_BYTES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REPORT = RESULTS / f"{STEM}.json"
MATMUL_KERNELS = {"fd_loss_fwd_kernel", "fd_loss_dS_kernel", "attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq",
                  "attn_bwd_small"}


@pytest.fixture(scope="module")
def report():
    assert REPORT.exists(), f"{REPORT.relative_to(ROOT)} is missing: run python bench/compile_report.py"
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def launches():
    return collect({"bf16": torch.bfloat16, "fp32": torch.float32})


def test_reports_of_both_triton_versions_are_committed():
    for minor in ("3.6", "3.8"):
        data = json.loads((RESULTS / f"compile_report_triton-{minor}.json").read_text())
        assert data["triton"].startswith(minor + ".") and data["configs"]
        assert data["configs_planned"] == len(data["configs"]), f"{minor}: a run cut short"
        assert all(r["tensor_cores"] in ("wgmma", "mma.sync", "none") for r in data["configs"])


def test_report_covers_every_current_launch_of_the_current_sources(report, launches):
    rows = {row_key(r): r for r in report["configs"]}
    missing = [identity(c) for c in launches if row_key(identity(c)) not in rows]
    assert not missing, f"launches not in the report (rerun bench/compile_report.py): {missing[:2]}"
    assert len(launches) >= 60
    hashes = {c["name"].lstrip("_"): source_hash(c["jit"]) for c in launches}
    stale = {r["kernel"] for r in report["configs"]
             if r["kernel"] in hashes and r["source_hash"] != hashes[r["kernel"]]}
    assert not stale, f"kernel sources changed since the report (rerun bench/compile_report.py): {sorted(stale)}"


def test_bf16_configs_fit_and_use_the_tensor_cores(report, launches):
    rows = {row_key(r): r for r in report["configs"]}
    for c in launches:
        row = rows[row_key(identity(c))]
        assert 0 < row["registers"] <= 255
        if row["dtype"] != "bf16":
            assert row["kernel"] not in MATMUL_KERNELS or row["tensor_cores"] == "none", row  # IEEE fp32: FMA
            continue
        assert row["spill_bytes"] == 0, f"{row_key(row)} spills {row['spill_bytes']} bytes"
        assert row["shared_bytes"] <= SM90_MAX_SHARED_BYTES, f"{row_key(row)} needs {row['shared_bytes']} B"
        if row["kernel"] in MATMUL_KERNELS:  # wgmma needs 64-row tiles per warp group; 32-row tiles: mma.sync
            assert row["tensor_cores"] in ("wgmma", "mma.sync"), row_key(row)
    assert report["shared_limit_bytes"] == 227 * 1024


def test_rows_carry_the_run_time_specialisation(report):
    """As Triton specialises at run time: ViT-B's N = 197 is not divisible by 16, W = 1 (no mask) and the unit
    head-dim strides are constants, B = 128 and the padded NP = 208 divide by 16; both teacher dtypes appear."""
    vit = next(r for r in report["configs"] if r["kernel"] == "attn_fwd" and r["workload"] == "vit_b"
               and r["dtype"] == "bf16")
    assert "N=197 " in vit["specialisation"] and "W=1c" in vit["specialisation"]
    assert "B=128/16" in vit["specialisation"] and "NP=208/16" in vit["specialisation"]
    assert "unit" in vit["specialisation"]
    teachers = {r["pointer_dtypes"]["T"] for r in report["configs"] if r["kernel"] == "fd_loss_fwd_kernel"}
    assert teachers == {"bf16", "fp32"}
    assert any(r["tiles"].get("BLOCK_D") == 16 for r in report["configs"])  # the head dim the CPU tests use


def test_a_row_is_reproduced_by_a_fresh_compile(report, tmp_path):
    """One config compiled again here (Triton for sm_90 + the bundled ptxas) gives the committed row's registers,
    spills, shared memory and tensor-core use."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--out", str(tmp_path),
                          "--dtypes", "bf16", "--only", "attn_bwd_delta", "--one-per-kernel"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = json.loads((tmp_path / REPORT.name).read_text())["configs"]
    assert len(fresh) == 1
    committed = [r for r in report["configs"] if row_key(r) == row_key(fresh[0])]
    assert committed, f"{row_key(fresh[0])} is not in the committed report"
    for field in ("registers", "spill_bytes", "shared_bytes", "tensor_cores", "source_hash", "specialisation"):
        assert committed[0][field] == fresh[0][field], field
    assert "attn_bwd_delta" in (tmp_path / f"{STEM}.txt").read_text()
