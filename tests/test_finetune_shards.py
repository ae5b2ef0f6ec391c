"""Fine-tuning's labelled pipeline (fdfast.finetune.data / .loader) on class folders and on labelled WebDataset shards
written by `fdfast shards`: the same samples, labels and augmentations, the order's guarantees on shards, exact resume,
bad members skipped and counted, one-line errors, and a tiny `fdfast finetune` on shards equal to the run on the folder.
"""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file

from fdfast.cli import main
from fdfast.data.shards import ShardList, write_shards
from fdfast.errors import FDFastError
from fdfast.finetune.config import FTDataConfig
from fdfast.finetune.data import LabelledImages, build_transforms, load_splits
from fdfast.finetune.loader import EvalBatches, LabelledLoader, ShardSteps

from test_finetune import _bad, _colour_set  # one line, exit 2, nothing written
from test_finetune_dist import student  # noqa: F401 - the fixture: a tiny FD student file
from test_shards import _jpeg, _tar, _write_classes

SIZE = 16
PLAIN = T.Compose([T.Resize((SIZE, SIZE)), T.PILToTensor()])  # uint8 [3, S, S]: the pixels, no augmentation


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))  # file-check and shard-index caches per test


@pytest.fixture(scope="module")
def splits_dir(tmp_path_factory):
    """train/ (15 images: 5 + 4 + 6) and val/ (9) class folders; each class has its own grey level (40 + 80 k)."""
    root = tmp_path_factory.mktemp("classes")
    _write_classes(root / "train", per_class=(5, 4, 6), seed=0)
    _write_classes(root / "val", per_class=(3, 3, 3), seed=1)
    return root


