"""rpb_attention: the Triton kernels (interpreted on the CPU) against the fp64 specification.

Forward and all four gradients (dq, dk, dv, dbias) on awkward shapes; the kernel's error must be no worse
than ~2x the error of plain PyTorch doing the same math at the input precision; backward is repeatable bit
for bit; bad inputs raise ValueError before any launch.
"""
from __future__ import annotations

import math

import pytest
import torch

import fdfast.kernels.rpb_attention as rpb
from fdfast.functional import rpb_attention
from fdfast.kernels.reference import rpb_attention_reference
from fdfast.kernels.rpb_attention import rpb_attention_triton
from helpers_gpu_cases import gpu_params

# max |err| / max(1, max |fp64 value|) allowed, per dtype: (output, gradients)
TOLERANCE = {
    torch.float32: (1e-5, 5e-5),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 8e-2),
}
# the ~2x-of-PyTorch rule gets a floor of a few units in the last place (PyTorch can be exact by luck)
ULP_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (B, H, N, D, W windows or 0, tile size or None = the interpreter's default whole-row tile)
SHAPES = [
    pytest.param(1, 2, 197, 80, 0, None, id="B1-N197-D80"),
    pytest.param(2, 2, 197, 64, 0, 64, id="N197-D64-tiles64"),
    pytest.param(8, 2, 49, 32, 4, 16, id="swin-N49-W4-mask-tiles16"),
    pytest.param(8, 2, 49, 32, 4, None, id="swin-N49-W4-mask-small-path"),
    pytest.param(2, 3, 64, 128, 0, 32, id="N64-D128-tiles32"),
    pytest.param(1, 2, 257, 64, 0, None, id="vitl14-N257-D64"),
    pytest.param(2, 2, 144, 32, 2, 64, id="swin12-N144-W2-mask-tiles64"),
]


def make_inputs(B, H, N, D, W, dtype, device="cpu", bias_scale=1.0):
    """Unit-scale q, k, v, a learned-looking bias and SwinV2's -100 shift mask (some entries masked)."""
    g = torch.Generator().manual_seed(B * 1000 + N * 10 + D)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    bias = (bias_scale * torch.randn(H, N, N, generator=g)).to(device, dtype).requires_grad_()
    mask = None
    if W:
        mask = torch.where(torch.rand(W, N, N, generator=g) < 0.3, -100.0, 0.0).to(device, dtype)
        mask[:, torch.arange(N), torch.arange(N)] = 0.0  # every query keeps itself, as in Swin
    return q, k, v, bias, mask


def naive_attention(q, k, v, bias, mask, scale):
    """The same math in plain PyTorch at the inputs' own precision (no upcast): the error yardstick."""
    B, H, N, D = q.shape
    logits = (q @ k.transpose(-2, -1)) * scale + bias
    if mask is not None:
        W = mask.shape[0]
        logits = (logits.view(B // W, W, H, N, N) + mask.view(1, W, 1, N, N)).view(B, H, N, N)
    return logits.softmax(-1) @ v


def forward_backward(fn, q, k, v, bias, mask, dout):
    out = fn(q, k, v, bias, mask)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    return [out, *grads]


def rel_err(x, ref) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def check_against_fp64(kernel_fn, q, k, v, bias, mask, dtype):
    scale = 1.0 / math.sqrt(q.shape[-1])
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.device, dtype)
    got = forward_backward(kernel_fn, q, k, v, bias, mask, dout)
    as64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, bias)]
    mask64 = None if mask is None else mask.double().cpu()
    ref = forward_backward(lambda *a: rpb_attention_reference(*a, scale=scale), *as64, mask64, dout.double().cpu())
    low = forward_backward(lambda *a: naive_attention(*a, scale), q, k, v, bias, mask, dout)
    names = ("out", "dq", "dk", "dv", "dbias")
    errors = {}
    for i, name in enumerate(names):
        err, err_torch = rel_err(got[i].cpu(), ref[i]), rel_err(low[i].cpu(), ref[i])
        errors[name] = (err, err_torch)
        tol = TOLERANCE[dtype][0 if i == 0 else 1]
        assert err <= tol, f"{name}: error {err:.3g} over the {dtype} tolerance {tol:.3g}"
        assert err <= 2 * err_torch + ULP_FLOOR[dtype], (
            f"{name}: error {err:.3g} is over 2x plain PyTorch's {err_torch:.3g} at {dtype}")
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,N,D,W,tile", SHAPES)
def test_matches_fp64_reference(B, H, N, D, W, tile, dtype):
    q, k, v, bias, mask = make_inputs(B, H, N, D, W, dtype)

    def kernel(q, k, v, bias, mask):
        return rpb_attention_triton(q, k, v, bias, mask, block_m=tile, block_n=tile)

    check_against_fp64(kernel, q, k, v, bias, mask, dtype)


