"""Image files of a data set: listing, a fast validity check cached on disk, and the per-epoch order.

Both loaders (DALI and torch) draw their batches from the same `EpochOrder`, so they agree on which file
each rank reads at each step, and a resumed run continues exactly where the checkpoint left it.

Sharding rule (equal, disjoint shards): each epoch the whole list is shuffled with the epoch's seed, the
last ``N mod world_size`` files of that permutation are dropped (different files each epoch), and rank r
takes every world_size-th file from position r. A shard whose length is not a multiple of the batch size
is padded by wrapping around to its own first files, so every batch is full and ranks stay disjoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fdfast.errors import FDFastError
from fdfast.io import atomic_write_json, cache_dir as fdfast_cache_dir

log = logging.getLogger("fdfast.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
BAD_FILES_SHOWN = 5  # bad paths named in warnings and in stats()
CHECK_VERSION = 2  # part of the cache key: a stricter check (2: header size, decompression bombs) re-checks

# Magic bytes of the formats both PIL and DALI decode.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"RIFF", b"II*\x00", b"MM\x00*",
          b"P5", b"P6", b"P2", b"P3")


@dataclass
class FileList:
    """The readable images of a data set, in a fixed (sorted) order, with labels for class folders."""
    root: Path
    paths: list[str]  # absolute
    labels: list[int]  # class index per file (0 for a flat folder)
    classes: list[str]  # class folder names, sorted; [] for a flat folder or a file list
    bad: list[str]  # files found unreadable by the check (not in `paths`)

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, i: int):
        """What ``load_rgb`` decodes for sample i: its path here (a shard list gives its member's bytes)."""
        return self.paths[i]

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample i (OSError when the file vanished)."""
        with open(self.paths[i], "rb") as f:
            return f.read()

    def subset(self, index) -> "FileList":
        """The samples ``index`` (ascending positions), as a list of the same kind; ``bad`` stays the whole set's.

        What fine-tuning takes per class (low-shot runs) and per rank (each rank's part of the val split).
        """
        return dataclasses.replace(self, **self._taken(np.asarray(index, dtype=np.int64)))

    def _taken(self, index: np.ndarray) -> dict:
        """The per-sample fields at ``index`` (a subclass adds its own columns)."""
        return dict(paths=[self.paths[i] for i in index], labels=[self.labels[i] for i in index])


def list_images(path: str | Path, *, labeled: bool = False, check: str = "fast",
                cache_dir: str | Path | None = None) -> FileList:
    """All image files under `path` (a folder, searched recursively, or a text file of paths).

    labeled=True requires class subfolders: the label of a file is the sorted index of its top folder.
    check: "fast" (magic bytes + end marker, cached by path/size/mtime), "full" (decode every file once,
    cached the same way) or "off".
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FDFastError(f"data path {str(root)!r} does not exist; pass --data DIR (a folder of images "
                          f"or class subfolders) or set data.path")
    if root.is_file():
        candidates = _read_file_list(root)
        root_dir = root.parent
    else:
        candidates = _walk_images(root)
        root_dir = root
    if not candidates:
        raise FDFastError(f"data path {str(root)!r} contains no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                          f"point data.path at a folder of images or class subfolders")

    classes: list[str] = []
    labels = [0] * len(candidates)
    if labeled:
        if root.is_file():
            raise FDFastError(f"labeled data needs a folder of class subfolders, got the file {str(root)!r}")
        tops = [Path(p).relative_to(root_dir).parts for p in candidates]
        loose = [p for p, parts in zip(candidates, tops) if len(parts) < 2]
        if loose:
            raise FDFastError(f"labeled data {str(root)!r} must hold one subfolder per class; "
                              f"{len(loose)} image(s) lie directly in it, e.g. {loose[0]!r}")
        classes = sorted({parts[0] for parts in tops})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in tops]

    ok = check_files(candidates, mode=check, cache_dir=cache_dir)
    bad = [p for p, good in zip(candidates, ok) if not good]
    if bad:
        log.warning("skipping %d unreadable image file(s) of %d under %s: %s%s", len(bad), len(candidates),
                    root, ", ".join(bad[:BAD_FILES_SHOWN]), " ..." if len(bad) > BAD_FILES_SHOWN else "")
    if len(bad) == len(candidates):
        raise FDFastError(f"none of the {len(candidates)} image files under {str(root)!r} can be read "
                          f"(empty, truncated or not images), e.g. {bad[0]!r}; replace the data")
    keep = [i for i, good in enumerate(ok) if good]
    return FileList(root_dir, [candidates[i] for i in keep], [labels[i] for i in keep], classes, bad)


def _walk_images(root: Path) -> list[str]:
    """Image files under root, sorted; hidden names skipped; symlinked folders followed, each real folder once.

    Data sets are often assembled from symlinked class folders, so links are followed; a link back up the
    tree (a symlink loop) would recurse forever, hence the (device, inode) set of folders already walked.
    """
    seen, out = set(), []
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: the same walk on every run
        out += [os.path.join(folder, n) for n in names
                if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def _read_file_list(list_file: Path) -> list[str]:
    """A text file with one image path per line (relative paths are relative to the file's folder)."""
    out = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line.split()[0])
            out.append(str(p if p.is_absolute() else list_file.parent / p))
    return out


def looks_like_image(path: str) -> bool:
    """Cheap structural check: non-empty, a known magic number, the format's end marker present, and a header
    that declares a sane size (`_sane_size`).

    Catches zero-byte, non-image, (for JPEG / PNG, the common formats) truncated files and decompression
    bombs without decoding; a file damaged in its middle passes here and is caught by the loaders' decode guard.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 64))
            tail = f.read(64)
    except OSError:
        return False
    return plausible_image(head, tail, size) and _sane_size(path)


def plausible_image(head: bytes, tail: bytes, size: int) -> bool:
    """The magic-number and end-marker half of `looks_like_image`: first 16 and last 64 bytes of the data."""
    if size == 0 or not head.startswith(_MAGIC):
        return False
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:  # JPEG end-of-image marker (may be padded)
        return False
    if head.startswith(b"\x89PNG") and b"IEND" not in tail:
        return False
    return True


def _sane_size(source) -> bool:
    """The header of ``source`` (a path or a binary file object) parses and declares 1 to PIL's MAX_IMAGE_PIXELS
    pixels (PIL reads only the header here).

    A decompression bomb (a small file declaring e.g. 30000 x 30000 pixels) would take gigabytes to decode
    in a worker or a DALI thread; PIL's own limit (about 89 M pixels, ``Image.MAX_IMAGE_PIXELS``; None: no
    limit) decides, so a user who raises it for a data set of huge images gets them read.
    """
    return image_size(source) is not None


def image_size(source) -> tuple[int, int] | None:
    """(width, height) its header declares, or None when the header does not parse or the size is not sane."""
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - Image.open fails on any header it cannot parse (or a bomb > 2x the limit)
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if width >= 1 and height >= 1 and (limit is None or width * height <= limit):
        return int(width), int(height)
    return None


def load_rgb(source):
    """Decode an image (a path or a binary file object) the way every fdfast reader does: a PIL RGB image, 8 bits
    per channel.

    grey, palette, CMYK, RGBA (alpha dropped) and animated files (first frame) convert with PIL; 16-bit grey
    (PNG / TIFF modes ``I;16*`` and ``I``) is scaled to 8 bits first, as PIL already does for 16-bit colour:
    PIL's own ``convert`` would clip it, turning most of the picture white.
    """
    from PIL import Image
    with Image.open(source) as img:
        if img.mode.startswith("I"):  # 16-bit grey: keep the top 8 bits of each value
            grey = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
            return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
        return img.convert("RGB")  # forces the full decode that open() defers


def decodes(source) -> bool:
    """Full check: the header passes `_sane_size` and every pixel decodes as the loaders decode it.

    ``source``: a path, or a binary file object positioned at the start of the image (it is read twice).
    """
    if not _sane_size(source):
        return False
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        load_rgb(source)
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "skip this file"
        return False


def check_files(paths: list[str], *, mode: str = "fast", cache_dir: str | Path | None = None) -> list[bool]:
    """One bool per path: may the loaders read it? Results are cached, keyed by path + size + mtime."""
    if mode == "off":
        return [True] * len(paths)
    if mode not in ("fast", "full"):
        raise FDFastError(f"data.check must be fast, full or off, got {mode!r}")
    check = looks_like_image if mode == "fast" else decodes
    cache_file = _cache_file(paths, mode, cache_dir)
    cache = _load_cache(cache_file)
    out, changed = [], False
    for p in paths:
        try:
            st = os.stat(p)
            key = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            out.append(False)
            continue
        hit = cache.get(p)
        if hit is not None and hit[0] == key:
            out.append(hit[1])
        else:
            good = check(p)
            cache[p] = (key, good)
            out.append(good)
            changed = True
    if changed:
        _save_cache(cache_file, cache)
    return out


def _cache_file(paths: list[str], mode: str, cache_dir) -> Path:
    # One cache file per data set: keyed by the folder holding the files and the check mode.
    folder = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    digest = hashlib.sha1(f"{os.path.abspath(folder)}|{mode}|{CHECK_VERSION}".encode()).hexdigest()[:16]
    if cache_dir is None:
        cache_dir = fdfast_cache_dir("filecheck")  # $FDFAST_CACHE/filecheck or ~/.cache/fdfast/filecheck
    return Path(cache_dir) / f"{digest}.json"


def _load_cache(cache_file: Path) -> dict:
    if not cache_file.exists():
        return {}
    try:
        return {p: tuple(v) for p, v in json.loads(cache_file.read_text()).items()}
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, never trusted


def _save_cache(cache_file: Path, cache: dict) -> None:
    try:
        atomic_write_json(cache_file, cache)  # concurrent ranks never read half a file
    except OSError as e:
        log.info("could not write the file-check cache %s: %s", cache_file, e)


class EpochOrder:
    """Which file (and per-sample seed) each batch of this rank holds, for every epoch.

    Pure function of (seed, epoch, rank, world_size, batch_size, n_files): the same on every loader,
    every process and after a resume.
    """

    def __init__(self, n_files: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise FDFastError(f"rank {rank} is outside world_size {world_size}")
        if n_files < world_size:
            raise FDFastError(f"{n_files} readable image(s) cannot be split over {world_size} ranks; "
                              f"add images or use fewer ranks")
        if batch_size < 1:
            raise FDFastError(f"data batch_size must be >= 1, got {batch_size}")
        self.n_files, self.batch_size = n_files, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard_len = n_files // world_size  # files per rank per epoch (the remainder dropped, a new one each epoch)
        self.batches_per_epoch = -(-self.shard_len // batch_size)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(file indices, sample seeds) of this rank for one epoch, each [batches_per_epoch * batch_size]."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1], self._cached[2]
        rng = np.random.default_rng([self.seed, epoch])
        sequence = self._sequence(rng)  # [n_files]: the epoch's order of the whole data set
        seeds = rng.integers(0, 2**31 - 1, size=self.n_files)  # per global position, so ranks differ
        index, sample_seeds = self._rank_part(sequence), self._rank_part(seeds)
        pad = self.batches_per_epoch * self.batch_size - self.shard_len
        if pad:  # wrap around this rank's own shard: full batches, shards still disjoint
            laps = 1 + -(-pad // self.shard_len)  # a shard shorter than the pad wraps more than once
            index = np.concatenate([index] * laps)[:self.shard_len + pad]
            # a repeated file gets another seed, hence another crop
            sample_seeds = np.concatenate([sample_seeds + lap for lap in range(laps)])[:self.shard_len + pad]
        self._cached = (epoch, index, sample_seeds)
        return index, sample_seeds

    def _sequence(self, rng: np.random.Generator) -> np.ndarray:
        """The whole data set in this epoch's order: a uniform permutation."""
        return rng.permutation(self.n_files)

    def _rank_part(self, x: np.ndarray) -> np.ndarray:
        """This rank's positions of an epoch sequence: every world_size-th from position rank (the rest dropped)."""
        return x[self.rank:self.shard_len * self.world_size:self.world_size]

    def batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        index, seeds = self.epoch(epoch)
        s = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        return index[s], seeds[s]

    def positions(self, epoch: int = 0, batch: int = 0):
        """Infinite (epoch, batch) sequence starting at a position."""
        return positions(self.batches_per_epoch, epoch, batch)


def positions(batches_per_epoch: int, epoch: int = 0, batch: int = 0):
    """Infinite (epoch, batch) sequence of epochs of ``batches_per_epoch`` batches, from a position."""
    while True:
        while batch < batches_per_epoch:
            yield epoch, batch
            batch += 1
        epoch, batch = epoch + 1, 0
