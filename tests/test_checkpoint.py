"""Checkpoint integrity (sizes + CRC-32 in COMMITTED), damaged checkpoints skipped or refused, the run-dir lock,
DCP checkpoints written and read in one process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from fdfast import checkpoint as ckpt
from fdfast.checkpointer import DcpWriter, save_full
from fdfast.cli import main
from fdfast.distributed import DistInfo
from fdfast.errors import FDFastError
from fdfast.io import run_dir_lock

from test_train import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
META = {"arch": "vit", "size": "tiny"}


def fake_run(tmp_path, steps=(1, 2)):
    """A run dir with committed full-format checkpoints of small tensors (no training)."""
    run = tmp_path / "run"
    for s in steps:
        tensors = {"student.w": torch.full((64, 64), float(s)), "proj.weight": torch.ones(3, 3) * s}
        save_full(run, s, tensors, {"step": s, "config": {"model": META}}, META, keep=5)
    return run


def truncate(path, keep=100):
    with open(path, "r+b") as f:
        f.truncate(keep)


def flip_byte(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_marker_records_size_and_crc_of_every_file(tmp_path):
    run = fake_run(tmp_path, (3,))
    step = run / "checkpoints" / "step-3"
    marker = json.loads((step / "COMMITTED").read_text())
    assert marker["step"] == 3 and marker["format"] == "full" and marker["checksum"] == "crc32"
    assert set(marker["files"]) == {"model.safetensors", "train_state.pt"}
    for name, rec in marker["files"].items():
        assert rec["size"] == (step / name).stat().st_size and len(rec["crc32"]) == 8
    assert ckpt.damage(step) is None


@pytest.mark.parametrize("fault,reason", [
    (lambda d: truncate(d / "model.safetensors"), "model.safetensors has 100 bytes"),
    (lambda d: flip_byte(d / "train_state.pt"), "train_state.pt fails its CRC-32 check"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: (d / "COMMITTED").write_text('{"step": 2}'), "no file sizes and checksums"),
    (lambda d: (d / "COMMITTED").write_text("{not json"), "marker is unreadable"),
])
def test_damaged_newest_is_reported_and_skipped(tmp_path, capsys, fault, reason):
    run = fake_run(tmp_path)
    fault(run / "checkpoints" / "step-2")
    assert ckpt.resolve_resume(run, "auto") == run / "checkpoints" / "step-1"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-2" in err[0] and reason in err[0]
    with pytest.raises(FDFastError, match=f"step-2 is damaged: .*{reason}"):
        ckpt.resolve_resume(run, str(run / "checkpoints" / "step-2"))
    with pytest.raises(FDFastError, match="step-2 is damaged"):
        ckpt.read_student(run / "checkpoints" / "step-2")
    _, sd = ckpt.read_student(run)  # the run's newest intact student
    assert float(sd["w"][0, 0]) == 1.0


def test_all_damaged_means_a_fresh_start_or_an_error(tmp_path, capsys):
    run = fake_run(tmp_path)
    for s in (1, 2):
        flip_byte(run / "checkpoints" / f"step-{s}" / "model.safetensors")
    assert ckpt.resolve_resume(run, "auto") is None
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    with pytest.raises(FDFastError, match="no intact committed checkpoint"):
        ckpt.resolve_resume(run, str(run))


def test_student_file_is_verified_against_its_record_or_its_header(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path = ckpt.save_student(run, {"w": torch.ones(256, 256)}, META)
    assert ckpt.read_student(run)[1]["w"].sum() == 256 * 256
    flip_byte(path)  # same size, different bytes: only the recorded CRC can tell
    with pytest.raises(FDFastError, match="student.safetensors fails its CRC-32 check"):
        ckpt.read_student(path)
    loose = tmp_path / "loose.safetensors"  # no record beside it: the header must match the length
    save_file({"w": torch.ones(256, 256)}, str(loose), metadata={ckpt.STUDENT_META_KEY: json.dumps(META)})
    truncate(loose, loose.stat().st_size - 1)
    with pytest.raises(FDFastError, match="header and length disagree"):
        ckpt.read_student(loose)


def test_cli_resume_export_and_diagnose_on_damaged_checkpoints(tmp_path, teacher_file, image_dir, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 4)) == 0
    straight = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step4 = out / "checkpoints" / "step-4"
    truncate(step4 / "model.safetensors", 4096)  # a full disk while writing, after the marker said otherwise
    (out / "student.safetensors").unlink()
    capsys.readouterr()
    for argv, what in ((["export", str(step4), "--out", str(tmp_path / "x.safetensors")], "export"),
                       (["diagnose", str(step4), "--out", str(tmp_path / "diag")], "diagnose"),
                       (tiny_args(out, teacher_file, image_dir, 4, "--resume", str(step4)), "train")):
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "step-4 is damaged" in err[0] and "model.safetensors has 4096 bytes" in err[0]
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "diag").exists()
    assert main(tiny_args(out, teacher_file, image_dir, 4, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {step4}" in err
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(straight[3]["loss"], rel=1e-5)
    assert ckpt.damage(step4) is None  # rewritten by the resumed run


# ----------------------------------------------------------------------------- the run-dir lock
HOLDER = """
import os, sys, time
from fdfast.io import run_dir_lock
with run_dir_lock(sys.argv[1], "holder"):
    if os.fork() == 0:   # a forked worker outlives its parent: it must not keep the lock
        time.sleep(60); os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_stops_at_once_and_a_killed_holder_never_blocks(tmp_path, teacher_file, image_dir, capsys):
    out = tmp_path / "busy"
    src = fake_run(tmp_path) / "checkpoints" / "step-2"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(out))
        t0 = time.perf_counter()
        assert main(tiny_args(out, teacher_file, image_dir, 2)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by `holder`" in err[0] and f"pid {holder.pid}" in err[0]
        assert main(["export", str(src), "--to", "fdfast", "--out", str(out / "student.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by `holder`" in err[0]
        assert sorted(os.listdir(out)) == before == [".lock"]  # wrote nothing
        assert time.perf_counter() - t0 < 60
        holder.kill()  # SIGKILL: no cleanup ran; its forked child is still alive
        holder.wait()
        with run_dir_lock(out, "next"):
            assert (out / ".lock").read_text().startswith("`next`")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_lock_is_exclusive_inside_one_process_too(tmp_path):
    with run_dir_lock(tmp_path / "run", "first"):
        with pytest.raises(FDFastError, match=r"in use by `first` \(pid"):
            with run_dir_lock(tmp_path / "run", "second"):
                pass
    with run_dir_lock(tmp_path / "run", "third"):  # released on exit
        pass


# ----------------------------------------------------------------------------- DCP in one process
def test_dcp_checkpoints_resume_exactly_and_load_without_a_process_group(tmp_path, teacher_file, image_dir):
    from fdfast.models.export import load_student
    straight, split = tmp_path / "straight", tmp_path / "split"
    dcp = ("--set", "ckpt.format=dcp")
    assert main(tiny_args(straight, teacher_file, image_dir, 4, *dcp)) == 0
    step4 = straight / "checkpoints" / "step-4"
    marker = json.loads((step4 / "COMMITTED").read_text())
    assert marker["format"] == "dcp" and "dcp/.metadata" in marker["files"] and "dcp/__0_0.distcp" in marker["files"]
    assert not (step4 / "model.safetensors").exists()
    # the DCP step's student equals the full-state student.safetensors written at the end
    _, from_dcp = ckpt.read_student(step4)
    _, final = ckpt.read_student(straight / "student.safetensors")
    assert from_dcp.keys() == final.keys() and all(torch.equal(from_dcp[k], final[k]) for k in final)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_student(step4).forward_features(x), load_student(straight).forward_features(x))

    assert main(tiny_args(split, teacher_file, image_dir, 4, *dcp)) == 0
    import shutil
    shutil.rmtree(split / "checkpoints" / "step-4")
    (split / "student.safetensors").unlink()
    assert main(tiny_args(split, teacher_file, image_dir, 4, "--resume", "auto", *dcp)) == 0
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)
    flip_byte(split / "checkpoints" / "step-4" / "dcp" / "__0_0.distcp", at=-100)
    with pytest.raises(FDFastError, match=r"step-4 is damaged: dcp/__0_0.distcp fails its CRC-32"):
        load_student(split / "checkpoints" / "step-4")


@pytest.mark.parametrize("async_save", [True, False])
def test_dcp_full_disk_is_one_line_and_keeps_the_committed_one(tmp_path, monkeypatch, async_save):
    import errno
    import torch.distributed.checkpoint.filesystem as dcp_fs
    run = tmp_path / "run"
    saver = DcpWriter(run, DistInfo(), keep=2, async_save=async_save)
    state = {"model": {"student.w": torch.ones(64, 64), "proj.weight": torch.ones(2, 2)}}
    saver.save(1, state, {"step": 1})
    saver.wait()  # sync: committed already; async: committed now
    assert [s for s, _ in ckpt.committed_steps(run)] == [1]

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dcp_fs, "_write_item", full_disk)
    with pytest.raises(FDFastError, match=r"cannot write checkpoint step-2 .*No space left on device.*step-1"):
        saver.save(2, state, {"step": 2})
        saver.wait()
    assert [s for s, _ in ckpt.committed_steps(run)] == [1] and ckpt.damage(run / "checkpoints" / "step-1") is None
    assert not (run / "checkpoints" / ".tmp-step-2").exists()
    assert torch.equal(ckpt.read_dcp_model(run / "checkpoints" / "step-1")["student.w"], torch.ones(64, 64))
