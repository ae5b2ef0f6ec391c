"""Golden loss curve (torchtitan-style regression guard): a fixed tiny FD run must keep its per-step losses.

A change that alters the numbers on purpose (init, schedule, augmentation, loss) regenerates the file with
FDFAST_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py, and says why in its commit.
"""
import json
import os
from pathlib import Path

import pytest

from fdfast.cli import main
from test_train import tiny_args

GOLDEN = Path(__file__).parent / "golden" / "tiny_fd_losses.json"


def test_tiny_run_follows_the_golden_loss_curve(tmp_path, teacher_file, image_dir):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 8, "--set", "ckpt.every=0")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {"loss": [r["loss"] for r in rows], "lr": [r["lr"] for r in rows]}
    if os.environ.get("FDFAST_UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN.name}; commit it")
    golden = json.loads(GOLDEN.read_text())
    assert curve["lr"] == pytest.approx(golden["lr"], rel=1e-9)
    assert curve["loss"] == pytest.approx(golden["loss"], rel=2e-4), "the FD loss curve moved"
    assert curve["loss"][-1] < curve["loss"][0]