def test_no_bias_mask_only_and_frozen_bias():
    """bias=None (plain ViT), a mask without a bias and a bias without grad take their own kernel branches."""
    q, k, v, _, mask = make_inputs(4, 2, 49, 32, 2, torch.float32)
    scale = 0.3
    frozen_bias = torch.randn(2, 49, 49)  # a bias without grad: no dbias partials
    for bias_, mask_ in ((None, None), (None, mask), (frozen_bias, mask)):
        out = rpb_attention_triton(q, k, v, bias_, mask_, scale=scale, block_m=16, block_n=32)
        ref = rpb_attention_reference(q.double(), k.double(), v.double(), None if bias_ is None else bias_.double(),
                                      None if mask_ is None else mask_.double(), scale=scale)
        assert (out.double() - ref).abs().max().item() < 1e-5
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        rq, rk, rv = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in ((dq, rq), (dk, rk), (dv, rv)):
            assert (a.double() - b).abs().max().item() < 1e-5


def test_strided_inputs_and_multi_chunk_dbias():
    """timm's q, k, v are strided views of one qkv tensor; dbias reduced from 3 batch-chunk partials."""
    B, H, N, D = 5, 2, 40, 16
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views, not contiguous
    bias = torch.randn(H, N, N, requires_grad=True)
    out = rpb_attention_triton(q, k, v, bias, block_m=16, block_n=16, num_chunks=3)
    ref = rpb_attention_reference(q, k, v, bias)
    assert (out - ref).abs().max().item() < 1e-5
    dout = torch.randn_like(out)
    g_qkv, g_bias = torch.autograd.grad(out, (qkv, bias), dout)
    r_qkv, r_bias = torch.autograd.grad(ref, (qkv, bias), dout)
    assert (g_qkv - r_qkv).abs().max().item() < 1e-5
    assert (g_bias - r_bias).abs().max().item() < 1e-5 * B


def test_backward_is_bitwise_repeatable():
    q, k, v, bias, mask = make_inputs(8, 2, 49, 32, 4, torch.float32)
    dout = torch.randn(q.shape)
    runs = []
    for _ in range(3):
        out = rpb_attention_triton(q, k, v, bias, mask, block_m=16, block_n=64, num_chunks=2)
        runs.append(torch.autograd.grad(out, (q, k, v, bias), dout))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


