"""WebDataset tar shards as a data set: which shards a spec names, their member index (cached), the epoch order
over shards, and ``fdfast shards`` that writes them from an image folder.

A shard is a plain tar; a sample is the run of consecutive members that share a key (the member name up to the
first dot of its base name, WebDataset's rule): ``n01440764_10026.jpg`` (the image) and, for labelled sets,
``n01440764_10026.cls`` (the class index as ASCII digits). Other members are carried along and ignored.

    data.path = "shards/train-{000000..000127}.tar"   # brace pattern (numeric ranges, {a,b} lists)
    data.path = "a/x-{0..3}.tar::b/y.tar"             # several specs joined by "::" (WebDataset's list form)
    data.path = "shards/"                              # a folder holding .tar files (sorted by name)

Indexing: every shard is read once, member by member (tarfile), and each image is checked like a file of an
image folder (``data.check``: magic bytes + end marker + header size, or a full decode; "off" still parses each
header, whose image size the crops are drawn from); the index (offsets, sizes, image sizes, labels, bad members)
is cached in $FDFAST_CACHE/shards (or data.cache_dir) keyed by path, size and mtime. Bad
members (non-images, truncated, undecodable headers) and damaged tars (a corrupt header ends the shard there)
are skipped and counted as bad files are.

Order (`ShardOrder`, the same rules on both loaders): each epoch the shards are visited in a fresh seeded order
and the samples of each shard in a fresh order; rank r reads the r-th contiguous part of that sequence (ranks
disjoint and equal, the remainder dropped, a short last batch padded from the rank's own samples, as
`EpochOrder` does for folders). Reads stay within one or two shards at a time, which is what shards are for;
batches mix samples of a shard, so write shards from shuffled data (``fdfast shards`` shuffles by default).
Fine-tuning reads labelled shards (``list_shards(labeled=True)``) in the same shard-by-shard sequence, dealt to
ranks like a folder's (``fdfast.finetune.loader``).
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fdfast.data.files import (BAD_FILES_SHOWN, IMAGE_EXTENSIONS, EpochOrder, FileList, image_size, list_images,
                               load_rgb, plausible_image)
from fdfast.errors import FDFastError
from fdfast.io import atomic_path, atomic_write_json, cache_dir as fdfast_cache_dir

log = logging.getLogger("fdfast.data")

SHARD_SUFFIX = ".tar"
LIST_SEPARATOR = "::"  # joins several shard specs in one string (WebDataset's convention)
LABEL_EXT = "cls"  # member holding a sample's class index (ASCII digits)
MANIFEST = "shards.json"  # written by `fdfast shards` beside the shards: class names, counts, provenance
INDEX_VERSION = 1  # part of the cache key: a changed index format re-indexes
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # member extensions that are images
OPEN_SHARDS = 64  # open file handles per process (a data set may have thousands of shards)
INDEX_THREADS = 8  # shards indexed at once


# ---- which shards a spec names ------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: ``{000..127}`` (zero-padded when the first bound is) and ``{a,b,c}``, any
    number of braces per pattern, expanded left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        lo, hi = bounds.groups()
        if int(hi) < int(lo):
            raise FDFastError(f"shard range {{{body}}} in {pattern!r} runs backwards; write {{{hi}..{lo}}}")
        width = len(lo) if lo.startswith("0") else 0
        options = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise FDFastError(f"cannot expand {{{body}}} in {pattern!r}: write a range {{000000..000127}} "
                          f"or a list {{a,b}}")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [name for option in options for name in expand_braces(head + option + tail)]


def shard_paths(spec: str | os.PathLike | None) -> list[str] | None:
    """The .tar files ``spec`` names, in order, or None when it names none (an image folder or a file list).

    A spec names shards when any of its parts (split on "::", braces expanded) ends in .tar, is a glob pattern,
    or is a folder with .tar files in it. Then every part must: a missing shard is one FDFastError naming it.
    """
    if spec is None:
        return None
    parts = [p.strip() for p in str(spec).split(LIST_SEPARATOR) if p.strip()]
    names = [os.path.expanduser(n) for p in parts for n in expand_braces(p)]

    def folder_shards(name):
        return sorted(str(p) for p in Path(name).glob("*" + SHARD_SUFFIX) if p.is_file()) if os.path.isdir(name) else []

    def is_glob(name):
        return any(c in name for c in "*?[")

    if not any(n.endswith(SHARD_SUFFIX) or is_glob(n) or folder_shards(n) for n in names):
        return None
    paths = []
    for name in names:
        if is_glob(name):
            found = sorted(p for p in glob.glob(name) if p.endswith(SHARD_SUFFIX))
            if not found:
                raise FDFastError(f"no .tar shard matches {name!r}; check data.path / --data")
            paths += found
        elif os.path.isdir(name):
            found = folder_shards(name)
            if not found:
                raise FDFastError(f"{name!r} holds no .tar shards; list shards, a folder of shards or an image folder")
            paths += found
        elif name.endswith(SHARD_SUFFIX):
            paths.append(name)
        else:
            raise FDFastError(f"{name!r} in the shard list is not a .tar shard; name .tar files (or a folder of them)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FDFastError(f"shard {missing[0]!r} does not exist ({len(missing)} of {len(paths)} shards missing); "
                          f"check data.path / --data")
    return [os.path.abspath(p) for p in paths]


# ---- the index of one shard ---------------------------------------------------------------------------------

def split_key(name: str) -> tuple[str, str]:
    """Member name -> (sample key, extension): the extension starts at the first dot of the base name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def index_shard(path: str, check: str = "fast", cache_dir=None) -> dict:
    """The index of one shard: per sample key, image member (ext, offset, size), image (width, height) and
    label (-1: no .cls), and the bad members; read from the cache when the shard has not changed."""
    if check not in ("fast", "full", "off"):
        raise FDFastError(f"data.check must be fast, full or off, got {check!r}")
    st = os.stat(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{check}|{INDEX_VERSION}"
    folder = Path(cache_dir) / "shards" if cache_dir is not None else fdfast_cache_dir("shards")
    cache_file = folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("cache_key") == key:
            return cached
    except (OSError, ValueError):
        pass  # absent or damaged: rebuilt, never trusted
    index = dict(_scan_shard(path, check), cache_key=key)
    try:
        atomic_write_json(cache_file, index)  # ranks indexing at once never read half a file
    except OSError as e:
        log.info("could not write the shard index cache %s: %s", cache_file, e)
    return index


def _scan_shard(path: str, check: str) -> dict:
    """Read a shard once, member by member; group members into samples; check every sample's image."""
    columns = {k: [] for k in ("key", "ext", "offset", "size", "width", "height", "label")}
    bad: list[str] = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        def add(key, members):
            problem = _add_sample(f, size, key, members, check, columns)
            if problem:
                bad.append(f"{path}:{key} ({problem})")

        key, members, damage = None, [], None
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = split_key(member.name)
                    if not k or k.endswith("/") or os.path.basename(k).startswith("."):
                        continue  # hidden names: skipped, as DALI's reader skips them
                    if k != key and members:
                        add(key, members)
                        members = []
                    key = k
                    members.append((ext, member.offset_data, member.size))
        except (tarfile.TarError, EOFError, OSError) as e:
            where = f"after {len(columns['key']) + len(bad)} samples" if columns["key"] or bad else "at its start"
            damage = f"{path} (damaged {where}: {str(e) or type(e).__name__})"
        if members:
            add(key, members)
        if damage and not (bad and bad[-1].endswith("(truncated)")):  # a cut-off last member says it already
            bad.append(damage)
    return dict(columns, bad=bad)


def _add_sample(f, file_size: int, key: str, members: list, check: str, columns: dict) -> str | None:
    """Append one sample to ``columns``; or return why it is bad (nothing appended)."""
    image = next(((e, o, s) for e, o, s in members if e.lower() in IMAGE_EXTS), None)
    if image is None:
        return "no image member: " + ", ".join(e or "?" for e, _, _ in members)
    ext, offset, size = image
    if offset + size > file_size:
        return "truncated"
    f.seek(offset)
    data = f.read(size)
    if check != "off" and not plausible_image(data[:16], data[-64:], size):
        return "not a readable image"
    dims = image_size(io.BytesIO(data))  # crops are drawn from it without decoding
    if dims is None:
        return "unreadable image header"
    if check == "full":
        try:
            load_rgb(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - any decoder failure means "skip this sample"
            return "does not decode"
    label = -1
    cls = next(((o, s) for e, o, s in members if e == LABEL_EXT), None)
    if cls is not None:
        f.seek(cls[0])
        text = f.read(cls[1]).decode("ascii", "replace").strip()
        if not re.fullmatch(r"\d+", text):
            return f"its .{LABEL_EXT} member is not a class index: {text[:20]!r}"
        label = int(text)
    for name, value in zip(("key", "ext", "offset", "size", "width", "height", "label"),
                           (key, ext, offset, size, dims[0], dims[1], label)):
        columns[name].append(value)
    return None


# ---- a shard set as the loaders see it --------------------------------------------------------------------

@dataclass
class ShardList(FileList):
    """The readable samples of a shard set, shard by shard in member order; a `FileList` the loaders read by index.

    ``paths[i]`` names sample i as "SHARD.tar:KEY" (for warnings and stats); ``source(i)`` / ``read(i)`` give its
    image bytes from the shard at the indexed offset (os.pread on a handle kept open per process).
    """
    shards: list[str]  # absolute .tar paths
    starts: np.ndarray  # int64 [n_shards + 1]: the samples of shard t are starts[t]:starts[t + 1]
    offsets: np.ndarray  # int64 [N]: where sample i's image data starts in its shard
    sizes: np.ndarray  # int64 [N]: its length in bytes
    exts: list[str]  # its image member's extension (jpg, png, ...)
    dims: np.ndarray  # int32 [N, 2]: its (width, height), from the image header

    def __post_init__(self):
        self._handles: collections.OrderedDict[int, int] = collections.OrderedDict()  # shard -> fd, LRU
        self._pid = os.getpid()

    def __getstate__(self):  # a worker started by spawn / forkserver opens its own handles
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def key(self, i: int) -> str:
        return self.paths[i][len(self.shards[self.shard_of(i)]) + 1:]  # paths[i] is "SHARD:KEY"

    def read(self, i: int) -> bytes:
        t = self.shard_of(i)
        data = os.pread(self._handle(t), int(self.sizes[i]), int(self.offsets[i]))
        if len(data) != self.sizes[i]:
            raise OSError(f"{self.shards[t]} is shorter than its index says; it changed after indexing")
        return data

    def source(self, i: int):
        return io.BytesIO(self.read(i))

    def _taken(self, index: np.ndarray) -> dict:
        # ascending positions keep each shard's samples together and in member order: shard t's new run is where
        # its old bounds fall among the kept positions
        if (np.diff(index) <= 0).any():
            raise FDFastError("a subset of a shard list takes ascending sample positions")
        return dict(super()._taken(index), offsets=self.offsets[index], sizes=self.sizes[index],
                    exts=[self.exts[i] for i in index], dims=self.dims[index],
                    starts=np.searchsorted(index, self.starts).astype(np.int64))

    def _handle(self, t: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own handles, closed by its own LRU
            self._handles = collections.OrderedDict()
            self._pid = os.getpid()
        fd = self._handles.get(t)
        if fd is None:
            fd = os.open(self.shards[t], os.O_RDONLY)
            self._handles[t] = fd
            if len(self._handles) > OPEN_SHARDS:
                os.close(self._handles.popitem(last=False)[1])
        self._handles.move_to_end(t)
        return fd

    def close(self) -> None:
        while self._handles:
            os.close(self._handles.popitem()[1])


def list_shards(paths: list[str], *, labeled: bool = False, check: str = "fast", cache_dir=None) -> ShardList:
    """Index every shard (cached) and gather the readable samples; labeled=True needs a .cls member per sample."""
    from concurrent.futures import ThreadPoolExecutor
    # shards index independently; threads overlap their reads (a network file system's latency, above all)
    with ThreadPoolExecutor(max_workers=min(INDEX_THREADS, len(paths))) as pool:
        indexes = list(pool.map(lambda p: index_shard(p, check, cache_dir), paths))
    keys, exts, labels, bad = [], [], [], []
    counts = []
    for path, index in zip(paths, indexes):
        counts.append(len(index["key"]))
        keys += [f"{path}:{k}" for k in index["key"]]
        exts += index["ext"]
        labels += index["label"]
        bad += index["bad"]
    what = f"{len(paths)} shard(s) ({paths[0]!r}{' ...' if len(paths) > 1 else ''})"
    if bad:
        log.warning("skipping %d unreadable sample(s) or damaged shard(s) of %s: %s%s", len(bad), what,
                    ", ".join(bad[:BAD_FILES_SHOWN]), " ..." if len(bad) > BAD_FILES_SHOWN else "")
    if not keys:
        raise FDFastError(f"{what} hold no readable image samples" + (f", e.g. {bad[0]}" if bad else "")
                          + "; write shards with `fdfast shards FOLDER --out DIR`")
    def column(name, dtype):
        return np.concatenate([np.asarray(ix[name], dtype) for ix in indexes])

    labels = np.asarray(labels, np.int64)
    classes: list[str] = []
    if labeled:
        unlabelled = np.flatnonzero(labels < 0)
        if len(unlabelled) == len(labels):
            raise FDFastError(f"{what} carry no .{LABEL_EXT} members (class labels); write labelled shards with "
                              f"`fdfast shards FOLDER --out DIR` from a folder of class subfolders")
        if len(unlabelled):
            raise FDFastError(f"{len(unlabelled)} sample(s) of {what} have no .{LABEL_EXT} member, e.g. "
                              f"{keys[unlabelled[0]]!r}; every sample of a labelled set needs its class index")
        classes = _class_names(paths, int(labels.max()) + 1)
    else:
        labels = np.zeros_like(labels)  # as for a flat folder
    shard_list = ShardList(Path(os.path.commonpath([os.path.dirname(p) for p in paths])), keys, labels.tolist(),
                           classes, bad, shards=list(paths),
                           starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                           offsets=column("offset", np.int64), sizes=column("size", np.int64), exts=exts,
                           dims=np.stack([column("width", np.int32), column("height", np.int32)], 1))
    return shard_list


def _class_names(paths: list[str], n_classes: int) -> list[str]:
    """Class names from the manifest `fdfast shards` writes beside the shards; else "0", "1", ... ."""
    manifest = Path(paths[0]).parent / MANIFEST
    try:
        names = json.loads(manifest.read_text()).get("classes") or []
    except (OSError, ValueError, AttributeError):
        names = []
    if len(names) >= n_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(n_classes)]


class ShardOrder(EpochOrder):
    """`EpochOrder` over shards: per epoch, shards in a seeded order and each shard's samples in a seeded order;
    rank r takes the r-th contiguous part.

    The same interface and rules as EpochOrder (disjoint equal parts, padding, per-position seeds, pure function
    of (seed, epoch, rank, world_size, batch_size, shard sizes)), so both loaders and resume work unchanged.
    """

    def __init__(self, starts: np.ndarray, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.starts = np.asarray(starts, dtype=np.int64)
        super().__init__(int(self.starts[-1]), batch_size, seed=seed, rank=rank, world_size=world_size)

    def _sequence(self, rng: np.random.Generator) -> np.ndarray:
        shards = rng.permutation(len(self.starts) - 1)
        pieces = [self.starts[t] + rng.permutation(self.starts[t + 1] - self.starts[t]) for t in shards]
        return np.concatenate(pieces)

    def _rank_part(self, x: np.ndarray) -> np.ndarray:
        return x[self.rank * self.shard_len:(self.rank + 1) * self.shard_len]


def dali_index_runs(files: ShardList, ids: np.ndarray) -> list[tuple[str, str]]:
    """The samples ``ids`` (in this order) as DALI webdataset index files: [(shard path, index text)], one per run
    of consecutive samples from one shard (DALI's reader reads the listed members in the listed order)."""
    runs = []
    shard_of = np.searchsorted(files.starts, ids, side="right") - 1
    cut = np.flatnonzero(np.diff(shard_of)) + 1
    for part, shard in zip(np.split(ids, cut), shard_of[np.concatenate([[0], cut]).astype(np.int64)]):
        # v1.2: one line per sample, "ext offset size name" per component (here the image only); no blanks in names
        lines = [f"{files.exts[i]} {files.offsets[i]} {files.sizes[i]} {_no_blanks(files.key(i))}.{files.exts[i]}"
                 for i in part]
        runs.append((files.shards[int(shard)], f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n"))
    return runs


def _no_blanks(name: str) -> str:
    return re.sub(r"\s", "_", name)


# ---- `fdfast shards`: an image folder -> shards ------------------------------------------------------------

def write_shards(folder, out, *, shard_size: int = 1000, labels: str = "auto", shuffle: bool = True, seed: int = 0,
                 prefix: str | None = None, check: str = "fast", classes: list[str] | None = None) -> dict:
    """Write the readable images of ``folder`` into ``out``/PREFIX-000000.tar, ... (``shard_size`` samples each).

    labels: "folders" (class subfolders: a .cls member per sample, class names in out/shards.json), "none", or
    "auto" (folders when ``folder`` holds only subfolders). classes: the class order to label with (e.g. the
    training split's, for its validation split, which may lack a class); default: the sorted subfolder names.
    The image bytes are stored unchanged; shuffle=True
    (seeded) writes the samples in random order, so a batch of one shard is a random sample of the data.
    Returns the manifest (also written to out/shards.json).
    """
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if shard_size < 1:
        raise FDFastError(f"--shard-size must be >= 1, got {shard_size}")
    if labels not in ("auto", "folders", "none"):
        raise FDFastError(f"--labels must be auto, folders or none, got {labels!r}")
    if out.is_dir() and any(out.glob("*" + SHARD_SUFFIX)):
        raise FDFastError(f"{out} already holds .tar shards; choose an empty --out folder")
    labeled = labels == "folders" or (labels == "auto" and folder.is_dir() and _only_subfolders(folder))
    files = list_images(folder, labeled=labeled, check=check)
    if labeled and classes is not None:
        unknown = sorted(set(files.classes) - set(classes))
        if unknown:
            raise FDFastError(f"class folders {unknown[:5]} of {str(folder)!r} are not in the given class list "
                              f"({len(classes)} classes); pass the list of the split these folders belong with")
        index = {c: i for i, c in enumerate(classes)}
        files.labels = [index[files.classes[label]] for label in files.labels]
        files.classes = list(classes)
    prefix = prefix or folder.resolve().name or "shard"
    if "{" in prefix or "/" in prefix or ":" in prefix:
        raise FDFastError(f"--prefix {prefix!r} must be a plain name (no braces, slashes or colons)")
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else np.arange(len(files))
    keys = _sample_keys([os.path.relpath(p, files.root) for p in files.paths])
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for t, start in enumerate(range(0, len(order), shard_size)):
        names.append(f"{prefix}-{t:06d}{SHARD_SUFFIX}")
        with atomic_path(out / names[-1]) as tmp, tarfile.open(tmp, "w") as tar:
            for i in order[start:start + shard_size]:
                _add_member(tar, f"{keys[i]}.{Path(files.paths[i]).suffix[1:].lower()}", files.read(i),
                            os.stat(files.paths[i]).st_mtime)
                if labeled:
                    _add_member(tar, f"{keys[i]}.{LABEL_EXT}", str(files.labels[i]).encode(), 0)
    last = f"{len(names) - 1:06d}"
    manifest = dict(format="webdataset", shards=names, samples=len(files), shard_size=shard_size,
                    classes=files.classes if labeled else None, shuffled=shuffle, seed=seed,
                    source=folder.resolve().name, skipped=[os.path.relpath(p, files.root) for p in files.bad],
                    data=str(out / f"{prefix}-{{000000..{last}}}{SHARD_SUFFIX}"))
    atomic_write_json(out / MANIFEST, manifest, indent=2)
    return manifest


def _only_subfolders(folder: Path) -> bool:
    """Does ``folder`` hold subfolders and no image directly (the class-folder layout)?"""
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    loose = any(e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in entries)
    return not loose and any(e.is_dir() for e in entries)


def _sample_keys(relative_paths: list[str]) -> list[str]:
    """A WebDataset key per image: its relative path without extension, dots and spaces made "_", made unique."""
    keys, seen = [], set()
    for rel in relative_paths:
        base = re.sub(r"[.\s]", "_", os.path.splitext(rel)[0].replace(os.sep, "/"))
        key, n = base, 1
        while key in seen:  # a.jpg and a.png in one folder
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644  # no owner names: the same bytes anywhere
    tar.addfile(info, io.BytesIO(data))


def register(subparsers) -> None:
    p = subparsers.add_parser("shards", help="write WebDataset tar shards from an image folder",
                              description="Convert an image folder (flat, or one subfolder per class: labels as .cls "
                                          "members) into tar shards that --data reads, e.g. "
                                          "--data 'DIR/train-{000000..000127}.tar'.")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--prefix", help="shard name prefix (default: FOLDER's name): PREFIX-000000.tar, ...")
    p.add_argument("--labels", default="auto", choices=["auto", "folders", "none"],
                   help="class labels from subfolders (auto: when FOLDER holds only subfolders)")
    p.add_argument("--classes", metavar="FILE",
                   help="label with this class order: the shards.json of another split (e.g. train's, when "
                        "converting val) or a text file of class names, one per line")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    p.add_argument("--check", default="fast", choices=["fast", "full", "off"],
                   help="which images to skip: fast = header + end marker, full = decode every image")
    p.set_defaults(func=_run)


def read_class_list(path) -> list[str]:
    """Class names from a shards.json (its "classes") or a text file (one name per line)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise FDFastError(f"cannot read the class list {str(path)!r}: {e.strerror}") from None
    if path.suffix == ".json":
        try:
            names = json.loads(text).get("classes")
        except (ValueError, AttributeError):
            names = None
        if not isinstance(names, list) or not names:
            raise FDFastError(f"{str(path)!r} has no \"classes\" list; pass the shards.json of a labelled shard set")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _run(args: argparse.Namespace) -> int:
    classes = read_class_list(args.classes) if args.classes else None
    m = write_shards(args.folder, args.out, shard_size=args.shard_size, labels=args.labels, shuffle=not args.no_shuffle,
                     seed=args.seed, prefix=args.prefix, check=args.check, classes=classes)
    classes = f", {len(m['classes'])} classes" if m["classes"] else ""
    skipped = f", {len(m['skipped'])} unreadable skipped" if m["skipped"] else ""
    print(f"wrote {len(m['shards'])} shard(s) ({m['samples']} images{classes}{skipped}) to {args.out}; "
          f"train on them with --data '{m['data']}'")
    return 0
