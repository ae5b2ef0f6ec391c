"""One FD forward: teacher -> target tokens; student -> projection -> whitened smooth-L1 loss.

The teacher is frozen (eval, no grad) and sees the same augmented images as the student. Whitening,
projection and smooth-L1 run in one fused op (``fdfast.FDLoss`` -> ``fdfast.kernels.fd_loss``).
The paper's ablations are switches here: ``loss.target`` (tokens = the full feature map, FD's; cls = the
CLS token, or the mean-pooled token of a model without one; embedding = the teacher's final pooled output,
predicted from the student's CLS / pooled token), ``loss.kind`` (smooth_l1 | l2 | cosine) and
``teacher.drop_path`` (the teacher built by ``teacher_from_config``).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from fdfast.errors import FDFastError
from fdfast.models import tokens
from fdfast.models.align import align_tokens, check_alignment


STUDENT_PREFIX, PROJECTION_PREFIX = "student.", "proj."  # FD's checkpoint key layout (timm keys after "student.")


def split_trainable(tensors: dict) -> tuple[dict, dict]:
    """(student state dict with timm keys, FDLoss state dict "proj.*") of an FD checkpoint's model tensors; any
    other key is an error."""
    student = {k[len(STUDENT_PREFIX):]: v for k, v in tensors.items() if k.startswith(STUDENT_PREFIX)}
    loss = {k: v for k, v in tensors.items() if k.startswith(PROJECTION_PREFIX)}
    unknown = sorted(k for k in tensors if not k.startswith((STUDENT_PREFIX, PROJECTION_PREFIX)))
    if unknown:
        raise FDFastError(f"checkpoint has keys that belong to neither student nor projection: {unknown[:5]}")
    return student, loss


def teacher_from_config(cfg, weights=None):
    """The frozen teacher of a run config: its head kept for loss.target=embedding, its drop path set.
    weights: None = cfg.teacher.weights; "random" for shape-only uses (fdfast plan)."""
    from fdfast.models.teachers import build_teacher
    t = cfg.teacher
    return build_teacher(t.name, t.weights if weights is None else weights, img_size=t.img_size or cfg.model.img_size,
                         embedding=cfg.loss.target == "embedding", drop_path=t.drop_path, **t.kwargs)


def pooled_token(x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """[B, N, C] -> [B, 1, C]: the CLS token (first in N), or the mean token of a model without prefix tokens."""
    return x[:, :1] if num_prefix_tokens else x.mean(dim=1, keepdim=True)


class FeatureDistiller(nn.Module):
    """student + projection (trainable) and a frozen teacher; forward(images) -> scalar loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_cfg, align: str = "bilinear"):
        super().__init__()
        self.student = student
        self.teacher = teacher  # frozen by build_teacher: eval mode and requires_grad False
        self.teacher_dtype: torch.dtype | None = None  # None: the teacher follows the step's autocast
        self.align = align
        self.target = loss_cfg.target
        geom = tokens.geometry(student)
        self.grid, self.prefix = geom.grid, geom.num_prefix_tokens
        if self.target == "tokens":  # fail before step 1
            check_alignment(self.grid, self.prefix, teacher.grid, teacher.num_prefix_tokens, align)
        if self.target == "embedding" and not teacher.embedding_dim:
            raise FDFastError(f"loss.target=embedding: teacher {teacher.name!r} was built without its head; build it "
                              f"with build_teacher(..., embedding=True) (fdfast.distill.teacher_from_config does)")
        target_dim = teacher.embedding_dim if self.target == "embedding" else teacher.dim
        from fdfast.loss import FDLoss  # imports the Triton kernels: only when a distiller is built
        self.fd_loss = FDLoss(student.num_features, target_dim, beta=loss_cfg.beta, eps=loss_cfg.eps,
                              whiten=loss_cfg.whiten, backend=loss_cfg.backend,
                              kind=loss_cfg.kind)

    def trained_model(self) -> nn.Module:
        return self.student

    def frozen_model(self) -> nn.Module:
        return self.teacher

    def checkpoint_layout(self) -> dict:
        """FD's checkpoint key layout, {prefix: module}: the student's timm keys under "student.", the projection's
        own "proj.weight" / "proj.bias" (fdfast.checkpointer stores and loads by it)."""
        return {STUDENT_PREFIX: self.student, "": self.fd_loss}

    def trainable_state(self) -> dict:
        """What a checkpoint stores (unsharded): the student (timm keys under "student.") and the projection."""
        return {prefix + k: v for prefix, m in self.checkpoint_layout().items() for k, v in m.state_dict().items()}

    def load_trainable_state(self, tensors: dict) -> None:
        student, loss = split_trainable(tensors)
        self.student.load_state_dict(student, strict=True)
        self.fd_loss.load_state_dict(loss, strict=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(mode)  # Teacher.train: eval always, but its DropPath layers when teacher.drop_path > 0
        return self

    def set_teacher_dtype(self, dtype: torch.dtype) -> None:
        """Store the frozen teacher's weights once in ``dtype`` (the run's autocast dtype): it then runs as plain
        inference in that dtype, with no per-step autocast casts of weights that never change."""
        self.teacher.to(dtype)
        self.teacher_dtype = dtype

    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The target, not yet whitened: [B, Nt, Ct] tokens after the teacher's own final norm (target tokens),
        or [B, 1, Ct] its CLS / pooled token (cls), or [B, 1, E] its final pooled output (embedding).
        The teacher runs as inference (no autograd records), in ``teacher_dtype`` when set."""
        cast = self.teacher_dtype is not None
        with torch.inference_mode(), torch.autocast(images.device.type, enabled=False) if cast else nullcontext():
            x = images.to(self.teacher_dtype) if cast else images
            if self.target == "embedding":
                t = self.teacher.embedding(x).unsqueeze(1)
            else:
                t = self.teacher(x)
                t = pooled_token(t, self.teacher.num_prefix_tokens) if self.target == "cls" else t
        return t.clone()  # an ordinary tensor: autograd may save it (inference tensors cannot be saved)

    def aligned_tokens(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student tokens [B, N, Cs], target [B, N, Ct]) as the loss compares them: on one grid (tokens), or
        the student's CLS / pooled token [B, 1, Cs] against the teacher's one-token target (cls, embedding)."""
        pred = tokens.final_tokens(self.student, images)  # [B, Ns, Cs]
        if self.target != "tokens":
            return pooled_token(pred, self.prefix), target
        return align_tokens(pred, target, self.grid, self.prefix, self.teacher.grid,
                            self.teacher.num_prefix_tokens, self.align)

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The FD loss of ``images``; ``target``: the teacher's tokens of them when already computed."""
        target = self.target_tokens(images) if target is None else target
        return self.fd_loss(*self.aligned_tokens(images, target))
