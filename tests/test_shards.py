"""WebDataset shards: specs, `fdfast shards`, the shard order, both FD loaders (same samples and crops as the folder,
exact resume, bad members), and a training run resumed on shards. Fine-tuning on labelled shards:
tests/test_finetune_shards.py."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN, IMAGENET_DEFAULT_STD as STD

from fdfast.cli import main
from fdfast.config import DataConfig
from fdfast.data import build_fd_loader, resolve_loader
from fdfast.data.files import list_images
from fdfast.data.shards import ShardOrder, expand_braces, list_shards, shard_paths, write_shards
from fdfast.data.torch_loader import CropDataset
from fdfast.errors import FDFastError

HAS_DALI = resolve_loader("auto") == "dali"
LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed"))]
SIZE = 32


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))


def _write_classes(folder, per_class=(5, 4, 6), seed=0):
    """Class subfolders of small JPEG / PNG images of odd sizes; each class has its own grey level."""
    rng = np.random.default_rng(seed)
    for label, n in enumerate(per_class):
        (folder / f"class{label}").mkdir(parents=True)
        for i in range(n):
            w, h = int(rng.integers(37, 70)), int(rng.integers(33, 60))
            noise = rng.integers(-20, 20, (h, w, 3))
            pixels = np.clip(40 + 80 * label + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class{label}" / f"img.{i}.{'png' if i % 3 == 0 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def classes_dir(tmp_path_factory):
    return _write_classes(tmp_path_factory.mktemp("classes") / "images")


@pytest.fixture(scope="module")
def shard_spec(classes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return write_shards(classes_dir, out, shard_size=4)["data"]


def _cfg(path, loader, **kw):
    kw.setdefault("num_workers", 1)
    return DataConfig(path=str(path), loader=loader, **kw)


def _fd(path, loader, batch_size=4, **kw):
    build = {k: kw.pop(k) for k in ("rank", "world_size", "seed") if k in kw}
    return build_fd_loader(_cfg(path, loader, **kw), image_size=SIZE, mean=MEAN, std=STD, batch_size=batch_size,
                           **build)


# -- which shards a spec names ------------------------------------------------------------------------------
def test_brace_patterns_lists_folders_and_globs(tmp_path):
    assert expand_braces("a-{000008..000011}.tar") == [f"a-0000{i:02d}.tar" for i in range(8, 12)]
    assert expand_braces("{x,y}-{1..2}.tar") == ["x-1.tar", "x-2.tar", "y-1.tar", "y-2.tar"]
    for name in ("s-00.tar", "s-01.tar", "s-02.tar", "other.tar"):
        (tmp_path / name).write_bytes(b"")
    names = lambda paths: [p.rsplit("/", 1)[-1] for p in paths]  # noqa: E731
    assert names(shard_paths(str(tmp_path / "s-{00..02}.tar"))) == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert names(shard_paths(f"{tmp_path}/s-{{00..01}}.tar::{tmp_path}/other.tar")) == ["s-00.tar", "s-01.tar",
                                                                                       "other.tar"]
    assert names(shard_paths(str(tmp_path))) == ["other.tar", "s-00.tar", "s-01.tar", "s-02.tar"]
    assert names(shard_paths(str(tmp_path / "s-*.tar"))) == ["s-00.tar", "s-01.tar", "s-02.tar"]
    (tmp_path / "images").mkdir()
    assert shard_paths(str(tmp_path / "images")) is None and shard_paths(None) is None  # an image folder


def test_a_missing_shard_is_one_line_naming_it(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    with pytest.raises(FDFastError, match=r"s-3\.tar' does not exist \(2 of 5 shards missing\)"):
        shard_paths(str(tmp_path / "s-{0..4}.tar"))
    with pytest.raises(FDFastError, match="runs backwards"):
        shard_paths(str(tmp_path / "s-{4..0}.tar"))
    with pytest.raises(FDFastError, match="no .tar shard matches"):
        shard_paths(str(tmp_path / "t-*.tar"))


def test_missing_shards_stop_the_cli_with_exit_2(tmp_path, teacher_file, capsys):
    assert main(_train_argv(tmp_path / "run", teacher_file, str(tmp_path / "x-{000000..000003}.tar"), 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x-000000.tar' does not exist (4 of 4 shards missing)" in err[0]
    assert not (tmp_path / "run").exists()


# -- fdfast shards -----------------------------------------------------------------------------------------
def test_fdfast_shards_writes_every_image_once_with_its_label(classes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["shards", str(classes_dir), "--out", str(out), "--shard-size", "4", "--prefix", "train"]) == 0
    assert "--data '" + str(out / "train-{000000..000003}.tar") + "'" in capsys.readouterr().out
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["classes"] == ["class0", "class1", "class2"] and manifest["samples"] == 15
    folder = list_images(classes_dir, labeled=True)
    by_bytes = {open(p, "rb").read(): label for p, label in zip(folder.paths, folder.labels)}
    seen, per_shard = [], []
    for name in manifest["shards"]:
        with tarfile.open(out / name) as tar:
            members = tar.getmembers()
            per_shard.append(len(members) // 2)
            for image, cls in zip(members[::2], members[1::2]):  # image then .cls, per sample
                assert image.name.split(".")[0] == cls.name.split(".")[0] and cls.name.endswith(".cls")
                data = tar.extractfile(image).read()
                assert by_bytes[data] == int(tar.extractfile(cls).read())  # unchanged bytes, right label
                seen.append(data)
    assert sorted(seen) == sorted(by_bytes) and per_shard == [4, 4, 4, 3]
    labels_in_order = [by_bytes[d] for d in seen]
    assert labels_in_order != sorted(labels_in_order)  # shuffled: shards mix the classes
    # the same seed writes the same shards, byte for byte
    again = write_shards(classes_dir, tmp_path / "again", shard_size=4, prefix="train")
    assert all((out / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in again["shards"])
    assert main(["shards", str(classes_dir), "--out", str(out)]) == 2  # never writes over shards
    assert "already holds .tar shards" in capsys.readouterr().err


def test_a_validation_split_takes_the_training_class_order(classes_dir, tmp_path, capsys):
    train = tmp_path / "train"
    write_shards(classes_dir, train, shard_size=8)
    val = tmp_path / "val"
    shutil.copytree(classes_dir / "class2", val / "class2")  # a split holding one class: its index stays 2
    assert main(["shards", str(val), "--out", str(tmp_path / "val-shards"), "--classes",
                 str(train / "shards.json")]) == 0
    files = list_shards(shard_paths(str(tmp_path / "val-shards")), labeled=True)
    assert set(files.labels) == {2} and files.classes == ["class0", "class1", "class2"]
    (val / "class9").mkdir()
    Image.new("RGB", (20, 20)).save(val / "class9" / "x.png")
    assert main(["shards", str(val), "--out", str(tmp_path / "v2"), "--classes", str(train / "shards.json")]) == 2
    assert "['class9']" in capsys.readouterr().err


def test_flat_folders_give_unlabelled_shards(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + i, 17), (i, 2, 3)).save(flat / f"{i}.png")
    m = write_shards(flat, tmp_path / "out", shard_size=2)
    assert m["classes"] is None and m["samples"] == 3 and m["data"].endswith("flat-{000000..000001}.tar")
    files = list_shards(shard_paths(m["data"]))
    assert len(files) == 3 and files.labels == [0, 0, 0]
    with pytest.raises(FDFastError, match="carry no .cls members"):
        list_shards(shard_paths(m["data"]), labeled=True)


# -- the order --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes,world,batch", [((5, 3, 7, 1), 3, 4), ((4, 4, 4), 2, 3), ((9,), 4, 2)])
def test_shard_order_parts_are_disjoint_equal_and_local(sizes, world, batch):
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n = starts[-1]
    for epoch in (0, 1):
        parts = [ShardOrder(starts, batch, seed=3, rank=r, world_size=world).epoch(epoch)[0] for r in range(world)]
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) % batch == 0  # equal, full batches
        unique = [set(p.tolist()) for p in parts]
        assert all(len(u) == n // world for u in unique)  # n // world distinct samples each (the rest dropped)
        assert sum(len(u) for u in unique) == len(set().union(*unique))  # disjoint
        for part in parts:  # contiguous in the epoch's shard sequence: each shard visited in one run
            shard = np.searchsorted(starts, part[:n // world], side="right") - 1
            assert len(np.flatnonzero(np.diff(shard))) + 1 == len(set(shard.tolist()))
    one = ShardOrder(starts, batch, seed=3)
    e0, e1 = one.epoch(0)[0][:n], one.epoch(1)[0][:n]
    assert sorted(e0.tolist()) == list(range(n)) and not np.array_equal(e0, e1)  # all, reshuffled


# -- the loaders ------------------------------------------------------------------------------------------
def test_shards_give_the_folders_samples_and_crops(classes_dir, shard_spec):
    """The same image with the same seed gives the same crop, read from a folder or from a shard."""
    folder = list_images(classes_dir, labeled=True)
    shards = list_shards(shard_paths(shard_spec), labeled=True)
    assert len(shards) == len(folder) and shards.classes == folder.classes
    position = {open(p, "rb").read(): i for i, p in enumerate(folder.paths)}
    args = (SIZE, (0.08, 1.0), (0.75, 4 / 3), 0.5)
    from_folder, from_shards = CropDataset(folder, *args), CropDataset(shards, *args)
    for i in range(len(shards)):
        j = position[shards.read(i)]
        assert shards.labels[i] == folder.labels[j] and tuple(shards.dims[i]) == Image.open(folder.paths[j]).size
        for seed in (1, 77):
            a, b = from_shards[(i, seed)], from_folder[(j, seed)]
            assert torch.equal(a[0], b[0])


def _levels(x):
    """Mean grey level (0-255) of each normalised image of a batch [B, 3, S, S] -> [B]."""
    return (x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255).mean((1, 2, 3))


@pytest.mark.parametrize("kind", LOADERS)
def test_shard_loader_batches(shard_spec, kind):
    loader = _fd(shard_spec, kind)
    assert loader.name == kind and len(loader) == 4  # 15 samples, batch 4
    for _ in range(2 * len(loader)):
        x = next(loader)
        assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
        # every image is one of the samples: its class's grey level (40, 120 or 200) +- the noise
        assert ((_levels(x) - 40) / 80 - ((_levels(x) - 40) / 80).round()).abs().max() < 6 / 80
    assert loader.stats()["images_seen"] == 4 * 2 * len(loader)


def test_both_loaders_read_the_same_samples_in_the_same_order(shard_spec):
    if not HAS_DALI:
        pytest.skip("nvidia-dali not installed")
    t, d = (_fd(shard_spec, kind, seed=5, rank=1, world_size=2, num_workers=0) for kind in ("torch", "dali"))
    for _ in range(5):  # past the epoch end (2 batches per epoch)
        xt, xd = next(t), next(d)
        # two decoders and resizers on the same crop windows: pixels agree to a few grey levels (another sample's
        # noise, or another class, would differ by far more)
        assert (xt - xd).abs().mean() < 0.05
        assert torch.allclose(_levels(xt), _levels(xd), atol=3)


@pytest.mark.parametrize("kind", LOADERS)
def test_shard_loader_resumes_exactly(shard_spec, kind):
    a = _fd(shard_spec, kind, batch_size=3, seed=2)
    for _ in range(len(a) + 2):  # past an epoch boundary
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as plain data
    expected = [next(a) for _ in range(len(a) + 1)]  # and across the next boundary
    b = _fd(shard_spec, kind, batch_size=3, seed=2)
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(b), want)
    assert b.stats()["images_seen"] == 3 * len(expected)


def test_torch_workers_do_not_change_the_batches(shard_spec):
    one, two = _fd(shard_spec, "torch", num_workers=0, seed=4), _fd(shard_spec, "torch", num_workers=2, seed=4)
    for _ in range(5):
        assert torch.equal(next(one), next(two))


# -- bad members -------------------------------------------------------------------------------------------
def _jpeg(rng, w=48, h=40):
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _write_damaged(folder):
    """Three good shards of 4 images and every kind of damage; returns the names of what must be skipped."""
    rng = np.random.default_rng(9)
    folder.mkdir()
    for s in range(3):
        _tar(folder / f"good-{s}.tar", [(f"s{s}_{i}.jpg", _jpeg(rng)) for i in range(4)])
    good = _jpeg(rng)
    _tar(folder / "members.tar", [
        ("ok_a.jpg", _jpeg(rng)),
        ("text.txt", b"not an image"),  # a sample without an image member
        ("fake.jpg", b"this is not a jpeg"),
        ("cut.jpg", good[: len(good) // 2]),  # truncated image (no end marker)
        ("ok_b.png", _png(rng)),
    ])
    (folder / "noise.tar").write_bytes(rng.bytes(3000))  # not a tar at all
    whole = _tar(folder / "cut.tar", [("c0.jpg", _jpeg(rng)), ("c1.jpg", _jpeg(rng))]).read_bytes()
    with tarfile.open(folder / "cut.tar") as tar:
        second = tar.getmembers()[1].offset_data
    (folder / "cut.tar").write_bytes(whole[:second + 100])  # the tar ends inside its second image
    return {"members.tar:text", "members.tar:fake", "members.tar:cut", "noise.tar", "cut.tar:c1"}


def _png(rng):
    buf = io.BytesIO()
    Image.fromarray((rng.random((30, 35, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _short(name: str) -> str:
    """'/x/members.tar:text (why)' -> 'members.tar:text'; '/x/noise.tar (damaged ...)' -> 'noise.tar'."""
    return name.split(" (")[0].rsplit("/", 1)[-1]


@pytest.mark.parametrize("kind", LOADERS)
def test_bad_members_and_damaged_shards_are_skipped_counted_and_named(tmp_path, kind, caplog):
    skipped = _write_damaged(tmp_path / "damaged")
    with caplog.at_level(logging.WARNING, logger="fdfast.data"):
        loader = _fd(tmp_path / "damaged", kind, batch_size=3)
    assert len(loader.files) == 12 + 2 + 1  # good shards, the two good members, the first image of cut.tar
    for _ in range(2 * len(loader)):  # two whole epochs: every sample is read
        x = next(loader)
        assert x.shape == (3, 3, SIZE, SIZE) and torch.isfinite(x).all()
    stats = loader.stats()
    assert stats["images_skipped"] == len(skipped) and {_short(b) for b in loader.files.bad} == skipped
    assert all(name in caplog.text for name in skipped)


@pytest.mark.parametrize("kind", LOADERS)
def test_damage_found_only_while_decoding_is_skipped_too(tmp_path, kind):
    rng = np.random.default_rng(3)
    data = _jpeg(rng, 64, 48)
    middle = data[:300] + b"\x00" * 600 + data[900:]  # header and end marker intact: only a decode finds it
    folder = tmp_path / "mid"
    folder.mkdir()
    _tar(folder / "a.tar", [(f"g{i}.jpg", _jpeg(rng)) for i in range(5)] + [("broken.jpg", middle)])
    loader = _fd(folder, kind, batch_size=3)
    assert len(loader.files) == 6  # the cheap check lets it through
    for _ in range(2 * len(loader)):
        assert torch.isfinite(next(loader)).all()
    assert [_short(b) for b in loader.stats()["bad_files"]] == ["a.tar:broken"]


# -- a training run on shards, interrupted and resumed ------------------------------------------------------
def _train_argv(out, teacher_file, data, steps, *extra):
    return ["train", "--out", str(out), "--steps", str(steps), "--data", data, "--teacher", "vit_tiny_patch16_224",
            "--teacher-weights", str(teacher_file), "--batch-size", "4", "--set", "teacher.kwargs={depth: 2}",
            "--set", "model.img_size=32", "--set", "model.patch_size=16", "--set", "model.kwargs={depth: 2}",
            "--set", "data.num_workers=0",
            "--set", "data.loader=torch", "--set", "ckpt.every=2", "--set", "optim.warmup_steps=1",
            "--set", "runtime.log_every=1", "--set", "runtime.tensorboard=false", "--set", "runtime.precision=fp32",
            *extra]


def test_a_run_on_shards_resumes_bitwise(tmp_path, teacher_file, shard_spec):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_train_argv(straight, teacher_file, shard_spec, 6)) == 0  # 6 steps of 4: past the 15-sample epoch
    shutil.copytree(straight, split)  # the same run (training is deterministic), then killed after step 2's commit:
    for step in (4, 6):  # what came later never happened
        shutil.rmtree(split / "checkpoints" / f"step-{step}")
    (split / "student.safetensors").unlink()
    assert main(_train_argv(split, teacher_file, shard_spec, 6, "--resume", "auto")) == 0
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa, sb = load_file(str(straight / "student.safetensors")), load_file(str(split / "student.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA device")
def test_dali_shards_decode_on_the_gpu(shard_spec):
    loader = build_fd_loader(_cfg(shard_spec, "dali"), image_size=SIZE, mean=MEAN, std=STD, batch_size=4,
                             device="cuda")
    cpu = _fd(shard_spec, "dali")
    for _ in range(5):
        x, xc = next(loader), next(cpu)
        assert x.is_cuda  # the same samples in the same order: nvJPEG and the CPU decoder agree to a few grey levels
        assert (x.cpu() - xc).abs().mean() < 0.05 and torch.allclose(_levels(x.cpu()), _levels(xc), atol=3)
