"""Read released checkpoint files and load weights STRICTLY, listing every key that does not fit.

The per-family key filters (release layout -> timm's) live beside the teacher table in
``fdfast.models.teachers``; this module holds what they and the student loaders share: reading a file
(safetensors, torch pickle with weights_only=True, OpenAI's TorchScript), unwrapping checkpoint containers,
prefix helpers, and ``load_strict``, which raises an FDFastError listing the missing / unexpected keys and
shape mismatches. Nothing is ever loaded with ``strict=False``.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from fdfast.errors import FDFastError

# containers released checkpoints wrap their weights in, in the order they are looked for
CONTAINERS = ("model", "state_dict", "module", "model_ema")


def read_weights(path) -> dict:
    """A weights file (safetensors, torch pickle, or TorchScript archive like OpenAI's CLIP .pt) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FDFastError(f"weights file {str(path)!r} does not exist; pass an existing file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise FDFastError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from None
    if _is_torchscript(path):  # OpenAI CLIP releases TorchScript archives; only the weights are read
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated; only the weights are read
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:
            raise FDFastError(f"weights file {str(path)!r} is a TorchScript archive that cannot be read: {e}") from None
    return torch_load_checkpoint(path)


def _benign_globals() -> dict:
    """Non-tensor objects research checkpoints pickle beside the weights (argparse args, yacs configs, numpy
    scalars): plain data, allowed for weights_only loading by their exact names."""
    import argparse
    import numpy as np
    allowed = {"argparse.Namespace": argparse.Namespace, "numpy.dtype": np.dtype}
    for name in ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"):
        module, _, attr = name.rpartition(".")
        try:
            allowed[name] = getattr(__import__(module, fromlist=[attr]), attr)
        except (ImportError, AttributeError):
            pass
    allowed.update({f"numpy.dtypes.{t.__name__}": t for t in vars(np.dtypes).values() if isinstance(t, type)})
    try:
        from yacs.config import CfgNode  # the official FD / Swin trainers pickle their config
        allowed["yacs.config.CfgNode"] = CfgNode
    except ImportError:
        pass
    return allowed


def torch_load_checkpoint(path) -> dict:
    """torch.load(weights_only=True), also for checkpoints that pickle benign metadata beside the weights.

    Anything else (a pickle that would run code, a truncated or foreign file) is one FDFastError line; the
    file is never unpickled with weights_only=False.
    """
    allowed, extra = _benign_globals(), []
    for _ in range(8):  # a legacy (non-zip) pickle names one refused global per attempt
        try:
            with torch.serialization.safe_globals(extra):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types here; each becomes one line below
            error = e
        needed = _refused_globals(path, error)
        if not needed or not all(n in allowed for n in needed) or all(allowed[n] in extra for n in needed):
            break
        extra += [allowed[n] for n in needed if allowed[n] not in extra]
    why, fix = _load_failure(path, error, needed)
    raise FDFastError(f"weights file {str(path)!r} cannot be read with torch.load(weights_only=True) ({why}); {fix}")


def _refused_globals(path, error: Exception) -> list[str]:
    """The globals (module.name) a weights_only load refuses: torch's scan of a zip checkpoint, else the one
    its error message names (legacy pickles)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint
        return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _load_failure(path, error: Exception, needed: list[str]) -> tuple[str, str]:
    """(why a weights file did not load, in a few words; the fix): torch's own message spans paragraphs and
    suggests weights_only=False, which would run whatever code the file holds."""
    resave = "re-save only its tensors, e.g. torch.save({'model': ckpt['model']}, FILE), or as safetensors"
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        return "the file is empty, 0 bytes", "download or copy it again"
    if needed:
        return f"it pickles {', '.join(needed)}: code or objects a weights file must not hold", resave
    if zipfile.is_zipfile(path) or head.startswith(b"PK"):
        first = str(error).split(". ")[0].strip() or type(error).__name__
        return f"a damaged or truncated torch zip archive: {first}", "download or copy it again"
    if not head.startswith(b"\x80"):  # every torch.save pickle starts with the PROTO opcode
        return f"not a torch checkpoint, safetensors or TorchScript file: it starts with {head!r}", "pass a weights file"
    return f"a pickle that weights_only loading refuses: {type(error).__name__}", resave


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def unwrap(obj, prefer=()) -> dict:
    """The tensor dict inside a checkpoint container ({"model": ...}, {"teacher": ...}, ...)."""
    for key in tuple(prefer) + CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return unwrap(obj[key], prefer)
    if not isinstance(obj, dict):
        raise FDFastError(f"expected a state dict, found a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(sd: dict, *prefixes: str) -> dict:
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def select_prefix(sd: dict, prefix: str) -> dict:
    """Only the sub-module under ``prefix`` (e.g. a MultiCropWrapper's ``backbone.``), when the file has one."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def drop(sd: dict, *patterns: str) -> dict:
    """Keys matching any regex in ``patterns`` removed (heads and buffers the release carries)."""
    rx = re.compile("|".join(patterns))
    return {k: v for k, v in sd.items() if not rx.search(k)}


# ---- strict load ------------------------------------------------------------------------------------------

def _listing(items, n=8) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"


def key_problems(expected_shapes: dict, sd: dict, source: str = "file", target: str = "model") -> list[str]:
    """What keeps ``sd`` from loading strictly into a state dict of ``expected_shapes`` (key -> shape): missing
    keys, unexpected keys, shape mismatches, each as one listing; empty when it fits."""
    missing = [k for k in expected_shapes if k not in sd]
    unexpected = [k for k in sd if k not in expected_shapes]
    mismatched = [f"{k}: {source} {tuple(sd[k].shape)} vs {target} {tuple(expected_shapes[k])}"
                  for k in expected_shapes if k in sd and tuple(sd[k].shape) != tuple(expected_shapes[k])]
    parts = []
    if missing:
        parts.append(f"missing keys {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches {_listing(mismatched)}")
    return parts


def load_strict_check(model: nn.Module, sd: dict, what: str, fix: str) -> None:
    """Raise an FDFastError listing every missing / unexpected key and shape mismatch, naming the fix."""
    parts = key_problems({k: v.shape for k, v in model.state_dict().items()}, sd)
    if parts:
        raise FDFastError(f"{what} do not fit {type(model).__name__}: " + "; ".join(parts) + f". {fix}")


def load_strict(model: nn.Module, sd: dict, what: str, fix: str) -> None:
    """load_state_dict(strict=True), after a check whose error lists every problem and names the fix."""
    load_strict_check(model, sd, what, fix)
    model.load_state_dict(sd, strict=True)
