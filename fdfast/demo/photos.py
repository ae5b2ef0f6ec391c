"""The real photos scikit-image ships offline, written once as RGB JPEGs into one flat cache folder."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import List, Tuple

from fdfast.demo.common import SKIMAGE_FIX, require
from fdfast.errors import FDFastError
from fdfast.io import atomic_dir, cache_dir

_IMAGES_DIR = "demo_images"

# skimage.data loader -> the file(s) it reads from the installed package. Only loaders whose files are
# present locally are called, so nothing ever reaches for the network. Synthetic or binary images
# (horse silhouette, checkerboard, logo, colorwheel, phantom) and the tiny 25x25 lfw faces are left out.
_SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut.png",),
    "brick": ("brick.png",),
    "camera": ("camera.png",),
    "cell": ("cell.png",),
    "chelsea": ("chelsea.png",),
    "clock": ("clock_motion.png",),
    "coffee": ("coffee.png",),
    "coins": ("coins.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "hubble_deep_field": ("hubble_deep_field.jpg",),
    "immunohistochemistry": ("ihc.png",),
    "microaneurysms": ("microaneurysms.png",),
    "moon": ("moon.png",),
    "page": ("page.png",),
    "retina": ("retina.jpg",),
    "rocket": ("rocket.jpg",),
    "text": ("text.png",),
    "stereo_motorcycle": ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz"),
}
_MIN_SIDE = 128


def _as_rgb_uint8(img):
    """uint8 HxWx3 from grey/RGB/RGBA, any dtype; None if not photo-like (binary, tiny, odd shape)."""
    import numpy as np

    a = np.asarray(img)
    if a.dtype == bool or a.ndim not in (2, 3) or min(a.shape[:2]) < _MIN_SIDE:
        return None
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        a = (a * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    elif a.shape[2] == 4:
        a = a[..., :3]
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, -1)
    if a.shape[2] != 3 or len(np.unique(a[::4, ::4, 0])) <= 2:
        return None
    return np.ascontiguousarray(a)


def _load_skimage_photos() -> List[Tuple[str, "np.ndarray"]]:  # noqa: F821
    skdata = require("skimage.data", SKIMAGE_FIX)
    local = Path(skdata.__file__).parent
    photos = []
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)  # belt and braces: no loader below should touch the network
    try:
        for name, files in _SKIMAGE_PHOTOS.items():
            if not all((local / f).is_file() for f in files):
                continue
            try:
                result = getattr(skdata, name)()
            except Exception:  # missing optional dependency, needs a download, corrupt file: skip it
                continue
            images = result[:2] if name == "stereo_motorcycle" else (result,)
            suffixes = ("left", "right") if name == "stereo_motorcycle" else ("",)
            for suffix, img in zip(suffixes, images):
                rgb = _as_rgb_uint8(img)
                if rgb is not None:
                    photos.append((f"{name}_{suffix}" if suffix else name, rgb))
    finally:
        socket.setdefaulttimeout(old_timeout)
    return photos


def demo_image_dir() -> Path:
    """A flat folder of the real photos scikit-image ships offline, as RGB JPEGs (quality 95)."""
    from PIL import Image

    final = cache_dir() / _IMAGES_DIR
    if final.is_dir() and any(final.glob("*.jpg")):
        return final
    photos = _load_skimage_photos()
    if not photos:
        raise FDFastError(
            "scikit-image ships no readable photos here; run `pip install --force-reinstall scikit-image`"
        )
    with atomic_dir(final) as tmp:  # racing writers: the first complete folder wins, the others are dropped
        for name, rgb in photos:
            Image.fromarray(rgb, "RGB").save(tmp / f"{name}.jpg", "JPEG", quality=95)
    return final
