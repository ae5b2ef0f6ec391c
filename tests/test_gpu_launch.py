"""The CUDA launch logic, checked without a GPU: fdfast's host code runs on fake CUDA tensors (shapes, dtypes and
strides only) with every launch recorded instead of run (bench/gpu_budget.py). The autotuners are called as the
installed Triton calls them; launches make the tensors' device current; fp64 never reaches the kernels."""
from __future__ import annotations

import inspect

import pytest
import torch

import fdfast.kernels.rpb_attention as rpb
from bench.gpu_budget import Recorder, attention_call, fake_cuda, fd_loss_call
from bench.suites.paths import dispatched
from fdfast.kernels import utils

triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402


def recorded(call) -> Recorder:
    rec = Recorder()
    with fake_cuda(rec):
        call()
    return rec


def test_every_autotune_key_names_an_argument_and_holds_batch_and_store_dbias():
    """Triton's Autotuner.run keys on ``[args[k] for k in keys if k in args]``: a misspelt name is dropped silently."""
    for name, tuner in rpb.TUNED.items():
        assert isinstance(tuner, Autotuner)
        assert set(tuner.keys) <= set(tuner.arg_names), (name, set(tuner.keys) - set(tuner.arg_names))
        assert {"B", "N", "BLOCK_D", "HAS_EXTRA", "W"} <= set(tuner.keys), name
    assert "STORE_DBIAS" in rpb.TUNED["attn_bwd_dq"].keys and "STORE_DBIAS" in rpb.TUNED["attn_bwd_small"].keys
    assert "DKDV" in rpb.TUNED["attn_bwd_small"].keys


@pytest.mark.parametrize("shape,dtype", [((128, 12, 197, 64, 0), torch.bfloat16),  # ViT-B: the general path
                                         ((512, 4, 49, 32, 64), torch.bfloat16),  # Swin w7: the small-N path
                                         ((2, 2, 197, 64, 0), torch.float32),
                                         ((1, 2, 197, 80, 0), torch.float16)],  # D = 80 -> BLOCK_D 128
                         ids=["vit_b-bf16", "swin_w7-bf16", "fp32", "d80-fp16"])
def test_prune_functions_as_the_installed_triton_calls_them(shape, dtype):
    """Each tuned launch's candidates: the Autotuner's own prune_configs (nargs set as run() sets them) keeps
    exactly ``tune_configs`` for the launch's head dim, dtype and tile, and never nothing."""
    rec = recorded(lambda: attention_call(*shape, dtype))
    tuned = [(k, a, m) for k, a, m, _ in rec.calls if isinstance(k, Autotuner)]
    assert tuned, "no autotuned launch recorded"
    for tuner, args, meta in tuned:
        prune = tuner.early_config_prune
        inspect.signature(prune).bind(tuner.configs, {}, **meta)  # the call shape of Autotuner.prune_configs
        kept = rec.pruned(tuner, args, meta)
        kernel = next(n for n, t in rpb.TUNED.items() if t is tuner)
        want = rpb.tune_configs({"attn_fwd": "fwd", "attn_bwd_dkdv": "dkdv", "attn_bwd_dq": "dq",
                                 "attn_bwd_small": "small"}[kernel], meta["BLOCK_D"], dtype, meta.get("BLOCK"))
        assert kept and [(c.kwargs, c.num_warps, c.num_stages) for c in kept] == \
            [(c.kwargs, c.num_warps, c.num_stages) for c in want], kernel
        assert tuner.nargs is None  # left as Triton leaves it


def test_tune_keys_separate_batch_sizes_and_the_dbias_flag():
    def keys(**kw):
        rec = recorded(lambda: attention_call(kw.pop("B", 32), 12, 197, 64, 0, torch.bfloat16, **kw))
        return {rec.tune_key(k, a, m) for k, a, m, _ in rec.calls if k is rpb.TUNED["attn_bwd_dq"]}
    learned, frozen, other_batch = keys(), keys(bias_grad=False), keys(B=64)
    assert len(learned) == len(frozen) == len(other_batch) == 1
    assert learned != frozen and learned != other_batch


