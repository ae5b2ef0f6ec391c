"""fdfast.io: atomic writes leave either the old file or the new one (never half, never a temp), the cache dir."""
from __future__ import annotations

import json
import os
import threading

import pytest

from fdfast import io
from fdfast.errors import FDFastError


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "a" / "b"))
    assert io.cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert io.cache_dir("filecheck") == tmp_path / "a" / "b" / "filecheck" and (tmp_path / "a" / "b" / "filecheck").is_dir()
    monkeypatch.delenv("FDFAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert io.cache_dir() == tmp_path / "home" / ".cache" / "fdfast"


def test_cache_dir_not_writable_names_the_fix(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "file" / "sub"))  # below a file: cannot be made
    with pytest.raises(FDFastError, match="set FDFAST_CACHE to a writable folder"):
        io.cache_dir()


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "x.json"
    io.atomic_write_json(path, {"a": 1}, indent=2)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    io.atomic_write_json(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert os.listdir(path.parent) == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.txt"
    io.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.txt"]


def test_safetensors_saved_atomically(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, safe_open

    w = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: saved anyway
    path = io.atomic_save_safetensors({"w": w.requires_grad_()}, tmp_path / "m.safetensors", metadata={"k": "v"})
    assert torch.equal(load_file(str(path))["w"], torch.arange(6.0).reshape(2, 3).t())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_atomic_dir_race_keeps_one_complete_folder(tmp_path):
    final = tmp_path / "images"
    errors = []
    barrier = threading.Barrier(3)

    def build(i: int) -> None:
        try:
            with io.atomic_dir(final) as tmp:
                for k in range(5):
                    (tmp / f"{k}.txt").write_text(str(i))
                barrier.wait(5)  # all three finish writing before any renames
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert errors == [] and os.listdir(tmp_path) == ["images"]
    contents = {(final / f"{k}.txt").read_text() for k in range(5)}
    assert len(contents) == 1 and sorted(os.listdir(final)) == [f"{k}.txt" for k in range(5)]  # one writer's folder
    assert oct(final.stat().st_mode & 0o777) == oct(0o755)


def test_atomic_dir_error_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with io.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("a")
            raise KeyError("stop")
    assert os.listdir(tmp_path) == []


def test_plots_are_written_through_the_atomic_writer(tmp_path):
    pytest.importorskip("matplotlib")
    from fdfast.diagnostics import plots

    path = plots.plot_head_diversity([{"label": "m", "similarity": [0.5, 0.4], "distance_std": [3.0, 2.0]}],
                                     tmp_path / "div.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["div.png"]


# ----------------------------------------------------------------------------- the fsync discipline and publishing
def _journal(monkeypatch):
    """Every fsync / rename fdfast.io makes, in order: ("fsync", path) / ("rename", src, dst)."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        return real_replace(a, b)
    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "rename", rename)
    monkeypatch.setattr(io.os, "replace", replace)
    return events


def test_every_publish_fsyncs_the_data_before_and_the_folder_after_its_rename(tmp_path, monkeypatch):
    events = _journal(monkeypatch)
    io.atomic_write_text(tmp_path / "a.txt", "x")
    (rename_at, (_, tmp, final)), = [(i, e) for i, e in enumerate(events) if e[0] == "rename"]
    assert final == str(tmp_path / "a.txt") and ("fsync", tmp) in events[:rename_at]
    assert ("fsync", str(tmp_path)) in events[rename_at + 1:]

    events.clear()
    work = tmp_path / ".work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "f.bin").write_bytes(b"123")
    assert io.publish_dir(work, tmp_path / "folder")
    rename_at = next(i for i, e in enumerate(events) if e[0] == "rename")
    before = {e[1] for e in events[:rename_at]}
    assert {str(work / "sub" / "f.bin"), str(work / "sub"), str(work)} <= before  # files, then folders, then rename
    assert ("fsync", str(tmp_path)) in events[rename_at + 1:]


def test_replacing_a_folder_never_leaves_a_moment_without_a_complete_one(tmp_path, monkeypatch):
    final = tmp_path / "step-3"
    final.mkdir()
    (final / "v").write_text("old")
    seen = []
    real_rename = os.rename

    def rename(a, b):  # after every rename: is there a complete copy under the final name or the aside name?
        real_rename(a, b)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        found = [p for p in (final, tmp_path / ".step-3.replaced") if (p / "v").is_file()]
        assert found, seen
    monkeypatch.setattr(io.os, "rename", rename)
    new = tmp_path / ".tmp-step-3"
    new.mkdir()
    (new / "v").write_text("new")
    assert io.publish_dir(new, final)
    assert seen == [[".step-3.replaced", ".tmp-step-3"], [".step-3.replaced", "step-3"]]
    assert (final / "v").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["step-3"]


@pytest.mark.parametrize("cut_after", [1, 2])
def test_recover_dirs_rolls_back_or_finishes_a_cut_swap(tmp_path, monkeypatch, cut_after):
    """A kill after the old copy went aside (1: roll back to it) or after the new one went in (2: keep the new)."""
    final = tmp_path / "d"
    final.mkdir()
    (final / "v").write_text("old")
    new = tmp_path / ".tmp-d"
    new.mkdir()
    (new / "v").write_text("new")
    real_rename, calls = os.rename, []

    class Killed(BaseException):
        pass

    def rename(a, b):
        real_rename(a, b)
        calls.append(b)
        if len(calls) == cut_after:
            raise Killed
    monkeypatch.setattr(io.os, "rename", rename)
    with pytest.raises(Killed):
        io.publish_dir(new, final)
    monkeypatch.undo()
    assert (tmp_path / ".d.replaced").is_dir()
    assert io.recover_dirs(tmp_path) == [("rolled back" if cut_after == 1 else "finished", final)]
    assert (final / "v").read_text() == ("old" if cut_after == 1 else "new")
    assert not (tmp_path / ".d.replaced").exists()


def test_a_folder_published_without_replace_keeps_the_first_complete_one(tmp_path):
    final = tmp_path / "cache"
    final.mkdir()  # an empty leftover: replaced
    a = tmp_path / ".a"
    a.mkdir()
    (a / "x").write_text("a")
    assert io.publish_dir(a, final, replace=False) and (final / "x").read_text() == "a"
    b = tmp_path / ".b"
    b.mkdir()
    (b / "x").write_text("b")
    assert not io.publish_dir(b, final, replace=False)  # a complete one is there: this copy is dropped
    assert (final / "x").read_text() == "a" and not b.exists()


@pytest.mark.parametrize("code,fix", [(28, "free space"), (5, "check the disk"), (30, "make the file system writable")])
def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, code, fix):
    path = tmp_path / "summary.json"
    io.atomic_write_json(path, {"old": 1})

    def fail(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(io.os, "fsync", fail)  # a write-back error surfaces at fsync
    with pytest.raises(io.WriteFailed, match=f"cannot write {path}: {os.strerror(code)}") as e:
        io.atomic_write_json(path, {"new": 2})
    assert e.value.fix.startswith(fix) and e.value.path == path
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(FileNotFoundError):  # not a write failure: passes unchanged
        with io.writing(path):
            open(tmp_path / "missing" / "x")


def test_remove_temp_takes_only_what_writers_leave(tmp_path):
    for name in (".x.json.tmp-12-ab", ".tmp-step-3"):
        (tmp_path / name).mkdir() if "step" in name else (tmp_path / name).write_text("half")
    for name in ("x.json", ".lock", ".step-3.replaced"):
        (tmp_path / name).write_text("keep")
    removed = io.remove_temp(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step-3", ".x.json.tmp-12-ab"]
    assert sorted(os.listdir(tmp_path)) == [".lock", ".step-3.replaced", "x.json"]
