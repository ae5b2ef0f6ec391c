"""The CPU's packed bf16 inference linear (fdfast.kernels.cpu_linear) against F.linear: forward on awkward
shapes, fused GELU, the pack cache's lifetime, the module patch, and every path that must stay F.linear.

Tolerances (both sides round x and W to bf16 and accumulate in fp32; the packed path adds the bias and applies
GELU before its single rounding to bf16, F.linear rounds after the GEMM and again after F.gelu):
| dtype of the math | packed vs F.linear (max abs error / max abs value) |
|---|---|
| bf16 (autocast fp32 inputs, or bf16 inputs) | 1.6e-2 (two bf16 roundings) |
| fp32 (no autocast)                          | exact: the packed path is not taken |
"""
from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdfast.kernels import cpu_linear
from fdfast.kernels.cpu_linear import linear, packed_cache_size, packed_linear_available
from fdfast.fastpath import pack_linears

needs_packed = pytest.mark.skipif(not packed_linear_available(),
                                  reason="this CPU has no native bf16 (AVX512-BF16 / AMX): linear is F.linear here")

SHAPES = [  # (leading dims of x, in features, out features)
    ((2, 197), 64, 96),   # 197 tokens (ViT/16 at 224 + CLS)
    ((1, 65), 37, 53),    # batch 1, odd widths
    ((3, 5), 384, 1536),  # the demo teacher's fc1, few rows
    ((7,), 1, 9),         # one input feature
]


def close(a, b, rel):
    scale = b.abs().max().clamp_min(1e-6)
    return (a.float() - b.float()).abs().max().item() <= rel * scale.item()


def frozen(n, k, bias, dtype=torch.float32):
    w = torch.randn(n, k).mul_(k ** -0.5).to(dtype)
    return w, (torch.randn(n).to(dtype) if bias else None)


@needs_packed
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["autocast", "bf16", "inference_mode"])
def test_inference_matches_f_linear(lead, k, n, bias, mode):
    torch.manual_seed(0)
    x = torch.randn(*lead, k)
    w, b = frozen(n, k, bias)
    before = packed_cache_size()
    if mode == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, ref = linear(x, w, b), F.linear(x, w, b)
    else:
        x, w, b = x.bfloat16(), w.bfloat16(), (b.bfloat16() if bias else None)
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            got, ref = linear(x, w, b), F.linear(x, w, b)
    assert packed_cache_size() == before + 1  # it did take the packed path
    assert got.dtype == ref.dtype == torch.bfloat16 and got.shape == ref.shape
    assert close(got, ref, 1.6e-2)


def test_training_calls_are_f_linear_exactly():
    """A trainable weight, or an input that needs a gradient: the very same F.linear (values and gradients)."""
    torch.manual_seed(7)
    x = torch.randn(2, 197, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    before = packed_cache_size()
    outs = []
    for fn in (F.linear, linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), [x, w, b])))
    for got, ref in zip(outs[1], outs[0]):
        assert torch.equal(got, ref)
    frozen_w = w.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, frozen_w)  # frozen weight, but x needs a gradient
    assert y.requires_grad and packed_cache_size() == before


@needs_packed
@pytest.mark.parametrize("act,approx", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_fused_gelu_inference_matches(act, approx):
    torch.manual_seed(1)
    x = torch.randn(2, 197, 48).bfloat16()
    w, b = torch.randn(80, 48).mul(0.2).bfloat16(), torch.randn(80).bfloat16()
    with torch.inference_mode():
        got = linear(x, w, b, act=act)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate=approx)
    assert got.dtype == torch.bfloat16 and close(got, ref, 1.6e-2)


@needs_packed
def test_frozen_weight_packed_once_repacked_after_change_and_freed_with_it():
    torch.manual_seed(2)
    layer = nn.Linear(16, 24).requires_grad_(False)
    x = torch.randn(5, 16)
    before = packed_cache_size()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = linear(x, layer.weight, layer.bias)
        linear(x, layer.weight, layer.bias)
        assert packed_cache_size() == before + 1
        layer.weight.mul_(-1)  # in place: version bumped
        y1 = linear(x, layer.weight, layer.bias)
        ref = F.linear(x, layer.weight, layer.bias)
    assert close(y1, ref, 1.6e-2) and not close(y1, y0, 1.6e-2)
    del layer
    gc.collect()
    assert packed_cache_size() == before


