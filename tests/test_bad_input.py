"""The bad-input sweep (issue 14): each bad input is one error line with exit code 2, or a counted skip.

    config       YAML syntax errors, a non-mapping file, wrong types      -> one line naming file / key, exit 2
    teacher      truncated, empty, foreign format, pickles that run code  -> one line naming the file, exit 2
    images       grey, CMYK, 16-bit, RGBA, palette, 1x1, animated         -> read as RGB (first frame), not skipped
                 zero-byte, non-image, truncated, decompression bomb,
                 unreadable, a symlink that loops, deleted mid-run        -> skipped, counted in summary.json
    data folder  symlink loops                                            -> the walk ends, each folder read once
    disk full    ENOSPC in the middle of a checkpoint write               -> one line, exit 2, older step intact
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fdfast import checkpoint as ckpt
from fdfast.cli import main
from fdfast.config import DataConfig
from fdfast.data import build_fd_loader, resolve_loader
from fdfast.data.files import list_images, load_rgb
from fdfast.errors import FDFastError

from test_train import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
HAS_DALI = resolve_loader("auto") == "dali"
LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed"))]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))


def one_error_line(capsys, argv, command="train") -> str:
    """Run the CLI in-process: exit code 2, no traceback, and the error is the last stderr line, alone."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith(f"fdfast {command}: error: ")]
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err and errors == [len(lines) - 1], err[-2000:]
    return lines[-1]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("text,match", [
    ("optim:\n  steps: 3\n warmup_steps: 1\n", r"not valid YAML at line 3, column 2"),
    ("model: {img_size: 32\n", r"not valid YAML at line 2"),
    ("optim:\n\tsteps: 3\n", r"not valid YAML at line 2, column 1"),
    ("- model\n- data\n", r"must be a YAML mapping of sections .* got a list"),
    ("optim:\n  steps: ten\n", r"config key 'optim.steps' needs a whole number, got 'ten'"),
    ("optim:\n  steps: 2.5\n", r"config key 'optim.steps' needs a whole number, got 2.5"),
    ("optim:\n  base_lr: fast\n", r"config key 'optim.base_lr' needs a number, got 'fast'"),
    ("optim: 5\n", r"config section 'optim' must be a mapping, got 5"),
    ("data:\n  scale: 0.5\n", r"config key 'data.scale' needs 2 values"),
    ("runtime:\n  tensorboard: maybe\n", r"config key 'runtime.tensorboard' needs true or false"),
    ("model:\n  kwargs: [1, 2]\n", r"config key 'model.kwargs' needs a mapping"),
    ("teacher:\n  name: [a, b]\n", r"config key 'teacher.name' needs a string"),
    ("data:\n  loader: pil\n", r"data.loader must be one of auto, dali, torch, synthetic, got 'pil'"),
])
def test_recipe_file_errors_are_one_line(tmp_path, capsys, text, match):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    line = one_error_line(capsys, ["train", str(recipe), "--out", str(out)])
    assert re.search(match, line), line
    assert not out.exists()  # nothing written by a failed start


@pytest.mark.parametrize("override,match", [
    ("optim.steps=[1, 2]", "config key 'optim.steps' needs a whole number"),
    ("data.batch_size=true", "config key 'data.batch_size' needs a number"),
    ("optim.betas=0.9", "config key 'optim.betas' needs 2 values"),
    ("ckpt=3", "config section 'ckpt' must be a mapping"),
])
def test_override_type_errors_are_one_line(tmp_path, capsys, override, match):
    line = one_error_line(capsys, ["train", "--out", str(tmp_path / "run"), "--set", override])
    assert match in line