def test_small_path_multi_chunk_dbias_is_exact_and_repeatable():
    """N <= 64 takes the one-kernel backward; dbias from 3 batch-chunk partials held in registers."""
    q, k, v, bias, mask = make_inputs(6, 2, 33, 16, 3, torch.float32)
    dout = torch.randn(q.shape)
    runs = []
    for _ in range(2):
        out = rpb_attention_triton(q, k, v, bias, mask, num_chunks=3)
        runs.append(torch.autograd.grad(out, (q, k, v, bias), dout))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref = rpb_attention_reference(q, k, v, bias, mask)
    for got, want in zip(runs[0], torch.autograd.grad(ref, (q, k, v, bias), dout)):
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("N", [49, 197], ids=["small-path", "general-path"])
def test_grid_axes_stay_within_cuda_limits(N, monkeypatch):
    """A Swin batch of 40,000 windows x 4 heads: B*H = 160,000 programs must sit on grid axis 0 (limit 2**31-1);
    axes 1 and 2 stay <= 65,535. Meta tensors: only the host launch logic runs."""
    grids = []

    def record(fn, tuned, grid, args, flags, tiles):
        meta = dict(flags, **(tiles or {"BLOCK_M": 16, "BLOCK_N": 16}))
        grids.append((fn.__name__ if hasattr(fn, "__name__") else str(fn), grid(meta) if callable(grid) else grid))

    monkeypatch.setattr(rpb, "_run", record)
    B, H, D = 40_000, 4, 32
    q, k, v = (torch.empty(B, H, N, D, device="meta", requires_grad=True) for _ in range(3))
    bias = torch.empty(H, N, N, device="meta", requires_grad=True)
    out = rpb._RPBAttentionTriton.apply(q, k, v, bias, None, 0.125)
    torch.autograd.grad(out, (q, k, v, bias), torch.empty_like(out))
    assert len(grids) == (3 if rpb._small_path(N, D, q.dtype, q.device) else 4)
    for name, grid in grids:
        assert all(g <= 65_535 for g in grid[1:]), (name, grid)
    assert max(g[0] for _, g in grids) >= B  # the big axis is axis 0


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference", "triton"])
def test_backends_agree(backend):
    q, k, v, bias, mask = make_inputs(4, 2, 16, 16, 2, torch.float32)
    out = rpb_attention(q, k, v, bias, mask, backend=backend)
    ref = rpb_attention_reference(q, k, v, bias, mask)
    assert (out - ref).abs().max().item() < 1e-5
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, bias))
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < 1e-4


def test_bias_in_fp32_with_fp16_inputs():
    """Under AMP the learned table stays fp32 while q, k, v are half: accepted, dbias comes back in fp32."""
    q, k, v, _, _ = make_inputs(2, 2, 33, 32, 0, torch.float16)
    bias = torch.randn(2, 33, 33, requires_grad=True)
    out = rpb_attention_triton(q, k, v, bias)
    (dbias,) = torch.autograd.grad(out.float().sum(), (bias,))
    assert dbias.dtype == torch.float32
    ref = rpb_attention_reference(q.double(), k.double(), v.double(), bias.double())
    assert (out.double() - ref).abs().max().item() < 2e-3


