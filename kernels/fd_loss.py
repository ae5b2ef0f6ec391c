"""Fused FD loss: whitening + 1x1 projection + smooth-L1 (host checks and backend dispatch).

The Triton kernels of this file (issue 3) are added beside the dispatch; ``backend="reference"`` is the
plain-PyTorch specification in ``reference.py``.
"""
from __future__ import annotations

import torch

from .reference import fd_loss_reference

BACKENDS = ("auto", "triton", "reference")


def check_fd_inputs(student_tokens, teacher_tokens, weight, bias) -> None:
    """Raise ValueError naming the problem before any launch."""
    if student_tokens.dim() != 3 or teacher_tokens.dim() != 3:
        raise ValueError(
            f"fd_loss expects student_tokens [B,N,Cs] and teacher_tokens [B,N,Ct]; got "
            f"{tuple(student_tokens.shape)} and {tuple(teacher_tokens.shape)} (reshape 2-D inputs to [1,N,C])"
        )
    if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
        raise ValueError(
            f"fd_loss: student and teacher disagree on [B,N]: {tuple(student_tokens.shape[:2])} vs "
            f"{tuple(teacher_tokens.shape[:2])}; align the teacher grid to the student's first"
        )
    if weight.dim() != 2 or weight.shape[1] != student_tokens.shape[-1] or weight.shape[0] != teacher_tokens.shape[-1]:
        raise ValueError(
            f"fd_loss: weight must be [Ct, Cs] = [{teacher_tokens.shape[-1]}, {student_tokens.shape[-1]}], "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fd_loss: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("student_tokens", student_tokens), ("teacher_tokens", teacher_tokens), ("weight", weight)):
        if not t.is_floating_point():
            raise ValueError(f"fd_loss: {name} must be a floating-point tensor, got {t.dtype}")


def fd_loss(student_tokens, teacher_tokens, weight, bias=None, beta=2.0, eps=1e-5, whiten=True, backend="auto"):
    """Mean smooth-L1(beta) between ``student_tokens @ weight.T + bias`` and the whitened teacher tokens."""
    if backend not in BACKENDS:
        raise ValueError(f"fd_loss: unknown backend {backend!r}; choose one of {BACKENDS}")
    check_fd_inputs(student_tokens, teacher_tokens, weight, bias)
    if beta < 0:
        raise ValueError(f"fd_loss: beta must be >= 0, got {beta}")
    return fd_loss_reference(student_tokens, teacher_tokens, weight, bias, beta=beta, eps=eps, whiten_target=whiten)
