"""patch_model: timm BEiT (shared / per-block bias), ViT and SwinV2 on fdfast attention give timm's outputs
and gradients, keep timm's parameter names, and refuse what they cannot run."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import fdfast
from fdfast.attention import FastBeitAttention, FastSwinV2WindowAttention, FastVitAttention, RPBAttention, patch_model
from fdfast.models.student import build_vit_student


def tiny_student(pos_bias):
    # 32 px / patch 8 -> 16 patches + CLS = 17 tokens; 2 blocks of 2 heads of width 16
    return build_vit_student("tiny", patch_size=8, img_size=32, drop_path=0.0, pos_bias=pos_bias,
                             embed_dim=32, depth=2, num_heads=2)


MODELS = {
    # name: (builder, image size, fast attention class)
    "beit_shared_rpb": (lambda: tiny_student("shared"), 32, FastBeitAttention),
    "beit_per_block_rpb": (lambda: tiny_student("per_block"), 32, FastBeitAttention),
    "vit": (lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0),
            32, FastVitAttention),
    # 8 x 8 token grid, 4 x 4 windows: block 0 plain windows, block 1 shifted with the [4, 16, 16] mask
    "swinv2": (lambda: SwinTransformerV2(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2,),
                                         num_heads=(2,), num_classes=0, drop_path_rate=0.0), 16,
               FastSwinV2WindowAttention),
}


def randomised(model: nn.Module) -> nn.Module:
    """Non-trivial bias tables and logit scales (timm zero-initialises the tables), fixed seed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "logit_scale" in name or name.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "logit_scale" in name else 0.0))
    return model


def outputs_and_grads(model, images, probe):
    images = images.clone().requires_grad_()
    tokens = model.forward_features(images)
    loss = (tokens * probe).sum()  # a random probe: a squared-norm loss would cancel through the final norm
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [images, *params])
    return tokens, dict(zip(["images", *[n for n, p in model.named_parameters() if p.requires_grad]], grads))


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_equals_timm(name, backend):
    build, size, fast_class = MODELS[name]
    timm_model = randomised(build()).train()
    fast_model = patch_model(copy.deepcopy(timm_model), backend=backend)
    assert sum(type(m) is fast_class for m in fast_model.modules()) == 2  # both blocks

    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(timm_model.forward_features(images).shape, generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_grads = outputs_and_grads(timm_model, images, probe)
    tokens, grads = outputs_and_grads(fast_model, images, probe)
    assert (tokens - ref_tokens).abs().max().item() < 2e-5
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        err = (grads[key] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-3)
        assert err < 1e-4, f"{name}: grad of {key} off by {err:.3g} (relative)"
    if "rpb" in name:  # the bias really learns: its gradient is not zero
        table = [k for k in grads if "relative_position_bias_table" in k]
        assert table and all(grads[k].abs().max() > 0 for k in table)


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_stays_timm(name):
    build, _, _ = MODELS[name]
    fast_model = patch_model(randomised(build()))
    fresh = build()
    fresh.load_state_dict(fast_model.state_dict(), strict=True)  # an exported student loads into plain timm
    assert list(fresh.state_dict()) == list(fast_model.state_dict())
    assert isinstance(fast_model, type(fresh))


def test_fd_student_runs_on_the_kernel_at_its_shape():
    """The FD student (shared RPB, 197 tokens at 224 px / 16) trains through the Triton kernel."""
    student = build_vit_student("tiny", patch_size=16, img_size=224, drop_path=0.1, pos_bias="shared",
                                embed_dim=64, depth=1, num_heads=2)
    student = randomised(student)
    reference = copy.deepcopy(student).eval()
    assert fdfast.patch_model(student, backend="triton") is student  # in place, returned
    student.eval()
    images = torch.randn(1, 3, 224, 224)
    tokens = student.forward_features(images)
    assert tokens.shape == (1, 197, 64)
    assert (tokens - reference.forward_features(images)).abs().max().item() < 2e-5
    tokens.sum().backward()
    assert student.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0


def test_patch_is_idempotent_and_only_sets_backend():
    model = patch_model(tiny_student("shared"), backend="triton")
    patch_model(model, backend="sdpa")
    backends = {m.fdfast_backend for m in model.modules() if isinstance(m, FastBeitAttention)}
    assert backends == {"sdpa"}


def test_attention_dropout_falls_back_to_timm_while_training():
    timm_model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                   attn_drop_rate=0.5)
    with pytest.warns(UserWarning, match="attention dropout is not fused"):
        fast_model = patch_model(copy.deepcopy(timm_model), backend="triton")
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    ref = timm_model.train().forward_features(images)
    torch.manual_seed(3)
    got = fast_model.train().forward_features(images)
    assert torch.equal(got, ref)  # same dropout draws: it ran timm's path
    ref_eval = timm_model.eval().forward_features(images)
    assert (fast_model.eval().forward_features(images) - ref_eval).abs().max().item() < 2e-5


