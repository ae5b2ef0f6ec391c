"""Golden loss curve (torchtitan-style regression guard): a fixed tiny FD run must keep its per-step losses.

The curve lives in tests/golden/tiny_fd_losses.json; without that file the test FAILS (a guard that can go
missing silently guards nothing). A change that alters the numbers on purpose (init, schedule, augmentation,
loss) regenerates the file, and only this does:

    FDFAST_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py

then commit the new file and say why in the commit message.
"""
import json
import os
from pathlib import Path

import pytest

from fdfast.cli import main
from test_train import tiny_args

GOLDEN = Path(__file__).parent / "golden" / "tiny_fd_losses.json"
REGEN = "FDFAST_REGEN_GOLDEN"


def test_tiny_run_follows_the_golden_loss_curve(tmp_path, teacher_file, image_dir):
    if not GOLDEN.exists() and os.environ.get(REGEN) != "1":
        pytest.fail(f"{GOLDEN} is missing: restore it from git, or regenerate it with {REGEN}=1 (see this docstring)")
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 8, "--set", "ckpt.every=0")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {"loss": [r["loss"] for r in rows], "lr": [r["lr"] for r in rows]}
    if os.environ.get(REGEN) == "1":
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert curve["lr"] == pytest.approx(golden["lr"], rel=1e-9)
    assert curve["loss"] == pytest.approx(golden["loss"], rel=2e-4), "the FD loss curve moved"
    assert curve["loss"][-1] < curve["loss"][0]


def test_a_missing_golden_file_fails_and_writes_nothing(tmp_path, monkeypatch):
    missing = tmp_path / "tiny_fd_losses.json"
    monkeypatch.setitem(globals(), "GOLDEN", missing)
    monkeypatch.delenv(REGEN, raising=False)
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        test_tiny_run_follows_the_golden_loss_curve(tmp_path, None, None)
    assert not missing.exists()
