"""Flash attention with an additive bias shared over the batch: Triton kernels, autograd.Function, dispatch.

    out = softmax(q k^T * scale + bias[h] + mask[b % W]) v        q, k, v, out: [B, H, N, D]

``bias`` [H, N, N] is the relative position bias of the FD student (one table for the whole batch, learned);
``mask`` [W, N, N] is SwinV2's additive shift mask (B = batch * W windows, no gradient). The kernels never
store an N x N matrix per batch element:

- once per call, bias and mask are added, multiplied by log2(e) and padded to Np = N rounded up to 16 in one
  fp32 table [W, H, Np, Np] ("extra"): tiles load it without re-scaling, from 16-aligned rows (as vectors).
- forward: one program per (batch x head, query block), B*H on grid axis 0 (limit 2**31 - 1, not 65,535);
  online softmax over key blocks in base 2 with fp32 accumulators; saves the log-sum-exp (base 2) per row.
- backward, small N (Swin windows: N <= 64 at head dim 32, N <= 32 at 64; one tile holds all of q k^T): a
  dk/dv kernel per (batch element, head), and a dq kernel per (batch chunk, head) that holds the chunk's dbias
  in registers and stores it once (one kernel for both spills registers on sm_90; see SMALL_PATH_WARPS).
- backward, larger N: FlashAttention-2 split. ``_attn_bwd_dkdv`` owns a key block (dk, dv); ``_attn_bwd_dq``
  owns a query block of one head and loops over a chunk of the batch and all key blocks (dq), adding ds into
  the chunk's dbias partial with atomic adds of which it is the only issuer (single writer, program order:
  deterministic, and no load-after-store for the software pipeliner to reorder).
- the [C, H, Np, Np] fp32 partials are summed over C in a fixed order on the host: dbias repeats bit for bit.
- on CUDA the tiles are autotuned per (B, N, D, mask, dbias or not, dtype) over a short config list (pruned by
  head dim; every launch is compiled for sm_90 without a GPU by bench/compile_report.py). Autotuning can pick
  another config in another process: results are bit-identical within a process, close (not equal) across
  processes; ``autotune_choices()`` says what this process chose.
- head dims that are not a power of two (80) are padded to the next one inside, with masked loads.

Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "reference" (the fp32 specification
in ``reference.py``), "sdpa" (PyTorch SDPA with the bias as a float mask), and "auto": Triton on CUDA
when there is a bias or mask and D <= 128 (plain attention goes to SDPA's flash kernel, fp64 to the
reference); on the CPU in bf16 / fp16 ``_cpu_low_precision_attention`` (bmm-based, logits and softmax in fp32,
the rest in the input dtype); SDPA on the CPU in fp32. Under torch.compile the Triton path is a graph break.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .choices import ATTENTION_BACKENDS
from .reference import rpb_attention_reference
from .utils import (batch_chunks, dot_precision, exact_bf16_products, launch, next_pow2, padded_tokens, tl, triton,
                    triton_usable)


BACKENDS = ATTENTION_BACKENDS
LOG2E = 1.4426950408889634
# the small-N backward (whole [N, N] tiles in registers): (padded head dim, next_pow2(N)) -> the warp counts
# that compile without spills on sm_90 for both of its kernels (bench/compile_report.py), for bf16 (the
# training dtype) and for fp16 / fp32; shapes not listed take the general path
SMALL_PATH_WARPS = {
    "bf16": {(32, 16): (4, 8, 16), (32, 32): (4, 8, 16), (32, 64): (8,), (64, 16): (4, 8, 16), (64, 32): (4, 8, 16)},
    "other": {(32, 16): (4, 8, 16), (32, 32): (4, 8, 16), (64, 16): (4, 8, 16), (64, 32): (8, 16)},
}

# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logits_base2(q, kt, Extra, plane, offs_m, offs_n, col_ok, NP, qk_scale_log2,
                      HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr = False):
        """One [BLOCK_M, BLOCK_N] tile of (q k^T * scale + bias + mask) * log2(e); padded keys are -inf.
        Extra is the pre-scaled, padded [W * H, NP, NP] table; NP % 16 == 0 keeps its rows aligned.
        TRANSPOSED: called as (k, q^T) for the tile's transpose [keys, queries]; col_ok then masks the rows."""
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale_log2
        if HAS_EXTRA:
            ok = (offs_m < NP)[:, None] & (offs_n < NP)[None, :]
            if TRANSPOSED:
                s += tl.load(Extra + plane * NP * NP + offs_n[None, :] * NP + offs_m[:, None], mask=ok, other=0.0)
            else:
                s += tl.load(Extra + plane * NP * NP + offs_m[:, None] * NP + offs_n[None, :], mask=ok, other=0.0)
        if TRANSPOSED:
            return tl.where(col_ok[:, None], s, float("-inf"))
        return tl.where(col_ok[None, :], s, float("-inf"))

    @triton.jit
    def _attn_fwd(Q, K, V, Extra, Out, Lse,
                  s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                  B, H, N, D, W, NP, qk_scale_log2,
                  HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Grid (B * H, query blocks). Out [B, H, N, D] and Lse [B * H, N] are contiguous. B is read by the
        autotuner's key only (the grid decides how many programs share the GPU, so the best tile depends on it)."""
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)  # int64: B * strides can pass 2**31
        h = pid_bh % H
        plane = (b % W) * H + h  # SwinV2 lays windows out as batch * W + w
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
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
            s = _logits_base2(q, kt, Extra, plane, offs_m, offs_n, col_ok, NP, qk_scale_log2, HAS_EXTRA, PRECISION)
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
        bh = pid_bh.to(tl.int64)
        tl.store(Out + (bh * N + offs_m[:, None]) * D + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + bh * N + offs_m, lse, mask=row_ok)

    @triton.jit
    def _load_tile(base, N, D, s_n, s_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """[BLOCK_N, BLOCK_D] tile of a [N, D] matrix at ``base`` with strides (s_n, s_d); zero outside."""
        rows = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        return tl.load(base + rows[:, None] * s_n + cols[None, :] * s_d,
                       mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0)

    @triton.jit
    def _store_tile(base, value, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Store the in-bounds part of a [BLOCK_N, BLOCK_D] tile into a contiguous [N, D] matrix at ``base``."""
        rows = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        tl.store(base + rows[:, None] * D + cols[None, :], value.to(base.dtype.element_ty),
                 mask=(rows < N)[:, None] & (cols < D)[None, :])

    @triton.jit
    def _attn_bwd_small(Q, K, V, Extra, Out, dOut, Lse, dQ, dK, dV, DBiasPart,
                        s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                        s_gb, s_gh, s_gn, s_gd, B, H, N, D, W, NP, sm_scale, qk_scale_log2,
                        HAS_EXTRA: tl.constexpr, STORE_DBIAS: tl.constexpr, DKDV: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """Backward for N <= BLOCK (one tile holds all of q k^T). Grid (C batch chunks, H); the program loops
        over the batch elements of its chunk. DKDV: dk and dv (keys on rows, as FA2's key loop, so neither
        needs a register transpose). Else: dq, with ds summed over the chunk in registers and the chunk's
        dbias partial DBiasPart[c, h] stored once. (One kernel doing both spills on sm_90 at N = 64.)"""
        pid_c = tl.program_id(0)
        h = tl.program_id(1)
        chunk = (B + tl.num_programs(0) - 1) // tl.num_programs(0)
        offs = tl.arange(0, BLOCK)  # query and key index alike
        n_ok = offs < N
        tile_ok = n_ok[:, None] & n_ok[None, :]
        dbias = tl.zeros([BLOCK, BLOCK], tl.float32)
        for b32 in range(pid_c * chunk, tl.minimum(pid_c * chunk + chunk, B)):
            b = tl.cast(b32, tl.int64)
            bh = b * H + h
            plane = (b % W) * H + h
            q = _load_tile(Q + b * s_qb + h * s_qh, N, D, s_qn, s_qd, BLOCK, BLOCK_D)
            k = _load_tile(K + b * s_kb + h * s_kh, N, D, s_kn, s_kd, BLOCK, BLOCK_D)
            v = _load_tile(V + b * s_vb + h * s_vh, N, D, s_vn, s_vd, BLOCK, BLOCK_D)
            do = _load_tile(dOut + b * s_gb + h * s_gh, N, D, s_gn, s_gd, BLOCK, BLOCK_D)
            o = _load_tile(Out + bh * N * D, N, D, D, 1, BLOCK, BLOCK_D)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O): the softmax correction
            lse = tl.load(Lse + bh * N + offs, mask=n_ok, other=0.0)
            if DKDV:
                st = _logits_base2(k, tl.trans(q), Extra, plane, offs, offs, n_ok, NP, qk_scale_log2,
                                   HAS_EXTRA, PRECISION, TRANSPOSED=True)  # [keys, queries]
                pt = tl.where(tile_ok, tl.math.exp2(st - lse[None, :]), 0.0)
                dv = tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :])  # (d loss / d logits)^T, natural units
                dk = tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
                _store_tile(dK + bh * N * D, dk * sm_scale, N, D, BLOCK, BLOCK_D)
                _store_tile(dV + bh * N * D, dv, N, D, BLOCK, BLOCK_D)
            else:
                s = _logits_base2(q, tl.trans(k), Extra, plane, offs, offs, n_ok, NP, qk_scale_log2,
                                  HAS_EXTRA, PRECISION)
                p = tl.where(tile_ok, tl.math.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])  # d loss / d logits, natural units
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                _store_tile(dQ + bh * N * D, dq * sm_scale, N, D, BLOCK, BLOCK_D)
                if STORE_DBIAS:
                    dbias += ds
        if STORE_DBIAS and not DKDV:
            part = DBiasPart + (pid_c * H + h).to(tl.int64) * NP * NP
            tl.store(part + offs[:, None] * NP + offs[None, :], dbias, mask=(offs < NP)[:, None] & (offs < NP)[None, :])

    @triton.jit
    def _attn_bwd_delta(Out, dOut, Delta, s_gb, s_gh, s_gn, s_gd, H, N, D,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta = rowsum(dO * O) in fp32: the softmax backward's correction term, [B*H, N]. Grid (B*H, blocks)."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_m < N)[:, None] & (offs_d < D)[None, :]
        o = tl.load(Out + (bh * N + offs_m[:, None]) * D + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(dOut + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + bh * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, Extra, dOut, Lse, Delta, dK, dV,
                       s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                       s_gb, s_gh, s_gn, s_gd, B, H, N, D, W, NP, sm_scale, qk_scale_log2,
                       HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dv = P^T dO and dk = scale * dS^T q for one key block, looping over all query blocks.
        Grid (B*H, key blocks); B only for the autotuner's key."""
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        plane = (b % W) * H + h
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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
        bh = pid_bh.to(tl.int64)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            qo_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=qo_ok,
                        other=0.0)
            do = tl.load(dOut + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
                         mask=qo_ok, other=0.0)
            lse = tl.load(Lse + bh * N + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * N + offs_m, mask=row_ok, other=0.0)
            s = _logits_base2(q, kt, Extra, plane, offs_m, offs_n, col_ok, NP, qk_scale_log2, HAS_EXTRA, PRECISION)
            p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])  # d loss / d logits (natural units)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        out_ptr = (bh * N + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(dK + out_ptr, (dk * sm_scale).to(dK.dtype.element_ty), mask=kv_ok)
        tl.store(dV + out_ptr, dv.to(dV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, Extra, dOut, Lse, Delta, dQ, DBiasPart,
                     s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                     s_gb, s_gh, s_gn, s_gd, B, H, N, D, W, NP, sm_scale, qk_scale_log2,
                     HAS_EXTRA: tl.constexpr, STORE_DBIAS: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dq for one query block of one head over a chunk of the batch, and that chunk's dbias partial.

        Grid (C chunks, H, query blocks). The program is the only one adding into DBiasPart[c, h, its rows, :],
        so its atomic adds land in its own program order: deterministic (and the partial is zeroed first).
        """
        pid_c = tl.program_id(0)
        h = tl.program_id(1)
        chunk = (B + tl.num_programs(0) - 1) // tl.num_programs(0)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < D
        qo_ok = row_ok[:, None] & d_ok[None, :]
        part = DBiasPart + (pid_c * H + h).to(tl.int64) * NP * NP
        for b32 in range(pid_c * chunk, tl.minimum(pid_c * chunk + chunk, B)):
            b = tl.cast(b32, tl.int64)
            bh = b * H + h
            plane = (b % W) * H + h
            q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=qo_ok,
                        other=0.0)
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
                s = _logits_base2(q, tl.trans(k), Extra, plane, offs_m, offs_n, col_ok, NP, qk_scale_log2,
                                  HAS_EXTRA, PRECISION)
                tile_ok = row_ok[:, None] & col_ok[None, :]
                p = tl.where(tile_ok, tl.math.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N], fp32
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                if STORE_DBIAS:
                    tl.atomic_add(part + offs_m[:, None] * NP + offs_n[None, :], ds, mask=tile_ok, sem="relaxed")
            tl.store(dQ + (bh * N + offs_m[:, None]) * D + offs_d[None, :], (dq * sm_scale).to(dQ.dtype.element_ty),
                     mask=qo_ok)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
# Autotune candidates per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages, largest padded head dim), for fp16 /
# bf16; fp32 (IEEE products, no tensor cores) keeps only the 32 x 32 tiles. Every fp16 / bf16 candidate compiles
# for sm_90 without spills and within shared memory at the head dims it is offered for (bench/compile_report.py
# compiles exactly this list; fp32 backward still spills at head dims >= 64: fp32 is the correctness path).
# Not yet timed on hardware: the tuner picks among them on the device.
TUNE_CONFIGS = {
    "fwd": [(128, 64, 8, 3, 64), (128, 32, 8, 3, 128), (64, 64, 4, 3, 128), (64, 64, 8, 2, 128),
            (128, 128, 8, 2, 64), (32, 32, 4, 2, 128), (32, 32, 8, 2, 128)],
    "dkdv": [(64, 64, 8, 2, 128), (32, 64, 4, 2, 64), (32, 128, 8, 2, 64), (32, 32, 4, 2, 128), (32, 32, 8, 2, 128)],
    "dq": [(64, 64, 8, 2, 128), (64, 32, 4, 2, 64), (128, 64, 8, 2, 64), (32, 32, 4, 2, 128), (32, 32, 8, 2, 64)],
    # BLOCK is next_pow2(N); only the warps are tuned, among SMALL_PATH_WARPS
    "small": [(0, 0, 4, 1, 64), (0, 0, 8, 1, 64), (0, 0, 16, 1, 64)],
}
FP32_MAX_TILE = 32 * 32
DELTA_BLOCK_M = 64


def _small_warps(block_d: int, block: int, dtype: torch.dtype) -> tuple:
    table = SMALL_PATH_WARPS["bf16" if dtype == torch.bfloat16 else "other"]
    return table.get((max(32, block_d), block), ())


def _small_path(N: int, D: int, dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """Whether the small-N backward runs: on CUDA where it compiles without spills, in the interpreter (no
    register limits) for every N <= 64, so the CPU tests cover the code the GPU runs for Swin's N = 49."""
    if device is not None and device.type != "cuda":
        return next_pow2(N) <= 64
    return bool(_small_warps(next_pow2(D), next_pow2(N), dtype))


def tune_configs(kernel: str, block_d: int, dtype: torch.dtype, block: int | None = None) -> list:
    """The autotune candidates of ``kernel`` that fit head dim ``block_d`` at ``dtype`` (also the report's list);
    ``block``: the small-N kernel's tile."""
    found = []
    half = dtype in (torch.float16, torch.bfloat16)
    for bm, bn, warps, stages, max_d in TUNE_CONFIGS[kernel]:
        if kernel == "small":
            fits = warps in _small_warps(block_d, block, dtype)
        else:
            fits = block_d <= max_d and (half or bm * bn <= FP32_MAX_TILE)
        if fits:
            meta = {} if kernel == "small" else {"BLOCK_M": bm, "BLOCK_N": bn}
            found.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return found


def _tuned(kernel: str, fn, reset_to_zero=None):
    def prune(configs, named_args, **kwargs):
        keep = {(c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps, c.num_stages)
                for c in tune_configs(kernel, kwargs["BLOCK_D"], named_args["Q"].dtype, kwargs.get("BLOCK"))}
        return [c for c in configs if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps,
                                       c.num_stages) in keep]

    every = [triton.Config({} if kernel == "small" else {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s, _ in TUNE_CONFIGS[kernel]]
    # key: the batch (it sets how many programs share the GPU), N, head dim, bias/mask present, windows, and the
    # flags that change the kernel's work (STORE_DBIAS: the dbias atomics / stores); the autotuner adds every
    # tensor argument's dtype. Every name must be an argument of ``fn``: Triton skips unknown names silently.
    key = ["B", "N", "BLOCK_D", "HAS_EXTRA", "W"] + {"small": ["DKDV", "STORE_DBIAS"], "dq": ["STORE_DBIAS"]}.get(
        kernel, [])
    return triton.autotune(every, key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero)(fn)


if triton is not None:
    _attn_fwd_tuned = _tuned("fwd", _attn_fwd)
    _attn_bwd_dkdv_tuned = _tuned("dkdv", _attn_bwd_dkdv)
    _attn_bwd_dq_tuned = _tuned("dq", _attn_bwd_dq, reset_to_zero=["DBiasPart"])  # it accumulates
    _attn_bwd_small_tuned = _tuned("small", _attn_bwd_small)
    TUNED = {"attn_fwd": _attn_fwd_tuned, "attn_bwd_dkdv": _attn_bwd_dkdv_tuned, "attn_bwd_dq": _attn_bwd_dq_tuned,
             "attn_bwd_small": _attn_bwd_small_tuned}


def autotune_choices() -> list:
    """What the autotuners chose in this process: one dict per (kernel, key) with the key's named values and the
    chosen tiles, warps and stages. Benches and bench/gpu_check.sh record it beside their timings (another
    process may choose differently, see the module docstring)."""
    rows = []
    for name, tuner in (TUNED.items() if triton is not None else ()):
        names = [k for k in tuner.keys if k in tuner.arg_names]
        for key, cfg in tuner.cache.items():
            named = dict(zip(names, key[:len(names)]))
            rows.append(dict(kernel=name, key={k: v if isinstance(v, (int, float, bool)) else str(v)
                                                for k, v in named.items()},
                             dtypes=[str(d) for d in key[len(names):]], config=dict(cfg.kwargs),
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return rows


def _explicit_tiles(N: int, device: torch.device, override: tuple) -> dict | None:
    """Fixed tiles, or None to autotune (CUDA without an override). The interpreter pays per program, so on
    the CPU a tile covers up to 128 tokens; ``override`` (block_m, block_n) comes from tests."""
    if device.type == "cuda" and override == (None, None):
        return None
    whole = max(16, min(128, next_pow2(N))) if device.type != "cuda" else 64
    return dict(BLOCK_M=override[0] or whole, BLOCK_N=override[1] or whole, num_warps=4,
                num_stages=2 if device.type == "cuda" else 1)


def _run(fn, tuned, grid, args, flags, tiles):
    """Launch ``fn`` with fixed ``tiles``, or its autotuned twin when tiles is None, on args[0]'s device."""
    if tiles is None:
        launch(tuned, grid, args, flags, args[0].device)
    else:
        launch(fn, grid, args, dict(flags, **tiles), args[0].device)


def _extra_table(bias, mask, H: int, N: int, NP: int):
    """(bias + mask) * log2(e) as one padded fp32 table [W, H, NP, NP] (W = 1 without a mask), or None."""
    if bias is None and mask is None:
        return None
    ref = bias if bias is not None else mask
    W = mask.shape[0] if mask is not None else 1
    extra = torch.zeros((W, H, NP, NP), device=ref.device, dtype=torch.float32)
    if bias is not None:
        extra[:, :, :N, :N] = bias.detach().float()
    if mask is not None:
        extra[:, :, :N, :N] += mask.float()[:, None]
    return extra.mul_(LOG2E)


class _RPBAttentionTriton(torch.autograd.Function):
    """Triton forward / backward; the saved state is q, k, v, the extra table, out and the base-2 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, block_m=None, block_n=None, num_chunks=None):
        B, H, N, D = q.shape
        NP, BD = padded_tokens(N), next_pow2(D)
        extra = _extra_table(bias, mask, H, N, NP)
        W = mask.shape[0] if mask is not None else 1
        out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)  # base 2
        small = _small_path(N, D, q.dtype, q.device) and block_m is None and block_n is None
        P = next_pow2(N)
        tiles = (dict(BLOCK_M=P, BLOCK_N=P, num_warps=4, num_stages=1) if small
                 else _explicit_tiles(N, q.device, (block_m, block_n)))
        args = (q, k, v, extra if extra is not None else lse, out, lse, *q.stride(), *k.stride(), *v.stride(),
                B, H, N, D, W, NP, scale * LOG2E)
        flags = dict(HAS_EXTRA=extra is not None, PRECISION=dot_precision(q), BLOCK_D=BD)
        _run(_attn_fwd, _attn_fwd_tuned, lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"])), args, flags, tiles)
        ctx.save_for_backward(q, k, v, extra, out, lse)
        ctx.scale, ctx.small, ctx.W, ctx.num_chunks = scale, small, W, num_chunks
        ctx.override, ctx.bias_dtype = (block_m, block_n), None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, extra, out, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        NP, BD = padded_tokens(N), next_pow2(D)
        store_dbias = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
        dq, dk, dv = (torch.empty((B, H, N, D), device=q.device, dtype=t.dtype) for t in (q, k, v))
        strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
        common = (B, H, N, D, ctx.W, NP, ctx.scale, ctx.scale * LOG2E)
        flags = dict(HAS_EXTRA=extra is not None, PRECISION=dot_precision(q), BLOCK_D=BD)
        extra_arg = extra if extra is not None else lse
        C = B  # batch chunks: one per batch element unless dbias is reduced
        if ctx.small:
            if store_dbias:
                C = min(B, ctx.num_chunks) if ctx.num_chunks else batch_chunks(B, H, q.device)
            part = torch.empty((C, H, NP, NP), device=q.device, dtype=torch.float32) if store_dbias else lse
            tiles = None if q.is_cuda else dict(num_warps=4, num_stages=1)
            small = dict(flags, STORE_DBIAS=store_dbias, BLOCK=next_pow2(N))
            _run(_attn_bwd_small, _attn_bwd_small_tuned, (B, H),  # dk, dv: one batch element per program
                 (q, k, v, extra_arg, out, dout, lse, dq, dk, dv, part, *strides, *common), dict(small, DKDV=True),
                 tiles)
            _run(_attn_bwd_small, _attn_bwd_small_tuned, (C, H),  # dq and the dbias partials
                 (q, k, v, extra_arg, out, dout, lse, dq, dk, dv, part, *strides, *common), dict(small, DKDV=False),
                 tiles)
        else:
            tiles = _explicit_tiles(N, q.device, ctx.override)
            delta = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
            bm = DELTA_BLOCK_M if tiles is None else tiles["BLOCK_M"]
            _run(_attn_bwd_delta, None, (B * H, triton.cdiv(N, bm)), (out, dout, delta, *dout.stride(), H, N, D),
                 {}, dict(BLOCK_M=bm, BLOCK_D=BD))
            _run(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_N"])),
                 (q, k, v, extra_arg, dout, lse, delta, dk, dv, *strides, *common), flags, tiles)
            if store_dbias:
                blocks = triton.cdiv(N, DELTA_BLOCK_M)
                C = min(B, ctx.num_chunks) if ctx.num_chunks else batch_chunks(B, H * blocks, q.device)
            # zeroed: the dq kernel adds into its own rows of its chunk's partial
            part = torch.zeros((C, H, NP, NP), device=q.device, dtype=torch.float32) if store_dbias else \
                torch.zeros(1, device=q.device, dtype=torch.float32)
            _run(_attn_bwd_dq, _attn_bwd_dq_tuned, lambda meta: (C, H, triton.cdiv(N, meta["BLOCK_M"])),
                 (q, k, v, extra_arg, dout, lse, delta, dq, part, *strides, *common),
                 dict(flags, STORE_DBIAS=store_dbias), tiles)
        dbias = None
        if store_dbias:
            # fixed-order reduction of the C partials: deterministic for a given shape, device and config
            dbias = (part[0] if C == 1 else part.sum(0))[:, :N, :N].to(ctx.bias_dtype)
        return dq, dk, dv, dbias, None, None, None, None, None


def launch_specs(dtype: torch.dtype, block_d: int) -> list:
    """Every GPU launch configuration of this module at ``dtype`` and head dim ``block_d``, for
    bench/compile_report.py: (name, jit function, constexprs, num_warps, num_stages). Bias and mask on."""
    flags = dict(HAS_EXTRA=True, PRECISION="ieee", BLOCK_D=block_d)
    specs = []
    for name, fn, kernel, extra in (("attn_fwd", _attn_fwd, "fwd", {}), ("attn_bwd_dkdv", _attn_bwd_dkdv, "dkdv", {}),
                                    ("attn_bwd_dq", _attn_bwd_dq, "dq", {"STORE_DBIAS": True})):
        for c in tune_configs(kernel, block_d, dtype):
            specs.append((name, fn, dict(flags, **extra, **c.kwargs), c.num_warps, c.num_stages))
    for block in (16, 32, 64):  # the small-N path: forward with one key block, the two small backward kernels
        if not _small_path(block, block_d, dtype):
            continue
        specs.append(("attn_fwd_small", _attn_fwd, dict(flags, BLOCK_M=block, BLOCK_N=block), 4, 1))
        for c in tune_configs("small", block_d, dtype, block):
            for part in ("dkdv", "dq"):
                specs.append((f"attn_bwd_small_{part}", _attn_bwd_small,
                              dict(flags, STORE_DBIAS=True, DKDV=part == "dkdv", BLOCK=block), c.num_warps,
                              c.num_stages))
    specs.append(("attn_bwd_delta", _attn_bwd_delta, dict(BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d), 4, 1))
    return specs


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


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] (any strides) -> [B*H, N, D] for bmm (a copy only when the view can't be flattened)."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _add_extra(logits: torch.Tensor, bias, mask) -> torch.Tensor:
    """logits [B, H, N, N] += bias [H, N, N] (+ mask [W, N, N] per window), in place, in logits' dtype."""
    B, H, N, _ = logits.shape
    if bias is not None:
        logits.add_(bias.to(logits.dtype))
    if mask is not None:
        W = mask.shape[0]
        logits.view(B // W, W, H, N, N).add_(mask.to(logits.dtype).unsqueeze(1))
    return logits


class _CpuLowPrecisionAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias + mask) v for bf16 / fp16 CPU tensors. Forward: the logits and the softmax in
    fp32 (q and k upcast for that one GEMM: bmm's only output dtype for bf16 inputs is bf16, and logits of a
    trained student (max |logit| 11-25) rounded to bf16 put 10-20% errors into the output), P rounded once for
    P V and saved. Backward in the input dtype, as autograd runs the three-op form: dV = P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(dP P)) (fp32 inside), dQ = dS K * scale, dK = dS^T Q * scale, dbias = dS summed over
    the batch (fp32 accumulation)."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # autocast would run the fp32 logits GEMM in bf16
    def forward(ctx, q, k, v, bias, mask, scale):
        B, H, N, D = q.shape
        # one copy each: upcast straight into a contiguous [B, H, N, D] (then a view for bmm)
        qf, kf = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (q, k))
        with exact_bf16_products(q.dtype):
            logits = torch.bmm(_heads_first(qf), _heads_first(kf).transpose(1, 2))
        p = _add_extra(logits.mul_(scale).view(B, H, N, N), bias, mask).softmax(-1).to(q.dtype)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale, ctx.bias_dtype = scale, (bias.dtype if bias is not None else None)
        return torch.bmm(_heads_first(p), _heads_first(v)).view(B, H, N, D)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        B, H, N, D = q.shape
        g = _heads_first(dout.to(q.dtype))
        p3 = _heads_first(p)
        dv = torch.bmm(p3.transpose(1, 2), g).view(B, H, N, D) if ctx.needs_input_grad[2] else None
        dp = torch.bmm(g, _heads_first(v).transpose(1, 2))
        ds = torch._softmax_backward_data(dp, p3, -1, q.dtype)  # P (dP - rowsum(dP P))
        # fp32 sum over the batch: one table collects every image's (and, in the model, every block's) gradient
        dbias = ds.view(B, H, N, N).sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        dq = torch.bmm(ds, _heads_first(k)).mul_(ctx.scale).view(B, H, N, D) if ctx.needs_input_grad[0] else None
        dk = (torch.bmm(ds.transpose(1, 2), _heads_first(q)).mul_(ctx.scale).view(B, H, N, D)
              if ctx.needs_input_grad[1] else None)
        return dq, dk, dv, dbias, None, None


def _cpu_low_precision_attention(q, k, v, bias, mask, scale):
    """"auto" on the CPU for bf16 / fp16 (``_CpuLowPrecisionAttention``). Measured on 2 AVX512-BF16 cores: SDPA's
    CPU flash kernel is 2-3x slower at ViT token counts (65-197), and with a bias that needs a gradient SDPA
    falls back to its math path in fp32 (forward+backward [32,3,65,64] 9.7 -> 4.0 ms, [16,3,197,64] 29 -> 10 ms,
    1 core, bf16 logits). The fp32 logits cost the demo student's forward + backward ~6% against bf16 logits
    (interleaved A/B, 158 -> 168 ms); fp32 in the backward too would cost ~9% more. Running the logits GEMM on
    the bf16 units (``utils.exact_bf16_products``) and upcasting q and k in one copy each took a forward back from
    797 to 687 us per student block ([32, 3, 65, 64]) and from 1,603 to 1,197 us per teacher block ([32, 6, 65, 64])."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CpuLowPrecisionAttention.apply(q, k, v, bias, mask, scale)


def rpb_attention_triton(q, k, v, bias=None, mask=None, scale=None, block_m=None, block_n=None, num_chunks=None):
    """The Triton path with explicit tile sizes and dbias batch chunks (tests use them to cover the multi-block
    and multi-partial code on small inputs); None picks them from the shape and device."""
    check_rpb_inputs(q, k, v, bias, mask)
    if not triton_usable(q.device):
        raise ValueError(f"rpb_attention: backend='triton' needs a CUDA tensor (or a CPU tensor with "
                         f"TRITON_INTERPRET=1 set before triton is imported); got a {q.device.type} tensor"
                         + ("" if triton is not None else " and triton is not installed"))
    if q.shape[-1] > 128:
        raise ValueError(f"rpb_attention: the Triton kernel takes head dims up to 128, got D = {q.shape[-1]}; "
                         f"use backend='sdpa' for wider heads")
    if q.is_cuda and q.dtype == torch.float64:
        # the kernels keep fp32 softmax state and accumulators (no fp64 tensor cores to feed anyway)
        raise ValueError("rpb_attention: the Triton kernel takes fp32 / fp16 / bf16 on CUDA, got float64; use "
                         "backend='reference' (or 'auto', which takes it for fp64)")
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

    ``scale`` defaults to 1/sqrt(D). ``backend``: "auto" (Triton on CUDA with a bias or mask; bmm + softmax for
    bf16 / fp16 on the CPU; else SDPA), "triton", "reference" (the fp32 specification), "sdpa".
    """
    if backend not in BACKENDS:
        raise ValueError(f"rpb_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        # without bias and mask PyTorch's own flash kernel (SDPA) is already the fastest exact attention
        has_extra = bias is not None or mask is not None
        fits = q.dim() == 4 and q.shape[-1] <= 128 and q.dtype != torch.float64
        backend = "triton" if (q.device.type == "cuda" and triton is not None and has_extra and fits) else "sdpa"
        if q.device.type == "cuda" and q.dtype == torch.float64:
            backend = "reference"  # fp64 (checks, gradcheck): the exact specification, not fp32 kernels
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            check_rpb_inputs(q, k, v, bias, mask)
            return _cpu_low_precision_attention(q, k, v, bias, mask, scale)
    if backend == "triton":
        return rpb_attention_triton(q, k, v, bias, mask, scale)
    check_rpb_inputs(q, k, v, bias, mask)
    if backend == "reference":
        return rpb_attention_reference(q, k, v, bias, mask, scale)
    return _sdpa(q, k, v, bias, mask, scale)
