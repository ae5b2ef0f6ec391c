"""timm model folders: `fdfast export --to timm-dir` -> timm.create_model("local-dir:DIR", pretrained=True) with no
other argument gives the student's features; timm train.py's model creation takes the folder; the folder is what
huggingface_hub.upload_folder pushes, with a model card; folders (local-dir: / hf-hub: from the offline cache) as
fdfast inputs: teachers and fine-tuning."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from fdfast.cli import main
from fdfast.config import ModelConfig
from fdfast.errors import FDFastError
from fdfast.io import atomic_save_safetensors
from fdfast.models.export import STUDENT_META_KEY, export, load_student
from fdfast.models.student import build_student

TOL = 1e-5


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def vit_cfg():
    return ModelConfig(arch="vit", size="base", patch_size=16, img_size=48, drop_path=0.1,
                       kwargs=dict(embed_dim=32, depth=2, num_heads=2))


def swin_cfg():
    return ModelConfig(arch="swinv2", size="tiny", img_size=64, drop_path=0.2,
                       kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=8))


def write_run(folder, cfg, steps=7):
    """A finished run as `fdfast train` leaves it: config.yaml, metrics.jsonl, student.safetensors."""
    torch.manual_seed(0)
    student = build_student(cfg)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the shared RPB table starts at zero: make it matter
    folder.mkdir(parents=True)
    atomic_save_safetensors(student.state_dict(), folder / "student.safetensors",
                            metadata={STUDENT_META_KEY: json.dumps(dict(vars(cfg)))})
    config = dict(recipe="clip_b16", model=dict(vars(cfg)), optim=dict(steps=steps),
                  teacher=dict(name="clip-vit-b16", weights="/somewhere/ViT-B-16.pt"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [dict(step=s, loss=1.0 / s, lr=1e-4, img_per_s=10.0) for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, student.eval()


@pytest.mark.parametrize("cfg,arch", [(vit_cfg(), "beit_base_patch16_224"), (swin_cfg(), "swinv2_tiny_window8_256")],
                         ids=["vit-shared-rpb", "swinv2"])
def test_timm_rebuilds_the_folder_with_no_other_argument(tmp_path, cfg, arch):
    run, student = write_run(tmp_path / "run", cfg)
    out = export(run, tmp_path / "fd-student", "timm-dir")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # exactly what a user runs
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    reference = load_student(run)
    with torch.no_grad():
        assert rel_err(model.forward_features(x), reference.forward_features(x)) <= TOL
        assert rel_err(model.forward_features(x), student.forward_features(x)) <= TOL
        assert rel_err(model(x), reference(x)) <= TOL
        assert rel_err(load_student(out).forward_features(x), reference.forward_features(x)) <= TOL
    # every tensor of the file is the model's (timm loads strictly: no head to adapt)
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == arch
    assert config["num_classes"] == 0 and config["model_args"]["img_size"] == [cfg.img_size, cfg.img_size]
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, cfg.img_size, cfg.img_size] and pre["crop_pct"] == 0.875
    assert pre["mean"] == pytest.approx(OPENAI_CLIP_MEAN) and pre["std"] == pytest.approx(OPENAI_CLIP_STD)  # teacher's
    assert "hf_hub_id" not in pre and "tag" not in pre  # nothing of the architecture's own published weights


def test_the_folder_is_what_upload_folder_pushes_with_a_model_card(tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
    run, _ = write_run(tmp_path / "run", vit_cfg(), steps=7)
    out = export(run, tmp_path / "fd-vit", "timm-dir")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "model.safetensors"]  # no lock, temp or hidden file
    assert sorted(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) == files
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and "feature-distillation" in card.data.tags
    from fdfast import __version__
    for fact in ("clip-vit-b16 (weights ViT-B-16.pt)", "**Recipe:** clip_b16", "**Steps:** 7",
                 "**Final FD loss:** 0.1429 (step 7", f"fdfast {__version__}", 'timm.create_model("local-dir:fd-vit"',
                 "fdfast finetune local-dir:fd-vit", "--model local-dir:fd-vit --pretrained --num-classes N"):
        assert fact in card.text, fact


def test_timm_train_py_model_creation_takes_the_folder(tmp_path):
    """timm's train.py (not shipped in the wheel): create_model(args.model, pretrained=..., in_chans, num_classes,
    drop_rate, drop_path_rate, drop_block_rate, global_pool=args.gp, bn_momentum, bn_eps, scriptable,
    checkpoint_path, **args.model_kwargs) with its defaults, then resolve_data_config(vars(args), model=model)."""
    from timm.data import create_transform, resolve_data_config
    run, _ = write_run(tmp_path / "run", vit_cfg())
    out = export(run, tmp_path / "fd-vit", "timm-dir")
    model = timm.create_model(f"local-dir:{out}", pretrained=True, in_chans=3, num_classes=5, drop_rate=0.0,
                              drop_path_rate=0.1, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=False, checkpoint_path=None)
    weights = load_file(str(out / "model.safetensors"))
    own = model.state_dict()
    assert set(own) - set(weights) == {"head.weight", "head.bias"} and model.num_classes == 5  # a new head
    assert all(torch.equal(own[k], v) for k, v in weights.items())  # the whole backbone from the folder
    args = dict(input_size=None, img_size=None, in_chans=None, mean=None, std=None, crop_pct=None, crop_mode=None,
                interpolation="")  # train.py's argparse defaults for the data keys
    data = resolve_data_config(args, model=model)
    assert data["input_size"] == (3, 48, 48) and data["crop_pct"] == 0.875 and data["interpolation"] == "bilinear"
    assert data["mean"] == pytest.approx(OPENAI_CLIP_MEAN)
    create_transform(**data, is_training=True)
    loss = model.train()(torch.randn(4, 3, 48, 48)).logsumexp(1).mean()
    loss.backward()  # one step trains
    assert model.head.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_export_cli_writes_a_new_folder_only(tmp_path, capsys):
    run, _ = write_run(tmp_path / "run", vit_cfg())
    out = tmp_path / "exported"
    assert main(["export", str(run), "--to", "timm-dir", "--out", str(out)]) == 0
    assert f"local-dir:{out}" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--to", "timm-dir", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and (out / "model.safetensors").read_bytes() == before
    assert main(["export", str(run), "--to", "timm-dir", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "writes a folder" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind


# -- model folders as inputs: teachers, fine-tuning, the Hugging Face cache ---------------------------------
def _timm_folder(folder, num_classes=0):
    """A tiny timm ViT saved by timm's own save_for_hf (what a hub repo of timm holds)."""
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    return model.eval()


