"""Flash attention with a bias shared over the batch (host checks and backend dispatch).

The Triton kernels of this file (issue 4) are added beside the dispatch; ``backend="reference"`` is the
plain-PyTorch specification in ``reference.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "reference", "sdpa")


def rpb_attention(q, k, v, bias=None, mask=None, scale=None, backend="auto"):
    """softmax(q k^T * scale + bias + mask) v; q, k, v [B,H,N,D]; bias [H,N,N]; mask [W,N,N]."""
    if backend not in BACKENDS:
        raise ValueError(f"rpb_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    attn_mask = None
    if bias is not None:
        attn_mask = bias.unsqueeze(0).to(q.dtype)
    if mask is not None:
        B, H, N, _ = q.shape
        W = mask.shape[0]
        m = mask.to(q.dtype).view(1, W, 1, N, N).expand(B // W, W, 1, N, N).reshape(B, 1, N, N)
        attn_mask = m if attn_mask is None else attn_mask + m
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
