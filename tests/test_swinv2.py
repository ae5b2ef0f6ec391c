"""SwinV2 students: timm's SwinTransformerV2 with FD's presets; SwinV2-G (~3.0 B) buildable on the meta device."""
import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2

from fdfast.config import ModelConfig
from fdfast.errors import FDFastError
from fdfast.models.student import build_student
from fdfast.models.tokens import final_tokens, geometry
from fdfast.models.swinv2 import build_swinv2_student, swinv2_student_kwargs


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_fd_preset_is_window14_depths_2_2_18_2_width_128():
    kw = swinv2_student_kwargs("fd")
    assert (kw["window_size"], kw["depths"], kw["embed_dim"], kw["num_heads"], kw["patch_size"]) == \
        (14, [2, 2, 18, 2], 128, [4, 8, 16, 32], 4)
    with torch.device("meta"):
        model = build_student(ModelConfig(arch="swinv2", size="fd", img_size=224))
    assert isinstance(model, SwinTransformerV2)
    assert 86e6 < n_params(model) < 89e6  # SwinV2-B
    assert (geometry(model).grid, geometry(model).num_prefix_tokens) == ((7, 7), 0) and model.num_features == 1024


def test_swinv2_giant_has_about_3_billion_parameters_on_meta():
    with torch.device("meta"):
        model = build_swinv2_student(ModelConfig(arch="swinv2", size="giant", img_size=224))
    assert all(p.is_meta for p in model.parameters())
    assert 2.9e9 < n_params(model) < 3.1e9, n_params(model)
    assert model.embed_dim == 512 and [len(s.blocks) for s in model.layers] == [2, 2, 42, 4]


def test_tiny_swinv2_student_runs_and_flattens_tokens():
    cfg = ModelConfig(arch="swinv2", size="tiny", img_size=64, drop_path=0.2,
                      kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=8))
    model = build_student(cfg)
    tokens = final_tokens(model, torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 64, 32)  # 64 px / 4 / 2 = 8x8 tokens of width 2 * 16
    assert (geometry(model).grid, geometry(model).num_prefix_tokens) == ((8, 8), 0)
    assert model.fd_student_kwargs["arch"] == "swinv2"
    assert model.layers[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_bad_sizes_are_user_errors():
    with pytest.raises(FDFastError, match="divisible by 32"):
        swinv2_student_kwargs("tiny", img_size=100)
    with pytest.raises(FDFastError, match="unknown SwinV2 student size"):
        swinv2_student_kwargs("huge")