def test_reset_to_zero_clears_the_dbias_partials_before_each_candidate():
    """The dq kernel accumulates into DBiasPart: the tuner zeroes it before every benchmark run (Triton calls
    ``pre_hook(nargs)`` in ``_bench``); the kernels that only store need no reset."""
    dq = rpb.TUNED["attn_bwd_dq"]
    assert dq.reset_to_zero == ["DBiasPart"] and "DBiasPart" in dq.arg_names
    part = torch.ones(2, 3)
    dq.pre_hook({"DBiasPart": part})
    assert torch.count_nonzero(part) == 0
    for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_small"):
        assert rpb.TUNED[name].reset_to_zero == [], name


def test_autotune_choices_reads_what_the_tuners_chose(monkeypatch):
    tuner = rpb.TUNED["attn_bwd_dq"]
    key = (32, 197, 64, True, 1, True, "torch.bfloat16")
    monkeypatch.setitem(tuner.cache, key, triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2))
    row = next(r for r in rpb.autotune_choices() if r["kernel"] == "attn_bwd_dq")
    assert row["key"] == {"B": 32, "N": 197, "BLOCK_D": 64, "HAS_EXTRA": True, "W": 1, "STORE_DBIAS": True}
    assert row["dtypes"] == ["torch.bfloat16"] and row["config"] == {"BLOCK_M": 64, "BLOCK_N": 32}
    assert (row["num_warps"], row["num_stages"]) == (4, 2)


def test_launch_makes_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: launch() enters torch.cuda.device(tensor's device) around it."""
    events = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", str(self.device)))

        def __exit__(self, *exc):
            events.append(("exit", str(self.device)))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: events.append(("launch", grid, args, meta))

    monkeypatch.setattr(torch.cuda, "device", Device)
    utils.launch(Kernel(), (3,), (1, 2), {"X": 4}, torch.device("cuda", 1))
    assert events == [("enter", "cuda:1"), ("launch", (3,), (1, 2), {"X": 4}), ("exit", "cuda:1")]
    events.clear()
    utils.launch(Kernel(), (1,), (), {}, torch.device("cpu"))  # the interpreter: no device to select
    assert events == [("launch", (1,), (), {})]


def test_every_kernel_launch_names_its_tensors_device():
    """On cuda:1 tensors every launch of both kernels (forward and backward) is made for cuda:1."""
    def both():
        attention_call(4, 2, 197, 64, 0, torch.bfloat16, device="cuda:1")
        attention_call(8, 2, 49, 32, 4, torch.bfloat16, device="cuda:1")
        fd_loss_call(2, 197, 64, 96, torch.bfloat16, device="cuda:1")
    rec = recorded(both)
    assert rec.launches >= 9
    assert {str(device) for *_, device in rec.calls} == {"cuda:1"}


def test_fp64_on_cuda_takes_the_reference_path_and_never_launches():
    """The kernels keep fp32 softmax state: fp64 CUDA attention goes to the fp64 specification ("auto"), and
    backend="triton" refuses it before any launch."""
    def fp64(backend):
        q = torch.empty(2, 2, 33, 16, device="cuda", dtype=torch.float64, requires_grad=True)
        bias = torch.empty(2, 33, 33, device="cuda", dtype=torch.float64, requires_grad=True)
        return dispatched("attention", lambda: rpb.rpb_attention(q, q, q, bias, backend=backend))

    rec = Recorder()
    with fake_cuda(rec):
        assert fp64("auto") == "reference"
        with pytest.raises(ValueError, match="float64"):
            fp64("triton")
    assert rec.launches == 0


def test_bench_paths_are_what_really_ran():
    """bench/suites/paths.py names the path a call entered, fallbacks included (CPU here)."""
    from fdfast.kernels.fd_loss import fd_loss
    q = torch.randn(2, 2, 16, 16)
    bias = torch.randn(2, 16, 16)
    assert dispatched("attention", lambda: rpb.rpb_attention(q, q, q, bias)) == "sdpa"
    assert dispatched("attention", lambda: rpb.rpb_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), bias)) == \
        "cpu_low_precision"
    assert dispatched("attention", lambda: rpb.rpb_attention(q, q, q, bias, backend="reference")) == "reference"
    S, T, W = torch.randn(1, 5, 8), torch.randn(1, 5, 4), torch.randn(4, 8)
    assert dispatched("loss", lambda: fd_loss(S, T, W)) == "torch"
    assert rpb._sdpa.__name__ == "_sdpa"  # restored after the call
