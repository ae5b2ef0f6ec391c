"""Attention with a learned bias shared over the batch: fdfast vs SDPA, FlexAttention and timm's eager math.

    python bench/run.py --suite attention [--device cpu|cuda] [--quick]

Providers (each learns the bias, i.e. dbias is computed in "bwd" / "full"):
- fdfast           ``rpb_attention(backend="auto")``: the Triton kernel on CUDA; on the CPU SDPA in fp32 (the row's
                   ``path`` is what the call really ran, see ``bench/suites/paths.py``)
- sdpa_math        SDPA's math backend, bias as a broadcast [1, H, N, N] float mask
- sdpa_efficient   (CUDA) SDPA's memory-efficient backend with the bias as a broadcast float mask (materialised
                   to [B, H, N, N] only if the kernel refuses the broadcast)
- flex             (CUDA; CPU forward only and not in --quick: no CPU backward, compiling costs ~30 s)
                   ``torch.compile(flex_attention)``, bias through ``score_mod`` (its dbias uses atomics)
- timm_eager       timm's non-fused path: (q * scale) @ k^T + bias, softmax, @ v

Modes: fwd (no grad), bwd (backward of a retained graph), full (forward + backward). Each row has the median
and min time in ms, ``speedup`` = provider min time / fdfast min time (> 1: fdfast is faster; the min is the
steadier figure on a shared CPU), the peak memory above the inputs (CUDA) and ``saved_mb``, the bytes autograd
keeps for backward (every device). On the CPU fdfast runs SDPA, so its rows there mostly measure noise.

Shapes (CUDA, issue 12): ViT-B (B = 128, H = 12, N = 197, D = 64) and Swin windows (B x nW = 2048, H = 4, D = 32,
shift mask) at N = 49 (7 x 7 windows, 64 per image: the small-N kernels) and N = 196 (14 x 14, 16 per image);
--quick keeps ViT-B and the N = 49 windows. CPU: ViT-S/B/L14 and a SwinV2-B stage-1 window layer at small batches.

What the learned bias costs (suite rows ``bias_cost``; the Triton path, at ViT-B on CUDA): the forward with and
without the bias, and the backward with and without its gradient (STORE_DBIAS: the dq kernel's dbias atomics
and the partials' sum), with each Triton kernel's own device time from ``torch.profiler`` (``kernel_ms``: dq
with / without STORE_DBIAS). On the CPU these rows run at a small shape only where Triton can run
(TRITON_INTERPRET=1, as ``bench/gpu_check.sh --dry-run`` sets): they prove the code, their times mean nothing.
The autotuners' choices go to ``attention_autotune.json`` beside the rows.

GPU goals (issue 12; to check when a GPU is lent): bf16 full (fwd + bwd with dbias) >= 1.3x ``sdpa_efficient``
and >= 1.2x ``flex`` at both shapes; deterministic dbias; activation memory per layer beyond q, k, v, o and the
log-sum-exp under 5 MB (``saved_mb`` of fdfast minus 4 x the q size).
"""
from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from bench.suites.paths import dispatched
from fdfast.functional import rpb_attention
from fdfast.kernels import rpb_attention as rpb_module
from fdfast.kernels.utils import triton_usable

# (B, H, N, D) of the bias-cost rows: ViT-B at the training batch on CUDA; a small ViT-B-like shape on the CPU
BIAS_COST_SHAPES = {"cuda": [(128, 12, 197, 64)], "cpu": [(2, 2, 197, 64)]}


def shapes(device: str, quick: bool):
    """(name, B, H, N, D, W windows); B counts windows for Swin (batch x W)."""
    if device == "cuda":
        found = [("vit_b", 128, 12, 197, 64, 0), ("swin_w7", 2048, 4, 49, 32, 64), ("swin_w14", 2048, 4, 196, 32, 16)]
        return found[:2] if quick else found
    if quick:
        return [("vit_s", 4, 6, 197, 64, 0), ("vit_b", 2, 12, 197, 64, 0), ("vit_l14", 1, 16, 257, 64, 0),
                ("swinv2_b_w7", 2 * 16, 4, 49, 32, 16)]
    return [("vit_s", 32, 6, 197, 64, 0), ("vit_b", 16, 12, 197, 64, 0), ("vit_l14", 8, 16, 257, 64, 0),
            ("swinv2_b_w7", 4 * 64, 4, 49, 32, 64)]


