"""Files and folders written safely: one fsync discipline, atomic files, atomic folders, the run-dir lock, the cache dir.

Every file and folder fdfast publishes goes through here, so a crash, a power loss or a second process never sees
half of one, and a write that fails is one line naming the file:

    with atomic_path(final) as tmp:      # tmp is a fresh name in final's folder
        write_something(tmp)             # on success: fsync tmp, os.replace(tmp, final), fsync the folder
    atomic_write_json(path, obj)         # the common cases, built on atomic_path
    publish_dir(tmp, final)              # a finished folder in place by one rename; a complete final it replaces is
                                         # renamed aside first and removed last (never a moment without one)
    with atomic_dir(final) as tmp: ...   # a folder built in tmp and published (racing writers: the first one wins)
    recover_dirs(parent, complete)       # finish or roll back a publish a crash cut short (under the writers' lock)
    with run_dir_lock(dir, "fdfast train"):   # one process per run directory (flock on DIR/.lock)
    with writing(path): ...              # ENOSPC / EIO / EROFS inside -> WriteFailed naming path (one line)
    remove_tree(folder)                  # its MARKER first, durably: a kill part-way leaves no marker on half of it

The fsync discipline, in one place: a file is fsynced before it is renamed into place; the folder that holds a
rename is fsynced after it (the new name is on disk); a folder is published only once everything inside it is.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fdfast.errors import FDFastError

__all__ = ["cache_dir", "WriteFailed", "writing", "fsync_file", "fsync_dir", "flush_tree", "atomic_path",
           "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors", "publish_dir",
           "atomic_dir", "recover_dirs", "is_temp_name", "remove_temp", "remove_tree", "run_dir_lock"]

# errno values that mean "this cannot be written here" (not a bug, not a missing input)
_FIX = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota", errno.EFBIG: "free space",
        errno.EROFS: "make the file system writable", errno.EACCES: "make the folder writable",
        errno.EPERM: "make the folder writable", errno.EIO: "check the disk (an I/O error)"}
ASIDE_SUFFIX = ".replaced"  # publish_dir's name for the folder being replaced: .NAME.replaced
MARKER = "COMMITTED"  # the file that certifies a folder's files (written last); deleted first (remove_tree)
FSYNC_FILES_MAX = 64  # files fsynced one by one when a folder is published; beyond that, one sync(2)


def cache_dir(*parts: str) -> Path:
    """$FDFAST_CACHE or ~/.cache/fdfast (joined with ``parts``), created on demand."""
    root = os.environ.get("FDFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fdfast")
    path = Path(root, *parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FDFastError(f"cannot create the fdfast cache folder {path}: {e}; set FDFAST_CACHE to a writable folder")
    return path


# ----------------------------------------------------------------------------- failed writes
class WriteFailed(FDFastError):
    """A file or folder that could not be written (a full disk, a quota, an I/O error, a read-only file system).

    ``str()`` names the path and the reason; ``fix`` says what to do. A run adds where it can resume from."""

    def __init__(self, path: os.PathLike, error: OSError):
        self.path, self.error = Path(path), error
        self.fix = _FIX.get(error.errno, "check the disk")
        super().__init__(f"cannot write {path}: {error.strerror or error}")


def _os_error(error: BaseException) -> OSError | None:
    """``error`` as an OSError: itself, or what a Rust writer (safetensors) reports as "... (os error 28)"."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, Exception) else None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


