"""Checkpoints: atomic save, a COMMITTED marker written last, exact resume from committed ones only.

Layout of a run directory::

    DIR/checkpoints/step-N/model.safetensors   student ("student.<timm key>") + projection ("proj.*")
    DIR/checkpoints/step-N/train_state.pt      optimizer, scheduler, scaler, RNG, loader position, config
    DIR/checkpoints/step-N/COMMITTED           written last: a step directory without it is ignored
    DIR/student.safetensors                    the student alone (timm keys), written at the end

Everything loads with ``torch.load(weights_only=True)`` / safetensors. Steps are found by their number,
never by file times.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from fdfast.errors import FDFastError

COMMITTED = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")
STUDENT_META_KEY = "fdfast_model"  # safetensors metadata: JSON of the student's ModelConfig


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def split_trainable(tensors: dict) -> tuple[dict, dict]:
    """(student state dict with timm keys, FDLoss state dict "proj.*") of a checkpoint's model tensors.

    The FDLoss state dict keys are the checkpoint's own ("proj.weight", "proj.bias"); any other key is an error.
    """
    student = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    loss = {k: v for k, v in tensors.items() if k.startswith("proj.")}
    unknown = sorted(k for k in tensors if not k.startswith(("student.", "proj.")))
    if unknown:
        raise FDFastError(f"checkpoint has keys that belong to neither student nor projection: {unknown[:5]}")
    return student, loss


def committed_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every committed checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / COMMITTED).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_committed(run_dir: Path) -> Path | None:
    steps = committed_steps(run_dir)
    return steps[-1][1] if steps else None


def save_checkpoint(run_dir: Path, step: int, model_tensors: dict, train_state: dict, model_meta: dict,
                    keep: int = 2) -> Path:
    """Save step-N atomically: files into a temporary folder, rename it into place, then COMMITTED."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_save_safetensors(model_tensors, tmp / "model.safetensors",
                            metadata={STUDENT_META_KEY: json.dumps(model_meta)})
    with open(tmp / "train_state.pt", "wb") as f:
        torch.save(train_state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # an uncommitted leftover of a crash at this very step
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker = final / f".{COMMITTED}.tmp"
    marker.write_text(json.dumps({"step": step, "time": time.time()}))
    os.replace(marker, final / COMMITTED)
    _fsync_dir(final)
    for _, old in committed_steps(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``--resume auto`` -> newest committed step of run_dir (or None); a path -> that committed step."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_committed(run_dir)
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_committed(path)
        if found is None:
            raise FDFastError(f"--resume {resume}: the run has no committed checkpoint; start a new run instead")
        return found
    if not (path / COMMITTED).is_file():
        raise FDFastError(f"--resume {resume}: not a committed checkpoint (no {COMMITTED} marker in it); "
                          f"pass a run directory, a checkpoints/step-N directory with a marker, or 'auto'")
    return path


def load_checkpoint(ckpt_dir: Path) -> tuple[dict, dict]:
    """(model tensors, train state) of a committed step directory."""
    ckpt_dir = Path(ckpt_dir)
    tensors = load_file(str(ckpt_dir / "model.safetensors"))
    state = torch.load(ckpt_dir / "train_state.pt", map_location="cpu", weights_only=True)
    return tensors, state


def _read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if STUDENT_META_KEY not in meta:
        raise FDFastError(f"{path} carries no fdfast student description (metadata {STUDENT_META_KEY!r}); "
                          f"it was not written by fdfast train")
    return json.loads(meta[STUDENT_META_KEY])


def read_student(path) -> tuple[dict, dict]:
    """(ModelConfig dict, student state dict with timm keys) from a run dir, a step dir, or a .safetensors.

    A run directory without a final student.safetensors (a run still going, or crashed) gives the student of
    its newest committed checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "student.safetensors").is_file():
            path = path / "student.safetensors"
        elif (path / "model.safetensors").is_file():
            if not (path / COMMITTED).is_file():
                raise FDFastError(f"{path} is an uncommitted (incomplete) checkpoint; use a committed step")
            path = path / "model.safetensors"
        else:
            latest = latest_committed(path)
            if latest is None:
                raise FDFastError(f"{path} holds neither student.safetensors nor a committed checkpoint")
            path = latest / "model.safetensors"
    if not path.is_file():
        raise FDFastError(f"no such checkpoint: {path}")
    model_cfg = _read_meta(path)
    tensors = load_file(str(path))
    if any(k.startswith("student.") for k in tensors):
        tensors, _ = split_trainable(tensors)
    return model_cfg, tensors
