"""Plain-PyTorch specification of every fdfast kernel: tests and benchmarks compare against these.

Everything here is differentiable with ordinary autograd and runs on any device and dtype. The
fast paths in ``fd_loss.py`` and ``rpb_attention.py`` must agree with these functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .choices import LOSS_KINDS




def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise smooth-L1 (Huber / beta) of a difference; beta == 0 is plain L1."""
    a = diff.abs()
    if beta == 0:
        return a
    return torch.where(a < beta, 0.5 * diff * diff / beta, a - 0.5 * beta)


def fd_loss_reference(
    student_tokens: torch.Tensor,  # [B, N, Cs]
    teacher_tokens: torch.Tensor,  # [B, N, Ct]
    weight: torch.Tensor,  # [Ct, Cs], the 1x1 projection
    bias: torch.Tensor | None = None,  # [Ct]
    beta: float = 2.0,
    eps: float = 1e-5,
    whiten_target: bool = True,
    kind: str = "smooth_l1",
) -> torch.Tensor:
    """The FD objective between pred = S @ W^T + b and target = LN_noaffine(T) (or T); math in fp32 (fp64 stays).

    kind "smooth_l1": mean over B*N*Ct of smooth_l1_beta(pred - target) (the paper's; beta 0 = L1);
    "l2": mean over B*N*Ct of (pred - target)^2; "cosine": mean over B*N tokens of 1 - cos(pred, target)
    (``F.cosine_similarity`` over channels, eps 1e-8). The teacher side never receives a gradient.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"fd_loss: unknown kind {kind!r}; choose one of {LOSS_KINDS}")
    compute = torch.float64 if student_tokens.dtype == torch.float64 else torch.float32
    pred = F.linear(student_tokens.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    t = teacher_tokens.detach().to(compute)
    target = F.layer_norm(t, t.shape[-1:], eps=eps) if whiten_target else t
    if kind == "l2":
        return (pred - target).square().mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target.to(pred.dtype), dim=-1)).mean()
    return smooth_l1(pred - target, beta).mean()


def rpb_attention_reference(
    q: torch.Tensor,  # [B, H, N, D]
    k: torch.Tensor,  # [B, H, N, D]
    v: torch.Tensor,  # [B, H, N, D]
    bias: torch.Tensor | None = None,  # [H, N, N], shared by the batch
    mask: torch.Tensor | None = None,  # [W, N, N], additive, B = batch * W (shifted windows)
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, computed naively in fp32 (fp64 stays fp64)."""
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) * scale
    if bias is not None:
        logits = logits + bias.to(compute).unsqueeze(0)
    if mask is not None:
        W = mask.shape[0]
        logits = logits.view(B // W, W, H, N, N) + mask.to(compute).view(1, W, 1, N, N)
        logits = logits.view(B, H, N, N)
    attn = logits.softmax(dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", attn, v.to(compute)).to(q.dtype)
