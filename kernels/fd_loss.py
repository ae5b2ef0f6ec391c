"""Fused FD loss: whitening + 1x1 projection + smooth-L1, as Triton kernels (forward and backward).

    loss = mean_{B*N*Ct} smooth_l1_beta( S @ W^T + b  -  layernorm_no_affine(T) )

Forward, one program per tile of BLOCK_M token rows (rows = B*N flattened):
  1. whitening statistics of the teacher rows in registers (two passes over Ct: mean, then variance; fp32);
  2. for each BLOCK_N slice of Ct: the projection tile S @ W^T (+ b) with ``tl.dot`` over Cs (fp32
     accumulator), the whitened target tile, the smooth-L1 value (summed per row) and its derivative;
  3. the program's partial loss sum goes to ``partial_loss[pid]``; the host sums that short vector in a
     fixed order (no float atomics, so the loss is bit-identical run to run).
Backward: dS = G @ W and dW = G^T @ S, db = sum_rows G (all times grad_out / numel); dW and db are
split over row chunks into per-chunk partial buffers that the host adds in a fixed order (deterministic).

What IS kept for backward, and why: G = d smooth_l1 / d pred, [B*N, Ct] in the *student's* dtype (values in
[-1, 1], so fp16 / bf16 hold them well), plus references to S and W (no copies). G is exactly what both
dS and dW need; keeping it costs one tensor the size of the teacher tokens, while recomputing it would cost
a second S @ W^T and another read of T. The whitened target and the projected prediction are never
written to memory, in any dtype. G is only written when some input needs a gradient.

Besides the Triton path, ``backend="torch"`` runs the same math as row-chunked ATen ops with the same saved
G; "auto" takes it on the CPU (see ``resolve_backend``). ``backend="reference"`` is the specification.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .reference import fd_loss_reference

try:  # Triton is Linux-only; the reference path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None

BACKENDS = ("auto", "triton", "torch", "reference")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    named = (("student_tokens", student_tokens), ("teacher_tokens", teacher_tokens), ("weight", weight), ("bias", bias))
    for name, t in named:
        if t is not None and not t.is_floating_point():
            raise ValueError(f"fd_loss: {name} must be a floating-point tensor, got {t.dtype}")
    devices = {t.device for _, t in named if t is not None}
    if len(devices) > 1:
        raise ValueError(f"fd_loss: all inputs must be on one device, got {sorted(map(str, devices))}")
    if student_tokens.numel() == 0 or teacher_tokens.numel() == 0:
        raise ValueError(
            f"fd_loss: empty input (student {tuple(student_tokens.shape)}, teacher {tuple(teacher_tokens.shape)}); "
            "the mean over zero tokens is undefined"
        )


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _row_stats(T, rows, row_ok, CT, eps, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """mean and 1/std of BLOCK_M teacher rows over Ct, two passes (no E[x^2]-E[x]^2 cancellation)."""
        total = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < CT)[None, :]
            t = tl.load(T + rows[:, None] * CT + cols[None, :], mask=ok, other=0.0).to(ACC)
            total += tl.sum(t, axis=1)
        mean = total / CT
        sq = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < CT)[None, :]
            t = tl.load(T + rows[:, None] * CT + cols[None, :], mask=ok, other=0.0).to(ACC)
            centred = tl.where(ok, t - mean[:, None], 0.0)
            sq += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(sq / CT + eps)  # biased variance, as LayerNorm
        return mean, rstd

    @triton.jit
    def _projection_tile(S, W, rows, row_ok, cols, col_ok, CS, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """[BLOCK_M, BLOCK_N] tile of S @ W^T, operands in the student's dtype, accumulated in ACC."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, CS, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < CS
            s = tl.load(S + rows[:, None] * CS + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # W is [Ct, Cs] row-major: this reads the transposed tile W^T[ks, cols] = [BLOCK_K, BLOCK_N]
            w = tl.load(W + cols[None, :] * CS + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(s, w.to(s.dtype), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _fd_loss_fwd_kernel(
        S, T, W, Bias, G, PartialLoss,  # [M,Cs], [M,Ct], [Ct,Cs], [Ct], [M,Ct] (S dtype), [programs]
        M, CS, CT, eps, beta, inv_beta,
        HAS_BIAS: tl.constexpr, WHITEN: tl.constexpr, L1: tl.constexpr, STORE_GRAD: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: B*N*C can pass 2**31
        row_ok = rows < M
        if WHITEN:
            mean, rstd = _row_stats(T, rows, row_ok, CT, eps, ACC, BLOCK_M, BLOCK_N)
        row_loss = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < CT
            ok = row_ok[:, None] & col_ok[None, :]
            pred = _projection_tile(S, W, rows, row_ok, cols, col_ok, CS, ACC, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                pred += tl.load(Bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
            target = tl.load(T + rows[:, None] * CT + cols[None, :], mask=ok, other=0.0).to(ACC)
            if WHITEN:
                target = (target - mean[:, None]) * rstd[:, None]
            diff = tl.where(ok, pred - target, 0.0)  # padded lanes contribute 0 to loss and grad
            mag = tl.abs(diff)
            sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC)
            if L1:  # beta == 0: plain L1
                loss = mag
                grad = sign
            else:
                small = mag < beta
                loss = tl.where(small, 0.5 * diff * diff * inv_beta, mag - 0.5 * beta)
                grad = tl.where(small, diff * inv_beta, sign)
            row_loss += tl.sum(loss, axis=1)
            if STORE_GRAD:
                tl.store(G + rows[:, None] * CT + cols[None, :], grad.to(G.dtype.element_ty), mask=ok)
        tl.store(PartialLoss + pid, tl.sum(row_loss, axis=0))

    @triton.jit
    def _fd_loss_dS_kernel(
        G, W, Scale, DS,  # [M,Ct], [Ct,Cs], [1] = grad_out / numel, [M,Cs]
        M, CS, CT,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dS tile [BLOCK_M, BLOCK_K] = scale * G[rows, :] @ W[:, ks]; the sum over Ct stays in one program."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        k_ok = ks < CS
        acc = tl.zeros([BLOCK_M, BLOCK_K], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < CT
            g = tl.load(G + rows[:, None] * CT + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * CS + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g, w.to(g.dtype), acc, input_precision=DOT_PRECISION)
        scale = tl.load(Scale).to(ACC)
        tl.store(DS + rows[:, None] * CS + ks[None, :], (acc * scale).to(DS.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _fd_loss_dW_kernel(
        G, S, Scale, PartialDW, PartialDB,  # [M,Ct], [M,Cs], [1], [SPLIT,Ct,Cs], [SPLIT,Ct] (ACC)
        M, CS, CT, ROWS_PER_SPLIT,
        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Partial dW[cols, ks] (and db[cols]) over the row chunk program_id(2); chunks are summed on the host."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(2)
        col_ok = cols < CT
        k_ok = ks < CS
        acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
        col_sum = tl.zeros([BLOCK_N], ACC)
        row_start = split * ROWS_PER_SPLIT
        for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
            rows = (row_start + m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < M
            g = tl.load(G + rows[:, None] * CT + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = tl.load(S + rows[:, None] * CS + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), s, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                col_sum += tl.sum(g.to(ACC), axis=0)
        scale = tl.load(Scale).to(ACC)
        out = PartialDW + split.to(tl.int64) * CT * CS
        tl.store(out + cols[:, None] * CS + ks[None, :], acc * scale, mask=col_ok[:, None] & k_ok[None, :])
        if HAS_BIAS:  # every Cs-tile column computes the same db slice; the first one writes it
            tl.store(PartialDB + split * CT + cols, col_sum * scale, mask=col_ok & (tl.program_id(1) == 0))


# ----------------------------------------------------------------------------------------------------------
# Host side: launch configuration, autograd.Function
# ----------------------------------------------------------------------------------------------------------
def _tile_config(student_tokens: torch.Tensor) -> dict:
    """Block sizes: large tiles (few programs) for the interpreter, tensor-core sized tiles on a GPU.

    GPU values are a starting point that has not been tuned on hardware yet (no GPU was lent to issue 3).
    """
    if not student_tokens.is_cuda:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    if student_tokens.dtype in (torch.float32, torch.float64):
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(student_tokens: torch.Tensor) -> str:
    """fp32 operands: exact IEEE products unless the user allowed TF32 for matmuls (as torch does)."""
    if student_tokens.is_cuda and student_tokens.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dw_split(M: int, CT: int, CS: int, cfg: dict, device: torch.device) -> int:
    """How many row chunks dW is split into: enough programs to fill the GPU, one chunk in the interpreter."""
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(CT, cfg["BLOCK_N"]) * triton.cdiv(CS, cfg["BLOCK_K"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, 4 * cfg["BLOCK_M"])))


class _FDLossTriton(torch.autograd.Function):
    """Triton FD loss; see the module docstring for what forward keeps for backward."""

    @staticmethod
    def forward(ctx, S, T, W, b, beta, eps, whiten, store_grad):
        # S [M,Cs], T [M,Ct], W [Ct,Cs], b [Ct] or None; all contiguous (fd_loss flattens B,N to M)
        M, CS = S.shape
        CT = T.shape[1]
        cfg = _tile_config(S)
        acc_dtype = torch.float64 if S.dtype == torch.float64 else torch.float32
        programs = triton.cdiv(M, cfg["BLOCK_M"])
        partial = torch.empty(programs, device=S.device, dtype=acc_dtype)
        G = torch.empty((M, CT), device=S.device, dtype=S.dtype) if store_grad else partial  # unused if not stored
        _fd_loss_fwd_kernel[(programs,)](
            S, T, W, b if b is not None else S, G, partial, M, CS, CT, eps, beta, 1.0 / beta if beta > 0 else 0.0,
            HAS_BIAS=b is not None, WHITEN=whiten, L1=beta == 0, STORE_GRAD=store_grad,
            ACC=_accumulator(S.dtype), DOT_PRECISION=_dot_precision(S), **cfg,
        )
        if store_grad:
            ctx.save_for_backward(G, S, W)
        ctx.bias_dtype = b.dtype if b is not None else None
        return partial.sum() / (M * CT)  # fixed-order sum of per-program partials: deterministic

    @staticmethod
    def backward(ctx, grad_out):
        G, S, W = ctx.saved_tensors
        M, CS = S.shape
        CT = G.shape[1]
        cfg = _tile_config(S)
        acc_dtype = torch.float64 if S.dtype == torch.float64 else torch.float32
        scale = (grad_out.to(acc_dtype) / (M * CT)).reshape(1)  # stays on device: no host sync
        common = dict(ACC=_accumulator(S.dtype), DOT_PRECISION=_dot_precision(S), **cfg)
        dS = dW = db = None
        need_dS, _, need_dW, need_db = ctx.needs_input_grad[:4]
        if need_dS:
            dS = torch.empty_like(S)
            grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(CS, cfg["BLOCK_K"]))
            _fd_loss_dS_kernel[grid](G, W, scale, dS, M, CS, CT, **common)
        if need_dW or need_db:
            split = _dw_split(M, CT, CS, cfg, S.device)
            rows_per_split = triton.cdiv(triton.cdiv(M, split), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
            split = triton.cdiv(M, rows_per_split)
            part_dw = torch.empty((split, CT, CS), device=S.device, dtype=acc_dtype)
            part_db = torch.empty((split, CT), device=S.device, dtype=acc_dtype) if need_db else part_dw
            grid = (triton.cdiv(CT, cfg["BLOCK_N"]), triton.cdiv(CS, cfg["BLOCK_K"]), split)
            _fd_loss_dW_kernel[grid](G, S, scale, part_dw, part_db, M, CS, CT, rows_per_split,
                                     HAS_BIAS=need_db, **common)
            dW = part_dw.sum(0).to(W.dtype) if need_dW else None  # fixed-order sum over chunks
            db = part_db.sum(0).to(ctx.bias_dtype) if need_db else None
        return dS, None, dW, db, None, None, None, None


def _fd_loss_triton(S, T, W, b, beta, eps, whiten):
    if triton is None:
        raise ValueError("fd_loss: backend='triton' needs the triton package (Linux); use backend='reference'")
    if not S.is_cuda and not _INTERPRET:
        raise ValueError(
            "fd_loss: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors "
            "(slow, for tests); use backend='auto' or 'reference' on the CPU"
        )
    B, N, CS = S.shape
    store_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (S, W, b))
    # reshape(-1, C) of a contiguous tensor is a view; non-contiguous inputs are copied once here
    S2 = S.contiguous().reshape(B * N, CS)
    T2 = T.detach().contiguous().reshape(B * N, T.shape[-1])
    return _FDLossTriton.apply(S2, T2, W.contiguous(), None if b is None else b.contiguous(),
                               float(beta), float(eps), bool(whiten), store_grad)


# ----------------------------------------------------------------------------------------------------------
# CPU path: the same math as a few fused ATen ops (no compile step, no Triton)
# ----------------------------------------------------------------------------------------------------------
_CPU_CHUNK_ELEMS = 1 << 18  # fp32 elements of one chunk's prediction (1 MiB): cache-sized, GEMM still efficient


def _chunk_diff(S, T, Wt, b, whiten, eps, compute):
    """S @ W^T + b - target for a chunk of rows, [rows, Ct] in `compute`, built in the target's buffer."""
    neg_b = None if b is None else -b
    if whiten:  # layer_norm's own bias argument subtracts b in the same pass: LN(T) - b
        target = F.layer_norm(T.to(compute), T.shape[-1:], bias=neg_b, eps=eps)
    elif b is None:
        target = T.to(compute, copy=True)  # never write into the caller's teacher tokens
    else:
        target = torch.sub(T.to(compute), b)
    return target.addmm_(S.to(compute), Wt, beta=-1)  # -(target - b) + S @ W^T inside the GEMM


class _FDLossTorch(torch.autograd.Function):
    """Row-chunked PyTorch FD loss for the CPU: keeps only G (the smooth-L1 derivative, student dtype).

    Rows are processed in chunks of about 1 MiB of fp32, so target and difference stay in cache and never
    exist for the whole batch (the eager reference keeps about five fp32 [M, Ct] tensors for autograd).
    Math in fp32 (fp64 stays fp64); ATen matmuls are deterministic on the CPU and the chunk losses are
    added in a fixed order. Backward reads grad_out on the host (a sync on CUDA; "auto" uses Triton there).
    """

    @staticmethod
    def forward(ctx, S, T, W, b, beta, eps, whiten, store_grad):
        compute = torch.float64 if S.dtype == torch.float64 else torch.float32
        M, CT = T.shape
        Wt, bc = W.to(compute).t(), None if b is None else b.to(compute)  # [Cs, Ct], [Ct]
        G = torch.empty((M, CT), dtype=S.dtype, device=S.device) if store_grad else None
        zero = torch.zeros((), dtype=compute, device=S.device)
        chunk = max(16, _CPU_CHUNK_ELEMS // CT)  # rows per chunk
        starts = range(0, M, chunk)
        # per-chunk sums, copied out: smooth_l1_loss's 0-dim "sum" result keeps its whole [rows, Ct] buffer
        # alive, so holding those results would keep every chunk (measured: +1 x [M, Ct] fp32)
        chunk_loss = torch.empty(len(starts), dtype=compute, device=S.device)
        for i, r0 in enumerate(starts):
            rows = slice(r0, r0 + chunk)
            diff = _chunk_diff(S[rows], T[rows], Wt, bc, whiten, eps, compute)
            if beta == 0:
                chunk_loss[i] = diff.abs().sum()
            else:  # a 0-strided zero target: smooth_l1_loss's own fused kernel, no second tensor
                chunk_loss[i] = F.smooth_l1_loss(diff, zero.expand_as(diff), reduction="sum", beta=beta)
            if store_grad:  # d smooth_l1 / d pred = clamp(diff / beta, -1, 1); sign(diff) for L1
                if beta == 0:
                    G[rows] = diff.sign_()
                else:  # written straight into G (cast to its dtype on the way): no chunk copy
                    torch.div(diff, beta, out=G[rows]).clamp_(-1.0, 1.0)
            del diff  # before the next chunk allocates: one chunk alive at a time
        if store_grad:
            ctx.save_for_backward(G, S, W)
            ctx.bias_dtype = None if b is None else b.dtype
        return chunk_loss.sum() / (M * CT)

    @staticmethod
    def backward(ctx, grad_out):
        G, S, W = ctx.saved_tensors
        compute = grad_out.dtype
        G = G.to(compute)  # [M, Ct]; a no-op for fp32 students
        scale = float(grad_out) / G.numel()  # as the GEMMs' alpha: no extra pass over the results
        zero = G.new_zeros(())
        need_dS, _, need_dW, need_db = ctx.needs_input_grad[:4]
        dS = torch.addmm(zero, G, W.to(compute), beta=0, alpha=scale).to(S.dtype) if need_dS else None
        dW = torch.addmm(zero, G.t(), S.to(compute), beta=0, alpha=scale).to(W.dtype) if need_dW else None
        db = G.sum(0).mul_(scale).to(ctx.bias_dtype) if need_db else None
        return dS, None, dW, db, None, None, None, None


def _fd_loss_torch(S, T, W, b, beta, eps, whiten):
    B, N, CS = S.shape
    store_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (S, W, b))
    S2 = S.reshape(B * N, CS)
    T2 = T.detach().reshape(B * N, T.shape[-1])
    return _FDLossTorch.apply(S2, T2, W, b, float(beta), float(eps), bool(whiten), store_grad)


def resolve_backend(student_tokens: torch.Tensor, backend: str = "auto") -> str:
    """The path "auto" takes: Triton for CUDA fp32 / fp16 / bf16, else the row-chunked torch path.

    On the 2-core CPU machines the torch path measured within ~3% of torch.compile(reference) (single-thread
    CPU time, ViT-B width, fwd+bwd: 26.6 vs 26.5 ms; eager 30.8 ms) with no compile step (1-3 s warm, 10-50 s
    cold, again for new shapes) and the same peak memory (~1/3 of eager's); bench/suites/loss.py.
    fp64 skips Triton on CUDA (no fp64 tensor cores).
    """
    if backend != "auto":
        return backend
    fp64 = student_tokens.dtype == torch.float64
    return "triton" if student_tokens.is_cuda and triton is not None and not fp64 else "torch"


def fd_loss(student_tokens, teacher_tokens, weight, bias=None, beta=2.0, eps=1e-5, whiten=True, backend="auto"):
    """Mean smooth-L1(beta) between ``student_tokens @ weight.T + bias`` and the whitened teacher tokens.

    student_tokens [B,N,Cs], teacher_tokens [B,N,Ct] (the frozen target: no gradient), weight [Ct,Cs],
    bias [Ct] or None; fp32 / fp16 / bf16 (fp64 too), math in fp32; returns an fp32 scalar (fp64 for fp64).
    ``beta=0`` is plain L1; ``whiten=False`` compares with the raw teacher tokens.
    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1); "torch" (row-chunked ATen ops, any device);
    "reference" (the plain-PyTorch specification); "auto": see ``resolve_backend``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"fd_loss: unknown backend {backend!r}; choose one of {BACKENDS}")
    check_fd_inputs(student_tokens, teacher_tokens, weight, bias)
    if beta < 0:
        raise ValueError(f"fd_loss: beta must be >= 0, got {beta}")
    backend = resolve_backend(student_tokens, backend)
    if backend == "triton":
        return _fd_loss_triton(student_tokens, teacher_tokens, weight, bias, beta, eps, whiten)
    if backend == "torch":
        return _fd_loss_torch(student_tokens, teacher_tokens, weight, bias, beta, eps, whiten)
    return fd_loss_reference(student_tokens, teacher_tokens, weight, bias, beta=beta, eps=eps, whiten_target=whiten)