def _window_mask(mask, B, N):
    """[W, N, N] -> [B, 1, N, N] in the batch * W window layout."""
    W = mask.shape[0]
    return mask.view(1, W, 1, N, N).expand(B // W, W, 1, N, N).reshape(B, 1, N, N)


def sdpa_math(q, k, v, bias, mask):
    attn_mask = bias.unsqueeze(0)
    if mask is not None:
        attn_mask = attn_mask + _window_mask(mask, q.shape[0], q.shape[2])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def sdpa_efficient(q, k, v, bias, mask):
    """Mem-efficient SDPA with the additive bias as a broadcast mask ([1, H, N, N], plus the [B, 1, N, N] window
    mask); its backward yields the bias gradient through the broadcast."""
    B, H, N, _ = q.shape
    attn_mask = bias.unsqueeze(0)
    if mask is not None:
        attn_mask = attn_mask + _window_mask(mask, B, N)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        except RuntimeError:  # a build that wants a dense mask: give it one (slower, but the baseline runs)
            dense = attn_mask.expand(B, H, N, N).contiguous()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def timm_eager(q, k, v, bias, mask):
    B, H, N, D = q.shape
    attn = (q * D ** -0.5) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        attn = (attn.view(-1, mask.shape[0], H, N, N) + mask.view(1, -1, 1, N, N)).view(B, H, N, N)
    return attn.softmax(-1) @ v


def make_flex():
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q, k, v, bias, mask):
        W = mask.shape[0] if mask is not None else 1

        def score_mod(score, b, h, q_idx, kv_idx):
            score = score + bias[h, q_idx, kv_idx]
            if mask is not None:
                score = score + mask[b % W, q_idx, kv_idx]
            return score

        return compiled(q, k, v, score_mod=score_mod)

    return flex


def providers(device: str, quick: bool):
    found = {"fdfast": lambda q, k, v, bias, mask: rpb_attention(q, k, v, bias, mask), "sdpa_math": sdpa_math}
    if device == "cuda":
        found["sdpa_efficient"] = sdpa_efficient
    if device == "cuda" or not quick:
        found["flex"] = make_flex()
    found["timm_eager"] = timm_eager
    return found


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, device, reps, warmup) -> dict:
    """{provider: (median, min) ms}. Providers take turns within each repetition, so a burst of load from
    other jobs on a shared CPU hits all of them alike; the min is the steadier figure there."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def peak_mb(step, device):
    """Peak memory one call allocates above what is already live (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def saved_bytes(fn, inputs) -> int:
    """Bytes of the distinct tensors autograd saves for backward (the activation memory of this op)."""
    seen = {}
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:  # q, k, v, bias are the layer's inputs, alive anyway
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def make_step(fn, mode, q, k, v, bias, mask):
    """One timed call: fwd (no grad), bwd (backward of a retained graph) or full (forward + backward)."""
    dout = torch.randn_like(q)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, bias, mask)
    elif mode == "full":
        def step():
            out = fn(q, k, v, bias, mask)
            torch.autograd.grad(out, (q, k, v, bias), dout)
    else:
        out = fn(q, k, v, bias, mask)

        def step():
            torch.autograd.grad(out, (q, k, v, bias), dout, retain_graph=True)
    return step


