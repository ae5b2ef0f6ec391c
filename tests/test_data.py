"""fdfast.data: both loaders on generated image folders (odd sizes, grey, RGBA, bad files)."""
from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from fdfast.config import DataConfig
from fdfast.data import build_fd_loader, resolve_loader, write_summary
from fdfast.data.files import EpochOrder, check_files, list_images
from fdfast.errors import FDFastError

HAS_DALI = resolve_loader("auto") == "dali"
LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed"))]
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # ImageNet's, as most teachers use
SIZE = 32


def _noise(rng, w, h, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = (rng.random((h, w, channels)) * 255).astype(np.uint8)
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)


def _write_mixed(folder, n=20, seed=0):
    """n small images of odd sizes: RGB JPEGs, grey JPEGs, RGBA PNGs, grey PNGs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [("RGB", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("L", "png")]
    for i in range(n):
        mode, ext = kinds[i % len(kinds)]
        w, h = int(rng.integers(37, 97)), int(rng.integers(33, 91))  # odd, non-square sizes
        _noise(rng, w, h, mode).save(folder / f"img_{i:03d}.{ext}")
    return folder


def _cfg(path, loader, **kw):
    kw.setdefault("num_workers", 1)
    return DataConfig(path=str(path), loader=loader, **kw)


def _loader(path, loader, batch_size=4, **kw):
    build_kw = {k: kw.pop(k) for k in ("rank", "world_size", "seed") if k in kw}
    return build_fd_loader(_cfg(path, loader, **kw), image_size=SIZE, mean=MEAN, std=STD,
                           batch_size=batch_size, **build_kw)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    return _write_mixed(tmp_path_factory.mktemp("mixed") / "images")


def _unnormalise(x):
    """Normalised float [B,3,S,S] -> the 0-255 pixels."""
    return x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


# -- shapes, values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOADERS)
def test_batches_are_normalised_nchw_float(mixed_dir, kind):
    loader = _loader(mixed_dir, kind, batch_size=6)
    assert loader.name == kind
    for _ in range(len(loader) + 1):  # one whole epoch and into the next
        x = next(loader)
        assert x.shape == (6, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.device.type == "cpu"
        pixels = _unnormalise(x)
        assert pixels.min() >= -0.01 and pixels.max() <= 255.01  # normalised with exactly MEAN / STD
        assert pixels.std() > 20  # real content, not a constant fill
    stats = loader.stats()
    assert stats["images_seen"] == 6 * (len(loader) + 1) and stats["images_skipped"] == 0
    loader.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_grey_images_become_three_equal_channels(tmp_path, kind):
    rng = np.random.default_rng(1)
    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(4):
        _noise(rng, 45 + i, 39, "L").save(folder / f"g{i}.png")
    x = _unnormalise(next(_loader(folder, kind)))
    assert torch.allclose(x[:, 0], x[:, 1], atol=0.05) and torch.allclose(x[:, 1], x[:, 2], atol=0.05)


# -- augmentation semantics: both paths crop and flip alike -----------------------------------------
def _crop_geometry(x, width, height):
    """From coordinate-ramp images (R = x, G = y): per sample crop area fraction, log aspect, flip, centre x."""
    p = _unnormalise(x) / 255  # [B, 3, S, S], R grows left->right, G grows top->bottom
    left, right = p[:, 0, :, 0].mean(1), p[:, 0, :, -1].mean(1)
    top, bottom = p[:, 1, 0, :].mean(1), p[:, 1, -1, :].mean(1)
    stretch = SIZE / (SIZE - 1)  # edge pixel centres sit half a pixel inside the crop
    w, h = (right - left).abs() * stretch, (bottom - top).abs() * stretch
    return dict(area=w * h, log_aspect=torch.log((w * width) / (h * height)), flip=(right < left).float(),
                centre_x=(left + right) / 2)


def test_crop_statistics_match_between_torch_and_dali(tmp_path):
    if not HAS_DALI:
        pytest.skip("nvidia-dali not installed")
    width, height = 160, 120
    ramp_x = np.tile(np.linspace(0, 255, width), (height, 1))
    ramp_y = np.tile(np.linspace(0, 255, height)[:, None], (1, width))
    rgb = np.stack([ramp_x, ramp_y, np.full_like(ramp_x, 128)], -1).round().astype(np.uint8)
    folder = tmp_path / "ramps"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(rgb).save(folder / f"r{i:02d}.png")  # lossless: only the crops differ
    geometry = {}
    for kind in ("torch", "dali"):
        loader = _loader(folder, kind, batch_size=16)
        x = torch.cat([next(loader) for _ in range(32)])  # 512 crops
        geometry[kind] = _crop_geometry(x, width, height)
    t, d = geometry["torch"], geometry["dali"]
    # Sample sizes 512 each: standard errors of the difference of means are about area 0.016,
    # log aspect 0.011 (uniform in log(3/4)..log(4/3), std 0.17), flip 0.031, centre 0.01; the
    # tolerances are ~4 standard errors, and far below what a wrong scale / ratio / p would give
    # (scale (0.5, 1) moves the mean area by ~0.2, no flip moves the rate by 0.5).
    for key, tol in (("area", 0.065), ("log_aspect", 0.045), ("flip", 0.125), ("centre_x", 0.04)):
        assert abs(t[key].mean() - d[key].mean()) < tol, (key, t[key].mean(), d[key].mean())
    # And both match RandomResizedCrop(scale=(0.08, 1)): area fraction spans ~[0.08, 1], mean ~0.5.
    for g in (t, d):
        assert 0.04 < g["area"].min() < 0.2 and g["area"].max() > 0.85 and 0.4 < g["area"].mean() < 0.62
        assert g["log_aspect"].abs().max() < math.log(4 / 3) + 0.12


# -- order: seeds, epochs, shards, resume -----------------------------------------------------------
@pytest.mark.parametrize("kind", LOADERS)
def test_same_seed_same_batches_other_seed_other_batches(mixed_dir, kind):
    a, b, c = (_loader(mixed_dir, kind, seed=s) for s in (3, 3, 4))
    for _ in range(3):
        xa, xb, xc = next(a), next(b), next(c)
        assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


def test_epochs_are_reshuffled_and_cover_the_data():
    order = EpochOrder(10, 5, seed=0)
    e0, e1 = order.epoch(0)[0], order.epoch(1)[0]
    assert sorted(e0) == sorted(e1) == list(range(10)) and not np.array_equal(e0, e1)


@pytest.mark.parametrize("n,world,batch", [(23, 3, 4), (12, 4, 3), (5, 2, 4)])
def test_shards_are_disjoint_and_equal(n, world, batch):
    for epoch in (0, 1):
        shards = [EpochOrder(n, batch, seed=7, rank=r, world_size=world).epoch(epoch)[0] for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) % batch == 0  # equal, full batches
        unique = [set(s.tolist()) for s in shards]
        assert all(len(u) == n // world for u in unique)  # every rank: n // world distinct files (drop rule)
        assert sum(len(u) for u in unique) == len(set().union(*unique))  # disjoint


def test_torch_resume_gives_the_same_next_batches(mixed_dir):
    a = _loader(mixed_dir, "torch", batch_size=6, seed=1)
    for _ in range(len(a) + 1):  # past an epoch boundary
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON (checkpoints store it so)
    expected = [next(a) for _ in range(len(a))]
    b = _loader(mixed_dir, "torch", batch_size=6, seed=1)
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(b), want)
    assert b.stats()["images_seen"] == 6 * len(expected)  # this process's images (its img/s)


@pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed")
def test_dali_resume_reads_the_same_files(tmp_path):
    # every file one flat grey level (lossless PNG): a crop's mean level names its file
    for i in range(11):
        Image.fromarray(np.full((30, 40, 3), 10 + 20 * i, np.uint8)).save(tmp_path / f"f{i:02d}.png")

    def files_of(batch):
        return ((_unnormalise(batch).mean((1, 2, 3)) - 10) / 20).round().long()  # [B] file numbers

    a = _loader(tmp_path, "dali", batch_size=3, seed=5)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = [files_of(next(a)) for _ in range(6)]
    b = _loader(tmp_path, "dali", batch_size=3, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(files_of(next(b)), e) for e in expected)
    # and DALI follows the torch loader's file order exactly
    t = _loader(tmp_path, "torch", batch_size=3, seed=5)
    t.load_state_dict(state)
    assert all(torch.equal(files_of(next(t)), e) for e in expected)


# -- bad input --------------------------------------------------------------------------------------
def _write_bad(folder):
    """Four kinds of bad files beside good ones; returns their names."""
    good = io.BytesIO()
    _noise(np.random.default_rng(3), 64, 48).save(good, "JPEG")
    data = good.getvalue()
    bad = {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "truncated.jpg": data[: len(data) // 2],
        # damaged in the middle, header and end marker intact: only a real decode finds it
        "corrupt_middle.jpg": data[:300] + b"\x00" * 600 + data[900:],
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return sorted(bad)


@pytest.mark.parametrize("kind", LOADERS)
def test_bad_files_are_skipped_counted_and_named(tmp_path, kind, caplog):
    folder = _write_mixed(tmp_path / "data", n=10)
    bad = _write_bad(folder)
    loader = _loader(folder, kind, batch_size=5)
    with caplog.at_level(logging.WARNING, logger="fdfast.data"):
        for _ in range(2 * len(loader)):  # two whole epochs: every file is read
            x = next(loader)
            assert x.shape == (5, 3, SIZE, SIZE) and torch.isfinite(x).all()
    stats = loader.stats()
    assert stats["images_skipped"] == 4
    assert sorted(p.rsplit("/", 1)[-1] for p in stats["bad_files"]) == bad
    logged = caplog.text
    assert all(name in logged for name in bad)


def test_the_cheap_check_rejects_what_it_can_and_is_cached(tmp_path, monkeypatch):
    folder = _write_mixed(tmp_path / "data", n=4)
    _write_bad(folder)
    files = list_images(folder)
    # zero-byte, non-image and truncated files never reach a loader; the mid-file damage does
    assert sorted(p.rsplit("/", 1)[-1] for p in files.bad) == ["text.jpg", "truncated.jpg", "zero.jpg"]
    import fdfast.data.files as files_mod

    def fail(path):
        raise AssertionError("re-checked a cached file")
    monkeypatch.setattr(files_mod, "looks_like_image", fail)
    assert list_images(folder).paths == files.paths  # all from the cache
    (folder / "zero.jpg").write_bytes((folder / "img_000.jpg").read_bytes())  # fixed: size changed
    monkeypatch.undo()
    assert len(list_images(folder)) == len(files) + 1
    assert check_files([str(folder / "corrupt_middle.jpg")], mode="full") == [False]


@pytest.mark.parametrize("kind", LOADERS)
def test_all_bad_files_stop_with_a_clear_error(tmp_path, kind):
    folder = tmp_path / "allbad"
    folder.mkdir()
    _write_bad(folder)
    (folder / "corrupt_middle.jpg").unlink()  # the cheap check now rejects every file
    with pytest.raises(FDFastError, match="none of the 3 image files.*allbad"):
        _loader(folder, kind)


@pytest.mark.parametrize("kind", LOADERS)
def test_all_bad_found_only_while_decoding_stops_with_a_clear_error(tmp_path, kind):
    folder = tmp_path / "damaged"
    folder.mkdir()
    good = io.BytesIO()
    _noise(np.random.default_rng(4), 64, 48).save(good, "JPEG")
    data = good.getvalue()
    for i in range(3):
        (folder / f"d{i}.jpg").write_bytes(data[:300] + b"\x00" * 600 + data[900:])
    loader = _loader(folder, kind, batch_size=2)
    with pytest.raises(FDFastError, match="decode"):
        next(loader)


def test_missing_empty_and_imageless_folders_name_the_path(tmp_path):
    with pytest.raises(FDFastError, match="does not exist.*--data"):
        _loader(tmp_path / "nowhere", "torch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FDFastError, match="empty.*no image files"):
        _loader(tmp_path / "empty", "torch")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no pictures here")
    with pytest.raises(FDFastError, match="docs.*no image files"):
        _loader(tmp_path / "docs", "torch")
    with pytest.raises(FDFastError, match="data.loader must be one of"):
        _loader(tmp_path, "pillow")


# -- labels (fine-tuning's loaders read them: tests/test_finetune_shards.py), synthetic, summary --------------
def test_labelled_listing_needs_class_folders(mixed_dir, tmp_path):
    with pytest.raises(FDFastError, match="one subfolder per class"):
        list_images(mixed_dir, labeled=True)
    for name in ("dog", "bird", "cat"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (20, 17)).save(tmp_path / name / "x.png")
    files = list_images(tmp_path, labeled=True)
    assert files.classes == ["bird", "cat", "dog"] and files.labels == [0, 1, 2]  # sorted folder names


def test_synthetic_loader_and_auto():
    loader = build_fd_loader(DataConfig(loader="synthetic"), image_size=SIZE, mean=MEAN, std=STD, batch_size=3)
    x = next(loader)
    assert loader.name == "synthetic" and x.shape == (3, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert not torch.equal(x, next(loader))
    assert resolve_loader("auto") == ("dali" if HAS_DALI else "torch")


def test_write_summary(tmp_path, mixed_dir):
    loader = _loader(mixed_dir, "torch")
    for _ in range(3):
        next(loader)
    summary = write_summary(tmp_path / "run", loader, steps=3, wall_s=2.0)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["loader"] == "torch" and on_disk["images_seen"] == 12 and on_disk["images_skipped"] == 0
    assert on_disk["steps"] == 3 and on_disk["wall_s"] == 2.0 and on_disk["img_per_s"] == 6.0


def test_bad_augmentation_settings_are_named(mixed_dir):
    with pytest.raises(FDFastError, match="data.scale"):
        _loader(mixed_dir, "torch", scale=(0.5, 0.2))
    with pytest.raises(FDFastError, match="mean and std"):
        build_fd_loader(_cfg(mixed_dir, "torch"), image_size=SIZE, mean=(0.5,), std=STD, batch_size=2)


def test_no_data_path_reads_the_demo_images(mixed_dir, monkeypatch):
    from fdfast.data import sources
    from fdfast.demo.photos import demo_image_dir

    assert sources.DEFAULT_SOURCE == "demo-images"
    assert sources._entry("demo-images").fn is demo_image_dir  # registered by the demo plugin
    monkeypatch.setitem(sources._SOURCES, "demo-images", sources.DataSource("demo-images", lambda: mixed_dir, ""))
    loader = build_fd_loader(DataConfig(path=None, loader="torch", num_workers=0), image_size=SIZE, mean=MEAN,
                             std=STD, batch_size=2)
    assert loader.files.root == mixed_dir and next(loader).shape == (2, 3, SIZE, SIZE)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA device")
def test_dali_mixed_decodes_on_the_gpu(mixed_dir):
    loader = build_fd_loader(_cfg(mixed_dir, "dali"), image_size=SIZE, mean=MEAN, std=STD, batch_size=4,
                             device="cuda")
    x = next(loader)
    assert x.is_cuda and x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
    pixels = _unnormalise(x.cpu())
    assert pixels.min() >= -0.01 and pixels.max() <= 255.01
