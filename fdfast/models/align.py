"""Align teacher tokens to the student's token grid (heterogeneous pairs: CLIP L/14 vs a /16 student,
Swin 7x7 vs ViT 14x14, a CNN map).

Both models see the same image, so the teacher's patch map is resized to the student's grid; widths may
differ freely (FD's projection maps student width to teacher width). Prefix tokens: timm orders them
[CLS, registers...]; the CLS target is kept when both sides have a CLS token and dropped otherwise;
register tokens (DINOv2-reg) have no counterpart and are always dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fdfast.errors import FDFastError

MODES = ("bilinear", "area")


def check_alignment(student_grid, student_prefix: int, teacher_grid, teacher_prefix: int,
                    mode: str = "bilinear") -> None:
    """Raise FDFastError (before training) when the pair cannot be aligned."""
    if mode not in MODES:
        raise FDFastError(f"teacher.align must be one of {list(MODES)}, got {mode!r}")
    for who, grid, prefix in (("student", student_grid, student_prefix), ("teacher", teacher_grid, teacher_prefix)):
        if grid is None or len(tuple(grid)) != 2 or min(int(g) for g in grid) < 1:
            raise FDFastError(f"the {who} has no 2-D token grid ({grid!r}); FD needs a spatial map of tokens "
                              f"(a ViT, Swin or CNN final map), not pooled features")
        if int(prefix) < 0:
            raise FDFastError(f"the {who}'s number of prefix tokens must be >= 0, got {prefix}")


def _check_tokens(who: str, tokens: torch.Tensor, grid, prefix: int) -> None:
    h, w = grid
    if tokens.dim() != 3 or tokens.shape[1] != prefix + h * w:
        raise FDFastError(f"{who} tokens {tuple(tokens.shape)} do not match its grid {h}x{w} + {prefix} prefix "
                          f"tokens ({prefix + h * w} tokens expected as [B, N, C]); the image size probably differs "
                          f"from the one the {who} was built for")


def resize_token_map(tokens: torch.Tensor, grid, new_grid, mode: str = "bilinear") -> torch.Tensor:
    """[B, h*w, C] patch tokens -> [B, H*W, C] on the new grid (bilinear: antialiased when shrinking)."""
    (h, w), (nh, nw) = tuple(grid), tuple(new_grid)
    if (h, w) == (nh, nw):
        return tokens
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, h, w)
    if mode == "area":
        x = F.interpolate(x, size=(nh, nw), mode="area")
    else:
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    return x.flatten(2).transpose(1, 2)


def align_tokens(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                 student_grid: tuple[int, int], student_prefix: int,
                 teacher_grid: tuple[int, int], teacher_prefix: int,
                 mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (student_tokens, teacher_tokens) with the same number of tokens, in the same order.

    Same grid and prefix: unchanged. Otherwise: [CLS if both have one] + the student's patch tokens, and
    [teacher CLS if kept] + the teacher's patch map resized to the student grid.
    """
    if tuple(student_grid) == tuple(teacher_grid) and student_prefix == teacher_prefix:
        return student_tokens, teacher_tokens
    check_alignment(student_grid, student_prefix, teacher_grid, teacher_prefix, mode)
    _check_tokens("student", student_tokens, student_grid, student_prefix)
    _check_tokens("teacher", teacher_tokens, teacher_grid, teacher_prefix)
    keep_cls = student_prefix >= 1 and teacher_prefix >= 1
    s_patch = student_tokens[:, student_prefix:]
    t_patch = resize_token_map(teacher_tokens[:, teacher_prefix:], teacher_grid, student_grid, mode)
    if keep_cls:
        return (torch.cat([student_tokens[:, :1], s_patch], 1), torch.cat([teacher_tokens[:, :1], t_patch], 1))
    return s_patch, t_patch
