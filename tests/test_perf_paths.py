"""The CPU fast paths of issue 11: precision auto, the teacher as bf16 inference, bf16 attention, fused AdamW,
dist.compile=auto (decision and fallback). Speed itself is measured by `bench/run.py --suite e2e`, never here."""
import json
import warnings

import pytest
import torch
from torch import nn

from fdfast import distributed, runtime
from fdfast.cli import main
from fdfast.config import Config
from fdfast.distributed import DistInfo
from fdfast.run import build_fd_run
from fdfast.runtime import Runtime
from fdfast.step import StepResult
from fdfast.kernels.reference import rpb_attention_reference
from fdfast.kernels.rpb_attention import rpb_attention
from test_train import tiny_args

CPU = torch.device("cpu")


def tiny_cfg(**sections) -> Config:
    d = {"model": {"size": "tiny", "patch_size": 16, "img_size": 32, "kwargs": {"depth": 2}},
         "teacher": {"name": "vit_tiny_patch16_224", "weights": "random", "kwargs": {"depth": 2}},
         "data": {"loader": "synthetic", "batch_size": 2}, "runtime": {"device": "cpu"}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return Config.from_dict(d)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, None)])
def test_precision_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    from fdfast.kernels import utils
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"capability": "X", "avx512_bf16": avx512_bf16, "amx": amx,
                                                      "threads": 1})
    monkeypatch.setattr(utils, "native_bf16_cpu", lambda: avx512_bf16 or amx)  # the one home of the probe
    assert runtime.resolve_precision("auto", CPU) is expected
    assert runtime.resolve_precision("fp32", CPU) is None  # one --set away
    info = runtime.precision_summary("auto", expected, CPU)
    assert info["precision"] == ("bf16" if expected else "fp32")
    assert ("AMX" if amx else "AVX512-BF16" if avx512_bf16 else "no native bf16") in info["why"]


def _target_and_casts(distiller, x):
    """(the target under bf16 autocast, how many dtype casts of a teacher weight computing it took)."""
    weights = {tuple(p.shape) for p in distiller.teacher.parameters()}
    with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        target = distiller.target_tokens(x)
    return target, sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                       if e.key == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in weights)


def test_teacher_runs_as_bf16_inference_without_weight_casts():
    torch.manual_seed(0)
    parts = build_fd_run(tiny_cfg(), Runtime(DistInfo(), torch.bfloat16))
    d = parts.task
    assert {p.dtype for p in d.teacher.parameters()} == {torch.bfloat16}  # stored once in the compute dtype
    assert {p.dtype for p in d.student.parameters()} == {torch.float32}  # the trained weights stay fp32
    x = next(parts.loader)
    target, casts = _target_and_casts(d, x)
    assert casts == 0  # no cast of any teacher weight (activations: the images, attention's fp32 logits)
    assert target.dtype == torch.bfloat16 and not target.is_inference() and not target.requires_grad
    fp32 = build_fd_run(tiny_cfg(), Runtime(DistInfo(), None)).task
    fp32.teacher.load_state_dict({k: v.float() for k, v in d.teacher.state_dict().items()})
    assert _target_and_casts(fp32, x)[1] >= 8  # an fp32 teacher under autocast: its weights every step
    ref = fp32.target_tokens(x)
    assert ref.dtype == torch.float32
    assert (target.float() - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding, not another model
    d.fd_loss.backend = "reference"  # a loss that saves the target for backward (inference tensors cannot be)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d(x).backward()


def test_bf16_attention_on_the_cpu_matches_the_reference():
    torch.manual_seed(0)
    B, H, N, D = 3, 2, 17, 16  # odd token count
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, N, N, dtype=torch.bfloat16, requires_grad=True)
    out = rpb_attention(q, k, v, bias)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    ins = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
    ref = rpb_attention_reference(*ins)
    ref.square().sum().backward()
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    for got, want in zip((q.grad, k.grad, v.grad, bias.grad), (t.grad for t in ins)):
        assert (got.float() - want).abs().max() < 0.03 * want.abs().max()
    assert rpb_attention(q.float(), k.float(), v.float(), bias.float()).dtype == torch.float32  # fp32: SDPA


