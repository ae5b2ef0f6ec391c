"""Every write path fails in one line (issue 24 item 5): a full disk, an I/O error or a read-only file system while
writing config.yaml, metrics.jsonl, TensorBoard events, a checkpoint, the final student, summary.json, an export,
or a fine-tuning run's model.json / checkpoint / best.safetensors / model.safetensors ends with exit 2 and one
line naming the file and the newest intact checkpoint; nothing incomplete carries a COMMITTED marker, no
temporary file is left, and once space is back `--resume auto` ends bitwise equal to an uninterrupted run.

The full disk is real where the test may mount a small tmpfs (root with CAP_SYS_ADMIN; skipped with the reason
elsewhere): a ballast file fills it right before the write under test, so the kernel itself refuses the write.
The I/O error (which a tmpfs cannot produce) is injected at the exact call: fsync, where write-back errors
surface, or the file object one writer opens.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfast import checkpoint as ckpt
from fdfast import io
from fdfast.cli import main
from test_train import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FS_BYTES = 96 << 20  # the small file system: a few tiny checkpoints (~13 MB each) fit


# ----------------------------------------------------------------------------- a small file system
@contextlib.contextmanager
def small_fs(where: Path, size: int = FS_BYTES):
    """A tmpfs of ``size`` bytes mounted at ``where`` (skips the test with the reason when it cannot be made)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the I/O-error variants cover the paths")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}); the I/O-error variants "
                    f"cover the paths")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path) -> Path:
    """Fill ``fs`` to the last byte with a ballast file (removed to free the space again)."""
    ballast = fs / f"ballast-{uuid.uuid4().hex[:6]}"
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return ballast


def fill_first(owner, name: str, fs: Path, when=lambda *a, **k: True):
    """Wrap ``owner.name`` so that the disk is full when it runs (the first call for which ``when`` holds)."""
    real = getattr(owner, name)
    done = []

    def wrapper(*a, **k):
        if not done and when(*a, **k):
            done.append(fill(fs))
        return real(*a, **k)
    return wrapper, done


# ----------------------------------------------------------------------------- what every failure must leave
def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [x for x in err.splitlines() if ": error: " in x]
    assert len(errors) == 1, err
    return errors[0]


def assert_nothing_incomplete(out: Path) -> None:
    """Every COMMITTED marker matches its files; no temporary file or folder is left."""
    for marker in out.rglob(ckpt.COMMITTED):
        assert ckpt.damage(marker.parent) is None, marker
    left = [p for p in out.rglob("*") if io.is_temp_name(p.name) or p.name.endswith(io.ASIDE_SUFFIX)]
    assert left == [], left


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_file, image_dir):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 4, "--set", "runtime.tensorboard=true")) == 0
    return out


# ----------------------------------------------------------------------------- fdfast train: a full disk
def _train_hooks():
    from fdfast import checkpoint, checkpointer, metrics, train
    return {  # what: (object, attribute that runs with the disk full, what the line names, newest intact)
        "config": (train, "atomic_write_text", lambda out: f"cannot write {out / 'config.yaml'}", None),
        "metrics": (metrics.MetricsLog, "log", lambda out: f"cannot write {out / 'metrics.jsonl'}", None),
        "tensorboard": (metrics.EventFile, "__init__", lambda out: f"cannot write {out / 'tb'}/events.out.tfevents.",
                        None),
        "checkpoint": (checkpointer.Checkpointer, "save",
                       lambda out: f"cannot write checkpoint step-2 in {out / 'checkpoints'}", None),
        "student": (checkpoint, "save_student", lambda out: f"cannot write {out / 'student.safetensors'}", "step-4"),
        "summary": (train, "atomic_write_json", lambda out: f"cannot write {out / 'summary.json'}", "step-4"),
    }


def _newest(out: Path, step: str | None) -> str:
    return f"the newest intact checkpoint is {out / 'checkpoints' / step}" if step else \
        "no checkpoint of this run is committed yet"