def run(ctx):
    device = ctx.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps, warmup = (9, 3) if ctx.quick else (20, 5)
    if device == "cuda":
        reps, warmup = (10, 3) if ctx.quick else (30, 10)
    found = providers(device, ctx.quick)
    for shape, B, H, N, D, W in shapes(device, ctx.quick):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        bias = torch.randn(H, N, N, generator=g).to(device, dtype).requires_grad_()
        mask = None
        if W:
            mask = torch.where(torch.rand(W, N, N, generator=g) < 0.3, -100.0, 0.0).to(device, dtype)
        fdfast_path = dispatched("attention", lambda: found["fdfast"](q, k, v, bias, mask))
        # --quick on CUDA (one GPU window): forward + backward with dbias only, the figure the goals name
        for mode in ("full",) if ctx.quick and device == "cuda" else ("fwd", "bwd", "full"):
            steps = {}
            for name, fn in found.items():
                if name == "flex" and device == "cpu" and mode != "fwd":
                    continue  # FlexAttention has no CPU backward
                try:
                    steps[name] = make_step(fn, mode, q, k, v, bias, mask)
                    steps[name]()  # compiles / fails here, before the timed loop
                except Exception as e:  # a provider that cannot run this shape is reported, not fatal
                    print(f"bench attention: {name} {shape} {mode} failed: {type(e).__name__}: {str(e)[:200]}")
                    steps.pop(name, None)
            timings = time_interleaved(steps, device, reps, warmup)
            fdfast_min = timings["fdfast"][1] if "fdfast" in timings else None
            for name, (ms, ms_min) in timings.items():
                saved_mb = None
                if mode == "full":
                    saved_mb = saved_bytes(lambda: found[name](q, k, v, bias, mask), (q, k, v, bias)) / 2 ** 20
                ctx.record(shape=shape, B=B, H=H, N=N, D=D, windows=W, dtype=str(dtype).split(".")[-1], mode=mode,
                           provider=name, path=fdfast_path if name == "fdfast" else None, ms=ms, ms_min=ms_min,
                           speedup=ms_min / fdfast_min if fdfast_min else None,  # provider / fdfast (min times)
                           peak_mb=peak_mb(steps[name], device), saved_mb=saved_mb)
    bias_cost(ctx, dtype, reps, warmup)
    choices = rpb_module.autotune_choices()
    if choices:  # CUDA only: what the autotuners picked for every key the suite met
        (ctx.results / "attention_autotune.json").write_text(json.dumps(choices, indent=1) + "\n")


def kernel_device_ms(step) -> dict:
    """{Triton kernel name: device ms} of one call of ``step`` (CUDA), from torch.profiler's kernel events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    found = {}
    for event in prof.key_averages():
        if "_attn_" in event.key:
            total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            found[event.key] = round(total / 1e3, 4)  # us -> ms
    return found


def bias_cost(ctx, dtype, reps, warmup):
    """The Triton path with and without the learned bias (forward) and its gradient (backward: STORE_DBIAS)."""
    device = ctx.device
    if not triton_usable(torch.device(device)):
        print(f"bench attention: bias_cost rows need CUDA or TRITON_INTERPRET=1 on the CPU; skipped on {device}")
        return
    if device == "cpu":
        reps, warmup = 1, 0  # interpreted kernels: the rows prove the code runs, their times mean nothing
    for B, H, N, D in BIAS_COST_SHAPES[device]:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        bias = torch.randn(H, N, N, generator=g).to(device, dtype)
        learned, frozen = bias.clone().requires_grad_(), bias
        dout = torch.randn_like(q)

        def triton_attention(table):
            return rpb_attention(q, k, v, table, None, backend="triton")

        def forward(table):
            def step():
                with torch.no_grad():
                    triton_attention(table)
            return step

        def backward(table):
            out = triton_attention(table)
            wrt = (q, k, v) + ((table,) if table.requires_grad else ())
            return lambda: torch.autograd.grad(out, wrt, dout, retain_graph=True)

        tables = {("fwd", "bias"): frozen, ("fwd", "no_bias"): None, ("bwd", "dbias"): learned,
                  ("bwd", "no_dbias"): frozen}
        variants = {key: (forward if key[0] == "fwd" else backward)(table) for key, table in tables.items()}
        # the path of the call that builds each variant's graph (a backward runs where its forward ran)
        paths = {key: dispatched("attention", lambda t=table: triton_attention(t)) for key, table in tables.items()}
        timings = time_interleaved({key: step for key, step in variants.items()}, device, reps, warmup)
        for (mode, variant), (ms, ms_min) in timings.items():
            base = timings[(mode, "bias" if mode == "fwd" else "dbias")][1]
            ctx.record(shape="vit_b" if device == "cuda" else "vit_b_small", B=B, H=H, N=N, D=D, windows=0,
                       dtype=str(dtype).split(".")[-1], mode=mode, provider=f"bias_cost:{variant}",
                       path=paths[(mode, variant)], ms=ms, ms_min=ms_min,
                       speedup=ms_min / base if base else None,  # variant / with-bias (min times)
                       kernel_ms=kernel_device_ms(variants[(mode, variant)]) if device == "cuda" else None)