@contextmanager
def writing(path: os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block (ENOSPC, EDQUOT, EFBIG, EIO, EROFS, EACCES, EPERM) into WriteFailed
    naming ``path``; other errors (a missing input, a bug) pass unchanged."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:
        error = _os_error(e)
        if error is not None and error.errno in _FIX:
            raise WriteFailed(path, error) from None
        raise


# ----------------------------------------------------------------------------- the fsync discipline
def fsync_file(path: os.PathLike) -> None:
    """The file's data and size on disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: os.PathLike) -> None:
    """The names in folder ``path`` on disk (after a rename, a create or a delete inside it).

    A file system that cannot fsync a folder (EINVAL: some network and FUSE file systems) makes it a no-op, as does
    Windows (folders cannot be opened); an I/O error is raised: the rename may not be on disk."""
    if os.name == "nt":  # pragma: no cover - no directory fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def flush_tree(root: os.PathLike) -> None:
    """Everything under folder ``root`` on disk: each file and folder fsynced (deepest first), or one sync(2) for
    many files (an fsync costs milliseconds each: a 10,000-image cache would take tens of seconds)."""
    root = Path(root)
    files, folders = [], [root]
    for p in root.rglob("*"):
        (folders if p.is_dir() else files).append(p)
    if len(files) > FSYNC_FILES_MAX and hasattr(os, "sync"):
        os.sync()
        return
    for f in files:
        fsync_file(f)
    for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


# ----------------------------------------------------------------------------- atomic files
def _tmp_name(final: Path) -> Path:
    # pid + random: unique across processes AND threads of one process writing the same target
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """A name this module (or a checkpoint writer) gives work in progress: ``.NAME.tmp-...`` or ``.tmp-...``."""
    return name.startswith(".") and ".tmp-" in name


def remove_tree(folder: os.PathLike, ignore_errors: bool = False) -> None:
    """Delete ``folder`` and everything in it, every MARKER inside first and durably (fsynced folder): a kill or a
    power loss part-way leaves files without a marker (a leftover ``recover`` removes), never a marker over a
    folder whose files are half gone."""
    folder = Path(folder)
    try:
        for marker in sorted(folder.rglob(MARKER)):
            marker.unlink()
            fsync_dir(marker.parent)
    except OSError:
        if not ignore_errors:
            raise
    shutil.rmtree(folder, ignore_errors=ignore_errors)


def remove_temp(folder: os.PathLike) -> list[Path]:
    """Remove the temporary files and folders a killed writer left in ``folder`` (call it only where no other
    writer can be at work: under the lock that keeps them out); returns what was removed."""
    folder, removed = Path(folder), []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if is_temp_name(p.name):
            remove_tree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    if removed:
        fsync_dir(folder)
    return removed


@contextmanager
def atomic_path(final: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it replaces ``final`` durably, on error it is removed
    (``final`` keeps its old content). A failed write is WriteFailed naming ``final``."""
    final = Path(final)
    tmp = _tmp_name(final)
    try:
        with writing(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, final)
            fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: os.PathLike, obj, indent: int | None = None) -> Path:
    """JSON of ``obj`` (a trailing newline when indented, for people reading it)."""
    text = json.dumps(obj, indent=indent)
    return atomic_write_text(path, text + "\n" if indent is not None else text)