def test_a_damaged_saved_config_is_one_line_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model:\n  arch: vit\n  size: [tiny\n")  # cut off mid-write
    line = one_error_line(capsys, ["train", "--out", str(out), "--resume", "auto"])
    assert "config.yaml" in line and "not valid YAML" in line


# ----------------------------------------------------------------------------- teacher weights
class _RunsCode:
    """Unpickling this calls os.system: the weights loader must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _weights_files(folder: Path, teacher_file: Path, marker: Path) -> dict[str, Path]:
    good = teacher_file.read_bytes()
    sd = load_file(str(teacher_file))
    torch.save(sd, folder / "good.pth")
    pth = (folder / "good.pth").read_bytes()
    files = {
        "truncated.safetensors": good[:len(good) // 2],
        "empty.safetensors": b"",
        "truncated.pth": pth[:len(pth) // 2],
        "empty.pth": b"",
        "text.pth": b"these are not weights\n",
        "jpeg.pth": b"\xff\xd8\xff\xe0" + bytes(200),
        "jpeg.safetensors": b"\xff\xd8\xff\xe0" + bytes(200),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    torch.save({"model": sd, "extra": _RunsCode(marker)}, folder / "code.pth")
    torch.save({"model": sd, "extra": _RunsCode(marker)}, folder / "code_legacy.pth",
               _use_new_zipfile_serialization=False)
    (folder / "code.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    return {n: folder / n for n in list(files) + ["code.pth", "code_legacy.pth", "code.pkl"]}


WEIGHTS_ERRORS = {
    "truncated.safetensors": "not a readable safetensors file",
    "empty.safetensors": "not a readable safetensors file",
    "jpeg.safetensors": "not a readable safetensors file",
    "truncated.pth": "(a damaged or truncated torch zip archive: PytorchStreamReader failed",
    "empty.pth": "(the file is empty, 0 bytes); download or copy it again",
    "text.pth": "not a torch checkpoint, safetensors or TorchScript file",
    "jpeg.pth": "not a torch checkpoint, safetensors or TorchScript file",
    "code.pth": "(it pickles posix.system: code or objects a weights file must not hold); re-save",
    "code_legacy.pth": "(it pickles posix.system: code or objects a weights file must not hold)",
    "code.pkl": "(a pickle that weights_only loading refuses: UnpicklingError)",
}


def test_bad_teacher_weights_are_one_line_and_never_run_code(tmp_path, capsys, teacher_file, image_dir):
    marker = tmp_path / "code_ran"
    files = _weights_files(tmp_path, teacher_file, marker)
    assert set(files) == set(WEIGHTS_ERRORS)
    for name, path in files.items():
        args = tiny_args(tmp_path / f"run-{name}", teacher_file, image_dir, 2)
        args[args.index(str(teacher_file))] = str(path)
        line = one_error_line(capsys, args)
        assert name in line and WEIGHTS_ERRORS[name] in line, (name, line)
        assert not (tmp_path / f"run-{name}").exists()
    assert not marker.exists()  # no pickle was ever executed


# ----------------------------------------------------------------------------- images that are read
def _solid(mode, colour, size=(40, 36)):
    return Image.new(mode, size, colour)


RGB = (10, 200, 30)
ODD_IMAGES = {  # name -> (writer, the RGB every reader must see); constant images: any crop has that colour
    "grey.png": (lambda p: _solid("L", 77).save(p), (77, 77, 77)),
    "cmyk.jpg": (lambda p: _solid("CMYK", (30, 60, 90, 20)).save(p, quality=100), (207, 180, 152)),
    "grey16.png": (lambda p: Image.fromarray(np.full((36, 40), 0x8A00, np.uint16)).save(p), (138, 138, 138)),
    "grey16.tif": (lambda p: Image.fromarray(np.full((36, 40), 0x8A00, np.uint16)).save(p), (138, 138, 138)),
    "rgba.png": (lambda p: _solid("RGBA", RGB + (0,)).save(p), RGB),  # alpha dropped, colour kept
    "palette.png": (lambda p: _solid("RGB", RGB).convert("P", palette=Image.Palette.ADAPTIVE).save(p), RGB),
    "1x1.png": (lambda p: _solid("RGB", RGB, (1, 1)).save(p), RGB),
    "animated.png": (lambda p: _solid("RGB", RGB).save(p, save_all=True, append_images=[_solid("RGB", (250, 0, 0))]),
                     RGB),  # first frame
    "animated.webp": (lambda p: _solid("RGB", RGB).save(p, save_all=True, lossless=True,
                                                         append_images=[_solid("RGB", (250, 0, 0))]), RGB),
}


def _loader(folder, kind, batch_size=2, **kw):
    cfg = DataConfig(path=str(folder), loader=kind, num_workers=kw.pop("num_workers", 0), **kw)
    return build_fd_loader(cfg, image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), batch_size=batch_size)


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_unusual_images_are_read_as_rgb(tmp_path, kind, name):
    write, want = ODD_IMAGES[name]
    write(tmp_path / name)
    assert np.asarray(load_rgb(str(tmp_path / name))).reshape(-1, 3).mean(0) == pytest.approx(want, abs=1)
    loader = _loader(tmp_path, kind)
    pixels = next(loader) * 255  # [2, 3, 16, 16] in 0-255 (mean 0, std 1)
    assert loader.stats()["images_skipped"] == 0 and len(loader.files) == 1
    # 16-bit grey: fdfast keeps the top 8 bits (138), DALI rounds value * 255 / 65535 (137)
    assert pixels.mean((0, 2, 3)).tolist() == pytest.approx(want, abs=1.5)
    assert float(pixels.amax((0, 2, 3)).sub(pixels.amin((0, 2, 3))).max()) <= 2  # one colour, not noise
    loader.close()


# ----------------------------------------------------------------------------- images that are skipped
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A 1 KB PNG declaring side x side grey pixels (900 M at 30000: gigabytes once decoded)."""
    rows = zlib.compress(b"\x00" * (side + 1) * 8)  # a few valid rows; the header is what a reader trusts
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
                     + _png_chunk(b"IEND", b""))