@pytest.mark.parametrize("fused", [True, False])
def test_trainable_weight_follows_optimizer_steps(fused):
    """Fused AdamW updates in place without bumping _version: a trainable weight is never packed, never stale."""
    torch.manual_seed(6)
    layer = nn.Linear(32, 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=fused)
    x = torch.randn(4, 32)
    before = packed_cache_size()
    for _ in range(3):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # an eval pass between steps
            assert torch.equal(linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear(x, layer.weight, layer.bias)
        y.float().square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert packed_cache_size() == before


def test_pack_linears_keeps_state_dict_pickle_and_deepcopy():
    from timm.layers.mlp import Mlp
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 20), Mlp(20, 40, 12), nn.LayerNorm(12))
    keys = list(model.state_dict())
    x = torch.randn(2, 7, 12)
    ref = model(x)
    assert pack_linears(model) == 4  # the outer Linear, the Mlp and its fc1 / fc2
    assert list(model.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # fills the pack cache on a bf16 CPU
    assert torch.equal(model(x), ref)  # fp32 without autocast: F.linear itself
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), ref)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), ref)


@needs_packed
def test_packed_mlp_fuses_gelu_for_a_frozen_mlp_only(monkeypatch):
    from timm.layers.mlp import Mlp
    torch.manual_seed(4)
    mlp = Mlp(24, 64, 24)
    x = torch.randn(3, 11, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = mlp(x)
    pack_linears(mlp)
    ops = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(cpu_linear.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: ops.append(a[3]) or real(*a), raising=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train = mlp(x)  # trainable: F.linear + F.gelu, with gradients
        train.float().sum().backward()
        assert ops == [] and mlp.fc1.weight.grad is not None
        mlp.requires_grad_(False)
        with torch.no_grad():
            fused = mlp(x)
    assert ops == ["gelu", "none"]  # fc1 with GELU in its epilogue, then fc2
    assert close(fused, ref, 1.6e-2) and torch.equal(train, ref)


def test_fallbacks_are_f_linear():
    torch.manual_seed(5)
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # fp32, no autocast
    assert torch.equal(linear(x, w, b, act="gelu"), F.gelu(F.linear(x, w, b)))
    assert not cpu_linear.packed_linear_usable(x.double(), w.double())
    with pytest.raises(ValueError, match="act must be"):
        linear(x, w, b, act="relu")


# ----------------------------------------------------------------------------- fused residual blocks
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_residual_block_matches_timm_block(amp, training):
    """Same outputs and gradients as timm's BEiT block (drop path masks drawn identically), on 197 tokens and
    batch 1 / 3; the state dict is untouched."""
    from timm.models.beit import Block

    from fdfast.fastpath import FusedResidualBlock, fuse_residuals
    for batch in (1, 3):
        torch.manual_seed(8)
        block = Block(dim=48, num_heads=3, qkv_bias=True, drop_path=0.4, init_values=0.1, window_size=None)
        block.train(training)
        keys = list(block.state_dict())
        x = torch.randn(batch, 197, 48, requires_grad=True)
        outs = []
        for fused in (False, True):
            if fused:
                assert fuse_residuals(block) == 1 and type(block) is FusedResidualBlock
            torch.manual_seed(9)  # the drop path masks
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = block(x)
            params = [x, block.gamma_1, block.gamma_2, block.mlp.fc1.weight, block.attn.qkv.weight]
            outs.append((y, *torch.autograd.grad(y.float().square().mean(), params)))
        assert list(block.state_dict()) == keys
        for got, ref in zip(outs[1], outs[0]):  # fp32: rounding of a product order; bf16: identical GEMM inputs
            assert got.dtype == ref.dtype
            assert close(got, ref, 1e-5), (got - ref).abs().max()