@pytest.mark.parametrize("what", list(_train_hooks()))
def test_a_full_disk_in_training_is_one_line_and_resumes_exactly(tmp_path, teacher_file, image_dir, capsys,
                                                                 monkeypatch, reference, what):
    owner, name, names, newest = _train_hooks()[what]
    with small_fs(tmp_path / "fs") as fs:
        out = fs / "run"
        wrapper, ballast = fill_first(owner, name, fs)
        monkeypatch.setattr(owner, name, wrapper)
        args = tiny_args(out, teacher_file, image_dir, 4, "--set", "runtime.tensorboard=true")
        assert main(args) == 2
        line = one_line(capsys)
        assert names(out) in line and "No space left on device" in line, line
        assert f"{_newest(out, newest)}: free space, then --resume auto" in line, line
        assert_nothing_incomplete(out)
        monkeypatch.undo()
        ballast[0].unlink()  # space is back
        assert main(args + ["--resume", "auto"]) == 0
        assert same_tensors(out / "student.safetensors", reference / "student.safetensors")
        assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        assert_nothing_incomplete(out)


def test_a_read_only_run_dir_is_one_line(tmp_path, teacher_file, image_dir, capsys):
    with small_fs(tmp_path / "fs") as fs:
        out = fs / "run"
        assert main(tiny_args(out, teacher_file, image_dir, 2)) == 0
        capsys.readouterr()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        assert main(tiny_args(out, teacher_file, image_dir, 4, "--resume", "auto")) == 2
        line = one_line(capsys)
        assert f"cannot write {out / '.lock'}: Read-only file system" in line
        assert f"the newest intact checkpoint is {out / 'checkpoints' / 'step-2'}" in line
        assert "make the file system writable, then --resume auto" in line
        assert main(["export", str(out), "--to", "timm", "--out", str(fs / "x.safetensors")]) == 2
        line = one_line(capsys)
        assert f"cannot write {fs / 'x.safetensors'}: Read-only file system" in line and str(out) in line


def test_a_full_disk_in_export_is_one_line(tmp_path, capsys, reference):
    with small_fs(tmp_path / "fs") as fs:
        fill(fs)
        for to, out in (("timm", fs / "x.safetensors"), ("timm-dir", fs / "x")):
            assert main(["export", str(reference), "--to", to, "--out", str(out)]) == 2
            line = one_line(capsys)
            assert f"cannot write {out}: No space left on device" in line
            assert f"the checkpoint exported, {reference}, is untouched" in line
            assert not out.exists() and not [p for p in fs.iterdir() if io.is_temp_name(p.name)]


# ----------------------------------------------------------------------------- I/O errors, injected at the call
def _eio_on(monkeypatch, target: str):
    """fsync of a file whose name contains ``target`` fails with EIO (where write-back errors surface)."""
    real = os.fsync

    def fsync(fd):
        if target in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)
    monkeypatch.setattr(io.os, "fsync", fsync)


@pytest.mark.parametrize("target,newest", [("config.yaml", None), ("step-2", None), ("student.safetensors", "step-4"),
                                           ("summary.json", "step-4")])
def test_an_io_error_in_training_is_one_line(tmp_path, teacher_file, image_dir, capsys, monkeypatch, target, newest):
    out = tmp_path / "run"
    _eio_on(monkeypatch, target)
    assert main(tiny_args(out, teacher_file, image_dir, 4)) == 2
    line = one_line(capsys)
    assert "Input/output error" in line and "check the disk" in line
    assert (f"checkpoint {target} in" if target.startswith("step") else f"cannot write {out / target}") in line
    assert _newest(out, newest) in line, line
    assert_nothing_incomplete(out)


