"""`fdfast finetune` under torchrun (issue 23): 2 gloo ranks on the CPU, tiny models, 32 px.

- 2 ranks x 4 images = 1 rank x 2 micro-batches of 4: the same model after the same steps (within float
  rounding: the gradients are summed in another order), the same top-1 on a val split of odd size;
- a group SIGTERM or a kill -9 mid-epoch, then --resume auto on the same world size: bitwise the uninterrupted
  run (drop path, Mixup/CutMix, RandAugment, EMA and DataLoader workers all on);
- a resume on another world size continues and says in one line what starts fresh.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fdfast import checkpoint as ckpt
from fdfast.cli import main

from test_finetune import _colour_set, _student_cfg

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
LAUNCH = [sys.executable, "-m", "fdfast.launch", "--standalone", "--nproc_per_node"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny FD student file (shared RPB ViT, 32 px) with a run config naming its teacher."""
    from fdfast.checkpoint import STUDENT_META_KEY
    from fdfast.config import ModelConfig
    from fdfast.io import atomic_save_safetensors
    from fdfast.models.student import build_student
    run = tmp_path_factory.mktemp("student")
    cfg = _student_cfg()
    torch.manual_seed(3)
    atomic_save_safetensors(build_student(ModelConfig(**cfg)).state_dict(), run / "student.safetensors",
                            metadata={STUDENT_META_KEY: json.dumps(cfg)})
    (run / "config.yaml").write_text("teacher:\n  name: clip-vit-b16\nmodel:\n  img_size: 32\n")
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 training images (3 classes x 8), 9 val images: not a multiple of 2 ranks."""
    root = tmp_path_factory.mktemp("data")
    _colour_set(root / "train", per_class=8, seed=0)
    _colour_set(root / "val", per_class=3, seed=1)
    return root


def ft_args(student, data, out, *extra):
    return ["finetune", str(student), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--set", "optim.epochs=2", "--set", "optim.warmup_epochs=1", "--set", "optim.base_lr=0.05",
            "--set", "runtime.precision=fp32", "--set", "runtime.progress=false", "--set", "data.num_workers=0",
            *extra]


EXACT = ["--set", "model.drop_path=0", "--set", "data.mixup=0", "--set", "data.cutmix=0"]  # no per-rank draws
EVERYTHING_ON = ["--set", "model.drop_path=0.1", "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0",
                 "--set", "optim.ema=true", "--set", "optim.ema_decay=0.5", "--set", "data.num_workers=1",
                 "--set", "runtime.log_every=1", "--set", "ckpt.every=2",  # 3 steps per epoch: mid-epoch commits
                 "--set", "ckpt.keep=10"]


def torchrun(nproc, argv, launcher=TORCHRUN, **kw):
    return subprocess.run(launcher + [str(nproc), "-m", "fdfast", *argv], capture_output=True, text=True,
                          timeout=600, env=ENV, **kw)


def rows(run):
    drop = {"img_per_s", "elapsed_s"}
    return [{k: v for k, v in json.loads(x).items() if k not in drop}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def models(run):
    return {name: load_file(str(run / name)) for name in ("model.safetensors", "best.safetensors")}


def bitwise(a, b) -> bool:
    return all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


def test_two_ranks_equal_one_rank_with_accumulation(student, data, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    res = torchrun(2, ft_args(student, data, two, *EXACT))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "global batch 8 = 4 per rank x 1 accumulation step x 2 ranks" in res.stderr
    assert main(ft_args(student, data, one, *EXACT, "--set", "optim.accum_steps=2")) == 0
    a, b = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # measured max abs difference ~1e-7 (fp32, 6 steps): summation order only
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ra, rb = rows(two), rows(one)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [3, 6]  # 3 optimizer steps per epoch both
    for x, y in zip(ra, rb):
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)  # lr scaled by the same global batch 8
        assert x["top1"] == y["top1"] and x["top5"] == y["top5"]  # all 9 val images, split 5 + 4 over 2 ranks
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
    s2, s1 = (json.loads((r / "summary.json").read_text()) for r in (two, one))
    assert s2["val_images"] == s1["val_images"] == 9 and s2["top1"] == s1["top1"]


def _wait_for(path_fn, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path_fn():
            return True
        time.sleep(0.1)
    return False


def _interrupted(student, data, out, sig, after_step):
    """A 2-rank fine-tune whose process group gets ``sig`` once step ``after_step`` is logged (SIGTERM) or
    committed (SIGKILL); returns the launcher's exit code and stderr."""
    argv = ft_args(student, data, out, *EVERYTHING_ON)
    proc = subprocess.Popen(LAUNCH + ["2", "-m", "fdfast", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)
    if sig == signal.SIGKILL:
        ready = lambda: (out / "checkpoints" / f"step-{after_step}" / ckpt.COMMITTED).is_file()  # noqa: E731
    else:
        ready = lambda: (out / "metrics.jsonl").is_file() and len(rows(out)) >= after_step  # noqa: E731
    assert _wait_for(ready), "the run never reached the step to interrupt"
    os.killpg(proc.pid, sig)  # the whole job, as a scheduler does
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def straight(student, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    res = torchrun(2, ft_args(student, data, out, *EVERYTHING_ON))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_group_sigterm_mid_epoch_then_resume_is_bitwise(student, data, straight, tmp_path):
    out = tmp_path / "run"
    code, err = _interrupted(student, data, out, signal.SIGTERM, after_step=1)
    assert code == 130, err[-3000:]
    steps = [s for s, _ in ckpt.committed_steps(out)]
    assert steps and steps[-1] < 6  # committed the step reached (mid-epoch unless the signal met step 3)
    res = torchrun(2, ft_args(student, data, out, *EVERYTHING_ON, "--resume", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert bitwise(models(straight), models(out)) and rows(straight) == rows(out)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bitwise(student, data, straight, tmp_path):
    out = tmp_path / "run"
    code, _ = _interrupted(student, data, out, signal.SIGKILL, after_step=4)  # step 4: epoch 2, step 1 of 3
    assert code != 0
    res = torchrun(2, ft_args(student, data, out, *EVERYTHING_ON, "--resume", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert bitwise(models(straight), models(out)) and rows(straight) == rows(out)


def test_resume_on_another_world_size_says_what_starts_fresh(student, data, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for _, step in ckpt.committed_steps(out)[1:]:
        shutil.rmtree(step)  # as if stopped after the first checkpoint (step 2: mid-epoch 1)
    for name in ("model.safetensors", "best.safetensors", "summary.json"):
        (out / name).unlink()
    res = subprocess.run([sys.executable, "-m", "fdfast", *ft_args(student, data, out, *EVERYTHING_ON,
                                                                      "--resume", "auto")],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    notes = [line for line in res.stderr.splitlines() if "saved by 2 ranks, resumed on 1" in line]
    assert len(notes) == 1 and "start fresh" not in notes[0] and "dropped" in notes[0], res.stderr[-2000:]
    # 4 images per step on one rank: 6 steps per epoch, the same 2 epochs
    assert [r["step"] for r in rows(out)][-1] == 12 and (out / "model.safetensors").is_file()