def atomic_save_safetensors(tensors: dict, path: os.PathLike, metadata: dict | None = None) -> Path:
    """Save ``tensors`` (detached, contiguous, on the CPU) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# ----------------------------------------------------------------------------- atomic folders
def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}{ASIDE_SUFFIX}")


def _nonempty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def publish_dir(tmp: os.PathLike, final: os.PathLike, replace: bool = True,
                complete: Callable[[Path], bool] = _nonempty) -> bool:
    """Put the finished folder ``tmp`` in place as ``final`` by one rename, durably; returns whether it was.

    Everything in ``tmp`` is flushed first. A ``final`` that is ``complete`` is, with ``replace``, renamed aside
    (``.NAME.replaced``), ``tmp`` renamed in, and the old one removed only then, each step fsynced: at every moment
    a complete ``final`` or its aside copy exists (``recover_dirs`` finishes or rolls back a crash in between).
    Without ``replace`` a complete ``final`` is kept (a racing writer finished first) and ``tmp`` is dropped. With
    ``replace`` an incomplete ``final`` (a leftover no reader trusts) is removed, and the caller keeps other writers
    of ``final`` out."""
    tmp, final = Path(tmp), Path(final)
    parent, aside = final.parent, None
    with writing(final):
        flush_tree(tmp)
        if final.exists() and complete(final):
            if not replace:
                remove_tree(tmp, ignore_errors=True)
                return False
            aside = _aside(final)
            if aside.exists():  # a leftover of a finished swap (final is complete): not needed
                remove_tree(aside)
            os.rename(final, aside)
            fsync_dir(parent)
        elif final.exists() and replace:  # (an empty one is replaced by the rename itself)
            remove_tree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not replace and final.exists() and complete(final):  # a racing writer finished first
                remove_tree(tmp, ignore_errors=True)
                return False
            if aside is not None:
                os.rename(aside, final)  # roll back: the old one stays in place
            raise
        fsync_dir(parent)
        if aside is not None:
            remove_tree(aside)
            fsync_dir(parent)
    return True


def recover_dirs(parent: os.PathLike, complete: Callable[[Path], bool] = _nonempty) -> list[tuple[str, Path]]:
    """Finish or roll back every ``publish_dir`` replacement a crash cut short in folder ``parent``: a complete new
    ``final`` stays and its aside copy goes ("finished"); else the aside copy is put back ("rolled back"). Call it
    under the lock that keeps writers out. Returns (what was done, final) pairs."""
    parent, done = Path(parent), []
    for aside in sorted(parent.glob(f".*{ASIDE_SUFFIX}")) if parent.is_dir() else ():
        final = parent / aside.name[1:-len(ASIDE_SUFFIX)]
        if final.exists() and complete(final):
            remove_tree(aside)
            done.append(("finished", final))
        else:
            if final.exists():
                remove_tree(final)
            os.rename(aside, final)
            done.append(("rolled back", final))
    if done:
        fsync_dir(parent)
    return done


@contextmanager
def atomic_dir(final: os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``, published as ``final`` once the block succeeds (publish_dir).

    Made for caches that several processes may build at once: when another writer finished ``final``
    first (it exists and is not empty), that one is kept and this copy is dropped. An empty leftover
    ``final`` is replaced. The temporary folder never survives, success or error.
    """
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=str(final.parent)))
    try:
        with writing(final):
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700: a shared cache should be readable
        publish_dir(tmp, final, replace=False)
    finally:
        if tmp.exists():
            remove_tree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the run-dir lock
_HELD: dict[str, int] = {}  # resolved run dir -> fd of its DIR/.lock, in this process


def _close_held_in_child() -> None:
    # A forked child (data-loader worker, file-check pool) shares the lock's open file; closing its copy means
    # an orphaned worker of a killed run can never keep the lock (flock holds while any copy is open).
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


_FORK_HOOK = []  # [True] once the at-fork hook is registered (at the first lock, not at import)


def _register_fork_hook() -> None:
    if not _FORK_HOOK and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_close_held_in_child)  # a no-op in children of a process holding none
        _FORK_HOOK.append(True)


@contextmanager
def run_dir_lock(run_dir: os.PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive OS lock (fcntl.flock on DIR/.lock) on a run directory while the block runs.

    A second process (or a second run in this process) on the same DIR gets one FDFastError at once, naming the
    holder; nothing else is written. The kernel drops the lock when its process dies, so a killed run never
    blocks the next one. Creates DIR: take it only once the input has been checked.
    """
    import fcntl
    _register_fork_hook()
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    path = run_dir / ".lock"
    with writing(path):  # a read-only or full file system: one line naming the lock file
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if key in _HELD:
            raise BlockingIOError
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text(errors="replace").strip() or "another process"
        raise FDFastError(f"{run_dir} is in use by {holder}; wait for it to finish, or choose another "
                          f"output directory") from None
    _HELD[key] = fd
    try:
        with writing(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"`{command}` (pid {os.getpid()})\n".encode())
        yield run_dir
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the flock; the file stays (its content names the last holder)