# | logits (std) | output | dq, dk, dv, dbias |   logits and softmax in fp32; P, dP and dS in bf16 (as autograd's
# |---|---|---|                                    three-op backward): gradients carry bf16's rounding of P
# | ~1 (a fresh student) | 1.6e-2 | 3e-2 (measured <= 0.9e-2) |
# | ~8, max ~30 (a trained one: the demo student's max |logit| is 11-25 per block) | 1.6e-2 | 3e-2 (measured <= 1.2e-2) |
CPU_ATTN_TOL = {1.0: (1.6e-2, 3e-2), 8.0: (1.6e-2, 3e-2)}


def test_cpu_attention_logits_on_bf16_units_are_the_fp32_products():
    """The bf16 CPU path computes q k^T from the upcast bf16 values in oneDNN's bf16 math mode: the same products
    and fp32 sums as an fp32 GEMM (bf16 values are exact in bf16), and the process-wide setting is restored."""
    from fdfast.kernels.utils import exact_bf16_products, native_bf16_cpu
    torch.manual_seed(0)
    q, k = (torch.randn(6, 65, 64).bfloat16().float() * 4 for _ in range(2))
    exact = torch.bmm(q.double(), k.double().transpose(1, 2))
    before = torch.backends.mkldnn.matmul.fp32_precision
    with exact_bf16_products(torch.bfloat16):
        inside = torch.backends.mkldnn.matmul.fp32_precision
        logits = torch.bmm(q, k.transpose(1, 2))
    assert inside == ("bf16" if native_bf16_cpu() else before)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert logits.dtype == torch.float32
    assert ((logits.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6  # fp32 accumulation only
    with exact_bf16_products(torch.float16):  # fp16 values are not exact in bf16: full fp32 math
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(RuntimeError), exact_bf16_products(torch.bfloat16):
        torch.bmm(q, k)  # wrong shapes: the setting is restored on the way out of an error too
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.parametrize("B,H,N,D,W", [(1, 3, 197, 64, 0), (4, 2, 49, 32, 2), (3, 1, 65, 16, 0)],
                         ids=["vit-197-batch1", "swin-window-mask", "demo-65"])
@pytest.mark.parametrize("logit_std", sorted(CPU_ATTN_TOL))
def test_bf16_cpu_attention_matches_the_fp64_reference(B, H, N, D, W, logit_std):
    """"auto" on the CPU in bf16 (fp32 logits and softmax, bf16 GEMMs otherwise), with a bias and SwinV2's window
    mask, output and every gradient against the fp64 specification, at a fresh and a trained student's logit
    scale (rounding such logits to bf16 put 4% / 20% errors into the output: the path this one replaced)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    q = q * (logit_std * D ** 0.5) ** 0.5 / q.std()
    k = k * (logit_std * D ** 0.5) ** 0.5 / k.std()  # q.k / sqrt(D) ~ N(0, logit_std^2)
    bias = torch.randn(H, N, N, dtype=torch.float64) * 0.5
    mask = None if not W else torch.where(torch.rand(W, N, N) < 0.3, -100.0, 0.0).double()
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    b32 = bias.float().requires_grad_()  # the student's table is an fp32 parameter
    exact = [t.bfloat16().double().requires_grad_() for t in (q, k, v)] + [b32.detach().double().requires_grad_()]
    ref = rpb_attention_reference(*exact, mask=mask)
    out = rpb_attention(*low, b32, mask=None if mask is None else mask.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    tol_out, tol_grad = CPU_ATTN_TOL[logit_std]
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol_out
    dout = torch.randn_like(ref)
    (out.double() * dout).sum().backward()
    (ref * dout).sum().backward()
    for got, want, name in zip([*low, b32], exact, "q k v bias".split()):
        rel = (got.grad.double() - want.grad).abs().max() / want.grad.abs().max()
        assert rel < tol_grad, (name, rel.item())
    with torch.no_grad():  # inference (the teacher) runs the same ops
        assert torch.equal(rpb_attention(*low, b32, mask=None if mask is None else mask.bfloat16()), out)


def test_adamw_is_fused_on_the_cpu_by_default():
    parts = build_fd_run(tiny_cfg(), Runtime(DistInfo(), None))
    assert parts.optimizer.defaults["fused"] is True
    parts = build_fd_run(tiny_cfg(optim={"fused": "false"}), Runtime(DistInfo(), None))
    assert not parts.optimizer.defaults["fused"]


class _Steps:
    """A stand-in step: counts calls; raises once when told to (a compiler error)."""

    def __init__(self, fail_first=False):
        self.calls, self.fail_first = 0, fail_first

    def __call__(self):
        self.calls += 1
        if self.fail_first and self.calls == 1:
            raise RuntimeError("BackendCompilerFailed: no C++ compiler")
        return StepResult(1.0, 1.0, 2)


def _distiller_with_compiled_parts():
    d = nn.Module()
    d.student, d.teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    d.student.compile()
    return d


def test_compile_auto_stays_eager_for_a_short_run(monkeypatch):
    monkeypatch.setattr(distributed, "compile_task", lambda *a, **k: pytest.fail("compiled a short run"))
    c = distributed.CompileWhenItPays("auto", nn.Module(), DistInfo(), "none")
    step = _Steps()
    for left in (9, 8, 7, 6):
        c.run(step, steps_left=left)
    assert step.calls == 4 and c.decision.startswith("eager (7 steps") and c.summary()["compile_s"] is None


def test_compile_auto_compiles_a_long_run(monkeypatch):
    compiled = []
    monkeypatch.setattr(distributed, "compile_task", lambda d, device: compiled.append(d))
    ticks = iter(range(100))
    monkeypatch.setattr(distributed.CompileWhenItPays, "_clock", lambda self: float(next(ticks)))  # 1 s per step
    d = nn.Module()
    c = distributed.CompileWhenItPays("auto", d, DistInfo(), "none")
    for _ in range(4):
        c.run(_Steps(), steps_left=10_000)  # 10,000 x 1 s x 2% = 200 s > 60 s
    assert compiled == [d] and c.decision.startswith("compiled") and c.compile_s is not None


def test_a_failing_compile_falls_back_to_eager_with_one_warning():
    d = _distiller_with_compiled_parts()
    c = distributed.CompileWhenItPays("true", d, DistInfo(), "none")
    step = _Steps(fail_first=True)
    with pytest.warns(UserWarning, match="compiling failed.*running eager"):
        result = c.run(step, steps_left=3)
    assert result.loss == 1.0 and step.calls == 2 and c.decision.startswith("eager (compile failed")
    assert d.student._compiled_call_impl is None  # back to eager
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.run(step, steps_left=2)  # later steps: no second warning


def test_default_run_reports_precision_and_compile(tmp_path, teacher_file, image_dir):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 4, "--set", "runtime.precision=auto")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == ("bf16" if runtime.native_bf16(CPU) else "fp32")
    assert "runtime.precision=fp32" in summary["why"] or summary["precision"] == "fp32"
    assert summary["compile"]["setting"] == "auto" and summary["compile"]["decision"].startswith("eager")
    assert summary["compile"]["compile_s"] is None and set(summary["cpu"]) >= {"avx512_bf16", "amx"}
    assert summary["malloc"]["setting"] == "auto" and summary["malloc"]["why"]  # fdfast.hostmem, tests/test_hostmem.py


@pytest.mark.slow
def test_compiled_run_trains_and_reports_compile_seconds(tmp_path, teacher_file, image_dir):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 3, "--set", "dist.compile=true",
                          "--set", "runtime.precision=auto")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile"]["decision"] == "compiled before step 1" and summary["compile"]["compile_s"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in rows)
