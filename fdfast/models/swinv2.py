"""SwinV2 students: timm's ``SwinTransformerV2`` with FD's presets (Swin-family teachers, METHOD.md).

FD distils EsViT Swin-B into a SwinV2 with window 14, depths 2,2,18,2 and width 128 (preset ``fd``); the
paper's largest run uses SwinV2-G (width 512, depths 2,2,42,4, ~3.0 B parameters; preset ``giant``), which
only a sharded run can hold: build it on the meta device to plan it. The student IS a timm model, so an
exported checkpoint loads with ``timm.create_model("swinv2_...", **timm_kwargs)`` or
``SwinTransformerV2(**timm_kwargs)``.
"""
from __future__ import annotations

from timm.models.swin_transformer_v2 import SwinTransformerV2

from fdfast.errors import FDFastError
from fdfast.models.kwargs import check_kwargs

# width, depths, heads (the SwinV2 paper's sizes; fd = base with FD's window 14)
SWINV2_PRESETS = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "fd": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128)),
}
FD_WINDOW = 14
SWINV2_PATCH = 4
VIT_DEFAULT_PATCH = 16  # ModelConfig.patch_size's default belongs to the ViT; SwinV2 patchifies by 4


def swinv2_student_kwargs(size: str = "fd", img_size: int = 224, drop_path: float = 0.3,
                          patch_size: int = SWINV2_PATCH, window_size: int = FD_WINDOW, **overrides) -> dict:
    """timm ``SwinTransformerV2`` kwargs of an FD SwinV2 student (JSON-serialisable: export writes them)."""
    if size not in SWINV2_PRESETS:
        raise FDFastError(f"unknown SwinV2 student size {size!r}; choose one of {sorted(SWINV2_PRESETS)}")
    width, depths, heads = SWINV2_PRESETS[size]
    depths, heads = overrides.pop("depths", depths), overrides.pop("num_heads", heads)
    reduction = patch_size * 2 ** (len(depths) - 1)  # the last stage's stride in pixels
    if img_size % reduction:
        raise FDFastError(f"a SwinV2 student with patch {patch_size} and {len(depths)} stages needs an image size "
                          f"divisible by {reduction}, got {img_size}; use e.g. {max(1, img_size // reduction) * reduction}")
    kw = dict(img_size=img_size, patch_size=patch_size, window_size=window_size, embed_dim=width,
              depths=list(depths), num_heads=list(heads), drop_path_rate=drop_path, num_classes=0)
    kw.update(overrides)
    return kw


def build_swinv2_student(model_cfg) -> SwinTransformerV2:
    """A SwinV2 student from ``config.ModelConfig`` (arch swinv2): size, img_size, drop_path, kwargs."""
    kwargs = dict(model_cfg.kwargs)
    check_kwargs(SwinTransformerV2, kwargs, "model.kwargs")
    if "patch_size" not in kwargs:
        kwargs["patch_size"] = model_cfg.patch_size if model_cfg.patch_size != VIT_DEFAULT_PATCH else SWINV2_PATCH
    model = SwinTransformerV2(**swinv2_student_kwargs(model_cfg.size, model_cfg.img_size, model_cfg.drop_path,
                                                      **kwargs))
    model.fd_student_kwargs = dict(arch="swinv2", size=model_cfg.size, img_size=model_cfg.img_size,
                                   drop_path=model_cfg.drop_path, **kwargs)
    return model
