"""The FD student: timm BEiT with ONE shared relative position bias, no absolute position embedding."""
import pytest
import torch
from timm.models.beit import Beit

from fdfast.config import ModelConfig
from fdfast.errors import FDFastError
from fdfast.models.student import build_student, build_vit_student
from fdfast.models.tokens import final_tokens, geometry


def test_tiny_student_is_the_papers_architecture():
    m = build_vit_student("tiny", patch_size=16, img_size=64, drop_path=0.2)
    assert isinstance(m, Beit)
    assert m.pos_embed is None  # no absolute position embedding
    assert m.rel_pos_bias is not None and all(b.attn.relative_position_bias_table is None
                                              for b in m.blocks)  # per-block tables absent
    # one table: ((2*4-1)*(2*4-1)+3) x heads, zero-initialised
    table = m.rel_pos_bias.relative_position_bias_table
    assert table.shape == (7 * 7 + 3, 3) and table.abs().sum() == 0
    assert all(torch.allclose(b.gamma_1, torch.full_like(b.gamma_1, 0.1)) for b in m.blocks)  # layer scale 0.1
    assert m.blocks[0].attn.q_bias is not None and m.blocks[0].attn.v_bias is not None
    assert m.blocks[0].attn.k_bias.abs().sum() == 0 and not m.blocks[0].attn.k_bias.requires_grad
    dps = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in m.blocks]
    assert dps[0] == 0.0 and abs(dps[-1] - 0.2) < 1e-6 and dps == sorted(dps)  # linear ramp
    assert m.norm.eps == 1e-6


def test_shared_table_is_really_shared():
    torch.manual_seed(0)
    m = build_vit_student("tiny", patch_size=16, img_size=48).eval()
    x = torch.randn(2, 3, 48, 48)
    out = final_tokens(m, x)
    assert out.shape == (2, 1 + 9, 192)
    out.sum().backward()
    table = m.rel_pos_bias.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0  # every block's logits feed one table
    with torch.no_grad():
        table.normal_()
    assert not torch.allclose(final_tokens(m, x), out)
    names = [n for n, _ in m.named_parameters() if "relative_position_bias_table" in n]
    assert names == ["rel_pos_bias.relative_position_bias_table"]


@pytest.mark.parametrize("size,width", [("tiny", 192), ("small", 384), ("base", 768), ("large", 1024)])
def test_presets_on_meta(size, width):
    with torch.device("meta"):
        m = build_student(ModelConfig(size=size, patch_size=14, img_size=224))
    assert m.num_features == width
    assert (geometry(m).grid, geometry(m).num_prefix_tokens) == ((16, 16), 1)


def test_bad_sizes_are_clear():
    with pytest.raises(FDFastError, match="not divisible by the patch size 16"):
        build_vit_student("tiny", patch_size=16, img_size=100)
    with pytest.raises(FDFastError, match="unknown ViT student size 'huge'"):
        build_vit_student("huge")


def test_unknown_model_kwargs_are_errors_not_ignored():
    with pytest.raises(FDFastError, match=r"model.kwargs: Beit takes no argument 'dpeth' \(did you mean 'depth'\?\)"):
        build_vit_student("tiny", img_size=32, dpeth=2)
    from fdfast.models.teachers import build_teacher
    # YAML "{depth:2}" (no space) parses to the key "depth:2"; timm alone would drop it silently
    with pytest.raises(FDFastError, match=r"teacher.kwargs: VisionTransformer takes no argument 'depth:2'.*space"):
        build_teacher("vit_tiny_patch16_224", weights="random", img_size=32, **{"depth:2": None})


@pytest.mark.parametrize("cfg", [ModelConfig(img_size=32, kwargs={"depth": 2}),
                                 ModelConfig(arch="swinv2", img_size=32, kwargs=dict(embed_dim=16, depths=[2],
                                                                                     num_heads=[2], window_size=4))],
                         ids=["vit", "swinv2"])
def test_fast_student_runs_fdfast_forwards_with_timms_state_dict(cfg):
    """build_student(fast=True): the attention (and BEiT's residuals) on fdfast's forwards from the start, the
    backend from the config; its state dict loads strictly into timm's own class built from the export's kwargs."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    from fdfast.attention import FAST_ATTENTION
    from fdfast.fastpath import FusedResidualBlock, timm_class
    from fdfast.models.student import vit_student_kwargs
    from fdfast.models.swinv2 import swinv2_student_kwargs
    cfg.attention = "reference"
    fast = build_student(cfg, fast=True)
    attention = [m for m in fast.modules() if type(m) in FAST_ATTENTION.values()]
    assert len(attention) == 2 and {m.fdfast_backend for m in attention} == {"reference"}
    assert sum(type(m) is FusedResidualBlock for m in fast.modules()) == (2 if cfg.arch == "vit" else 0)
    plain = build_student(cfg)
    assert [timm_class(type(m)) for m in fast.modules()] == [type(m) for m in plain.modules()]
    if cfg.arch == "vit":
        timm_model = Beit(**vit_student_kwargs(cfg.size, cfg.patch_size, cfg.img_size, cfg.drop_path, cfg.pos_bias,
                                               **cfg.kwargs))
    else:
        timm_model = SwinTransformerV2(**swinv2_student_kwargs(cfg.size, cfg.img_size, cfg.drop_path, **cfg.kwargs))
    timm_model.load_state_dict(fast.state_dict(), strict=True)
    assert list(timm_model.state_dict()) == list(fast.state_dict())
