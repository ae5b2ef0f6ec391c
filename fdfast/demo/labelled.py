"""The demo-labelled set: 10 classes of real 28x28 animal silhouettes (the animal-mnist package), as an ImageFolder.

Prepared once into ``fdfast.io.cache_dir()/demo_labelled-animal_mnist-0.4-v1/{train,val}/<class>/*.png``:
- the 10,000 images are de-duplicated first (the package holds a few hundred byte-identical copies; an image
  that appears under two labels is dropped), so no image is both in train and in val;
- the split is fixed and needs no RNG: within each class, images are ordered by the SHA-1 of their pixels and
  the first 20% are validation.
Registered as the data source "demo-labelled" by fdfast.demo.register; ``fdfast finetune / knn / linprobe``
without --data read it.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

from fdfast.demo.common import package_dir
from fdfast.errors import FDFastError
from fdfast.io import atomic_dir, cache_dir

PACKAGE, VERSION = "animal_mnist", "0.4"
CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")  # label order
VAL_FRACTION = 0.2
_DIR = f"demo_labelled-animal_mnist-{VERSION}-v1"
_FIX = f"animal-mnist is not installed: run `pip install --no-deps animal-mnist=={VERSION}` (setup.sh does this)"
HELP = ("10 classes of real 28x28 animal silhouettes (animal-mnist), de-duplicated, fixed 80/20 train/val split, "
        "as class subfolders")


def _read_arrays():
    """(images uint8 [N, 28, 28], labels int [N]) straight from the package's files (its module imports TensorFlow)."""
    root = package_dir(PACKAGE, _FIX) / "data" / "Animal_MNIST"
    try:
        with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
            images = pickle.load(f)  # noqa: S301 - the installed package's own data file
        with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
            labels = pickle.load(f)  # noqa: S301
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise FDFastError(f"cannot read animal-mnist's data files under {root} ({e}); reinstall it: "
                          f"pip install --no-deps --force-reinstall animal-mnist=={VERSION}") from None
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or int(labels.max()) >= len(CLASSES):
        raise FDFastError(f"animal-mnist's data under {root} is not 28x28 images with labels 0-9; "
                          f"install animal-mnist=={VERSION}")
    return images, labels


def split(images, labels) -> dict[str, list[tuple[str, int, object]]]:
    """{"train"|"val": [(sha1, label, image)]}: duplicates removed, per class sorted by hash, first 20% -> val."""
    by_hash: dict[str, tuple[set, object]] = {}
    for img, label in zip(images, labels):
        h = hashlib.sha1(img.tobytes()).hexdigest()
        by_hash.setdefault(h, (set(), img))[0].add(int(label))
    out = {"train": [], "val": []}
    for c in range(len(CLASSES)):
        items = sorted((h, img) for h, (ls, img) in by_hash.items() if ls == {c})
        n_val = round(len(items) * VAL_FRACTION)
        out["val"] += [(h, c, img) for h, img in items[:n_val]]
        out["train"] += [(h, c, img) for h, img in items[n_val:]]
    return out


def demo_labelled_dir() -> Path:
    """The prepared ImageFolder (train/ and val/), built on first call; later calls return it at once."""
    final = cache_dir() / _DIR
    if (final / "train").is_dir() and (final / "val").is_dir():
        return final
    from PIL import Image
    parts = split(*_read_arrays())
    with atomic_dir(final) as tmp:
        for name, items in parts.items():
            for c in CLASSES:
                (tmp / name / c).mkdir(parents=True)
            for h, label, img in items:
                Image.fromarray(img).save(tmp / name / CLASSES[label] / f"{h[:16]}.png")
    return final
