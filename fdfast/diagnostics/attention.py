"""Attention capture and the paper's attention statistics: mean attention distance and head similarity.

Capture works on timm's ViT (``timm.layers.Attention``), BEiT (shared or per-block relative position bias)
and Swin / SwinV2 window attention: for the length of one forward, every attention module takes timm's
own explicit path (``fused_attn = False``: ``softmax(q k^T * scale + bias [+ mask])``) and a pre-hook on
its ``attn_drop`` reads the softmax weights. The biases (BEiT's shared table, which the model passes to
each block as an argument; SwinV2's continuous bias and shift mask) are therefore exactly the ones the
module adds. Outputs agree with the fused SDPA path to float rounding (tests: atol 1e-5), and the modules
are restored afterwards.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from fdfast.errors import FDFastError
from fdfast.fastpath import timm_forward
from fdfast.models import tokens


@dataclass
class AttentionMaps:
    """The softmax weights of one attention layer for a batch, with the geometry to read them."""
    name: str  # module path, e.g. "blocks.3.attn"
    weights: torch.Tensor  # [B', H, N, N]; B' = images, or images x windows for window attention
    grid: tuple[int, int]  # patch-token grid of one map (the window for window attention), (rows, cols)
    patch_size: tuple[float, float]  # pixels between neighbouring tokens, (y, x)
    num_prefix_tokens: int  # CLS / register tokens before the patch tokens
    windows: int = 1  # attention windows per image (B' = B * windows)
    windowed: bool = False  # window attention (Swin): grid and coordinates are those of one window

    @property
    def num_heads(self) -> int:
        return self.weights.shape[1]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm attention modules that apply ``attn_drop`` to their softmax weights, in forward order."""
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "attn_drop", None), nn.Module) and hasattr(m, "num_heads")]
    if not mods:
        raise FDFastError(f"cannot capture attention of a {type(model).__name__}: it has no timm attention "
                          "modules (ViT, BEiT, Swin / SwinV2); pass the timm model itself")
    return mods


