"""The FD student: timm's BEiT-style ViT with ONE relative position bias table shared by all blocks.

METHOD.md: random init, CLS kept, no absolute position embedding, one zero-initialised shared RPB table
((2Gh-1)(2Gw-1)+3 rows x heads), layer scale 0.1, learnable q/v bias (k bias zero), LayerNorm eps 1e-6,
drop path ramping linearly over depth. This is timm's ``Beit(use_shared_rel_pos_bias=True,
use_abs_pos_emb=False)``: the student IS a timm model, no fork.

``build_student(cfg, fast=True)`` returns it on fdfast's forwards, as ``fdfast train`` runs it: the attention on
``rpb_attention`` (backend ``cfg.attention``) and the fused residual blocks. timm's ``Beit`` and
``SwinTransformerV2`` take no block or attention class argument, so timm constructs the model and the builder
switches the modules before anyone holds it (``fdfast.fastpath.swap_forwards``: forward-only subclasses, the
same state dict, so the export loads strictly into timm's classes).
"""
from __future__ import annotations

from timm.models.beit import Beit
from torch import nn

from fdfast.errors import FDFastError
from fdfast.models.kwargs import check_kwargs

# width, depth, heads (the ViT family presets)
VIT_PRESETS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def vit_student_kwargs(size: str = "base", patch_size: int = 16, img_size: int = 224, drop_path: float = 0.1,
                       pos_bias: str = "shared", **overrides) -> dict:
    """timm ``Beit`` kwargs of an FD student; also what ``fdfast export`` writes as ``timm_kwargs``."""
    if size not in VIT_PRESETS:
        raise FDFastError(f"unknown ViT student size {size!r}; choose one of {sorted(VIT_PRESETS)}")
    if img_size % patch_size:
        raise FDFastError(f"image size {img_size} is not divisible by the patch size {patch_size}; "
                          f"use an image size that is a multiple of {patch_size} (e.g. {img_size // patch_size * patch_size or patch_size})")
    if pos_bias not in ("shared", "per_block", "abs"):
        raise FDFastError(f"model.pos_bias must be shared, per_block or abs, got {pos_bias!r}")
    width, depth, heads = VIT_PRESETS[size]
    kw = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=4.0, qkv_bias=True, init_values=0.1, drop_path_rate=drop_path, num_classes=0,
        global_pool="avg", use_fc_norm=False,  # FD reads all tokens after the final norm
        use_abs_pos_emb=pos_bias == "abs",
        use_rel_pos_bias=pos_bias == "per_block",
        use_shared_rel_pos_bias=pos_bias == "shared",
    )
    kw.update(overrides)
    return kw


def build_vit_student(size: str = "base", patch_size: int = 16, img_size: int = 224, drop_path: float = 0.1,
                      pos_bias: str = "shared", **overrides) -> Beit:
    check_kwargs(Beit, overrides, "model.kwargs")
    # timm's default norm layer is LayerNorm(eps=1e-6), the paper's; kwargs stay JSON-serialisable for export
    model = Beit(**vit_student_kwargs(size, patch_size, img_size, drop_path, pos_bias, **overrides))
    model.fd_student_kwargs = dict(arch="vit", size=size, patch_size=patch_size, img_size=img_size,
                                   drop_path=drop_path, pos_bias=pos_bias, **overrides)
    return model


def build_student(model_cfg, *, fast: bool = False) -> nn.Module:
    """A student from ``config.ModelConfig`` (or any object with the same attributes).

    fast: on fdfast's forwards (attention backend ``model_cfg.attention``, fused residual blocks), as training
    runs it; False: timm's own modules (export, loading weights, references in tests).
    """
    if model_cfg.arch == "vit":
        model = build_vit_student(model_cfg.size, model_cfg.patch_size, model_cfg.img_size, model_cfg.drop_path,
                                  model_cfg.pos_bias, **dict(model_cfg.kwargs))
    elif model_cfg.arch == "swinv2":
        from fdfast.models.swinv2 import build_swinv2_student
        model = build_swinv2_student(model_cfg)
    else:
        raise FDFastError(f"unknown student arch {model_cfg.arch!r}; choose vit or swinv2")
    if fast:
        from fdfast.attention import patch_model
        from fdfast.fastpath import fuse_residuals
        fuse_residuals(patch_model(model, backend=model_cfg.attention))
    return model
