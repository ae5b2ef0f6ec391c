"""Fused FD loss: whitening + 1x1 projection + loss reduction, as Triton kernels (forward and backward).

    loss = mean_{B*N*Ct} smooth_l1_beta( S @ W^T + b  -  layernorm_no_affine(T) )      (kind "smooth_l1")

Forward, two launches (rows = B*N flattened):
  1. ``_fd_row_stats_kernel``: whitening mean and 1/std of every teacher row ([M] fp32 each, two passes);
  2. ``_fd_loss_fwd_kernel``: a 2-D tiled matmul S @ W^T in grouped tile order (tensor cores for fp16 / bf16,
     fp32 accumulation) whose epilogue adds b, whitens the target tile, and writes the loss derivative G and
     the tile's loss sum to ``partial_loss[tile]``; the host sums that short vector in a fixed order (no float
     atomics, so the loss is bit-identical run to run).
Backward: dS = scale * G @ W by a Triton kernel (the scale grad_out / numel is read on the device: no host
sync); dW = G^T @ S and db = colsum(G) by cuBLAS / ATen with fp32 results, then scaled (both deterministic).

Kinds: "smooth_l1" (beta 0 = L1) and "l2" have the fused kernel (a constexpr switch); "cosine" (a per-token
reduction over channels, not elementwise) has none: backend="triton" raises for it and "auto" takes the
"torch" path. Autocast: like ``F.linear``, S, W and b are cast to the autocast dtype first.

What IS kept for backward, and why: G = d loss / d pred, [B*N, Ct] in the *student's* dtype (values in
[-1, 1] for smooth-L1, so fp16 / bf16 hold them well), plus references to S and W (no copies). G is exactly
what both dS and dW need; keeping it costs one tensor the size of the teacher tokens, while recomputing it
would cost a second S @ W^T and another read of T. The whitened target and the projected prediction are never
written to memory, in any dtype. G is only written when some input needs a gradient.

Besides the Triton path, ``backend="torch"`` runs the same math as row-chunked ATen ops with the same saved
G; "auto" takes it on the CPU (see ``resolve_backend``). ``backend="reference"`` is the specification.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .choices import FUSED_LOSS_KINDS, LOSS_BACKENDS, LOSS_KINDS
from .reference import fd_loss_reference
from .utils import (autocast_dtype, compute_dtype, dot_precision, launch, mm_fp32_accumulate, tl, tl_accumulator,
                    triton, triton_usable)


BACKENDS = LOSS_BACKENDS
TRITON_KINDS = FUSED_LOSS_KINDS  # kinds with a fused kernel; cosine runs on the torch path


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
# the loss of one element as a constexpr switch of the forward kernel
LOSS_CODE = {"smooth_l1": 0, "l1": 1, "l2": 2}

if triton is not None:

    @triton.jit
    def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) in grouped order: GROUP_M row tiles sweep the column tiles together, so the weight
        tiles they share stay in L2 (the Triton matmul tutorial's schedule)."""
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size

    @triton.jit
    def _fd_row_stats_kernel(T, Mean, Rstd, M, CT, eps, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
        """Whitening statistics of BLOCK_M teacher rows: mean and 1/std over Ct in two passes (the second
        pass reads rows the first just brought into L2; no E[x^2] - E[x]^2 cancellation)."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M*Ct can pass 2**31
        row_ok = rows < M
        total = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            t = tl.load(T + rows[:, None] * CT + cols[None, :], mask=row_ok[:, None] & (cols < CT)[None, :],
                        other=0.0)
            total += tl.sum(t.to(ACC), axis=1)
        mean = total / CT
        sq = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < CT)[None, :]
            t = tl.load(T + rows[:, None] * CT + cols[None, :], mask=ok, other=0.0).to(ACC)
            centred = tl.where(ok, t - mean[:, None], 0.0)
            sq += tl.sum(centred * centred, axis=1)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, 1.0 / tl.sqrt(sq / CT + eps), mask=row_ok)  # biased variance, as LayerNorm

    @triton.jit
    def _fd_loss_fwd_kernel(
        S, T, W, Bias, Mean, Rstd, G, PartialLoss,  # [M,Cs], [M,Ct], [Ct,Cs], [Ct], [M], [M], [M,Ct], [tiles]
        M, CS, CT, beta, inv_beta,
        HAS_BIAS: tl.constexpr, WHITEN: tl.constexpr, LOSS: tl.constexpr, STORE_GRAD: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] tile of pred = S @ W^T + b, with the whitened target, the loss and its
        derivative G fused into the matmul's epilogue; the tile's loss sum goes to PartialLoss[pid]."""
        pid = tl.program_id(0)
        pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(CT, BLOCK_N), GROUP_M)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < CT
        pred = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, CS, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < CS
            s = tl.load(S + rows[:, None] * CS + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # W is [Ct, Cs] row-major: this reads the transposed tile W^T[ks, cols] = [BLOCK_K, BLOCK_N]
            w = tl.load(W + cols[None, :] * CS + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            # tensor cores for 16-bit S; out_dtype names the accumulator (fp64 for fp64 inputs: Triton 3.6 asserts
            # acc's type == out_dtype, whose default is fp32)
            pred = tl.dot(s, w.to(s.dtype), pred, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            pred += tl.load(Bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        target = tl.load(T + rows[:, None] * CT + cols[None, :], mask=ok, other=0.0).to(ACC)
        if WHITEN:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            target = (target - mean[:, None]) * rstd[:, None]
        diff = tl.where(ok, pred - target, 0.0)  # padded lanes add 0 to loss and gradient
        if LOSS == 2:  # l2
            loss = diff * diff
            grad = 2.0 * diff
        else:
            mag = tl.abs(diff)
            sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC)
            if LOSS == 1:  # l1 (smooth-L1 with beta 0)
                loss = mag
                grad = sign
            else:
                small = mag < beta
                loss = tl.where(small, 0.5 * diff * diff * inv_beta, mag - 0.5 * beta)
                grad = tl.where(small, diff * inv_beta, sign)
        if STORE_GRAD:
            tl.store(G + rows[:, None] * CT + cols[None, :], grad.to(G.dtype.element_ty), mask=ok)
        tl.store(PartialLoss + pid, tl.sum(tl.sum(loss, axis=1), axis=0))

    @triton.jit
    def _fd_loss_dS_kernel(
        G, W, Scale, DS,  # [M,Ct], [Ct,Cs], [1] = grad_out / denominator, [M,Cs]
        M, CS, CT,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """dS tile [BLOCK_M, BLOCK_K] = scale * G[rows, :] @ W[:, ks]; the sum over Ct stays in one program,
        and the scale (a device scalar: no host sync) is applied in the epilogue."""
        pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(CS, BLOCK_K), GROUP_M)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        k_ok = ks < CS
        acc = tl.zeros([BLOCK_M, BLOCK_K], ACC)
        for n0 in range(0, CT, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < CT
            g = tl.load(G + rows[:, None] * CT + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * CS + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g, w.to(g.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        scale = tl.load(Scale).to(ACC)
        tl.store(DS + rows[:, None] * CS + ks[None, :], (acc * scale).to(DS.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Host side: launch configuration, autograd.Function
# ----------------------------------------------------------------------------------------------------------
# GPU tiles per kernel and operand class. "half" (fp16 / bf16, tensor cores): the Triton matmul tutorial's
# Hopper tile, 128 x 128 x 64 with 8 warps; "fp32" (IEEE products, no tensor cores) needs small tiles. Checked
# for registers, spills and shared memory without a GPU by bench/compile_report.py (sm_90); not yet timed.
GPU_TILES = {
    "stats": {"half": dict(BLOCK_M=16, BLOCK_N=256, num_warps=4, num_stages=1),
              "fp32": dict(BLOCK_M=16, BLOCK_N=256, num_warps=4, num_stages=1)},
    "fwd": {"half": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
            "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)},
    "dS": {"half": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
           "fp32": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)},
}
# the interpreter pays per program: whole small problems in one or two programs
INTERPRETER_TILES = {
    "stats": dict(BLOCK_M=256, BLOCK_N=128, num_warps=4, num_stages=1),
    "fwd": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1),
    "dS": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1),
}


def _tile_config(kernel: str, student_tokens: torch.Tensor) -> dict:
    if not student_tokens.is_cuda:
        return INTERPRETER_TILES[kernel]
    half = student_tokens.dtype in (torch.float16, torch.bfloat16)
    return GPU_TILES[kernel]["half" if half else "fp32"]


def _loss_code(kind: str, beta: float) -> int:
    return LOSS_CODE["l2"] if kind == "l2" else LOSS_CODE["l1" if beta == 0 else "smooth_l1"]


class _FDLossTriton(torch.autograd.Function):
    """Triton FD loss; see the module docstring for what forward keeps for backward."""

    @staticmethod
    def forward(ctx, S, T, W, b, beta, eps, whiten, store_grad, kind):
        # S [M,Cs], T [M,Ct], W [Ct,Cs], b [Ct] or None; all contiguous (fd_loss flattens B,N to M)
        M, CS = S.shape
        CT = T.shape[1]
        acc = compute_dtype(S.dtype)
        mean = rstd = torch.empty(1, device=S.device, dtype=acc)  # unread unless whitening
        if whiten:
            mean, rstd = torch.empty(M, device=S.device, dtype=acc), torch.empty(M, device=S.device, dtype=acc)
            cfg = _tile_config("stats", S)
            launch(_fd_row_stats_kernel, (triton.cdiv(M, cfg["BLOCK_M"]),), (T, mean, rstd, M, CT, eps),
                   dict(ACC=tl_accumulator(S.dtype), **cfg), S.device)
        cfg = _tile_config("fwd", S)
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(CT, cfg["BLOCK_N"])
        partial = torch.empty(tiles, device=S.device, dtype=acc)
        G = torch.empty((M, CT), device=S.device, dtype=S.dtype) if store_grad else partial  # unused if not stored
        launch(_fd_loss_fwd_kernel, (tiles,),
               (S, T, W, b if b is not None else S, mean, rstd, G, partial, M, CS, CT,
                beta, 1.0 / beta if beta > 0 else 0.0),
               dict(HAS_BIAS=b is not None, WHITEN=whiten, LOSS=_loss_code(kind, beta), STORE_GRAD=store_grad,
                    ACC=tl_accumulator(S.dtype), DOT_PRECISION=dot_precision(S), **cfg), S.device)
        if store_grad:
            ctx.save_for_backward(G, S, W)
        ctx.bias_dtype = b.dtype if b is not None else None
        return partial.sum() / (M * CT)  # fixed-order sum of per-tile partials: deterministic

    @staticmethod
    def backward(ctx, grad_out):
        """dS by the Triton kernel (scale fused); dW = G^T S and db = colsum(G) by cuBLAS / ATen reductions
        with fp32 results (a split-K GEMM over B*N rows is what cuBLAS tunes best; both are deterministic)."""
        G, S, W = ctx.saved_tensors
        M, CS = S.shape
        CT = G.shape[1]
        scale = (grad_out.to(compute_dtype(S.dtype)) / (M * CT)).reshape(1)  # stays on device: no host sync
        dS = dW = db = None
        need_dS, _, need_dW, need_db = ctx.needs_input_grad[:4]
        if need_dS:
            dS = torch.empty_like(S)
            cfg = _tile_config("dS", S)
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(CS, cfg["BLOCK_K"]),)
            launch(_fd_loss_dS_kernel, grid, (G, W, scale, dS, M, CS, CT),
                   dict(ACC=tl_accumulator(S.dtype), DOT_PRECISION=dot_precision(S), **cfg), S.device)
        if need_dW:
            dW = mm_fp32_accumulate(G.t(), S).mul_(scale).to(W.dtype)  # [Ct, Cs]
        if need_db:
            db = G.sum(0, dtype=compute_dtype(S.dtype)).mul_(scale).to(ctx.bias_dtype)
        return dS, None, dW, db, None, None, None, None, None


def _fd_loss_triton(S, T, W, b, beta, eps, whiten, kind):
    if triton is None:
        raise ValueError("fd_loss: backend='triton' needs the triton package (Linux); use backend='reference'")
    if not triton_usable(S.device):
        raise ValueError(
            "fd_loss: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors "
            "(slow, for tests); use backend='auto' or 'reference' on the CPU"
        )
    if kind not in TRITON_KINDS:
        raise ValueError(f"fd_loss: kind={kind!r} has no fused Triton kernel (it covers {TRITON_KINDS}); use "
                         "backend='auto' (takes the 'torch' path for it) or 'torch' / 'reference'")
    B, N, CS = S.shape
    store_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (S, W, b))
    # reshape(-1, C) of a contiguous tensor is a view; non-contiguous inputs are copied once here
    S2 = S.contiguous().reshape(B * N, CS)
    T2 = T.detach().contiguous().reshape(B * N, T.shape[-1])
    return _FDLossTriton.apply(S2, T2, W.contiguous(), None if b is None else b.contiguous(),
                               float(beta), float(eps), bool(whiten), store_grad, kind)


def launch_specs():
    """Every GPU launch configuration of this module, for bench/compile_report.py:
    (kernel name, jit function, {operand class: tile dict}, the constexpr flags compiled with)."""
    flags = dict(HAS_BIAS=True, WHITEN=True, LOSS=LOSS_CODE["smooth_l1"], STORE_GRAD=True)
    return [("fd_row_stats", _fd_row_stats_kernel, GPU_TILES["stats"], {}),
            ("fd_loss_fwd", _fd_loss_fwd_kernel, GPU_TILES["fwd"], flags),
            ("fd_loss_dS", _fd_loss_dS_kernel, GPU_TILES["dS"], {})]


# ----------------------------------------------------------------------------------------------------------
# CPU path: the same math as a few fused ATen ops (no compile step, no Triton)
# ----------------------------------------------------------------------------------------------------------
_CPU_CHUNK_ELEMS = 1 << 18  # fp32 elements of one chunk's prediction (1 MiB): cache-sized, GEMM still efficient


def _chunk_target(T, whiten, eps, compute, neg_b=None):
    """The target of a chunk of rows in `compute`, in a fresh buffer (never the caller's teacher tokens);
    with ``neg_b`` it is target - b (layer_norm's own bias argument subtracts b in the same pass)."""
    if whiten:
        return F.layer_norm(T.to(compute), T.shape[-1:], bias=neg_b, eps=eps)
    if neg_b is None:
        return T.to(compute, copy=True)
    return torch.add(T.to(compute), neg_b)


def _chunk_diff(S, T, Wt, b, whiten, eps, compute):
    """S @ W^T + b - target for a chunk of rows, [rows, Ct] in `compute`, built in the target's buffer."""
    target = _chunk_target(T, whiten, eps, compute, None if b is None else -b)
    return target.addmm_(S.to(compute), Wt, beta=-1)  # -(target - b) + S @ W^T inside the GEMM


def _chunk_cosine(S, T, Wt, b, whiten, eps, compute):
    """(sum over the chunk's tokens of 1 - cos(pred, target), d/d pred [rows, Ct]); norms clamped at 1e-8 as
    ``F.cosine_similarity`` does."""
    pred = torch.mm(S.to(compute), Wt) if b is None else torch.addmm(b, S.to(compute), Wt)
    target = _chunk_target(T, whiten, eps, compute)
    p_norm = pred.norm(dim=-1, keepdim=True).clamp_min_(1e-8)
    p_hat = pred.div_(p_norm)
    t_hat = target.div_(target.norm(dim=-1, keepdim=True).clamp_min_(1e-8))
    cos = (p_hat * t_hat).sum(-1, keepdim=True)
    grad = t_hat.sub_(p_hat.mul_(cos)).div_(p_norm).neg_()  # -(t^ - cos p^) / |p|
    return (1 - cos).sum(), grad


def _chunk_loss_and_grad(diff, kind, beta, zero):
    """(summed loss, d loss / d pred or None) of one chunk's difference; the grad may reuse diff's buffer."""
    if kind == "l2":
        return diff.square().sum(), diff.mul_(2.0)
    if beta == 0:
        return diff.abs().sum(), diff.sign_()
    # a 0-strided zero target: smooth_l1_loss's own fused kernel, no second tensor
    loss = F.smooth_l1_loss(diff, zero.expand_as(diff), reduction="sum", beta=beta)
    return loss, diff.div_(beta).clamp_(-1.0, 1.0)  # d smooth_l1 / d pred = clamp(diff / beta, -1, 1)


class _FDLossTorch(torch.autograd.Function):
    """Row-chunked PyTorch FD loss for the CPU: keeps only G (the loss derivative, student dtype).

    Rows are processed in chunks of about 1 MiB of fp32, so target and difference stay in cache and never
    exist for the whole batch (the eager reference keeps about five fp32 [M, Ct] tensors for autograd).
    Math in fp32 (fp64 stays fp64); ATen matmuls are deterministic on the CPU and the chunk losses are
    added in a fixed order. Backward reads grad_out on the host (a sync on CUDA; "auto" uses Triton there).
    """

    @staticmethod
    def forward(ctx, S, T, W, b, beta, eps, whiten, store_grad, kind):
        compute = compute_dtype(S.dtype)
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
            if kind == "cosine":
                chunk_loss[i], grad = _chunk_cosine(S[rows], T[rows], Wt, bc, whiten, eps, compute)
            else:
                diff = _chunk_diff(S[rows], T[rows], Wt, bc, whiten, eps, compute)
                chunk_loss[i], grad = _chunk_loss_and_grad(diff, kind, beta, zero)
            if store_grad:
                G[rows] = grad  # cast to G's dtype on the way
            grad = diff = None  # before the next chunk allocates: one chunk alive at a time
        ctx.denominator = M if kind == "cosine" else M * CT  # cosine: a mean over tokens, not elements
        if store_grad:
            ctx.save_for_backward(G, S, W)
            ctx.bias_dtype = None if b is None else b.dtype
        return chunk_loss.sum() / ctx.denominator

    @staticmethod
    def backward(ctx, grad_out):
        G, S, W = ctx.saved_tensors
        compute = grad_out.dtype
        G = G.to(compute)  # [M, Ct]; a no-op for fp32 students
        scale = float(grad_out) / ctx.denominator  # as the GEMMs' alpha: no extra pass over the results
        zero = G.new_zeros(())
        need_dS, _, need_dW, need_db = ctx.needs_input_grad[:4]
        dS = torch.addmm(zero, G, W.to(compute), beta=0, alpha=scale).to(S.dtype) if need_dS else None
        dW = torch.addmm(zero, G.t(), S.to(compute), beta=0, alpha=scale).to(W.dtype) if need_dW else None
        db = G.sum(0).mul_(scale).to(ctx.bias_dtype) if need_db else None
        return dS, None, dW, db, None, None, None, None, None


def _fd_loss_torch(S, T, W, b, beta, eps, whiten, kind):
    B, N, CS = S.shape
    store_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (S, W, b))
    S2 = S.reshape(B * N, CS)
    T2 = T.detach().reshape(B * N, T.shape[-1])
    return _FDLossTorch.apply(S2, T2, W, b, float(beta), float(eps), bool(whiten), store_grad, kind)


def resolve_backend(student_tokens: torch.Tensor, backend: str = "auto", kind: str = "smooth_l1") -> str:
    """The path "auto" takes: Triton for CUDA fp32 / fp16 / bf16 and the fused kinds, else the torch path.

    On the 2-core CPU machines the torch path measured within ~3% of torch.compile(reference) (single-thread
    CPU time, ViT-B width, fwd+bwd: 26.6 vs 26.5 ms; eager 30.8 ms) with no compile step (1-3 s warm, 10-50 s
    cold, again for new shapes) and the same peak memory (~1/3 of eager's); bench/suites/loss.py.
    fp64 skips Triton on CUDA (no fp64 tensor cores); "cosine" has no fused kernel.
    """
    if backend != "auto":
        return backend
    fp64 = student_tokens.dtype == torch.float64
    fused = student_tokens.is_cuda and triton is not None and not fp64 and kind in TRITON_KINDS
    return "triton" if fused else "torch"


def fd_loss(student_tokens, teacher_tokens, weight, bias=None, beta=2.0, eps=1e-5, whiten=True, backend="auto",
            kind="smooth_l1"):
    """Mean loss between ``student_tokens @ weight.T + bias`` and the whitened teacher tokens.

    student_tokens [B,N,Cs], teacher_tokens [B,N,Ct] (the frozen target: no gradient), weight [Ct,Cs],
    bias [Ct] or None; fp32 / fp16 / bf16 (fp64 too), math in fp32; returns an fp32 scalar (fp64 for fp64).
    Under autocast S, W and b are cast to the autocast dtype first, as ``F.linear`` does (tensor cores).
    ``kind``: "smooth_l1" (the paper's; ``beta=0`` is plain L1), "l2", "cosine" (see reference.py).
    ``whiten=False`` compares with the raw teacher tokens.
    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1; smooth_l1 and l2); "torch" (row-chunked ATen
    ops, any device, every kind); "reference" (the plain-PyTorch specification); "auto": see ``resolve_backend``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"fd_loss: unknown backend {backend!r}; choose one of {BACKENDS}")
    if kind not in LOSS_KINDS:
        raise ValueError(f"fd_loss: unknown kind {kind!r}; choose one of {LOSS_KINDS}")
    check_fd_inputs(student_tokens, teacher_tokens, weight, bias)
    if beta < 0:
        raise ValueError(f"fd_loss: beta must be >= 0, got {beta}")
    cast = autocast_dtype(student_tokens.device.type)
    if cast is not None and backend != "reference" and student_tokens.dtype != torch.float64:
        # F.linear's autocast rule (the reference gets it from F.linear itself); autograd casts grads back
        student_tokens, weight = student_tokens.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    backend = resolve_backend(student_tokens, backend, kind)
    args = (student_tokens, teacher_tokens, weight, bias, beta, eps, whiten, kind)
    if backend == "triton":
        return _fd_loss_triton(*args)
    if backend == "torch":
        return _fd_loss_torch(*args)
    return fd_loss_reference(student_tokens, teacher_tokens, weight, bias, beta=beta, eps=eps, whiten_target=whiten,
                             kind=kind)