class AttentionCapture:
    """Context manager: ``with AttentionCapture(model) as cap: out = model(x)``; then ``cap.maps``.

    ``keep(weights)`` may reduce what is stored per layer (default: detach, move to the CPU).
    """

    def __init__(self, model: nn.Module, keep=None):
        self.model = model
        self.keep = keep or (lambda w: w.detach().float().cpu())
        self.maps: list[AttentionMaps] = []
        self._handles, self._fused = [], []
        self._timm_forward = contextlib.ExitStack()
        self._image_hw: tuple[int, int] | None = None

    def __enter__(self) -> "AttentionCapture":
        targets = attention_modules(self.model)  # raises before any hook is registered
        modules = dict(self.model.named_modules())
        # the patch embedding sees the image even when only forward_features is called
        stem = getattr(self.model, "patch_embed", None)
        stem = stem if isinstance(stem, nn.Module) else self.model
        self._handles.append(stem.register_forward_pre_hook(self._read_image_size))
        # fdfast.patch_model's fused forward never materialises the weights: timm's own for this capture
        self._timm_forward.enter_context(timm_forward(attn for _, attn in targets))
        for name, attn in targets:
            if hasattr(attn, "fused_attn"):
                self._fused.append((attn, attn.fused_attn))
                attn.fused_attn = False  # timm's explicit path: the same math, weights materialised
            parent = modules.get(name.rpartition(".")[0]) if "." in name else None
            windowed = parent is not None and hasattr(parent, "shift_size") and hasattr(attn, "window_size")
            state = {"feature_hw": None}
            if windowed:  # Swin: the block sees [B, H, W, C]; the window lives on that feature map
                self._handles.append(parent.register_forward_pre_hook(
                    lambda mod, args, state=state: state.update(feature_hw=tuple(args[0].shape[1:3]))))
            self._handles.append(attn.attn_drop.register_forward_pre_hook(
                self._make_hook(name, attn, windowed, state)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for attn, fused in self._fused:
            attn.fused_attn = fused
        self._timm_forward.close()
        self._handles, self._fused = [], []

    def _read_image_size(self, module, args) -> None:
        self._image_hw = tuple(args[0].shape[-2:])

    def _make_hook(self, name: str, attn: nn.Module, windowed: bool, state: dict):
        def hook(module, args):
            weights = args[0]  # [B', H, N, N], after softmax, before dropout
            n = weights.shape[-1]
            if windowed:
                grid = tuple(int(s) for s in attn.window_size)
                fh, fw = state["feature_hw"]
                img_h, img_w = self._image_hw
                patch = (img_h / fh, img_w / fw)
                prefix = 0
                windows = math.ceil(fh / grid[0]) * math.ceil(fw / grid[1])
            else:
                patch = tokens.patch_size(self.model)
                img_h, img_w = self._image_hw
                grid = (img_h // patch[0], img_w // patch[1])
                prefix = n - grid[0] * grid[1]
                windows = 1
            if prefix < 0:
                raise FDFastError(f"{name}: {n} tokens do not cover a {grid[0]}x{grid[1]} patch grid")
            self.maps.append(AttentionMaps(name, self.keep(weights), grid, (float(patch[0]), float(patch[1])),
                                           prefix, windows, windowed))
        return hook


def capture_attention(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[AttentionMaps]]:
    """(model(images), attention maps of every layer in forward order); no gradient, model mode unchanged."""
    with torch.no_grad(), AttentionCapture(model) as cap:
        out = model(images)
    if not cap.maps:
        raise FDFastError(f"no attention weights reached the hooks of {type(model).__name__}: its attention "
                          "modules do not run timm's explicit softmax path")
    return out, cap.maps


def patch_distances(grid: tuple[int, int], patch_size) -> torch.Tensor:
    """[M, M] Euclidean distance in pixels between the centres of the M = rows*cols patches (row-major)."""
    py, px = (patch_size, patch_size) if isinstance(patch_size, (int, float)) else patch_size
    rows, cols = grid
    yy, xx = torch.meshgrid(torch.arange(rows, dtype=torch.float64) * py,
                            torch.arange(cols, dtype=torch.float64) * px, indexing="ij")
    centres = torch.stack([yy.flatten(), xx.flatten()], dim=1)  # [M, 2]
    return torch.cdist(centres, centres)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size, num_prefix_tokens: int = 1
                       ) -> torch.Tensor:
    """Mean attention distance per head in PIXELS (Dosovitskiy et al.): [H].

    attn: [B, H, N, N] softmax weights, N = num_prefix_tokens + rows*cols. For each patch-token query, the
    attention-weighted mean distance between patch centres over the patch-token keys (weights renormalised
    to sum to one over those keys), averaged over patch-token queries and images.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention_distance: attn must be [B, H, N, N], got {tuple(attn.shape)}")
    p = num_prefix_tokens
    m = grid[0] * grid[1]
    if attn.shape[-1] != p + m:
        raise ValueError(f"attention_distance: {attn.shape[-1]} tokens != {p} prefix + {grid[0]}x{grid[1]} patches")
    a = attn[:, :, p:, p:].double()  # [B, H, M, M], patch queries x patch keys
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    dist = patch_distances(grid, patch_size).to(a.device)  # [M, M] px
    per_query = torch.einsum("bhqk,qk->bhq", a, dist)
    return per_query.mean(dim=(0, 2)).float()


def head_similarity_matrix(attn: torch.Tensor) -> torch.Tensor:
    """[H, H] cosine similarity of the heads' flattened attention maps, averaged over the B images."""
    if attn.dim() != 4:
        raise ValueError(f"head_similarity: attn must be [B, H, N, N], got {tuple(attn.shape)}")
    flat = torch.nn.functional.normalize(attn.flatten(2).double(), dim=-1)  # [B, H, N*N]
    return (flat @ flat.transpose(1, 2)).mean(0).float()


def head_similarity(attn: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the heads' attention maps (1: identical heads, 0: disjoint)."""
    h = attn.shape[1]
    if h < 2:
        raise ValueError("head_similarity needs at least two heads")
    sim = head_similarity_matrix(attn)
    off_diagonal = sim[~torch.eye(h, dtype=torch.bool)]
    return float(off_diagonal.mean())


def distance_spread(distances) -> dict:
    """How far the heads of one layer spread over distances (px): std (population), min, max, range."""
    d = torch.as_tensor(distances, dtype=torch.float64)
    return {"std": float(d.std(unbiased=False)), "min": float(d.min()), "max": float(d.max()),
            "range": float(d.max() - d.min())}