def _hub_cache(root, repo, folder):
    """The files of ``folder`` as huggingface_hub caches a download of ``repo``: blobs, a snapshot of symlinks, refs."""
    base = root / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (base / "snapshots" / commit).mkdir(parents=True)
    (base / "blobs").mkdir()
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", base / "snapshots" / commit / path.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE  # conftest: no network, the cache only
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_a_timm_folder_is_a_teacher(tmp_path):
    from fdfast.models.teachers import build_teacher
    model = _timm_folder(tmp_path / "vit", num_classes=10)
    teacher = build_teacher(f"local-dir:{tmp_path / 'vit'}", embedding=True)
    assert teacher.img_size == 32 and teacher.mean == (0.5, 0.5, 0.5)  # from the folder's config
    assert (teacher.grid, teacher.num_prefix_tokens, teacher.dim, teacher.embedding_dim) == ((2, 2), 1, 192, 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), model.forward_features(x))
        assert torch.equal(teacher.embedding(x), model(x))
    # an exported FD student is a teacher too (iterated FD), its tokens the student's
    run, student = write_run(tmp_path / "run", vit_cfg())
    out = export(run, tmp_path / "fd-vit", "timm-dir")
    fd_teacher = build_teacher(f"local-dir:{out}")
    assert fd_teacher.mean == pytest.approx(OPENAI_CLIP_MEAN) and fd_teacher.grid == (3, 3)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(fd_teacher(x), student.forward_features(x)) <= TOL
    with pytest.raises(FDFastError, match="holds no config.json.*--to timm-dir"):
        build_teacher(f"local-dir:{tmp_path / 'run'}")


def test_a_timm_folder_fine_tunes(tmp_path):
    from fdfast.finetune.model import build_classifier, resolve_model
    run, _ = write_run(tmp_path / "run", vit_cfg())
    out = export(run, tmp_path / "fd-vit", "timm-dir")
    backbone = resolve_model(f"local-dir:{out}")
    assert backbone.img_size == 48 and backbone.mean == pytest.approx(OPENAI_CLIP_MEAN)
    clf = build_classifier(backbone, num_classes=3)
    weights = load_file(str(out / "model.safetensors"))
    own = clf.model.state_dict()
    trunk = [k for k in weights if not k.startswith("norm.")]  # the final norm: the fine-tune recipe's choice
    assert trunk and all(torch.equal(own[k], weights[k]) for k in trunk)  # every other weight from the folder
    assert clf.model.num_classes == 3 and clf.model.head.weight.abs().max() < 0.01  # new, almost silent head


def test_hf_hub_names_come_from_the_offline_cache(tmp_path, hub_cache):
    from fdfast.finetune.model import resolve_model
    from fdfast.models.teachers import build_teacher
    model = _timm_folder(tmp_path / "vit")
    _hub_cache(hub_cache, "someone/tiny-vit", tmp_path / "vit")
    assert timm.create_model("hf-hub:someone/tiny-vit", pretrained=True) is not None  # the layout timm reads
    teacher = build_teacher("hf-hub:someone/tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), model.forward_features(x))
    assert resolve_model("hf-hub:someone/tiny-vit").img_size == 32
    with pytest.raises(FDFastError) as e:
        build_teacher("hf-hub:someone/not-downloaded")
    message = str(e.value)
    assert "\n" not in message and "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message


def test_an_uncached_hub_model_is_one_line_exit_2(tmp_path, hub_cache, capsys):
    assert main(["finetune", "hf-hub:someone/not-downloaded", "--out", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf-hub:someone/not-downloaded" in err[0] and "not in the Hugging Face cache" in err[0]
    assert not (tmp_path / "ft").exists()


def test_fdfast_train_takes_a_folder_teacher(tmp_path, image_dir):
    from test_shards import _train_argv
    _timm_folder(tmp_path / "vit")
    argv = _train_argv(tmp_path / "run", "", str(image_dir), 2)
    argv[argv.index("--teacher") + 1] = f"local-dir:{tmp_path / 'vit'}"
    del argv[argv.index("--teacher-weights"):argv.index("--teacher-weights") + 2]  # the folder holds them
    assert main(argv) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["teacher"]["name"] == f"local-dir:{tmp_path / 'vit'}"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
