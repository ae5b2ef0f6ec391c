"""Eager fast paths for timm modules, patched in place like ``fdfast.patch_model`` patches attention: each
module's class becomes a subclass that overrides ``forward`` only, so parameters, buffers and state dicts stay
timm's (and load strictly into the unpatched classes).

- ``pack_linears(model)``: ``nn.Linear`` -> ``PackedLinear`` and timm ``Mlp`` -> ``PackedMlp`` run on
  ``fdfast.kernels.cpu_linear.linear``: oneDNN-packed bf16 weights for frozen layers on a native-bf16 CPU (the
  teacher), fc1 + GELU as one GEMM there; ``F.linear`` itself everywhere else.
- ``fuse_residuals(model)``: timm BEiT blocks (the FD student) add each branch as
  ``torch.addcmul(x, gamma * keep_mask, branch)``: one op for layer scale, drop path and the residual add instead
  of three (measured: the demo student's forward + backward 183 -> 175 ms on 2 CPU cores). The drop-path mask is
  drawn exactly as timm's ``DropPath`` draws it (same shape, dtype and RNG calls), so runs stay reproducible.
"""
from __future__ import annotations

import torch
from timm.layers.activations import GELU, GELUTanh
from timm.layers.drop import DropPath
from timm.layers.mlp import Mlp
from timm.models.beit import Block as BeitBlock
from torch import nn

from fdfast.kernels.cpu_linear import linear


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose forward is ``cpu_linear.linear``: packed bf16 on a native-bf16 CPU, else F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu_kind(act: nn.Module) -> str | None:
    """"gelu" / "gelu_tanh" for the GELU modules timm builds, None for any other activation."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {GELU: "gelu", GELUTanh: "gelu_tanh"}.get(type(act))


class PackedMlp(Mlp):
    """timm ``Mlp`` with fc1 + GELU as one ``linear`` call (fused where no gradient is needed); timm's own
    forward for other activations, a hidden norm, or active hidden dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = gelu_kind(self.act)
        if kind is None or not isinstance(self.norm, nn.Identity) or (self.training and self.drop1.p > 0):
            return super().forward(x)
        return self.drop2(self.fc2(linear(x, self.fc1.weight, self.fc1.bias, act=kind)))


PACKED_CLASSES = {nn.Linear: PackedLinear, Mlp: PackedMlp}


def pack_linears(model: nn.Module) -> int:
    """Run ``model``'s ``nn.Linear`` and timm ``Mlp`` modules (exact types) on ``cpu_linear.linear``, in place;
    returns how many modules changed (0 when called again)."""
    changed = 0
    for module in model.modules():
        fast = PACKED_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            changed += 1
    return changed


def _residual(x: torch.Tensor, gamma: torch.Tensor, drop_path: nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """x + drop_path(gamma * branch) as one addcmul; the mask drawn as ``timm.layers.drop.drop_path`` draws it."""
    scale = gamma
    if isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0:
        keep = 1 - drop_path.drop_prob
        # timm: (gamma * branch).new_empty(...): gamma * branch has x's dtype (fp32 gamma, fp32 or bf16 branch)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0 and drop_path.scale_by_keep:
            mask.div_(keep)
        scale = gamma * mask
    elif not isinstance(drop_path, (DropPath, nn.Identity)):
        return x + drop_path(gamma * branch)
    return torch.addcmul(x, scale, branch)


class FusedResidualBlock(BeitBlock):
    """timm BEiT ``Block`` with layer scale, drop path and residual add fused per branch (``_residual``); timm's
    forward for blocks without layer scale."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gamma_1 is None or self.gamma_1.dtype != x.dtype:  # timm draws the mask in gamma * branch's dtype
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        x = _residual(x, self.gamma_1, self.drop_path1,
                      self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        return _residual(x, self.gamma_2, self.drop_path2, self.mlp(self.norm2(x)))


def fuse_residuals(model: nn.Module) -> int:
    """Switch ``model``'s timm BEiT blocks (exact type) to ``FusedResidualBlock``, in place; returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is BeitBlock:
            module.__class__ = FusedResidualBlock
            changed += 1
    return changed
