"""fdfast.models.tokens: the one answer to "what tokens does this model give" for every supported family.

For each family, the geometry read from the architecture (also on the meta device, as `fdfast teachers` does)
must describe the tensor that ``final_tokens`` really returns, and the tokens must be the model's own
final-norm output.
"""
import pytest
import timm
import torch

from fdfast.errors import FDFastError
from fdfast.models import tokens
from fdfast.models.student import build_vit_student

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, num_classes=0)
CASES = {
    # name: (builder, image size, grid, prefix, dim, layout, blocks)
    "beit_student": (lambda: build_vit_student("tiny", patch_size=8, img_size=32, depth=2), 32, (4, 4), 1, 192,
                     "vit", 2),
    "deit": (lambda: timm.create_model("deit_small_patch16_224", img_size=32, **TINY_VIT), 32, (2, 2), 1, 32, "vit", 2),
    "dinov2_reg": (lambda: timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, **TINY_VIT), 28, (2, 2), 5,
                   32, "vit", 2),
    "eva02": (lambda: timm.create_model("eva02_base_patch14_224", img_size=28, use_fc_norm=False, **TINY_VIT), 28,
              (2, 2), 1, 32, "vit", 2),
    "swinv2": (lambda: timm.create_model("swinv2_tiny_window8_256", img_size=64, window_size=8, embed_dim=16,
                                         depths=(2, 2), num_heads=(1, 2), num_classes=0), 64, (8, 8), 0, 32, "nhwc", 4),
    "resnet": (lambda: timm.create_model("resnet18", num_classes=0), 64, (2, 2), 0, 512, "cnn", 8),
    "efficientnet": (lambda: timm.create_model("efficientnet_lite0", num_classes=0), 112, (4, 4), 0, 320, "cnn", 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_describes_the_final_tokens(name):
    build, size, grid, prefix, dim, kind, n_blocks = CASES[name]
    model = build().eval()
    geom = tokens.geometry(model, (size, size))
    assert (geom.grid, geom.num_prefix_tokens, geom.dim, geom.layout) == (grid, prefix, dim, kind)
    with torch.no_grad():
        out = tokens.final_tokens(model, torch.randn(2, 3, size, size))
    assert out.shape == (2, geom.num_tokens, dim)
    assert tokens.patch_map(out, geom).shape == (2, *grid, dim)
    assert len(tokens.blocks(model)) == n_blocks
    with torch.device("meta"):
        on_meta = build()
    assert tokens.geometry(on_meta, (size, size)) == geom  # no weights, no forward: what `fdfast teachers` prints


def test_vit_and_swin_tokens_are_forward_features_after_the_final_norm():
    vit = CASES["dinov2_reg"][0]().eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(tokens.final_tokens(vit, x), vit.forward_features(x))
        final, _ = vit.forward_intermediates(x, indices=1, norm=True)  # timm's own account of the final tokens
        assert torch.allclose(tokens.final_tokens(vit, x), final, atol=1e-6)
    swin = CASES["swinv2"][0]().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tokens.final_tokens(swin, x), swin.forward_features(x).flatten(1, 2))


def test_cnn_tokens_are_the_last_stage_map_and_pruning_keeps_them():
    model = timm.create_model("efficientnet_lite0", num_classes=0).eval()
    features = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(-1,)).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if k in features.state_dict()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = features(x)[-1].flatten(2).transpose(1, 2)  # [B, h*w, 320], before conv_head
        assert torch.equal(tokens.final_tokens(model, x), want)
        before = sum(p.numel() for p in model.parameters())
        tokens.prune_to_final_tokens(model)
        assert sum(p.numel() for p in model.parameters()) < before  # conv_head (320 -> 1280) is gone
        assert torch.equal(tokens.final_tokens(model, x), want)


def test_open_clip_tower_tokens_after_ln_post():
    from open_clip.model import CLIP
    clip = CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=16, image_size=64),
                text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)).eval()
    tower = clip.visual
    geom = tokens.geometry(tower)
    assert (geom.grid, geom.num_prefix_tokens, geom.dim, geom.layout) == ((4, 4), 1, 32, "open_clip")
    assert tokens.patch_size(tower) == (16, 16) and len(tokens.blocks(tower)) == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tokens.final_tokens(tower, x)
        assert out.shape == (2, 17, 32)
        assert torch.allclose(out[:, 0] @ tower.proj, clip.encode_image(x), atol=1e-5)  # CLS + proj = the embedding


def test_a_model_without_tokens_is_a_one_line_error():
    with pytest.raises(FDFastError, match="cannot read tokens from a Linear"):
        tokens.geometry(torch.nn.Linear(3, 3))
