"""Token geometry of every supported model: its grid, prefix tokens, final-norm tokens [B, N, C] and blocks.

The one place that knows how a model lays out its output (students, teachers, FSDP / activation
checkpointing / compile, attention capture, diagnostics and export all ask here):
- ``"vit"``: timm ViT / DeiT / DINOv2 / EVA / CLIP / BEiT (the FD student): ``forward_features`` gives
  [B, prefix + h*w, C] after the final norm; the prefix is timm's ``num_prefix_tokens`` (CLS [+ registers]).
- ``"nhwc"``: timm Swin / SwinV2 (``output_fmt == "NHWC"``): [B, h, w, C] after the final norm, no prefix.
- ``"cnn"``: any other timm model: the map of its last ``feature_info`` stage, [B, C, h, w], read with timm's
  ``forward_intermediates`` (the head, and EfficientNet's conv_head, are not part of it).
- ``"open_clip"``: an open_clip ``VisionTransformer`` tower: tokens after ``ln_post``, before ``proj``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fdfast.errors import FDFastError

LAYOUTS = ("vit", "nhwc", "cnn", "open_clip")


@dataclass(frozen=True)
class TokenGeometry:
    """What a model's final tokens look like at one input size."""
    grid: tuple[int, int]  # (h, w) of the patch tokens
    num_prefix_tokens: int  # CLS [+ registers], first in N
    dim: int  # C
    layout: str  # one of LAYOUTS

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]


def layout(model: nn.Module) -> str:
    """How ``model`` lays out its final tokens (see the module docstring)."""
    if hasattr(model, "transformer") and hasattr(model, "ln_post") and hasattr(model, "conv1"):
        return "open_clip"
    if getattr(model, "output_fmt", None) == "NHWC" and hasattr(model, "layers"):
        return "nhwc"
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return "vit"
    if hasattr(model, "forward_intermediates") and hasattr(model, "feature_info"):
        return "cnn"
    raise FDFastError(f"fdfast cannot read tokens from a {type(model).__name__}: use a timm ViT / Swin / CNN "
                      f"(with forward_intermediates) or an open_clip VisionTransformer")


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def patch_size(model: nn.Module) -> tuple[int, int]:
    """Pixels per patch token (y, x) of a ViT-like model (its patch embedding's kernel)."""
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps is None and hasattr(model, "conv1") and hasattr(model, "ln_post"):  # open_clip tower
        ps = model.patch_size
    if ps is None:
        raise FDFastError(f"cannot tell the patch size of a {type(model).__name__} (no patch_embed.patch_size)")
    return _pair(ps)


def geometry(model: nn.Module, image_hw=None) -> TokenGeometry:
    """Grid, prefix tokens and width of ``final_tokens(model, images)`` for images of ``image_hw`` (default: the
    size the model was built for). Read from timm's attributes; works on the meta device."""
    kind = layout(model)
    if kind == "vit":
        if image_hw is None:
            grid = _pair(model.patch_embed.grid_size)
        else:
            ph, pw = patch_size(model)
            grid = (_pair(image_hw)[0] // ph, _pair(image_hw)[1] // pw)
        return TokenGeometry(grid, int(model.num_prefix_tokens), int(model.num_features), kind)
    if kind == "open_clip":
        grid = _pair(model.grid_size) if image_hw is None else tuple(
            s // p for s, p in zip(_pair(image_hw), patch_size(model)))
        return TokenGeometry(grid, 1, int(model.ln_post.normalized_shape[0]), kind)
    size = _pair(image_hw if image_hw is not None else _built_size(model))
    info = model.feature_info[-1] if isinstance(model.feature_info, list) else model.feature_info.get_dicts()[-1]
    reduction = int(info["reduction"])
    grid = (-(-size[0] // reduction), -(-size[1] // reduction))  # strided convs round up ('same'-like padding)
    if kind == "nhwc":
        return TokenGeometry((size[0] // reduction, size[1] // reduction), 0, int(model.num_features), kind)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "meta":  # padding rules vary: one probe gives the exact map
        was_training = model.training
        model.eval()  # the probe must not move batch-norm statistics
        with torch.no_grad():
            probe = model.forward_intermediates(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype),
                                                indices=1, intermediates_only=True)[-1]
        model.train(was_training)
        grid = tuple(int(s) for s in probe.shape[-2:])
    return TokenGeometry(grid, 0, int(info["num_chs"]), kind)


def _built_size(model: nn.Module):
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    return size


def final_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's tokens after its final norm, as [B, N, C] (prefix tokens first, then patches row-major)."""
    kind = layout(model)
    if kind == "vit":
        return model.forward_features(images)
    if kind == "nhwc":
        return model.forward_features(images).flatten(1, 2)
    if kind == "cnn":
        x = model.forward_intermediates(images, indices=1, intermediates_only=True)[-1]  # [B, C, h, w]
        return x.flatten(2).transpose(1, 2)
    return _open_clip_tokens(model, images)


def _open_clip_tokens(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = tower.ln_post.register_forward_hook(lambda m, i, o: out.setdefault("tokens", o))
    try:
        tower(images)
    finally:
        handle.remove()
    tokens = out["tokens"]
    if tokens.dim() != 3:
        raise FDFastError("this open_clip tower pools before ln_post; FD needs its tokens (a plain CLIP ViT)")
    return tokens


def patch_map(tokens: torch.Tensor, geom: TokenGeometry) -> torch.Tensor:
    """[B, N, C] final tokens -> [B, h, w, C] patch tokens (prefix tokens dropped)."""
    h, w = geom.grid
    return tokens[:, geom.num_prefix_tokens:].reshape(tokens.shape[0], h, w, tokens.shape[-1])


def prune_to_final_tokens(model: nn.Module) -> nn.Module:
    """Drop what ``final_tokens`` never runs (a CNN's head and layers after its last stage), in place."""
    if layout(model) == "cnn" and hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(indices=1, prune_head=True)
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, in forward order: the units of FSDP, activation checkpointing and compile."""
    if layout(model) == "open_clip":
        return list(model.transformer.resblocks)
    if hasattr(model, "blocks"):
        return [b for stage in model.blocks for b in stage] if layout(model) == "cnn" else list(model.blocks)
    if hasattr(model, "layers") and all(hasattr(layer, "blocks") for layer in model.layers):
        return [b for layer in model.layers for b in layer.blocks]
    if hasattr(model, "stages"):  # ConvNeXt-like CNNs
        return [b for stage in model.stages for b in getattr(stage, "blocks", stage)]
    if hasattr(model, "layer4"):  # ResNet-like CNNs
        return [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    raise FDFastError(f"{type(model).__name__} has neither .blocks nor .layers[i].blocks to shard or compile")
