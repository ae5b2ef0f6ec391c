"""Checkpoints that travel: export -> timm.create_model(timm_model, **timm_kwargs) strict load -> equal features;
load_student on runs, step dirs and official FD checkpoints."""
import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from timm.models.beit import Beit

from fdfast import checkpoint as ckpt
from fdfast.checkpointer import save_full
from fdfast.config import ModelConfig
from fdfast.errors import FDFastError
from fdfast.models.export import export, finetune_state_dict, load_student, load_timm_export
from fdfast.models.student import build_student

TOL = 1e-5
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the shared RPB table is zero-initialised: make it matter
    return model.eval()


def vit_cfg(**kw):
    return ModelConfig(arch="vit", size="base", patch_size=16, img_size=48, drop_path=0.1, kwargs=dict(TINY, **kw))


def swin_cfg():
    return ModelConfig(arch="swinv2", size="tiny", img_size=64, drop_path=0.2,
                       kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=8))


def write_run(tmp_path, cfg):
    """A run dir as `fdfast train` leaves it: student.safetensors + a committed step."""
    student = perturbed(build_student(cfg))
    meta = json.dumps(dict(vars(cfg)))
    run = tmp_path / "run"
    run.mkdir()
    ckpt.atomic_save_safetensors(student.state_dict(), run / "student.safetensors",
                                 metadata={ckpt.STUDENT_META_KEY: meta})
    tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
    tensors.update({"proj.weight": torch.randn(8, 32), "proj.bias": torch.zeros(8)})
    save_full(run, 5, tensors, {"step": 5}, dict(vars(cfg)), keep=2)
    return run, student


@pytest.mark.parametrize("cfg", [vit_cfg(), swin_cfg()], ids=["vit-shared-rpb", "swinv2"])
def test_export_loads_strictly_in_timm_with_equal_features(tmp_path, cfg):
    run, student = write_run(tmp_path, cfg)
    out = export(run, tmp_path / "student_timm.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    kwargs = json.loads(meta["timm_kwargs"])
    model = timm.create_model(meta["timm_model"], **kwargs)  # exactly what a user runs
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(out)), strict=True)
    model.eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert rel_err(model.forward_features(x), student.forward_features(x)) <= TOL
        assert rel_err(model(x), student(x)) <= TOL
    if cfg.arch == "vit":  # per-block tables, each a copy of the shared one
        assert kwargs["use_rel_pos_bias"] and not kwargs["use_shared_rel_pos_bias"] and not kwargs["use_fc_norm"]
        shared = student.state_dict()["rel_pos_bias.relative_position_bias_table"]
        for blk in model.blocks:
            assert torch.equal(blk.attn.relative_position_bias_table, shared)
    # the step dir exports the same weights
    step = export(run / "checkpoints" / "step-5", tmp_path / "from_step.safetensors")
    with torch.no_grad():
        assert torch.equal(load_timm_export(step).forward_features(x), load_timm_export(out).forward_features(x))


def test_load_student_from_run_step_and_file(tmp_path):
    run, student = write_run(tmp_path, vit_cfg())
    x = torch.randn(2, 3, 48, 48)
    want = student.forward_features(x)
    for src in (run, run / "checkpoints" / "step-5", run / "student.safetensors"):
        got = load_student(src)
        assert isinstance(got, Beit) and not got.training
        with torch.no_grad():
            assert torch.equal(got.forward_features(x), want)


