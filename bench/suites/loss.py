"""Benchmark of the FD loss: eager reference vs torch.compile(reference) vs fdfast, forward / backward / full.

On CUDA every provider runs as training calls it: fp32 student tokens (the final norm's output) and an fp32
projection under ``torch.autocast("cuda", bfloat16)``, so the eager and compiled baselines take bf16 tensor-core
matmuls too (F.linear autocasts) and fdfast casts to bf16 as F.linear would (rows say ``autocast: bf16``). The
teacher tokens are bf16 on every device: training keeps the frozen teacher in bf16 (``teacher_dtype`` in rows).
The fdfast row's ``backend`` is the path its call really took (``bench/suites/paths.py``), not a prediction.

Times: median, 20 / 80 % quantiles and minimum in ms (``triton.testing.do_bench`` on CUDA; on the CPU a timer
loop where the providers take turns, plus the median process CPU time ``cpu_ms``, which other users' load on
the shared 2-core machines disturbs far less than wall time).
Memory: peak *extra* bytes over what existed before the measured call (inputs excluded, gradients and
saved tensors included): ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the allocation timeline
of ``torch.profiler`` (profile_memory=True; every tensor create / destroy, replayed to find the peak).
Ratios are against the eager reference of the same shape and mode: speedups > 1 are faster than eager,
mem_vs_eager < 1 is leaner.
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.suites.paths import dispatched
from fdfast.kernels.fd_loss import fd_loss
from fdfast.kernels.reference import fd_loss_reference

# name: (batch, tokens, Cs, Ct) at the batch sizes FD trains with on one GPU
SHAPES = {
    "vit_s16": (256, 197, 384, 384),
    "vit_b16": (256, 197, 768, 768),
    "vit_l14": (128, 257, 1024, 1024),
}
QUICK_CPU_BATCH = {"vit_s16": 8, "vit_b16": 4}  # --quick on the CPU: two shapes, small batches (~1 minute)
CPU_BATCH = {"vit_s16": 32, "vit_b16": 16, "vit_l14": 8}  # full CPU run: real widths, batches that fit 2 cores
MODES = ("forward", "backward", "full")
TEACHER_DTYPE = torch.bfloat16  # the frozen teacher runs in bf16 in training: its tokens arrive in bf16


def cuda_shapes(quick: bool) -> dict:
    """The CUDA shapes: ViT-B alone in --quick (one GPU window), every width otherwise."""
    return {"vit_b16": SHAPES["vit_b16"]} if quick else dict(SHAPES)


def _inputs(B, N, CS, CT, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    S = torch.randn(B, N, CS, generator=gen).to(device, dtype).requires_grad_()
    T = (torch.randn(B, N, CT, generator=gen) * 2 + 0.5).to(device, TEACHER_DTYPE)
    W = (torch.randn(CT, CS, generator=gen) / CS**0.5).to(device, dtype).requires_grad_()
    b = torch.zeros(CT).to(device, dtype).requires_grad_()
    return S, T, W, b


def _step(loss_fn, inputs, mode):
    """(setup, fn): `fn(setup())` is one timed `mode` call; for "backward" setup builds the graph untimed.

    (Backward cannot be repeated with retain_graph: torch.compile donates its saved buffers.)
    """
    S, T, W, b = inputs

    def clear():
        S.grad = W.grad = b.grad = None

    if mode == "forward":
        return (lambda: None), (lambda _: loss_fn(S, T, W, b))
    if mode == "full":
        return (lambda: clear()), (lambda _: loss_fn(S, T, W, b).backward())
    return (lambda: (clear(), loss_fn(S, T, W, b))[1]), (lambda loss: loss.backward())


def _quantiles(times):
    """Median, 20 % and 80 % quantile, and minimum of a list of ms (the minimum: least disturbed by load)."""
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return statistics.median(times), q[1], q[7], min(times)


def _time_cpu_interleaved(steps, reps):
    """{provider: (median, p20, p80)} in ms; providers take turns inside every repeat.

    The CPU machines are shared, so load changes within seconds: round-robin gives every provider the same
    weather, which a per-provider loop does not. `steps`: {provider: (setup, fn)}; setup is not timed.
    """
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}  # process CPU time: barely moved by other users' load
    for rep in range(reps + 1):  # repeat 0 warms up (allocator, caches)
        for name, (setup, fn) in steps.items():
            state = setup()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(state)
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu_times[name].append((time.process_time() - c0) * 1e3)
    return {name: _quantiles(t) + (statistics.median(cpu_times[name]),) for name, t in times.items()}


def _peak_cpu(setup, fn):
    """Peak extra bytes of one call from the profiler's tensor allocation timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    state = setup()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn(state)
    current = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def _time_cuda(setup, fn, mode):
    """do_bench for forward / full (it repeats a closure); an event loop for backward (needs a fresh graph)."""
    if mode != "backward":
        import triton.testing

        return tuple(triton.testing.do_bench(lambda: fn(setup()), quantiles=[0.5, 0.2, 0.8, 0.0])) + (None,)
    times = []
    for rep in range(51):
        state = setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        torch.cuda.synchronize()
        if rep:
            times.append(start.elapsed_time(end))
    return _quantiles(times) + (None,)


