"""Flash attention with an additive bias shared over the batch: Triton kernels, autograd.Function, dispatch.

    out = softmax(q k^T * scale + bias[h] + mask[b % W]) v        q, k, v, out: [B, H, N, D]

``bias`` [H, N, N] is the relative position bias of the FD student (one table for the whole batch, learned);
``mask`` [W, N, N] is SwinV2's additive shift mask (B = batch * W windows, no gradient). The kernels never
store an N x N matrix per batch element:

- forward: one program per (query block, batch, head); online softmax over key blocks in base 2 with fp32
  accumulators; saves the log-sum-exp (base 2) per row for the backward.
- backward: FlashAttention-2 split without atomics. ``_bwd_dkdv`` owns a key block and loops over query
  blocks (dk, dv); ``_bwd_dq_dbias`` owns a query block of one head and loops over a chunk of the batch and
  all key blocks (dq), adding ds into a per-chunk dbias partial that only it touches. The partials
  [C, H, N, N] are summed over C in a fixed order on the host: dbias is deterministic, bit for bit.
- head dims that are not a power of two (80) are padded to the next one inside, with masked loads.

Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "reference" (the fp32 specification
in ``reference.py``), "sdpa" (PyTorch SDPA with the bias as a float mask), and "auto": Triton on CUDA
when there is a bias or mask and D <= 128 (plain attention goes to SDPA's flash kernel), SDPA on the CPU
(the fastest correct CPU path; it also learns the bias). Under torch.compile the Triton path is a graph break.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .reference import rpb_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without Triton still has the "sdpa" and "reference" paths
    triton = None

BACKENDS = ("auto", "triton", "reference", "sdpa")
LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logits_base2(q, kt, Bias, Mask, h, w, offs_m, offs_n, row_ok, col_ok,
                      s_bh, s_bm, s_bn, s_mw, s_mm, s_mn, qk_scale_log2,
                      HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of (q k^T * scale + bias + mask) * log2(e); padded keys are -inf."""
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale_log2
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            b = tl.load(Bias + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn, mask=tile_ok, other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        if HAS_MASK:
            m = tl.load(Mask + w * s_mw + offs_m[:, None] * s_mm + offs_n[None, :] * s_mn, mask=tile_ok, other=0.0)
            s += m.to(tl.float32) * 1.4426950408889634
        return tl.where(col_ok[None, :], s, float("-inf"))

    @triton.jit
    def _fwd(Q, K, V, Bias, Mask, Out, Lse,
             s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
             s_ob, s_oh, s_on, s_od, s_bh, s_bm, s_bn, s_mw, s_mm, s_mn,
             H, N, D, W, qk_scale_log2,
             HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        w = b % W  # the window of this batch element (SwinV2 lays windows out as batch * W + w)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < D
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 logits)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            kt = tl.load(K + b * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            s = _logits_base2(q, kt, Bias, Mask, h, w, offs_m, offs_n, row_ok, col_ok,
                              s_bh, s_bm, s_bn, s_mw, s_mm, s_mn, qk_scale_log2, HAS_BIAS, HAS_MASK, PRECISION)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row whose logits are all -inf so far (only with a -inf user mask) must not produce nan
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + pid_bh * N + offs_m, lse, mask=row_ok)

    @triton.jit
    def _bwd_delta(Out, dOut, Delta, s_ob, s_oh, s_on, s_od, s_gb, s_gh, s_gn, s_gd, H, N, D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta = rowsum(dO * O) in fp32: the softmax backward's correction term, [B*H, N]."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_m < N)[:, None] & (offs_d < D)[None, :]
        o = tl.load(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od, mask=ok, other=0.0)
        do = tl.load(dOut + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + pid_bh * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _bwd_dkdv(Q, K, V, Bias, Mask, dOut, Lse, Delta, dK, dV,
                  s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                  s_gb, s_gh, s_gn, s_gd, s_bh, s_bm, s_bn, s_mw, s_mm, s_mn,
                  H, N, D, W, sm_scale, qk_scale_log2,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dv = P^T dO and dk = scale * dS^T q for one key block; loops over all query blocks."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        w = b % W
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < N
        d_ok = offs_d < D
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0)
        kt = tl.trans(k)  # [BLOCK_D, BLOCK_N]
        vt = tl.trans(v)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            qo_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                        mask=qo_ok, other=0.0)
            do = tl.load(dOut + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
                         mask=qo_ok, other=0.0)
            lse = tl.load(Lse + pid_bh * N + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + pid_bh * N + offs_m, mask=row_ok, other=0.0)
            s = _logits_base2(q, kt, Bias, Mask, h, w, offs_m, offs_n, row_ok, col_ok,
                              s_bh, s_bm, s_bn, s_mw, s_mm, s_mn, qk_scale_log2, HAS_BIAS, HAS_MASK, PRECISION)
            p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])  # d loss / d logits (natural units)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(dK + pid_bh * N * D + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(dK.dtype.element_ty),
                 mask=kv_ok)
        tl.store(dV + pid_bh * N * D + offs_n[:, None] * D + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _bwd_dq_dbias(Q, K, V, Bias, Mask, dOut, Lse, Delta, dQ, dBiasPart,
                      s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                      s_gb, s_gh, s_gn, s_gd, s_bh, s_bm, s_bn, s_mw, s_mm, s_mn,
                      B, H, N, D, W, sm_scale, qk_scale_log2,
                      HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STORE_DBIAS: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dq for one query block of one head over a chunk of the batch; dbias partial of that chunk.

        Grid (query blocks, C chunks, H). Chunk c covers batch elements [c * chunk, (c + 1) * chunk); the program
        is the only writer of dBiasPart[c, h, its rows, :], so the read-add-write needs no atomics.
        """
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        h = tl.program_id(2)
        chunk = (B + tl.num_programs(1) - 1) // tl.num_programs(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < D
        qo_ok = row_ok[:, None] & d_ok[None, :]
        b_end = tl.minimum(pid_c * chunk + chunk, B)
        for b in range(pid_c * chunk, b_end):
            w = b % W
            bh = b * H + h
            q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                        mask=qo_ok, other=0.0)
            do = tl.load(dOut + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
                         mask=qo_ok, other=0.0)
            lse = tl.load(Lse + bh * N + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * N + offs_m, mask=row_ok, other=0.0)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                col_ok = offs_n < N
                kv_ok = col_ok[:, None] & d_ok[None, :]
                k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                            mask=kv_ok, other=0.0)
                v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                            mask=kv_ok, other=0.0)
                s = _logits_base2(q, tl.trans(k), Bias, Mask, h, w, offs_m, offs_n, row_ok, col_ok,
                                  s_bh, s_bm, s_bn, s_mw, s_mm, s_mn, qk_scale_log2, HAS_BIAS, HAS_MASK, PRECISION)
                tile_ok = row_ok[:, None] & col_ok[None, :]
                p = tl.where(tile_ok, tl.math.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N], fp32
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                if STORE_DBIAS:
                    ptr = dBiasPart + (pid_c * H + h) * N * N + offs_m[:, None] * N + offs_n[None, :]
                    tl.store(ptr, tl.load(ptr, mask=tile_ok, other=0.0) + ds, mask=tile_ok)
            tl.store(dQ + bh * N * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(dQ.dtype.element_ty),
                     mask=qo_ok)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
# GPU tiles per kernel, (BLOCK_M, BLOCK_N, num_warps), for fp16 / bf16 and head dims padded to <= 64 or to
# 128. Chosen offline (triton.compile for sm_90 + ptxas -v, no GPU lent yet): none spills registers with or
# without bias and mask (4 warps spilled in the dq/dbias kernel). Not yet timed on hardware.
_GPU_TILES = {
    ("fwd", 64): (64, 64, 8), ("dkdv", 64): (64, 64, 8), ("dq", 64): (64, 32, 8),
    ("fwd", 128): (64, 32, 8), ("dkdv", 128): (64, 32, 8), ("dq", 128): (32, 32, 8),
}
# fp32 inputs use exact fp32 dot products (no tensor cores), which need far more registers: small tiles.
# fp32 is the correctness path; training runs under AMP (bf16 / fp16).
_GPU_TILES_FP32 = (32, 32, 4)


def _tiles(kernel: str, N: int, D: int, dtype: torch.dtype, device: torch.device,
           override: tuple) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of one kernel; BLOCK_D is D padded to a power of two >= 16.

    The interpreter pays per program, so on the CPU the tiles cover up to 128 tokens. ``override``
    (block_m, block_n) comes from tests; None entries keep the default.
    """
    block_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":
        whole = max(16, min(128, triton.next_power_of_2(N)))
        bm, bn, warps = whole, whole, 4
    elif dtype == torch.float32:
        bm, bn, warps = _GPU_TILES_FP32
    else:
        bm, bn, warps = _GPU_TILES[(kernel, 64 if block_d <= 64 else 128)]
    return override[0] or bm, override[1] or bn, block_d, warps


def _num_chunks(B: int, H: int, m_blocks: int, device: torch.device, store_dbias: bool) -> int:
    """How many batch chunks the dq/dbias kernel splits the batch into (one dbias partial each).

    Without a bias gradient every batch element is its own program. With one, enough chunks to fill the GPU
    (about 4 programs per SM) while keeping the [C, H, N, N] fp32 partials small; on the CPU one chunk.
    """
    if not store_dbias:
        return B
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(1, m_blocks * H))
    chunk = triton.cdiv(B, min(B, want))
    return triton.cdiv(B, chunk)


def _strides3(t):
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _precision(q) -> str:
    # fp32 inputs get true fp32 dot products (TF32 would be ~1e-3 off); fp16 / bf16 ignore this
    return "ieee" if q.dtype == torch.float32 else "tf32"


class _RPBAttentionTriton(torch.autograd.Function):
    """Triton forward / backward; the saved state is q, k, v, bias, mask, out and the base-2 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, block_m=None, block_n=None, num_chunks=None):
        B, H, N, D = q.shape
        # the gathered bias of timm is a permuted view: one small [H, N, N] copy gives coalesced tile loads
        bias = bias.contiguous() if bias is not None else None
        mask = mask.contiguous() if mask is not None else None
        BM, BN, BD, warps = _tiles("fwd", N, D, q.dtype, q.device, (block_m, block_n))
        W = mask.shape[0] if mask is not None else 1
        out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)  # base 2
        dummy = q  # never read when HAS_BIAS / HAS_MASK is False
        _fwd[(triton.cdiv(N, BM), B * H)](
            q, k, v, bias if bias is not None else dummy, mask if mask is not None else dummy, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_strides3(bias), *_strides3(mask),
            H, N, D, W, scale * LOG2E,
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, PRECISION=_precision(q),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=2)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.scale, ctx.override, ctx.num_chunks = scale, (block_m, block_n), num_chunks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        W = mask.shape[0] if mask is not None else 1
        scale = ctx.scale
        bias_arg = bias if bias is not None else q
        mask_arg = mask if mask is not None else q
        strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *_strides3(bias), *_strides3(mask))
        flags = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None, PRECISION=_precision(q))

        BM, _, BD, _ = _tiles("fwd", N, D, q.dtype, q.device, ctx.override)
        delta = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
        _bwd_delta[(triton.cdiv(N, BM), B * H)](out, dout, delta, *out.stride(), *dout.stride(), H, N, D,
                                                BLOCK_M=BM, BLOCK_D=BD)

        dk = torch.empty((B, H, N, D), device=q.device, dtype=k.dtype)
        dv = torch.empty((B, H, N, D), device=q.device, dtype=v.dtype)
        BM, BN, BD, warps = _tiles("dkdv", N, D, q.dtype, q.device, ctx.override)
        _bwd_dkdv[(triton.cdiv(N, BN), B * H)](
            q, k, v, bias_arg, mask_arg, dout, lse, delta, dk, dv, *strides,
            H, N, D, W, scale, scale * LOG2E, **flags, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
            num_warps=warps, num_stages=2)

        store_dbias = bias is not None and ctx.needs_input_grad[3]
        BM, BN, BD, warps = _tiles("dq", N, D, q.dtype, q.device, ctx.override)
        m_blocks = triton.cdiv(N, BM)
        C = _num_chunks(B, H, m_blocks, q.device, store_dbias)
        if store_dbias and ctx.num_chunks:
            C = min(B, ctx.num_chunks)
        dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
        # fp32 dbias partial per batch chunk, zeroed so the kernel can always read-add-write its own tiles
        dbias_part = torch.zeros((C, H, N, N), device=q.device, dtype=torch.float32) if store_dbias else lse
        _bwd_dq_dbias[(m_blocks, C, H)](
            q, k, v, bias_arg, mask_arg, dout, lse, delta, dq, dbias_part, *strides,
            B, H, N, D, W, scale, scale * LOG2E, **flags, STORE_DBIAS=store_dbias,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=2)
        dbias = None
        if store_dbias:
            # fixed-order reduction of the C partials: deterministic for a given shape and device
            dbias = (dbias_part[0] if C == 1 else dbias_part.sum(0)).to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Host checks and dispatch
# ---------------------------------------------------------------------------------------------------------
def check_rpb_inputs(q, k, v, bias, mask) -> None:
    """Raise ValueError naming the problem before any launch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rpb_attention: {name} must be [B, H, N, D], got {shape}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"rpb_attention: q, k, v must have the same [B, H, N, D] shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)} (D mismatch or different token counts)")
    if not q.is_floating_point() or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"rpb_attention: q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}; cast them (or run under torch.autocast) first")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"rpb_attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    B, H, N, _ = q.shape
    for name, t, lead, what in (("bias", bias, H, "heads H"), ("mask", mask, None, "windows W")):
        if t is None:
            continue
        if t.dim() != 3 or t.shape[1:] != (N, N) or (lead is not None and t.shape[0] != lead):
            want = f"[{lead}, {N}, {N}]" if lead is not None else f"[W, {N}, {N}]"
            raise ValueError(f"rpb_attention: {name} must be {want} ({what}, query tokens, key tokens) for q of "
                             f"shape {tuple(q.shape)}, got {tuple(t.shape)}; squeeze a leading batch dim of 1 "
                             f"(timm's [1, H, N, N]) before passing it")
        if not t.is_floating_point():
            raise ValueError(f"rpb_attention: {name} must be floating point (it is added to the logits), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"rpb_attention: {name} is on {t.device} but q is on {q.device}")
    if mask is not None and B % mask.shape[0]:
        raise ValueError(f"rpb_attention: batch {B} is not a multiple of the {mask.shape[0]} mask windows "
                         f"(q must be [batch * W, H, N, D], windows innermost)")
    if mask is not None and mask.requires_grad:
        raise ValueError("rpb_attention: mask gets no gradient; pass mask.detach() (it is a fixed shift mask)")


def _sdpa(q, k, v, bias, mask, scale):
    """PyTorch SDPA with bias (+ mask) as one float attn_mask; autograd sums its gradient over the batch."""
    attn_mask = None
    if bias is not None:
        attn_mask = bias.unsqueeze(0).to(q.dtype)  # [1, H, N, N]
    if mask is not None:
        B, H, N, _ = q.shape
        W = mask.shape[0]
        m = mask.to(q.dtype).view(1, W, 1, N, N).expand(B // W, W, 1, N, N).reshape(B, 1, N, N)
        attn_mask = m if attn_mask is None else attn_mask + m  # [B, H, N, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _triton_usable(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))


def rpb_attention_triton(q, k, v, bias=None, mask=None, scale=None, block_m=None, block_n=None, num_chunks=None):
    """The Triton path with explicit tile sizes and dbias batch chunks (tests use them to cover the multi-block
    and multi-partial code on small inputs); None picks them from the shape and device."""
    check_rpb_inputs(q, k, v, bias, mask)
    if not _triton_usable(q.device):
        raise ValueError(f"rpb_attention: backend='triton' needs a CUDA tensor (or a CPU tensor with "
                         f"TRITON_INTERPRET=1 set before triton is imported); got a {q.device.type} tensor"
                         + ("" if triton is not None else " and triton is not installed"))
    if q.shape[-1] > 128:
        raise ValueError(f"rpb_attention: the Triton kernel takes head dims up to 128, got D = {q.shape[-1]}; "
                         f"use backend='sdpa' for wider heads")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"rpb_attention: {name} must be a power of two >= 16, got {blk}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _launch(q, k, v, bias, mask, scale, block_m, block_n, num_chunks)


@torch.compiler.disable
def _launch(*args):
    # torch.compile (per-block compile in fdfast.distributed) breaks the graph here and runs the kernels
    # eagerly: they are already fused, and tracing host-side launch code buys nothing
    return _RPBAttentionTriton.apply(*args)


def rpb_attention(q, k, v, bias=None, mask=None, scale=None, backend="auto"):
    """softmax(q k^T * scale + bias + mask) v; q, k, v [B,H,N,D]; bias [H,N,N]; mask [W,N,N] (B = batch*W).

    ``scale`` defaults to 1/sqrt(D). ``backend``: "auto" (Triton on CUDA with a bias or mask, else SDPA), "triton",
    "reference" (the fp32 specification), "sdpa".
    """
    if backend not in BACKENDS:
        raise ValueError(f"rpb_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        # without bias and mask PyTorch's own flash kernel (SDPA) is already the fastest exact attention
        has_extra = bias is not None or mask is not None
        fits = q.dim() == 4 and q.shape[-1] <= 128
        backend = "triton" if (q.device.type == "cuda" and triton is not None and has_extra and fits) else "sdpa"
    if backend == "triton":
        return rpb_attention_triton(q, k, v, bias, mask, scale)
    check_rpb_inputs(q, k, v, bias, mask)
    if backend == "reference":
        return rpb_attention_reference(q, k, v, bias, mask, scale)
    return _sdpa(q, k, v, bias, mask, scale)
