"""Fused FD loss (kernels/fd_loss.py): forward, dS, dW, db against the fp64 reference, determinism, errors.

The Triton kernels run on the CPU through TRITON_INTERPRET=1 (tests/conftest.py); bf16 numerics are wrong in
the interpreter, so Triton's bf16 is tested on a GPU only (``-m gpu``); the CPU "torch" path is tested in bf16 here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fdfast.kernels.fd_loss as fd
from fdfast.kernels.fd_loss import fd_loss
from fdfast.kernels.reference import fd_loss_reference
from fdfast.loss import FDLoss
from helpers_gpu_cases import gpu_params

# max |kernel - fp64 reference| / max |reference|, per input dtype (forward loss and every gradient)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# awkward (B, N, Cs, Ct): 197 / 49 / 1 tokens, widths that are not multiples of the 64-wide blocks
SHAPES = [(1, 197, 24, 40), (2, 49, 96, 80), (3, 1, 40, 24), (2, 77, 72, 96)]
CPU_BACKENDS = ["triton", "torch"]


def make_inputs(B, N, CS, CT, dtype, device="cpu", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(B, N, CS, generator=gen).to(device, dtype).requires_grad_()
    T = (torch.randn(B, N, CT, generator=gen) * 3 + 1).to(device, dtype)  # off-centre: whitening matters
    W = (torch.randn(CT, CS, generator=gen) / CS**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(CT, generator=gen) * 0.5).to(device, dtype).requires_grad_() if bias else None
    return S, T, W, b


def loss_and_grads(fn, S, T, W, b, **kw):
    """(loss, [dS, dW, db]) of one forward + backward; grads are fresh tensors."""
    params = [t for t in (S, W, b) if t is not None]
    loss = fn(S, T, W, b, **kw)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def reference_fp64(S, T, W, b, beta=2.0, whiten=True, kind="smooth_l1"):
    up = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (S, T, W, b)]
    return loss_and_grads(fd_loss_reference, *up, beta=beta, whiten_target=whiten, kind=kind)


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def assert_close_to_reference(got, ref, dtype):
    names = ["loss", "dS", "dW", "db"]
    for name, x, r in zip(names, [got[0], *got[1]], [ref[0], *ref[1]]):
        assert rel_err(x, r) <= TOLERANCE[dtype], f"{name}: rel err {rel_err(x, r):.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(shape, dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; test_gpu_matches_fp64_reference covers it")
    S, T, W, b = make_inputs(*shape, dtype)
    loss, grads = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert [g.dtype for g in grads] == [dtype] * 3  # each gradient in its input's dtype
    assert_close_to_reference((loss, grads), reference_fp64(S, T, W, b), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beta, whiten, bias", [(0.0, True, True), (0.5, True, False), (2.0, False, True),
                                               (10.0, False, False), (1e-3, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_beta_whiten_and_bias_options(beta, whiten, bias, backend, dtype):
    S, T, W, b = make_inputs(2, 49, 40, 72, dtype, bias=bias)
    got = loss_and_grads(fd_loss, S, T, W, b, beta=beta, whiten=whiten, backend=backend)
    assert len(got[1]) == (3 if bias else 2)
    assert_close_to_reference(got, reference_fp64(S, T, W, b, beta=beta, whiten=whiten), dtype)


def plain_fp16_math(S, T, W, b, beta=2.0):
    """The same math as the reference, every op in fp16 (what a naive half-precision port would do)."""
    pred = F.linear(S, W, b)
    target = F.layer_norm(T, T.shape[-1:], eps=1e-5)
    diff = pred - target
    a = diff.abs()
    return torch.where(a < beta, 0.5 * diff * diff / beta, a - 0.5 * beta).mean()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_error_no_worse_than_plain_fp16_pytorch(backend):
    S, T, W, b = make_inputs(2, 197, 96, 80, torch.float16)
    ref = reference_fp64(S, T, W, b)
    kernel = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
    naive = loss_and_grads(plain_fp16_math, S, T, W, b)
    for name, k, n, r in zip(["loss", "dS", "dW", "db"], [kernel[0], *kernel[1]], [naive[0], *naive[1]],
                             [ref[0], *ref[1]]):
        # 2x the naive error, plus half an fp16 ulp of the output (both round their result to fp16)
        assert rel_err(k, r) <= 2 * rel_err(n, r) + 2**-12, f"{name}: {rel_err(k, r):.2e} vs naive {rel_err(n, r):.2e}"


# GPU-like small tiles in the interpreter: many tiles in grouped order, partial sums over 3 x 5 tiles
SMALL_TILES = {"stats": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
               "fwd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
               "dS": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_bit_identical_across_runs(backend, monkeypatch):
    monkeypatch.setattr(fd, "INTERPRETER_TILES", SMALL_TILES)  # many tiles: the grouped order and partials
    S, T, W, b = make_inputs(1, 45, 72, 40, torch.float32)
    first = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
    for _ in range(2):
        again = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
        assert torch.equal(again[0], first[0])
        assert all(torch.equal(x, y) for x, y in zip(again[1], first[1]))
    assert_close_to_reference(first, reference_fp64(S, T, W, b), torch.float32)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_small_grouped_tiles_match_reference(kind, monkeypatch):
    """Ragged last tiles on every axis (49 rows, Ct 40, Cs 72 over 16-wide tiles) in the grouped order."""
    monkeypatch.setattr(fd, "INTERPRETER_TILES", SMALL_TILES)
    S, T, W, b = make_inputs(1, 49, 72, 40, torch.float16)
    got = loss_and_grads(fd_loss, S, T, W, b, backend="triton", kind=kind)
    assert_close_to_reference(got, reference_fp64(S, T, W, b, kind=kind), torch.float16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_fp64(backend):
    S, T, W, b = make_inputs(1, 5, 6, 7, torch.float64)
    T = T.detach()
    # beta=1 keeps every |diff| well inside or outside the quadratic zone for finite differences
    assert torch.autograd.gradcheck(lambda s, w, c: fd_loss(s, T, w, c, beta=1.0, backend=backend), (S, W, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_like_amp(backend):
    """fp16 student with an fp32 projection (autocast-style): each gradient comes back in its input's dtype."""
    S, T, _, _ = make_inputs(2, 49, 40, 24, torch.float16)
    _, _, W, b = make_inputs(2, 49, 40, 24, torch.float32)
    loss, (dS, dW, db) = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
    assert (dS.dtype, dW.dtype, db.dtype) == (torch.float16, torch.float32, torch.float32)
    assert_close_to_reference((loss, [dS, dW, db]), reference_fp64(S, T, W, b), torch.float16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_kinds_match_fp64_reference(kind, dtype, backend):
    if backend == "triton" and kind == "cosine":
        pytest.skip("cosine has no fused kernel: test_cosine_on_triton_is_a_clear_error")
    S, T, W, b = make_inputs(2, 49, 40, 72, dtype)
    got = loss_and_grads(fd_loss, S, T, W, b, backend=backend, kind=kind)
    assert_close_to_reference(got, reference_fp64(S, T, W, b, kind=kind), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["l2", "cosine"])  # smooth_l1: test_gradcheck_fp64
def test_kinds_gradcheck_fp64(kind, backend):
    if backend == "triton" and kind == "cosine":
        pytest.skip("cosine has no fused kernel")
    S, T, W, b = make_inputs(1, 5, 6, 7, torch.float64)
    T = T.detach()
    assert torch.autograd.gradcheck(lambda s, w, c: fd_loss(s, T, w, c, beta=1.0, backend=backend, kind=kind),
                                    (S, W, b))


def test_cosine_on_triton_is_a_clear_error_and_auto_takes_torch():
    S, T, W, b = make_inputs(1, 9, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="kind='cosine' has no fused Triton kernel"):
        fd_loss(S, T, W, b, backend="triton", kind="cosine")
    assert fd.resolve_backend(S, "auto", "cosine") == "torch"
    with pytest.raises(ValueError, match="unknown kind 'huber'"):
        fd_loss(S, T, W, b, kind="huber")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_follows_autocast_like_f_linear(backend):
    """Under autocast S, W, b are cast to the autocast dtype (fp16 here: the interpreter gets bf16 wrong) as
    F.linear does, so the loss equals the fp64 loss of the fp16-rounded inputs; grads come back in fp32."""
    S, T, W, b = make_inputs(2, 49, 40, 72, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, grads = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    rounded = [t.detach().half().float().requires_grad_() for t in (S, W, b)]
    ref = reference_fp64(rounded[0], T, rounded[1], rounded[2])
    assert rel_err(loss, ref[0]) <= 2e-3  # the reference rounds pred to fp16 too (F.linear's output)
    if backend != "reference":
        # the kernel's pred is an fp32 accumulation of fp16 products: fp32-close to the rounded-input loss
        assert rel_err(loss, ref[0]) <= 1e-5
        assert_close_to_reference((loss, grads), ref, torch.float16)
    fp32 = loss_and_grads(fd_loss, S, T, W, b, backend=backend)
    assert not torch.equal(fp32[0], loss)  # autocast changed the operands: this test could fail


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_and_frozen_teacher(backend):
    S0, T0, W0, b = make_inputs(2, 49, 40, 24, torch.float32)
    S = S0.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [B,N,C] view, strided
    T = T0.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # the target: gets no grad
    W = W0.detach().t().contiguous().t().requires_grad_()
    assert not (S.is_contiguous() or T.is_contiguous() or W.is_contiguous())
    loss = fd_loss(S, T, W, b, backend=backend)
    loss.backward()
    assert T.grad is None
    assert_close_to_reference((loss.detach(), [S.grad, W.grad, b.grad]), reference_fp64(S0, T0, W0, b), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_forward_matches_training_forward(backend):
    S, T, W, b = make_inputs(1, 197, 24, 40, torch.float32)
    with torch.no_grad():
        evaluated = fd_loss(S, T, W, b, backend=backend)
    assert not evaluated.requires_grad
    assert torch.equal(evaluated, fd_loss(S, T, W, b, backend=backend).detach())


def test_auto_on_cpu_is_the_measured_fastest_path():
    """bench/suites/loss.py measured the row-chunked torch path as the CPU choice (see resolve_backend)."""
    S, T, W, b = make_inputs(2, 49, 40, 24, torch.float32)
    assert fd.resolve_backend(S) == "torch" and fd.resolve_backend(S.double()) == "torch"
    assert torch.equal(fd_loss(S, T, W, b), fd_loss(S, T, W, b, backend="torch"))


def test_fdloss_module_with_triton_backend():
    torch.manual_seed(0)
    module = FDLoss(24, 40, backend="triton")
    S, T, _, _ = make_inputs(1, 197, 24, 40, torch.float32)
    loss = module(S, T)
    loss.backward()
    ref = reference_fp64(S, T, module.proj.weight, module.proj.bias)
    assert_close_to_reference((loss.detach(), [S.grad, module.proj.weight.grad, module.proj.bias.grad]), ref,
                              torch.float32)


BAD_INPUTS = {
    "mismatched N": (lambda S, T, W, b: (S, T[:, :-1], W, b), "disagree on \\[B,N\\]"),
    "mismatched B": (lambda S, T, W, b: (S, T[:1], W, b), "disagree on \\[B,N\\]"),
    "2-D student": (lambda S, T, W, b: (S[0], T, W, b), "expects student_tokens \\[B,N,Cs\\]"),
    "2-D both": (lambda S, T, W, b: (S[0], T[0], W, b), "reshape 2-D inputs"),
    "weight transposed": (lambda S, T, W, b: (S, T, W.t(), b), "weight must be \\[Ct, Cs\\]"),
    "bias size": (lambda S, T, W, b: (S, T, W, b[:-1]), "bias must be"),
    "integer student": (lambda S, T, W, b: (S.long(), T, W, b), "student_tokens must be a floating-point"),
    "integer teacher": (lambda S, T, W, b: (S, T.to(torch.int32), W, b), "teacher_tokens must be a floating-point"),
    "integer weight": (lambda S, T, W, b: (S, T, W.to(torch.int8), b), "weight must be a floating-point"),
    "empty": (lambda S, T, W, b: (S[:, :0], T[:, :0], W, b), "empty input"),
}


@pytest.mark.parametrize("backend", ["triton", "torch", "reference", "auto"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_value_errors(case, backend):
    make_bad, message = BAD_INPUTS[case]
    S, T, W, b = make_inputs(2, 9, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        fd_loss(*make_bad(S.detach(), T, W.detach(), b.detach()), backend=backend)


def test_bad_options_raise_clear_value_errors():
    S, T, W, b = make_inputs(2, 9, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fd_loss(S, T, W, b, backend="cuda")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fd_loss(S, T, W, b, beta=-1.0, backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    S, T, W, b = make_inputs(2, 9, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        fd_loss(S, T, W, b, backend="triton")


# ---------------------------------------------------------------------------------------------------------
# GPU only: bf16 numerics and the real ViT-B shape (run with `pytest -m gpu` on a CUDA machine)
# ---------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# The GPU cases, as tables bench/gpu_budget.py also reads (it counts the compiles they cost on a cold machine).
# Core (bench/gpu_check.sh runs these first): bf16, the training dtype, at ViT-B (batch 256) and at ViT-L/14's 257
# tokens with an odd Ct, and fp32 once (the small-tile, non-tensor-core configs of every kernel). Extra (ids
# "extra-...", run when the GPU window has time left): an awkward shape in bf16 and fp16.
FD_GPU_CASES = [((256, 197, 768, 768), torch.bfloat16), ((2, 257, 1024, 1000), torch.bfloat16),
                ((3, 197, 24, 40), torch.float32)]
FD_GPU_EXTRA_CASES = [((3, 197, 24, 40), torch.bfloat16), ((3, 197, 24, 40), torch.float16)]
FD_GPU_AUTOCAST_SHAPE = (64, 197, 384, 768)  # fp32 student tokens under bf16 autocast, as training calls it


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape,dtype", gpu_params(FD_GPU_CASES, FD_GPU_EXTRA_CASES))
def test_gpu_matches_fp64_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 tolerance needs IEEE products
    S, T, W, b = make_inputs(*shape, dtype, device="cuda")
    got = loss_and_grads(fd_loss, S, T, W, b, backend="triton")
    assert_close_to_reference(got, reference_fp64(S, T, W, b), dtype)
    again = loss_and_grads(fd_loss, S, T, W, b, backend="triton")
    assert torch.equal(got[0], again[0]) and all(torch.equal(x, y) for x, y in zip(got[1], again[1]))


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_is_triton_and_lean():
    """At ViT-B bf16, the fused path's peak extra memory is at most 40% of the eager reference's."""
    S, T, W, b = make_inputs(256, 197, 768, 768, torch.bfloat16, device="cuda")
    assert fd.resolve_backend(S) == "triton"

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_and_grads(fn, S, T, W, b)
        return torch.cuda.max_memory_allocated() - base

    eager = peak(fd_loss_reference)
    fused = peak(fd_loss)
    assert fused <= 0.4 * eager, f"fused peak {fused / 2**20:.0f} MiB vs eager {eager / 2**20:.0f} MiB"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_gpu_autocast_bf16_uses_bf16_operands(kind):
    """Under bf16 autocast the fused loss equals the fp64 loss of bf16-rounded S, W, b (tensor-core path)."""
    S, T, W, b = make_inputs(*FD_GPU_AUTOCAST_SHAPE, torch.float32, device="cuda")
    T = T.bfloat16()  # the teacher runs in bf16 in training: its tokens arrive in bf16
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(fd_loss, S, T, W, b, backend="triton", kind=kind)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    rounded = [t.detach().bfloat16().float().requires_grad_() for t in (S, W, b)]
    ref = reference_fp64(rounded[0], T, rounded[1], rounded[2], kind=kind)
    assert_close_to_reference((loss, grads), ref, torch.bfloat16)