@pytest.fixture(scope="module")
def shards_dir(splits_dir, tmp_path_factory):
    """The same splits as shards: train shuffled into 4 shards, val into 3 (labelled in train's class order)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(splits_dir / "train", out / "train", shard_size=4, prefix="train")
    write_shards(splits_dir / "val", out / "val", shard_size=4, prefix="val",
                 classes=json.loads((out / "train" / "shards.json").read_text())["classes"])
    return out


def _level(x):
    return x.float().mean((1, 2, 3))  # [B] mean grey level of uint8 images


# -- the same samples, labels and augmentations --------------------------------------------------------------------
def test_shard_splits_hold_the_folders_samples_labels_and_augmentations(splits_dir, shards_dir):
    folder = load_splits(str(splits_dir / "train"), str(splits_dir / "val"))
    spec = str(shards_dir / "train" / "train-{000000..000003}.tar")
    for shards in (load_splits(spec, str(shards_dir / "val")), load_splits(str(shards_dir))):  # SPEC + VAL; DIR
        assert isinstance(shards.train, ShardList) and shards.classes == folder.classes == ["class0", "class1",
                                                                                            "class2"]
        assert (len(shards.train), len(shards.val)) == (len(folder.train), len(folder.val)) == (15, 9)
    cfg = FTDataConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    train_tf, eval_tf = build_transforms(cfg, SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for split in ("train", "val"):
        a, b = getattr(folder, split), getattr(shards, split)
        position = {a.read(i): i for i in range(len(a))}
        assert sorted(position) == sorted(b.read(i) for i in range(len(b)))  # the very bytes, each once
        for tf in (train_tf, eval_tf):
            from_folder, from_shards = LabelledImages(a, tf), LabelledImages(b, tf)
            for i in range(len(b)):
                j = position[b.read(i)]
                x, y = from_shards[(i, 7 + i)]
                x_ref, y_ref = from_folder[(j, 7 + i)]
                assert y == y_ref and torch.equal(x, x_ref)  # same label, same RandAugment / erasing draws


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_labels_and_evaluation_batches(splits_dir, shards_dir, source):
    splits = load_splits(str(splits_dir if source == "folder" else shards_dir))
    loader = LabelledLoader(splits.train, PLAIN, 4, seed=1)
    assert loader.steps_per_epoch == 4 and len(loader) == 4  # 15 images, batch 4: the last step wraps around
    for _ in range(2 * len(loader)):
        x, y = next(loader)
        assert x.shape == (4, 3, SIZE, SIZE) and y.dtype == torch.int64
        assert torch.allclose(_level(x), 40 + 80 * y.float(), atol=6)  # each image carries its own label
    evaluation = EvalBatches(splits.val, PLAIN, 4, num_workers=0)
    for _ in range(2):  # one finite pass per iteration, in stored order, the last batch short
        batches = list(evaluation)
        assert [len(y) for _, y in batches] == [4, 4, 1] and len(evaluation) == 3
        assert torch.cat([y for _, y in batches]).tolist() == splits.val.labels
        levels = _level(torch.cat([x for x, _ in batches]))
        assert torch.allclose(levels, 40 + 80 * torch.tensor(splits.val.labels).float(), atol=6)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_rank_scores_its_own_part_of_the_val_shards(shards_dir, world):
    val = load_splits(str(shards_dir)).val
    parts = [val.subset(range(r, len(val), world)) for r in range(world)]  # what build_finetune_run gives rank r
    assert sorted(p for part in parts for p in part.paths) == sorted(val.paths)  # every sample once
    for r, part in enumerate(parts):
        for k in range(len(part)):  # each reads its own bytes from the right shard, with its label
            assert part.read(k) == val.read(r + k * world) and part.labels[k] == val.labels[r + k * world]
    few = load_splits(str(shards_dir), train_per_class=2, val_per_class=1)
    assert sorted(few.train.labels) == [0, 0, 1, 1, 2, 2] and sorted(few.val.labels) == [0, 1, 2]
    assert all(Image.open(few.train.source(i)).size for i in range(6))  # the picks read real images
    with pytest.raises(FDFastError, match="ascending"):
        val.subset([3, 1])


# -- the order on shards -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes,world,batch", [((5, 3, 7, 1), 3, 2), ((4, 4, 4), 2, 3), ((9,), 4, 1)])
def test_a_step_sees_the_same_images_whatever_the_ranks(sizes, world, batch):
    """Rank r takes every world_size-th position of the epoch's shard-by-shard sequence: ranks disjoint and equal,
    and step k of `world` ranks x `batch` images is step k of one rank x `world * batch` images."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n = int(starts[-1])
    one = ShardSteps(starts, batch * world, seed=3)
    for epoch in (0, 1):
        parts = [ShardSteps(starts, batch, seed=3, rank=r, world_size=world).epoch(epoch)[0] for r in range(world)]
        unique = [set(p.tolist()) for p in parts]
        assert all(len(u) == n // world for u in unique) and sum(map(len, unique)) == len(set().union(*unique))
        whole = one.epoch(epoch)[0]
        for k in range(n // world // batch):  # full steps
            step = np.concatenate([p[k * batch:(k + 1) * batch] for p in parts])
            assert sorted(step.tolist()) == sorted(whole[k * batch * world:(k + 1) * batch * world].tolist())
        sequence = whole[:n]  # the epoch's sequence, shard by shard: each shard's samples in one run
        shard = np.searchsorted(starts, sequence, side="right") - 1
        assert len(np.flatnonzero(np.diff(shard))) + 1 == len(set(shard.tolist()))
    assert not np.array_equal(one.epoch(0)[0], one.epoch(1)[0])  # reshuffled


@pytest.mark.parametrize("workers", [0, 1])
def test_shard_loader_resumes_exactly(shards_dir, workers):
    train = load_splits(str(shards_dir)).train
    tf, _ = build_transforms(FTDataConfig(), SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def build():
        return LabelledLoader(train, tf, 2, seed=4, accum_steps=2, num_workers=workers)

    a = build()
    for _ in range(len(a) + 3):  # past an epoch boundary, mid-step (2 micro-batches per step)
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as plain data
    expected = [next(a) for _ in range(len(a) + 1)]  # and across the next boundary
    b = build()
    b.load_state_dict(state)
    for x, y in expected:
        xb, yb = next(b)
        assert torch.equal(xb, x) and torch.equal(yb, y)
    assert b.stats()["images_seen"] == 2 * len(expected)


# -- bad input -----------------------------------------------------------------------------------------------------
def _labelled_tar(path, samples):
    return _tar(path, [m for key, image, label in samples
                       for m in ([(f"{key}.jpg", image)] if image is not None else []) + [(f"{key}.cls", label)]])


def test_bad_members_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "damaged"
    folder.mkdir()
    for s in range(2):
        _labelled_tar(folder / f"good-{s}.tar", [(f"s{s}_{i}", _jpeg(rng), str(i % 2).encode()) for i in range(4)])
    cut = _jpeg(rng)
    _labelled_tar(folder / "members.tar", [("ok", _jpeg(rng), b"1"), ("fake", b"not a jpeg", b"0"),
                                           ("cut", cut[:len(cut) // 2], b"1"), ("noimage", None, b"0")])
    (folder / "noise.tar").write_bytes(rng.bytes(3000))  # not a tar at all
    val = tmp_path / "val"
    val.mkdir()
    _labelled_tar(val / "v.tar", [(f"v{i}", _jpeg(rng), str(i % 2).encode()) for i in range(3)])
    splits = load_splits(str(folder), str(val))
    assert len(splits.train) == 9 and splits.classes == ["0", "1"]  # no shards.json: the indices name the classes
    loader = LabelledLoader(splits.train, PLAIN, 3, seed=0)
    for _ in range(2 * len(loader)):
        x, y = next(loader)
        assert x.shape == (3, 3, SIZE, SIZE) and set(y.tolist()) <= {0, 1}
    stats = loader.stats()
    skipped = {b.split(" (")[0].rsplit("/", 1)[-1] for b in stats["bad_files"]}
    assert stats["images_skipped"] == 4 and skipped == {"members.tar:fake", "members.tar:cut", "members.tar:noimage",
                                                        "noise.tar"}
    _labelled_tar(val / "w.tar", [("w0", _jpeg(rng), b"0")])
    with tarfile.open(val / "x.tar", "w") as tar:  # a sample without its class index: the set is not labelled
        info = tarfile.TarInfo("x0.jpg")
        data = _jpeg(rng)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(FDFastError, match=r"1 sample\(s\) of .* have no \.cls member"):
        load_splits(str(folder), str(val))


# -- `fdfast finetune` on shards -----------------------------------------------------------------------------------
def _ft(student, out, *data):
    return ["finetune", str(student), *data, "--out", str(out), "--batch-size", "4", "--set", "optim.epochs=2",
            "--set", "optim.warmup_epochs=1", "--set", "optim.base_lr=0.05", "--set", "runtime.precision=fp32",
            "--set", "runtime.progress=false", "--set", "data.num_workers=0"]


def test_finetune_on_shards_equals_the_run_on_the_folder(student, tmp_path, capsys):
    """Train shards written in the folder's order (one shard, --no-shuffle) give the folder run bit for bit; the val
    split, shuffled into 3 shards, is scored over every image once: the same top-1 / top-5."""
    data = tmp_path / "data"
    _colour_set(data / "train", per_class=4, seed=0)
    _colour_set(data / "val", per_class=3, seed=1)
    train, val = tmp_path / "train-shards", tmp_path / "val-shards"
    assert main(["shards", str(data / "train"), "--out", str(train), "--prefix", "train", "--no-shuffle",
                 "--shard-size", "100"]) == 0
    assert main(["shards", str(data / "val"), "--out", str(val), "--shard-size", "3", "--classes",
                 str(train / "shards.json")]) == 0
    capsys.readouterr()
    a, b = tmp_path / "folder-run", tmp_path / "shard-run"
    assert main(_ft(student, a, "--data", str(data))) == 0
    assert main(_ft(student, b, "--data", str(train / "train-{000000..000000}.tar"), "--val", str(val))) == 0
    ma, mb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b))
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb):
        assert (x["step"], x["train_loss"], x["top1"], x["top5"]) == (y["step"], y["train_loss"], y["top1"], y["top5"])
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)  # summed in another order
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert (sa["top1"], sa["classes"], sa["train_images"], sa["val_images"]) == \
        (sb["top1"], sb["classes"], sb["train_images"], sb["val_images"]) == (sa["top1"], 3, 12, 9)
    assert json.loads((b / "model.json").read_text())["classes"] == ["a", "b", "c"]
    spec = str(train / "train-{000000..000000}.tar")  # the probes read shards too
    assert main(["knn", str(b / "best.safetensors"), "--data", spec, "--val", str(val), "--k", "2"]) == 0


def test_missing_shards_and_a_missing_val_split_are_one_line_exit_2(student, shards_dir, tmp_path, capsys):
    out = tmp_path / "out"
    spec = str(shards_dir / "train" / "train-{000000..000005}.tar")  # 4 shards exist
    _bad(capsys, _ft(student, out, "--data", spec, "--val", str(shards_dir / "val")), out,
         r"train-000004\.tar' does not exist \(2 of 6 shards missing\)")
    _bad(capsys, _ft(student, out, "--data", str(shards_dir / "train"), "--val", str(tmp_path / "v-{0..1}.tar")), out,
         r"v-0\.tar' does not exist")
    _bad(capsys, _ft(student, out, "--data", str(shards_dir / "train")), out, "names training shards.*--val")
