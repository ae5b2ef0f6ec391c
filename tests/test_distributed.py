"""Real torch.distributed on the CPU: torchrun, 2 processes, gloo. DDP and FSDP2 train the same model."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train import tiny_args


def torchrun(out, teacher_file, image_dir, *extra):
    """The tiny run of test_train on 2 processes (batch 2 each: the same global batch of 4), drop path off."""
    args = tiny_args(out, teacher_file, image_dir, 4, "--set", "model.drop_path=0", *extra)
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "fdfast", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_and_fsdp_agree_and_fsdp_resumes(tmp_path, teacher_file, image_dir):
    ddp = torchrun(tmp_path / "ddp", teacher_file, image_dir)
    fsdp = torchrun(tmp_path / "fsdp", teacher_file, image_dir, "--set", "dist.strategy=fsdp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]  # one log line per step: rank 0 writes alone
    for a, b in zip(ddp, fsdp):
        assert a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    sa, sb = load_file(str(tmp_path / "ddp" / "student.safetensors")), load_file(str(tmp_path / "fsdp" / "student.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:  # FSDP's gathered full state equals DDP's replica
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)

    # kill-and-resume under FSDP: drop step 4, resume from the committed step 2 (sharded state reloaded)
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-4")
    (tmp_path / "fsdp" / "student.safetensors").unlink()
    again = torchrun(tmp_path / "fsdp", teacher_file, image_dir, "--set", "dist.strategy=fsdp", "--resume", "auto")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(fsdp[3]["loss"], rel=1e-5)