def _jpeg_bytes(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((36, 40, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((36, 40, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _unreadable(path: Path) -> None:
    path.write_bytes(_jpeg_bytes(5))
    path.chmod(0)


BAD_IMAGES = {  # name -> writer; every one must be skipped and counted
    "zero.jpg": lambda p: p.write_bytes(b""),
    "text.jpg": lambda p: p.write_text("not an image"),
    "truncated.jpg": lambda p: p.write_bytes(_jpeg_bytes()[:600]),
    "truncated.png": lambda p: p.write_bytes(_png_bytes()[:900]),
    "bomb.png": _bomb_png,
    "loop.jpg": lambda p: p.symlink_to(p.name),  # a symlink to itself: ELOOP on open
    "unreadable.jpg": _unreadable,
}


def _good_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"good{i}.jpg").write_bytes(_jpeg_bytes(i))


def _skip_if_readable_anyway(path: Path) -> None:
    if path.name == "unreadable.jpg" and os.access(path, os.R_OK):
        pytest.skip("running as root: chmod 000 does not stop reads, so the file is not unreadable here")


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_skipped_and_counted(tmp_path, kind, name):
    _good_images(tmp_path / "data")
    BAD_IMAGES[name](tmp_path / "data" / name)
    _skip_if_readable_anyway(tmp_path / "data" / name)
    loader = _loader(tmp_path / "data", kind, batch_size=3)
    assert [Path(p).name for p in loader.files.bad] == [name] and len(loader.files) == 3
    for _ in range(3):
        x = next(loader)
        assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert loader.stats()["images_skipped"] == 1 and Path(loader.stats()["bad_files"][0]).name == name
    loader.close()


def test_the_decompression_bomb_check_follows_pils_limit(tmp_path, monkeypatch):
    _good_images(tmp_path)
    _bomb_png(tmp_path / "bomb.png", side=2000)  # 4 M pixels: a real (large) image under PIL's default
    assert len(list_images(tmp_path, check="fast", cache_dir=tmp_path / "c1")) == 4
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # a user's stricter limit
    files = list_images(tmp_path, check="fast", cache_dir=tmp_path / "c2")
    assert [Path(p).name for p in files.bad] == ["bomb.png"]
    assert [Path(p).name for p in list_images(tmp_path, check="full", cache_dir=tmp_path / "c3").bad] == ["bomb.png"]


def test_symlink_loops_end_and_linked_folders_are_read_once(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _good_images(data / "a", 2)
    _good_images(elsewhere, 3)
    (data / "a" / "up").symlink_to("..")  # data/a/up -> data: a loop
    (data / "self").symlink_to(".")  # data/self -> data
    (data / "linked").symlink_to(elsewhere)  # a class folder assembled from a link: read
    (data / "again").symlink_to(elsewhere)  # the same folder by a second link: read once
    (data / "loop.jpg").symlink_to("loop.jpg")
    files = list_images(data)
    names = sorted(Path(p).name for p in files.paths)
    assert names == ["good0.jpg", "good0.jpg", "good1.jpg", "good1.jpg", "good2.jpg"]
    assert [Path(p).name for p in files.bad] == ["loop.jpg"]
    assert {Path(p).parent.name for p in files.paths} == {"a", "again"}  # 'again' sorts before 'linked'


@pytest.mark.parametrize("kind,workers", [("torch", 0), ("torch", 1), pytest.param(
    "dali", 1, marks=pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed"))])
def test_files_deleted_mid_run_are_skipped_and_counted(tmp_path, kind, workers):
    _good_images(tmp_path / "data", 8)
    loader = _loader(tmp_path / "data", kind, batch_size=4, num_workers=workers)
    try:
        next(loader)
        gone = sorted((tmp_path / "data").iterdir())[:3]
        for p in gone:
            p.unlink()
        for _ in range(4):  # two epochs: every file comes up
            x = next(loader)
            assert x.shape == (4, 3, 16, 16) and torch.isfinite(x).all()
        stats = loader.stats()
        assert stats["images_skipped"] == 3
        assert sorted(Path(p).name for p in stats["bad_files"]) == [p.name for p in gone]
        for p in sorted((tmp_path / "data").iterdir()):
            p.unlink()  # now nothing is left to substitute: one clear error, also from a worker process
        with pytest.raises(FDFastError, match="decode") as e:  # torch: "failed to decode", DALI: "can be decoded"
            for _ in range(4):
                next(loader)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    finally:
        loader.close()


def test_a_run_on_every_kind_of_image_counts_its_skips(tmp_path, caplog, teacher_file, image_dir):
    """End to end through the CLI: the run finishes, summary.json counts (and names) every skipped file."""
    data = tmp_path / "data"
    _good_images(data, 4)
    for name, (write, _) in ODD_IMAGES.items():
        write(data / name)
    bad = [n for n in BAD_IMAGES if n != "unreadable.jpg" or os.geteuid() != 0]
    for name in bad:
        BAD_IMAGES[name](data / name)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="fdfast.data"):
        assert main(tiny_args(out, teacher_file, data, 2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_skipped"] == len(bad)
    assert {Path(p).name for p in summary["bad_files"]} <= set(bad) and len(summary["bad_files"]) == min(5, len(bad))
    assert f"skipping {len(bad)} unreadable image file(s)" in caplog.text


# ----------------------------------------------------------------------------- full disk
def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_one(tmp_path, capsys, monkeypatch,
                                                                                teacher_file, image_dir):
    import safetensors.torch
    real_save = safetensors.torch.save_file
    calls = []

    def fills_the_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:  # step-2 is written; step-4 runs out of space half-way through its tensor file
            return real_save(tensors, filename, metadata=metadata)
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    out = tmp_path / "run"
    line = one_error_line(capsys, tiny_args(out, teacher_file, image_dir, 4))
    assert "step-4" in line and "No space left on device" in line
    assert [s for s, _ in ckpt.committed_steps(out)] == [2]
    assert ckpt.damage(out / "checkpoints" / "step-2") is None  # the previous committed checkpoint is intact
    assert not list((out / "checkpoints").glob("*step-4*"))  # no half-written folder left to fill the disk
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)  # space freed: the run continues
    assert main(tiny_args(out, teacher_file, image_dir, 4, "--resume", "auto")) == 0
    assert [s for s, _ in ckpt.committed_steps(out)] == [2, 4]