def test_vit_explicit_attn_mask_uses_timm_path():
    timm_model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    fast_model = patch_model(copy.deepcopy(timm_model), backend="triton")
    x = torch.randn(2, 17, 32)
    mask = torch.zeros(2, 1, 17, 17)
    mask[..., -3:] = float("-inf")
    ref = timm_model.blocks[0].attn(x, attn_mask=mask)
    assert torch.allclose(fast_model.blocks[0].attn(x, attn_mask=mask), ref, atol=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="no attention module fdfast supports"):
        patch_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="unknown backend"):
        patch_model(tiny_student("shared"), backend="flash")
    with pytest.raises(ValueError, match="unknown backend"):
        RPBAttention(backend="flash")


def test_rpb_attention_module():
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    bias = torch.randn(3, 10, 10)
    module = RPBAttention(scale=0.2, backend="triton")
    ref = RPBAttention(scale=0.2, backend="reference")
    assert (module(q, k, v, bias) - ref(q, k, v, bias)).abs().max().item() < 1e-5
    assert "triton" in repr(module)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_patched_bf16_autocast(name):
    build, size, _ = MODELS[name]
    timm_model = randomised(build()).cuda()
    fast_model = patch_model(copy.deepcopy(timm_model), backend="auto")
    images = torch.randn(4, 3, size, size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = timm_model.forward_features(images).float()
        got = fast_model.forward_features(images).float()
    assert (got - ref).abs().max().item() < 5e-2


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_runs_under_cpu_autocast(name):
    """AMP: bf16 activations with fp32 bias tables and logit scales reach the kernel in matching dtypes."""
    build, size, _ = MODELS[name]
    timm_model = randomised(build())
    fast_model = patch_model(copy.deepcopy(timm_model), backend="auto")
    images = torch.randn(2, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = timm_model.forward_features(images).float()
        got = fast_model.forward_features(images).float()
        got.sum().backward()
    assert (got - ref).abs().max().item() < 0.05  # bf16 rounding through 2 blocks and the final norm
    assert all(p.grad is not None for n, p in fast_model.named_parameters() if "bias_table" in n)


# ---- the one home of the class swap (fdfast.fastpath) -----------------------------------------------------------

def test_fast_forward_takes_forward_only_subclasses():
    from fdfast.fastpath import fast_forward
    with pytest.raises(TypeError, match="may override forward only.*__init__"):
        @fast_forward
        class WithState(nn.Linear):
            def __init__(self, *args):
                super().__init__(*args)
                self.extra = nn.Parameter(torch.zeros(1))  # a key timm's Linear would not load

            def forward(self, x):
                return super().forward(x)
    with pytest.raises(TypeError, match="exactly one nn.Module class"):
        @fast_forward
        class TwoBases(nn.Linear, nn.ReLU):
            def forward(self, x):
                return x


def test_swap_forwards_switches_exact_timm_classes_and_refuses_unregistered_ones():
    from fdfast.fastpath import PackedLinear, pack_linears, swap_forwards

    class UsersLinear(nn.Linear):  # may mean something else by forward: left alone
        pass

    model = nn.Sequential(nn.Linear(4, 4), UsersLinear(4, 4))
    assert pack_linears(model) == 1 and type(model[0]) is PackedLinear and type(model[1]) is UsersLinear
    assert pack_linears(model) == 0
    with pytest.raises(TypeError, match="not registered"):
        swap_forwards(model, (UsersLinear,))


def test_timm_forward_switches_back_for_a_block_and_restores_after_an_error():
    from timm.models.beit import Attention as BeitAttention

    from fdfast.fastpath import timm_class, timm_forward
    model = patch_model(tiny_student("shared"))
    attn = model.blocks[0].attn
    assert timm_class(type(attn)) is BeitAttention and timm_class(BeitAttention) is BeitAttention
    with pytest.raises(RuntimeError, match="inside"), timm_forward(model.modules()):
        assert type(attn) is BeitAttention
        raise RuntimeError("inside")
    assert type(attn) is FastBeitAttention and attn.fdfast_backend == "auto"


def test_modules_a_fast_forward_does_not_cover_keep_timms_class():
    from timm.layers import Mlp
    from timm.layers.activations import QuickGELU
    from timm.models.beit import Block

    from fdfast.fastpath import PackedMlp, fuse_residuals, pack_linears
    conv_mlp = Mlp(8, 16, use_conv=True)  # ConvNeXt's conv_mlp: 1x1 convolutions on [B, C, H, W]
    quick = Mlp(8, 16, act_layer=QuickGELU)  # OpenAI CLIP
    normed = Mlp(8, 16, norm_layer=nn.LayerNorm)  # BEiT's scale_mlp
    gelu = Mlp(8, 16)
    model = nn.ModuleList([conv_mlp, quick, normed, gelu])
    pack_linears(model)
    assert [type(m) for m in model] == [Mlp, Mlp, Mlp, PackedMlp]
    x = torch.randn(2, 8, 3, 3)
    assert conv_mlp(x).shape == x.shape  # still timm's forward (the packed one would fail on a 4-d weight)
    no_layer_scale = Block(dim=16, num_heads=2, init_values=None)
    assert fuse_residuals(no_layer_scale) == 0 and type(no_layer_scale) is Block