def test_cpu_bf16_dbias_is_summed_over_the_batch_in_fp32():
    """The CPU bf16 path adds every image's gradient of the shared table in fp32 (one table collects them all):
    the batched dbias equals the fp64 sum of the per-image dbias to fp32 rounding (a bf16 sum is off by ~2**-9)."""
    B, H, N, D = 64, 2, 16, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g).bfloat16().requires_grad_() for _ in range(3))
    bias = torch.randn(H, N, N, generator=g, requires_grad=True)  # the fp32 table of an autocast run
    dout = torch.randn(B, H, N, D, generator=g).bfloat16()
    (dbias,) = torch.autograd.grad(rpb_attention(q, k, v, bias), (bias,), dout)
    assert dbias.dtype == torch.float32
    per_image = [torch.autograd.grad(rpb_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], bias), (bias,),
                                     dout[i:i + 1])[0] for i in range(B)]
    exact = torch.stack(per_image).double().sum(0)
    assert ((dbias.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5


def bad_inputs():
    q = torch.randn(2, 3, 10, 16)
    bias = torch.randn(3, 10, 10)
    yield "bias must be [3, 10, 10]", dict(q=q, k=q, v=q, bias=bias.unsqueeze(0))  # timm's [1, H, N, N]
    yield "bias must be [3, 10, 10]", dict(q=q, k=q, v=q, bias=torch.randn(4, 10, 10))  # wrong heads
    yield "bias must be [3, 10, 10]", dict(q=q, k=q, v=q, bias=torch.randn(3, 10, 11))
    yield "same [B, H, N, D] shape", dict(q=q, k=torch.randn(2, 3, 10, 8), v=q)  # D mismatch
    yield "same [B, H, N, D] shape", dict(q=q, k=torch.randn(2, 3, 12, 16), v=q)
    yield "must be [B, H, N, D]", dict(q=q[0], k=q[0], v=q[0])
    yield "share one floating-point dtype", dict(q=q, k=q.half(), v=q)
    yield "share one floating-point dtype", dict(q=q.long(), k=q.long(), v=q.long())
    yield "mask must be [W, 10, 10]", dict(q=q, k=q, v=q, mask=torch.zeros(2, 10, 9))
    yield "not a multiple of the 3 mask windows", dict(q=q, k=q, v=q, mask=torch.zeros(3, 10, 10))
    yield "bias is on meta", dict(q=q, k=q, v=q, bias=torch.empty(3, 10, 10, device="meta"))
    yield "mask gets no gradient", dict(q=q, k=q, v=q, mask=torch.zeros(1, 10, 10, requires_grad=True))


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("message,kwargs", list(bad_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_clear_errors(message, kwargs, backend):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rpb_attention(**kwargs, backend=backend)


def test_unknown_backend_and_triton_without_interpreter(monkeypatch):
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        rpb_attention(q, q, q, backend="flash")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rpb_attention(q, q, q, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="power of two >= 16"):
        rpb_attention_triton(q, q, q, block_m=24)
    wide = torch.randn(1, 1, 16, 256)
    with pytest.raises(ValueError, match="head dims up to 128"):
        rpb_attention(wide, wide, wide, backend="triton")


# The GPU cases, as tables bench/gpu_budget.py also reads (it counts the compiles they cost on a cold machine).
# Core (bench/gpu_check.sh runs these first): bf16, the training dtype, at the training shapes (ViT-B; Swin
# windows of 7 x 7 on the small-N kernels) and fp32 once on each path with a shift mask (fp32 keeps small
# non-tensor-core tiles: its own configs of every kernel). Extra (ids "extra-...", run when the GPU window has
# time left): Swin windows of 14 x 14 with the mask in bf16, B = 1 with D = 80 (padded to 128), and fp16.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ATTN_GPU_CASES = [((32, 12, 197, 64, 0), torch.bfloat16), ((512, 4, 49, 32, 64), torch.bfloat16),
                  ((2, 2, 197, 64, 2), torch.float32), ((4, 2, 16, 16, 2), torch.float32)]
ATTN_GPU_EXTRA_CASES = [((128, 4, 196, 32, 16), torch.bfloat16), ((1, 2, 197, 80, 0), torch.bfloat16),
                        ((2, 2, 144, 32, 2), torch.float16)]
ATTN_GPU_FORWARD_CASES = [((17_500, 4, 16, 16, 0), torch.bfloat16)]  # B*H = 70,000 programs on grid axis 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape,dtype", gpu_params(ATTN_GPU_CASES, ATTN_GPU_EXTRA_CASES))
def test_gpu_matches_fp64_reference_and_repeats(shape, dtype, monkeypatch):
    """Autotuned tiles, many dbias batch chunks: every gradient, dbias included, against fp64 (per-dtype
    tolerance and <= 2x plain PyTorch's error), and backward repeated bit for bit."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 tolerance needs IEEE products
    q, k, v, bias, mask = make_inputs(*shape, dtype, device="cuda")
    errors = check_against_fp64(lambda *a: rpb_attention(*a, backend="triton"), q, k, v, bias, mask, dtype)
    print(dtype, errors)
    dout = torch.randn_like(q)
    first = None
    for _ in range(3):
        out = rpb_attention(q, k, v, bias, mask, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v, bias), dout)
        first = first or grads
        assert all(torch.equal(a, b) for a, b in zip(first, grads))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape,dtype", gpu_params(ATTN_GPU_FORWARD_CASES))
def test_gpu_batch_heads_over_65535_launch(shape, dtype):
    """B*H = 70,000 > 65,535 (the old grid axis 1 limit): launches and matches SDPA."""
    q, k, v, bias, _ = make_inputs(*shape, dtype, device="cuda")
    out = rpb_attention(q, k, v, bias, backend="triton")
    ref = rpb_attention(q, k, v, bias, backend="sdpa")
    assert (out.float() - ref.float()).abs().max().item() < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp64_takes_the_reference_path():
    """fp64 on CUDA: "auto" runs the fp64 specification (the kernels keep fp32 state); "triton" refuses."""
    q, k, v, bias, _ = make_inputs(2, 2, 33, 16, 0, torch.float64, device="cuda")
    out = rpb_attention(q, k, v, bias)
    assert out.dtype == torch.float64
    assert torch.equal(out, rpb_attention_reference(q, k, v, bias))
    with pytest.raises(ValueError, match="float64"):
        rpb_attention(q, k, v, bias, backend="triton")
