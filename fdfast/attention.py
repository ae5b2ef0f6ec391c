"""fdfast's shared-bias attention as modules: ``RPBAttention`` and ``patch_model`` for timm models.

``patch_model(model)`` swaps ``fdfast.functional.rpb_attention`` into timm's own attention modules in place,
by switching each module's class to a subclass that overrides ``forward`` only (``fdfast.fastpath.swap_forwards``,
the one home of that idiom). Parameters, buffers and their names stay timm's (``relative_position_bias_table``, ``rel_pos_bias.*``, ``cpb_mlp.*``, ...), so
state dicts load strictly into the unpatched timm class and back. Supported:

- ``timm.models.beit.Attention``: BEiT / the FD student; the shared bias (``Beit.rel_pos_bias()``, gathered
  to [H, N, N] once per forward by timm and passed to every block) and/or the block's own table.
- ``timm.layers.attention.Attention``: VisionTransformer / DeiT (no bias).
- ``timm.models.swin_transformer_v2.WindowAttention``: cosine logits with the learned per-head logit scale
  folded into q, the CPB-MLP bias 16 * sigmoid(.) as [H, N, N], the shifted-window mask as [W, N, N].

What the kernel does not do (attention dropout while training, an explicit ``attn_mask``/``is_causal`` in
ViT) falls back to timm's own forward for that call, so outputs never change meaning.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention as TimmAttention
from timm.models.beit import Attention as BeitAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from torch import nn

from fdfast.fastpath import fast_forward, swap_forwards
from fdfast.functional import rpb_attention
from fdfast.kernels.cpu_linear import linear
from fdfast.kernels.rpb_attention import BACKENDS


class RPBAttention(nn.Module):
    """softmax(q k^T * scale + bias + mask) v as a module (no parameters): the functional call with a backend.

    q, k, v [B, H, N, D]; bias [H, N, N] shared by the batch; mask [W, N, N] additive, B = batch * W.
    """

    def __init__(self, scale: float | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"RPBAttention: unknown backend {backend!r}; choose one of {BACKENDS}")
        self.scale, self.backend = scale, backend

    def forward(self, q, k, v, bias=None, mask=None):
        return rpb_attention(q, k, v, bias, mask, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, backend={self.backend!r}"


def _dropout_active(module: nn.Module) -> bool:
    """The kernel has no attention dropout: such training calls take timm's path (FD uses attn_drop 0)."""
    return module.training and module.attn_drop.p > 0


def _split_heads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's fused qkv projection (learnable q/v bias, zero k bias) -> q, k, v [B, H, N, hd] (views)."""
    B, N, _ = x.shape
    if module.q_bias is None:
        qkv = module.qkv(x)
    else:
        qkv_bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
        if getattr(module, "qkv_bias_separate", False):
            qkv = module.qkv(x) + qkv_bias
        else:
            qkv = linear(x, module.qkv.weight, qkv_bias)  # F.linear, or packed bf16 on the CPU
    return qkv.reshape(B, N, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


@fast_forward
class FastBeitAttention(BeitAttention):
    """timm BEiT attention on ``rpb_attention``: shared and/or per-block relative position bias."""

    fdfast_backend = "auto"

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if _dropout_active(self):
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        B, N, _ = x.shape
        q, k, v = _split_heads(self, x)
        bias = None  # [H, N, N]
        if self.relative_position_bias_table is not None:  # per-block table (timm BEiT, fine-tuned FD)
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
            bias = bias.permute(2, 0, 1)
        if shared_rel_pos_bias is not None:  # the FD student's one table, gathered once per forward by Beit
            shared = shared_rel_pos_bias.reshape(-1, N, N)
            bias = shared if bias is None else bias + shared
        x = rpb_attention(q, k, v, bias, scale=self.scale, backend=self.fdfast_backend)
        x = self.proj(x.transpose(1, 2).reshape(B, N, -1))
        return self.proj_drop(x)


@fast_forward
class FastVitAttention(TimmAttention):
    """timm VisionTransformer attention (no bias) on ``rpb_attention``; explicit masks use timm's path."""

    fdfast_backend = "auto"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or _dropout_active(self):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = rpb_attention(q, k, v, scale=self.scale, backend=self.fdfast_backend)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@fast_forward
class FastSwinV2WindowAttention(SwinV2WindowAttention):
    """timm SwinV2 window attention on ``rpb_attention``: cosine logits, CPB bias, shift mask."""

    fdfast_backend = "auto"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if _dropout_active(self):
            return super().forward(x, mask=mask)
        B_, N, _ = x.shape
        q, k, v = _split_heads(self, x)
        # cosine attention: the learned per-head temperature [H, 1, 1] is folded into q, so scale = 1
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        q = (F.normalize(q, dim=-1) * logit_scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)  # continuous position bias
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # [H, N, N]
        bias = 16 * torch.sigmoid(bias)
        x = rpb_attention(q, k, v, bias, mask, scale=1.0, backend=self.fdfast_backend)
        x = self.proj(x.transpose(1, 2).reshape(B_, N, -1))
        return self.proj_drop(x)


# timm class -> its fdfast subclass (exact types only: an unknown subclass may change forward's meaning)
FAST_ATTENTION = {
    BeitAttention: FastBeitAttention,
    TimmAttention: FastVitAttention,
    SwinV2WindowAttention: FastSwinV2WindowAttention,
}


def patch_model(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run every supported timm attention module of ``model`` on fdfast's attention, in place; returns model.

    Only ``forward`` changes (each module's class becomes a subclass of its timm class); parameter and buffer
    names are untouched, so checkpoints stay timm-compatible. Calling it again only changes the backend.
    Raises ValueError when the model holds no supported attention module.
    """
    if backend not in BACKENDS:
        raise ValueError(f"patch_model: unknown backend {backend!r}; choose one of {BACKENDS}")
    swap_forwards(model, FAST_ATTENTION.values())
    fast_classes = set(FAST_ATTENTION.values())
    patched = []
    for name, module in model.named_modules():
        if type(module) not in fast_classes:  # no fast path for this module: timm's class and forward
            continue
        module.fdfast_backend = backend
        if module.attn_drop.p > 0:
            patched.append(f"{name} (attn_drop {module.attn_drop.p} -> timm's path while training)")
        else:
            patched.append(name)
    if not patched:
        raise ValueError(
            f"patch_model: {type(model).__name__} has no attention module fdfast supports; supported are timm's "
            f"{', '.join(c.__module__ + '.' + c.__name__ for c in FAST_ATTENTION)}")
    dropped = [p for p in patched if "attn_drop" in p]
    if dropped:
        warnings.warn(f"patch_model: attention dropout is not fused; {len(dropped)} module(s) use timm's own "
                      f"forward while training, e.g. {dropped[0]}", stacklevel=2)
    return model