def test_an_io_error_on_a_metrics_row_is_one_line(tmp_path, teacher_file, image_dir, capsys, monkeypatch):
    from fdfast import metrics
    out = tmp_path / "run"

    class Failing:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
    rows = []
    monkeypatch.setattr(metrics, "open", lambda p, *a, **k: Failing() if len(rows) == 2 else (rows.append(p) or
                                                                                               open(p, *a, **k)),
                        raising=False)
    assert main(tiny_args(out, teacher_file, image_dir, 4)) == 2
    line = one_line(capsys)
    assert f"cannot write {out / 'metrics.jsonl'}: Input/output error" in line
    assert f"the newest intact checkpoint is {out / 'checkpoints' / 'step-2'}" in line
    assert_nothing_incomplete(out)


# ----------------------------------------------------------------------------- fdfast finetune
@pytest.fixture(scope="module")
def ft_inputs(tmp_path_factory):
    from test_finetune import _colour_set, _student_cfg
    from fdfast.config import ModelConfig
    from fdfast.models.student import build_student
    root = tmp_path_factory.mktemp("ft")
    _colour_set(root / "data" / "train", per_class=4, seed=0)
    _colour_set(root / "data" / "val", per_class=2, seed=1)
    cfg = _student_cfg()
    torch.manual_seed(3)
    io.atomic_save_safetensors(build_student(ModelConfig(**cfg)).state_dict(), root / "student.safetensors",
                               metadata={ckpt.STUDENT_META_KEY: json.dumps(cfg)})
    return root


def ft_args(inputs: Path, out: Path, *extra) -> list[str]:
    return ["finetune", str(inputs / "student.safetensors"), "--data", str(inputs / "data"), "--out", str(out),
            "--epochs", "2", "--batch-size", "4", "--set", "data.num_workers=0", "--set", "optim.warmup_epochs=1",
            "--set", "runtime.progress=false", *extra]


def _ft_hooks():
    from fdfast import checkpointer
    from fdfast.finetune import task
    named = lambda file: lambda self, path, *a, **k: Path(path).name == file  # noqa: E731
    return {  # what: (object, attribute, which call, the file the line names, newest intact after it)
        "model.json": (task, "write_model_json", lambda *a, **k: True, "model.json", None),
        "best": (task.Evaluator, "save", named("best.safetensors"), "best.safetensors", None),
        "checkpoint": (checkpointer.Checkpointer, "save", lambda *a, **k: True, "checkpoint step-3", None),
        "model": (task.Evaluator, "save", named("model.safetensors"), "model.safetensors", "step-6"),
    }


@pytest.mark.parametrize("what", list(_ft_hooks()))
def test_a_full_disk_in_finetuning_is_one_line_and_resumes_exactly(tmp_path, ft_inputs, capsys, monkeypatch, what):
    owner, name, when, file, newest = _ft_hooks()[what]
    ref = tmp_path / "ref"
    assert main(ft_args(ft_inputs, ref)) == 0
    with small_fs(tmp_path / "fs") as fs:
        out = fs / "ft"
        wrapper, ballast = fill_first(owner, name, fs, when)
        monkeypatch.setattr(owner, name, wrapper)
        assert main(ft_args(ft_inputs, out)) == 2
        line = one_line(capsys)
        assert file in line and "No space left on device" in line and "free space, then --resume auto" in line
        assert _newest(out, newest) in line, line
        assert_nothing_incomplete(out)
        monkeypatch.undo()
        ballast[0].unlink()
        capsys.readouterr()
        assert main(ft_args(ft_inputs, out, "--resume", "auto")) == 0
        resumed = json.loads((out / "summary.json").read_text())["resumed_from"]
        if newest:  # the resume names its checkpoint, on stderr and in summary.json
            assert f"fdfast finetune: resuming from {out / 'checkpoints' / newest} (step 6, branch 0)" in \
                capsys.readouterr().err
            assert resumed == {"path": str(out / "checkpoints" / newest), "step": 6, "branch": 0,
                               "continues_as_branch": 0, "abandoned": None}
        else:
            assert resumed is None
        assert same_tensors(out / "model.safetensors", ref / "model.safetensors")
        assert same_tensors(out / "best.safetensors", ref / "best.safetensors")
        assert_nothing_incomplete(out)
    shutil.rmtree(ref)
