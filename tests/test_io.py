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
