"""Checkpoint integrity (sizes + CRC-32 in COMMITTED), damaged checkpoints skipped or refused, the run-dir lock,
DCP checkpoints written and read in one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# ----------------------------------------------------------------------------- a committed step is never lost
class Killed(BaseException):
    """A SIGKILL at this point: no except / finally of fdfast's code runs past it."""


def _save(run, step, value, keep=5):
    tensors = {"student.w": torch.full((8, 8), float(value)), "proj.weight": torch.ones(2, 2)}
    return save_full(run, step, tensors, {"step": step, "value": value, "config": {"model": META}}, META, keep=keep)


def _value(step_dir):
    return float(ckpt.load_model_tensors(step_dir)["student.w"][0, 0])


@pytest.mark.parametrize("cut", ["aside", "in", "removed"])
def test_saving_a_committed_step_again_never_leaves_it_uncommitted(tmp_path, monkeypatch, cut):
    """Re-committing step-2 (a run resumed at its last step) killed after each of the swap's moves: at every moment
    a reader finds a committed, intact step-2, and recovery at the next start keeps the old or the new one."""
    from fdfast import io
    run = tmp_path / "run"
    _save(run, 1, 1.0)
    _save(run, 2, 2.0)
    real_rename, real_rmtree = os.rename, io.shutil.rmtree

    def rename(a, b):
        real_rename(a, b)
        (step, d), = [x for x in ckpt.committed_steps(run) if x[0] == 2]  # a reader, right now
        assert ckpt.damage(d) is None
        if (cut, Path(b).name) in (("aside", ".step-2.replaced"), ("in", "step-2")):
            raise Killed

    def rmtree(path, *a, **k):
        real_rmtree(path, *a, **k)
        if cut == "removed" and Path(path).name == ".step-2.replaced":
            raise Killed
    monkeypatch.setattr(io.os, "rename", rename)
    monkeypatch.setattr(io.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        _save(run, 2, 20.0)
    monkeypatch.undo()
    assert _value(dict(ckpt.committed_steps(run))[2]) == (2.0 if cut == "aside" else 20.0)
    done = ckpt.recover(run)
    assert done == {"aside": ["rolled back the interrupted replacement of checkpoints/step-2",
                              "removed what an interrupted run left unfinished: checkpoints/.tmp-step-2"],
                    "in": ["finished the interrupted replacement of checkpoints/step-2"], "removed": []}[cut]
    assert sorted(os.listdir(run / "checkpoints")) == ["step-1", "step-2"]
    assert _value(run / "checkpoints" / "step-2") == (2.0 if cut == "aside" else 20.0)
    assert ckpt.damage(run / "checkpoints" / "step-2") is None


@pytest.mark.parametrize("doomed", [".step-2.replaced", ".tmp-pruned-step-1"])
def test_a_kill_while_a_committed_folder_is_deleted_never_leaves_its_marker_on_half_of_it(tmp_path, monkeypatch,
                                                                                          doomed):
    """The old copy of a re-saved step (after the new one is in) and a pruned step are deleted file by file: a
    kill part-way leaves files without a marker, which recovery removes, never a marker that lies about them."""
    from fdfast import io
    run = tmp_path / "run"
    _save(run, 1, 1.0)
    _save(run, 2, 2.0)
    real_rmtree = io.shutil.rmtree

    def rmtree(path, *a, **k):
        if Path(path).name == doomed:
            (Path(path) / "model.safetensors").unlink()  # the first file gone, then the kill
            raise Killed
        real_rmtree(path, *a, **k)
    monkeypatch.setattr(io.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        _save(run, 2, 20.0) if doomed.startswith(".step") else _save(run, 3, 3.0, keep=2)
    monkeypatch.undo()
    assert (run / "checkpoints" / doomed).is_dir() and not (run / "checkpoints" / doomed / ckpt.COMMITTED).exists()
    assert [m.parent.name for m in run.rglob(ckpt.COMMITTED) if ckpt.damage(m.parent) is not None] == []
    assert ckpt.recover(run)
    assert sorted(os.listdir(run / "checkpoints")) == (["step-1", "step-2"] if doomed.startswith(".step")
                                                       else ["step-2", "step-3"])
    assert _value(run / "checkpoints" / "step-2") == (20.0 if doomed.startswith(".step") else 2.0)


def test_recover_removes_and_names_what_a_killed_writer_left(tmp_path):
    run = tmp_path / "run"
    _save(run, 1, 1.0)
    root = run / "checkpoints"
    (root / ".tmp-step-2").mkdir()
    (root / ".tmp-step-2" / "model.safetensors").write_bytes(b"half")
    (root / "step-3").mkdir()  # renamed in by an older fdfast, never marked
    (run / ".summary.json.tmp-99-abcd").write_text("{")
    done = ckpt.recover(run)
    assert len(done) == 1 and done[0].startswith("removed what an interrupted run left unfinished: ")
    for name in ("checkpoints/.tmp-step-2", "checkpoints/step-3", ".summary.json.tmp-99-abcd"):
        assert name in done[0]
    assert sorted(os.listdir(root)) == ["step-1"] and ".summary.json.tmp-99-abcd" not in os.listdir(run)
    assert ckpt.recover(run) == []


# ----------------------------------------------------------------------------- lineage
def test_a_resume_to_an_earlier_step_moves_the_later_branch_out_of_sight(tmp_path):
    run = tmp_path / "run"
    for s in (2, 4, 6):
        _save(run, s, s)
    ckpt.save_student(run, {"w": torch.full((8, 8), 6.0)}, META)
    step2 = run / "checkpoints" / "step-2"
    branch, folder, moved = ckpt.start_branch(run, step2, "--resume step-2")
    assert (branch, moved) == (1, [4, 6]) and folder.parent == run / "checkpoints"
    assert [s for s, _ in ckpt.committed_steps(run)] == [2]
    assert ckpt.resolve_resume(run, "auto") == step2  # --resume auto, export, finetune: the current branch only
    assert float(ckpt.read_student(run)[1]["w"][0, 0]) == 2.0
    assert sorted(os.listdir(folder)) == ["ABANDONED", "COMMITTED", "step-4", "step-6", "student.safetensors"]
    journal = json.loads((folder / "ABANDONED").read_text())
    assert journal["done"] and journal["branch"] == 1 and journal["resumed_from"] == str(step2)
    assert ckpt.damage(folder / "step-6") is None and ckpt.damage(folder) is None  # kept intact, for a look back
    assert ckpt.branch_of(run, step2) == 1  # a resume of step-2 continues branch 1
    # the new branch commits step-4 again; a resume to step-2 once more leaves branch 1 as well
    save_full(run, 4, {"student.w": torch.zeros(8, 8), "proj.weight": torch.ones(2, 2)}, {"step": 4}, META, keep=5,
              branch=1)
    assert ckpt.start_branch(run, step2, "--resume step-2")[0] == 2


def test_a_resume_from_another_run_leaves_this_runs_steps_aside(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    _save(here, 2, 2.0)
    _save(there, 8, 8.0)
    branch, folder, moved = ckpt.start_branch(here, there / "checkpoints" / "step-8", "--resume other")
    assert moved == [2] and ckpt.committed_steps(here) == [] and (folder / "step-2").is_dir()


def test_a_move_cut_short_is_not_the_current_branch_and_is_finished_at_start(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for s in (2, 4, 6):
        _save(run, s, s)
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if Path(b).name == "step-4":
            raise Killed  # step-4 moved, step-6 not yet
    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(Killed):
        ckpt.start_branch(run, run / "checkpoints" / "step-2", "--resume step-2")
    monkeypatch.undo()
    assert [s for s, _ in ckpt.committed_steps(run)] == [2]  # step-6 is on its way out: never resumed from
    done = ckpt.recover(run)
    assert done and done[0].startswith("finished moving steps 4, 6 to abandoned-")
    folder = next((run / "checkpoints").glob("abandoned-*"))
    assert sorted(os.listdir(folder)) == ["ABANDONED", "step-4", "step-6"]


def test_pruning_keeps_the_newest_of_the_current_branch_by_commit_order(tmp_path):
    """The issue's case: keep=2, committed {200, 300}, --resume step-200, then a save at 250: the branch is
    {200, 250}; 300 (the branch left) is neither kept nor resumed from."""
    run = tmp_path / "run"
    for s in (100, 200, 300):
        _save(run, s, s, keep=2)
    assert [s for s, _ in ckpt.committed_steps(run)] == [200, 300]
    ckpt.start_branch(run, run / "checkpoints" / "step-200", "--resume step-200")
    _save(run, 250, 250, keep=2)
    assert [s for s, _ in ckpt.committed_steps(run)] == [200, 250]
    _save(run, 260, 260, keep=2)
    assert [s for s, _ in ckpt.committed_steps(run)] == [250, 260]
    assert ckpt.resolve_resume(run, "auto").name == "step-260"
    seqs = [ckpt.marker_field(d, "seq") for _, d in ckpt.committed_steps(run)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 2
    # commit order, not step number: a step saved again (seq newest) counts as the newest
    _save(run, 250, 251, keep=2)
    assert [s for s, _ in ckpt.committed_steps(run)] == [250, 260]
    _save(run, 255, 255, keep=2)
    assert [s for s, _ in ckpt.committed_steps(run)] == [250, 255]


def test_explicit_resume_then_a_stop_then_auto_stays_on_the_new_branch(tmp_path, teacher_file, image_dir, capsys,
                                                                       monkeypatch):
    """As a user meets it: a finished 8-step run (keep=2: steps 6, 8), `--resume .../step-6` with a change, killed
    after committing step 7, then `--resume auto`: it continues from 7 (not the abandoned 8) and ends bitwise equal
    to the same branch run without the kill; every resume says where it resumed from."""
    from safetensors.torch import load_file
    from fdfast.checkpointer import Checkpointer
    out, ref = tmp_path / "run", tmp_path / "ref"
    keep = ("--set", "ckpt.keep=2")
    branch = ("--set", "ckpt.every=1", "--set", "model.drop_path=0.2")  # the new branch trains differently
    assert main(tiny_args(out, teacher_file, image_dir, 8, *keep)) == 0
    first = load_file(str(out / "student.safetensors"))
    shutil_copy = __import__("shutil").copytree
    shutil_copy(out, ref)
    assert main(tiny_args(ref, teacher_file, image_dir, 8, *keep, "--resume", str(ref / "checkpoints" / "step-6"),
                          *branch)) == 0
    capsys.readouterr()
    save = Checkpointer.save

    def killed_after_7(self, step, run, state, meta):
        save(self, step, run, state, meta)
        if step == 7:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(Checkpointer, "save", killed_after_7)
    assert main(tiny_args(out, teacher_file, image_dir, 8, *keep, "--resume", str(out / "checkpoints" / "step-6"),
                          *branch)) == 130
    monkeypatch.setattr(Checkpointer, "save", save)
    err = capsys.readouterr().err
    assert f"fdfast train: resuming from {out / 'checkpoints' / 'step-6'} (step 6, branch 0)" in err
    assert "step 8 (after step 6) left the current branch" in err and "continues as branch 1" in err
    assert [s for s, _ in ckpt.committed_steps(out)] == [6, 7] and not (out / "student.safetensors").exists()
    assert main(tiny_args(out, teacher_file, image_dir, 8, *keep, "--resume", "auto", *branch)) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoints' / 'step-7'} (step 7, branch 1)" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == {"path": str(out / "checkpoints" / "step-7"), "step": 7, "branch": 1,
                                       "continues_as_branch": 1, "abandoned": None}
    a, b = load_file(str(out / "student.safetensors")), load_file(str(ref / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], first[k]) for k in a)
    assert {ckpt.marker_field(d, "branch") for _, d in ckpt.committed_steps(out)} == {1}
    rows = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 9))
