"""bench/results/compile_report.json: every current GPU launch config of the kernels, compiled for sm_90 without a
GPU, and no bf16 config spills registers or exceeds the 227 KiB of shared memory a block may use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fdfast.kernels.fd_loss as fd
import fdfast.kernels.rpb_attention as rpb
from fdfast.kernels.utils import SM90_MAX_SHARED_BYTES

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "results" / "compile_report.json"
HEAD_DIMS = (32, 64, 128)


def _key(kernel, dtype, tiles, warps, stages):
    return kernel, dtype, tuple(sorted(tiles.items())), warps, stages


def current_configs(dtype: torch.dtype, name: str) -> set:
    """The launch configs the kernels use today, keyed as the report's rows (kernel, dtype, tiles, warps, stages)."""
    found = set()
    operands = "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"
    for kernel, _, tiles, _ in fd.launch_specs():
        cfg = dict(tiles[operands])
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        found.add(_key(kernel, name, cfg, warps, stages))
    for block_d in HEAD_DIMS:
        for kernel, _, consts, warps, stages in rpb.launch_specs(dtype, block_d):
            tiles = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k == "GROUP_M"}
            found.add(_key(kernel, name, tiles, warps, stages))
    return found


@pytest.fixture(scope="module")
def report():
    assert REPORT.exists(), "bench/results/compile_report.json is missing: run python bench/compile_report.py"
    return json.loads(REPORT.read_text())


def test_report_covers_every_current_bf16_config_and_none_spills(report):
    rows = {_key(r["kernel"], r["dtype"], r["tiles"], r["num_warps"], r["num_stages"]): r for r in report["configs"]}
    wanted = current_configs(torch.bfloat16, "bf16")
    missing = wanted - set(rows)
    assert not missing, f"configs not in the report (rerun bench/compile_report.py): {sorted(missing)[:3]}"
    assert len(wanted) >= 20
    for key in wanted:
        row = rows[key]
        assert row["spill_bytes"] == 0, f"{key} spills {row['spill_bytes']} bytes"
        assert 0 < row["registers"] <= 255
        assert row["shared_bytes"] <= SM90_MAX_SHARED_BYTES, f"{key} needs {row['shared_bytes']} B of shared memory"
    assert report["shared_limit_bytes"] == 227 * 1024


def test_report_rows_are_reproduced_by_a_fresh_compile(report, tmp_path):
    """One config compiled again here (the real pipeline: Triton for sm_90 + the bundled ptxas) gives the same
    registers, spills and shared memory as the committed row."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--out", str(tmp_path),
                          "--dtypes", "bf16", "--head-dims", "64", "--only", "attn_bwd_delta"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = json.loads((tmp_path / "compile_report.json").read_text())["configs"]
    assert len(fresh) == 1
    committed = [r for r in report["configs"] if r["kernel"] == "attn_bwd_delta" and r["dtype"] == "bf16"
                 and r["tiles"] == fresh[0]["tiles"]]
    assert committed, "attn_bwd_delta bf16 at head dim 64 is not in the committed report"
    for field in ("registers", "spill_bytes", "shared_bytes"):
        assert committed[0][field] == fresh[0][field], field
    assert "attn_bwd_delta" in (tmp_path / "compile_report.txt").read_text()
