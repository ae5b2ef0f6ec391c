"""One FD forward: teacher -> target tokens; student -> projection -> whitened smooth-L1 loss.

The teacher is frozen (eval, no grad) and sees the same augmented images as the student. Whitening,
projection and smooth-L1 run in one fused op (``fdfast.FDLoss`` -> ``fdfast.kernels.fd_loss``).
"""
from __future__ import annotations

import torch
from torch import nn

from fdfast.checkpoint import split_trainable
from fdfast.loss import FDLoss
from fdfast.models.align import align_tokens, check_alignment
from fdfast.models.student import student_grid, student_tokens


class FeatureDistiller(nn.Module):
    """student + projection (trainable) and a frozen teacher; forward(images) -> scalar loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_cfg, align: str = "bilinear"):
        super().__init__()
        self.student = student
        self.teacher = teacher  # frozen by build_teacher: eval mode and requires_grad False
        self.align = align
        self.grid, self.prefix = student_grid(student)
        check_alignment(self.grid, self.prefix, teacher.grid, teacher.num_prefix_tokens, align)  # fail before step 1
        self.fd_loss = FDLoss(student.num_features, teacher.dim, beta=loss_cfg.beta, eps=loss_cfg.eps,
                              whiten=loss_cfg.whiten, backend=loss_cfg.backend)

    def trainable_state(self) -> dict:
        """What a checkpoint stores: the student (timm keys under 'student.') and the projection."""
        out = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        out.update(self.fd_loss.state_dict())  # "proj.weight", "proj.bias"
        return out

    def load_trainable_state(self, tensors: dict) -> None:
        student, loss = split_trainable(tensors)
        self.student.load_state_dict(student, strict=True)
        self.fd_loss.load_state_dict(loss, strict=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths or updates norms
        return self

    @torch.no_grad()
    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)  # [B, Nt, Ct], after the teacher's own final norm, not yet whitened

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        target = self.target_tokens(images)
        pred = student_tokens(self.student, images)  # [B, Ns, Cs]
        pred, target = align_tokens(pred, target, self.grid, self.prefix, self.teacher.grid,
                                    self.teacher.num_prefix_tokens, self.align)
        return self.fd_loss(pred, target)