def _peak_cuda(setup, fn):
    state = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(state)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _under_autocast(fn):
    """fn called inside bf16 CUDA autocast (backward runs outside, as in a training step)."""
    def call(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(*args)
    return call


def _providers(device):
    """name -> loss function; "eager" first (the ratios' baseline). fdfast: Triton on CUDA, "auto" on the CPU.
    On CUDA all three run under bf16 autocast (see the module docstring)."""
    backend = "triton" if device == "cuda" else "auto"
    found = {
        "eager": fd_loss_reference,
        "compile": torch.compile(fd_loss_reference),
        "fdfast": lambda S, T, W, b: fd_loss(S, T, W, b, backend=backend),
    }
    if device == "cuda":
        found = {name: _under_autocast(fn) for name, fn in found.items()}
    return found


def _first_calls(providers, inputs):
    """{provider: (seconds of the first forward + backward, loss error vs fp64)}: compile / JIT cost, sanity."""
    expected = fd_loss_reference(*(t.detach().double() for t in inputs)).item()
    out = {}
    for provider, loss_fn in providers.items():
        t0 = time.perf_counter()
        loss = loss_fn(*inputs)
        loss.backward()
        out[provider] = (time.perf_counter() - t0, abs(loss.item() - expected) / abs(expected))
    return out


def _bench_shape(ctx, name, B, N, CS, CT, dtype, providers, modes=MODES):
    inputs = _inputs(B, N, CS, CT, dtype, ctx.device)
    first = _first_calls(providers, inputs)  # first: its time includes compiling
    fdfast_backend = dispatched("loss", lambda: providers["fdfast"](*inputs))
    for mode in modes:
        steps = {provider: _step(loss_fn, inputs, mode) for provider, loss_fn in providers.items()}
        if ctx.device == "cuda":
            timing = {provider: _time_cuda(*step, mode) for provider, step in steps.items()}
            peaks = {provider: _peak_cuda(*step) for provider, step in steps.items()}
            mem_method = "cuda.max_memory_allocated"
        else:
            timing = _time_cpu_interleaved(steps, reps=9 if ctx.quick else 15)
            peaks = {provider: _peak_cpu(*step) for provider, step in steps.items()}
            mem_method = "torch.profiler allocation timeline"
        eager_t, eager_peak = timing["eager"], peaks["eager"]
        for provider, (med, p20, p80, fastest, cpu_ms) in timing.items():
            ctx.record(
                shape=name, B=B, N=N, Cs=CS, Ct=CT, dtype=str(dtype).replace("torch.", ""), provider=provider,
                backend=fdfast_backend if provider == "fdfast" else None, mode=mode,
                ms=med, ms_p20=p20, ms_p80=p80, ms_min=fastest, cpu_ms=cpu_ms,
                speedup_vs_eager=eager_t[0] / med, speedup_min_vs_eager=eager_t[3] / fastest,
                cpu_speedup_vs_eager=eager_t[4] / cpu_ms if cpu_ms else None,
                peak_mib=peaks[provider] / 2**20, mem_vs_eager=peaks[provider] / eager_peak if eager_peak else None,
                mem_method=mem_method, first_call_s=first[provider][0], loss_rel_err=first[provider][1],
                autocast="bf16" if ctx.device == "cuda" else None, teacher_dtype=str(TEACHER_DTYPE).split(".")[-1],
            )
        del steps
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


def run(ctx) -> None:
    torch.manual_seed(0)
    if ctx.device == "cuda":
        dtypes = (torch.float32,)  # fp32 tokens and projection, as they arrive under autocast
        shapes = cuda_shapes(ctx.quick)
    else:
        dtypes = (torch.float32,)  # CPU training runs in fp32 (bf16 matmuls are slow on these cores)
        batches = QUICK_CPU_BATCH if ctx.quick else CPU_BATCH
        shapes = {k: (batches[k],) + SHAPES[k][1:] for k in batches}
    providers = _providers(ctx.device)
    for dtype in dtypes:
        for name, (B, N, CS, CT) in shapes.items():
            # --quick on CUDA (one GPU window): forward + backward only, the figure the goals name
            modes = ("full",) if ctx.quick and ctx.device == "cuda" else MODES
            _bench_shape(ctx, name, B, N, CS, CT, dtype, providers, modes)
