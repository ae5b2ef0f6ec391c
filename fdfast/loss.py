"""FDLoss: the paper's 1x1 projection (a Linear) + whitened smooth-L1 objective as an nn.Module."""
from __future__ import annotations

import torch
from torch import nn

from fdfast.functional import fd_loss


class FDLoss(nn.Module):
    """loss = mean smooth_l1_beta(proj(student_tokens) - layernorm_no_affine(teacher_tokens)).

    ``proj`` is ``nn.Linear(student_dim, teacher_dim)`` (the paper's 1x1 conv); the teacher tokens are the
    frozen target (no gradient). ``backend`` selects the kernel: "auto" (Triton on CUDA, "torch" on the
    CPU), "triton", "torch" (row-chunked CPU path: no [B,N,Ct] fp32 intermediates) or "reference".
    """

    def __init__(self, student_dim: int, teacher_dim: int, beta: float = 2.0, eps: float = 1e-5,
                 whiten: bool = True, backend: str = "auto", kind: str = "smooth_l1"):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)
        self.beta, self.eps, self.whiten, self.backend, self.kind = beta, eps, whiten, backend, kind

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        return fd_loss(student_tokens, teacher_tokens, self.proj.weight, self.proj.bias, beta=self.beta,
                       eps=self.eps, whiten=self.whiten, backend=self.backend, kind=self.kind)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eps={self.eps}, whiten={self.whiten}, backend={self.backend!r}, kind={self.kind!r}"