def test_finetune_head_gets_a_new_fc_norm(tmp_path):
    run, student = write_run(tmp_path, vit_cfg())
    out = export(run, tmp_path / "s.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    from safetensors.torch import load_file
    model = timm.create_model(meta["timm_model"], **dict(json.loads(meta["timm_kwargs"]), use_fc_norm=True,
                                                          num_classes=7))
    missing, unexpected = model.load_state_dict(finetune_state_dict(load_file(str(out))), strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and unexpected == []


def _official_fd_stage(student_ref):
    sd = {f"encoder.{k}": v for k, v in student_ref.state_dict().items()}
    sd["encoder.rel_pos_bias.relative_position_index"] = torch.zeros(10, 10, dtype=torch.long)
    sd.update({"decoder.0.weight": torch.randn(24, 32, 1), "decoder.0.bias": torch.randn(24),
               "feature_model.visual.conv1.weight": torch.randn(24, 3, 16, 16)})
    return {"model": sd, "epoch": 299, "max_accuracy": 0.0}


def test_official_fd_checkpoints_import(tmp_path):
    x = torch.randn(2, 3, 48, 48)
    # FD stage: shared RPB, final norm, the student under encoder., projection as decoder.0 (Conv1d)
    fd = perturbed(Beit(img_size=48, patch_size=16, num_classes=0, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                        use_fc_norm=False, init_values=0.1, **TINY))
    torch.save(_official_fd_stage(fd), tmp_path / "fd_pretrain.pth")
    got = load_student(tmp_path / "fd_pretrain.pth")
    with torch.no_grad():
        assert rel_err(got.forward_features(x), fd.forward_features(x)) <= TOL
    from fdfast.models.official import read_official
    cfg, _, extras = read_official(tmp_path / "fd_pretrain.pth")
    assert (cfg["pos_bias"], cfg["img_size"], cfg["patch_size"], extras["stage"]) == ("shared", 48, 16, "fd")
    assert extras["proj.weight"].shape == (24, 32)
    # ... and travels on: export to timm, and to fdfast's own student format
    timm_file = export(tmp_path / "fd_pretrain.pth", tmp_path / "fd_timm.safetensors")
    with torch.no_grad():
        assert rel_err(load_timm_export(timm_file).forward_features(x), fd.forward_features(x)) <= TOL
    own = export(tmp_path / "fd_pretrain.pth", tmp_path / "student.safetensors", to="fdfast")
    with torch.no_grad():
        assert rel_err(load_student(own).forward_features(x), fd.forward_features(x)) <= TOL

    # fine-tune stage: per-block tables, mean pooling -> fc_norm -> head, relative_position_index buffers
    ft = perturbed(Beit(img_size=48, patch_size=16, num_classes=10, use_abs_pos_emb=False, use_rel_pos_bias=True,
                        use_fc_norm=True, init_values=0.1, **TINY))
    sd = dict(ft.state_dict())
    sd.update({f"blocks.{i}.attn.relative_position_index": torch.zeros(10, 10, dtype=torch.long) for i in range(2)})
    torch.save({"model": sd, "epoch": 99}, tmp_path / "fd_finetune.pth")
    got = load_student(tmp_path / "fd_finetune.pth")
    with torch.no_grad():
        assert rel_err(got(x), ft(x)) <= TOL  # class logits equal


def test_bad_inputs_fail_loudly(tmp_path):
    run, _ = write_run(tmp_path, vit_cfg())
    with pytest.raises(FDFastError, match="must be a .safetensors"):
        export(run, tmp_path / "x.pth")
    with pytest.raises(FDFastError, match="no such run"):
        load_student(tmp_path / "nope")
    bad = {"model": {"encoder.layers.0.blocks.0.norm1.weight": torch.ones(2), "encoder.patch_embed.proj.weight":
                     torch.ones(2, 3, 4, 4)}}
    torch.save(bad, tmp_path / "swin.pth")
    with pytest.raises(FDFastError, match="Swin"):
        load_student(tmp_path / "swin.pth")
    # weights that disagree with the stored description name the missing key
    from safetensors.torch import load_file
    sd = load_file(str(run / "student.safetensors"))
    del sd["blocks.1.norm1.weight"]
    with safe_open(str(run / "student.safetensors"), framework="pt") as f:
        meta = f.metadata()
    ckpt.atomic_save_safetensors(sd, tmp_path / "broken.safetensors", metadata=meta)
    with pytest.raises(FDFastError, match=r"missing keys \[blocks\.1\.norm1\.weight\]"):
        load_student(tmp_path / "broken.safetensors")


def test_export_cli(tmp_path):
    run, _ = write_run(tmp_path, swin_cfg())
    out = tmp_path / "swin.safetensors"
    r = subprocess.run([sys.executable, "-m", "fdfast", "export", str(run), "--to", "timm", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "strict=True" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fdfast", "export", str(tmp_path / "missing"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("fdfast export: error:") and len(r.stderr.splitlines()) == 1
