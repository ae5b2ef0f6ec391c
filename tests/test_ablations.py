"""The paper's ablations as switches: loss.target, loss.kind, teacher.drop_path (and their bad input).

Formula tests of each loss kind (fp64, forward and gradients) live with the kernels (test_fd_loss_reference.py,
test_fd_loss_kernel.py); here: each switch reaches the loss from --set and from a recipe, the targets are the
tokens they claim to be, and the teacher's drop path touches nothing but DropPath layers.
"""
import json
import re
import typing

import pytest
import timm
import torch
import yaml

from fdfast.cli import main
from fdfast.config import FUSED_LOSS_KINDS, RECIPE_DIR, LossConfig, ModelConfig, load_config
from fdfast.distill import FeatureDistiller, pooled_token
from fdfast.errors import FDFastError
from fdfast.kernels.fd_loss import TRITON_KINDS
from fdfast.kernels.reference import LOSS_KINDS, fd_loss_reference
from fdfast.models.student import build_student
from fdfast.models.teachers import build_teacher, embedding_teachers
from tests.test_train import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SWITCHES = {"loss.target": "cls", "loss.kind": "cosine", "teacher.drop_path": 0.1, "loss.whiten": False,
            "model.pos_bias": "per_block"}


def tiny_teacher(**kw):
    return build_teacher("vit_tiny_patch16_224", "random", img_size=32, depth=2, **kw)


def error_lines(capsys) -> list[str]:
    """The error lines of a failed CLI run (status lines, e.g. the precision chosen, may come before)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def tiny_student():
    return build_student(ModelConfig(img_size=32, drop_path=0.0, kwargs={"depth": 2}))


# ---- config: every switch from --set and from a recipe; bad values are one line -------------------------

def test_config_choices_match_the_kernels():
    hints = typing.get_type_hints(LossConfig)
    assert set(typing.get_args(hints["kind"])) == set(LOSS_KINDS)
    assert set(FUSED_LOSS_KINDS) == set(TRITON_KINDS) == {"smooth_l1", "l2"}
    assert typing.get_args(hints["target"]) == ("tokens", "cls", "embedding")
    cfg = load_config("demo")
    assert (cfg.loss.target, cfg.loss.kind, cfg.teacher.drop_path) == ("tokens", "smooth_l1", 0.0)  # the paper's


def test_each_switch_from_set_and_from_a_recipe(tmp_path):
    cfg = load_config("demo", dict(SWITCHES))
    recipe = yaml.safe_load((RECIPE_DIR / "demo.yaml").read_text())
    for key, value in SWITCHES.items():
        section, name = key.split(".")
        recipe[section][name] = value
    (tmp_path / "ablate.yaml").write_text(yaml.safe_dump(recipe))
    from_recipe = load_config(str(tmp_path / "ablate.yaml"))
    for key, value in SWITCHES.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
        assert getattr(getattr(from_recipe, section), name) == value


@pytest.mark.parametrize("setting, match", [
    ("loss.target=logits", r"loss.target must be one of tokens, cls, embedding, got 'logits'"),
    ("loss.kind=huber", r"loss.kind must be one of smooth_l1, l2, cosine, got 'huber'"),
    ("teacher.drop_path=1.5", r"teacher.drop_path must be in \[0, 1\), got 1.5"),
])
def test_bad_switch_is_one_line_exit_2(tmp_path, teacher_file, image_dir, capsys, setting, match):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 2, "--set", setting)) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not out.exists()


def test_cosine_on_the_fused_backend_is_refused(tmp_path, teacher_file, image_dir, capsys):
    args = tiny_args(tmp_path / "run", teacher_file, image_dir, 2, "--set", "loss.kind=cosine",
                     "--set", "loss.backend=triton")
    assert main(args) == 2
    assert "no fused kernel for loss.kind=cosine (it covers smooth_l1, l2)" in capsys.readouterr().err


def test_embedding_on_a_teacher_without_a_head_names_the_teachers_that_have_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "2", "--set", "optim.warmup_steps=1",
                 "--set", "loss.target=embedding"]) == 2  # the demo recipe
    lines = error_lines(capsys)
    assert len(lines) == 1 and "'demo-dinov2-s14' has no final pooled output" in lines[0]
    err = lines[0]
    for name in ("clip-vit-b16", "deit-vit-b16", "resnet50", "demo-efficientnet-lite0"):
        assert name in err
    assert "dino-vit-b16," not in err and "mae-vit-b16" not in err  # self-supervised: no head
    assert not out.exists()
    assert {"clip-vit-l14", "swin-l-w7"} <= set(embedding_teachers())


# ---- the targets -----------------------------------------------------------------------------------------

def test_cls_target_is_the_cls_token_and_the_student_predicts_it_from_its_own():
    teacher, student = tiny_teacher(), tiny_student()
    d = FeatureDistiller(student, teacher, LossConfig(target="cls", backend="torch")).eval()
    x = torch.randn(3, 3, 32, 32)
    target = d.target_tokens(x)
    assert target.shape == (3, 1, teacher.dim)
    torch.testing.assert_close(target, teacher(x)[:, :1])
    pred = student.forward_features(x)[:, :1]  # the student's CLS token after its final norm
    want = fd_loss_reference(pred, target, d.fd_loss.proj.weight, d.fd_loss.proj.bias)
    torch.testing.assert_close(d(x), want, rtol=1e-5, atol=1e-6)


def test_cls_target_of_a_model_without_prefix_tokens_is_the_mean_token():
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(pooled_token(x, 0), x.mean(1, keepdim=True))
    torch.testing.assert_close(pooled_token(x, 1), x[:, :1])
    cnn = build_teacher("resnet18", "random", img_size=64)
    d = FeatureDistiller(build_student(ModelConfig(img_size=64, kwargs={"depth": 1})), cnn,
                         LossConfig(target="cls", backend="torch"))
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(d.target_tokens(images), cnn(images).mean(1, keepdim=True))


def test_embedding_target_is_the_logits_and_whitening_applies_the_same_way():
    teacher = tiny_teacher(embedding=True)
    assert teacher.embedding_dim == 1000
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    reference.load_state_dict(teacher.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.embedding(x), reference(x))  # timm's own logits
    for whiten in (True, False):
        d = FeatureDistiller(tiny_student(), teacher, LossConfig(target="embedding", whiten=whiten, backend="torch"))
        assert d.fd_loss.proj.weight.shape == (1000, 192)
        pred = d.student.forward_features(x)[:, :1]
        want = fd_loss_reference(pred, reference(x).unsqueeze(1), d.fd_loss.proj.weight, d.fd_loss.proj.bias,
                                 whiten_target=whiten)
        torch.testing.assert_close(d.eval()(x), want, rtol=1e-5, atol=1e-6)


def test_clip_embedding_is_the_image_embedding_after_the_projection(tmp_path):
    from tests.test_teachers import TINY_VIT, _tiny_clip
    model = _tiny_clip(quick_gelu=True)
    torch.save(model.state_dict(), tmp_path / "clip.pt")  # open_clip's layout: visual.* + the text tower
    t = build_teacher("clip-vit-b16", tmp_path / "clip.pt", img_size=64, embedding=True, num_classes=16, **TINY_VIT)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.encode_image(x)  # open_clip: ln_post(CLS) @ proj
    torch.testing.assert_close(t.embedding(x), want, rtol=1e-5, atol=1e-5)
    assert t.embedding_dim == 16
    plain = build_teacher("clip-vit-b16", tmp_path / "clip.pt", img_size=64, **TINY_VIT)  # tokens: projection dropped
    assert plain.embedding_dim == 0 and not any(k.startswith("head") for k in plain.backbone.state_dict())


# ---- teacher drop path -----------------------------------------------------------------------------------

def test_teacher_drop_path_is_the_only_thing_in_train_mode():
    teacher = tiny_teacher(drop_path=0.5, proj_drop_rate=0.3)  # dropout too: it must stay off
    d = FeatureDistiller(tiny_student(), teacher, LossConfig(backend="torch")).train()
    kinds = {}
    for m in teacher.modules():
        kinds.setdefault(type(m).__name__, set()).add(m.training)
    assert kinds["DropPath"] == {True}
    assert kinds["Dropout"] == {False} and kinds["LayerNorm"] == {False} and kinds["VisionTransformer"] == {False}
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 3, 32, 32)
    a, b = d.target_tokens(x), d.target_tokens(x)
    assert not a.requires_grad and (a - b).abs().max() > 1e-3  # paths dropped at random
    d.eval()
    assert all(not m.training for m in teacher.modules())
    torch.testing.assert_close(d.target_tokens(x), d.target_tokens(x), rtol=0, atol=0)
    d.train()
    assert all(m.training for m in teacher.modules() if type(m).__name__ == "DropPath")


def test_no_teacher_drop_path_means_a_deterministic_teacher():
    d = FeatureDistiller(tiny_student(), tiny_teacher(), LossConfig(backend="torch")).train()
    assert not any(m.training for m in d.teacher.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(d.target_tokens(x), d.target_tokens(x), rtol=0, atol=0)


def test_teacher_drop_path_needs_drop_path_layers():
    with pytest.raises(FDFastError, match="set the drop path once"):
        tiny_teacher(drop_path=0.1, drop_path_rate=0.2)
    with pytest.raises(FDFastError, match="has no drop path layers, so teacher.drop_path=0.1 would change nothing"):
        build_teacher("vit_tiny_patch16_224", "random", img_size=32, depth=1, drop_path=0.1)  # timm ramp: block 0: 0
    with pytest.raises(FDFastError, match="rejects the kwargs .*drop_path_rate"):
        build_teacher("vgg11", "random", img_size=32, drop_path=0.1)


# ---- end to end: each switch through `fdfast train` ------------------------------------------------------

@pytest.mark.parametrize("settings", [
    ["loss.target=cls"], ["loss.kind=l2"], ["loss.kind=cosine"], ["teacher.drop_path=0.1"],
    ["loss.target=embedding", "loss.kind=l2"],
], ids=lambda s: ",".join(s))
def test_each_switch_trains_from_the_cli(tmp_path, teacher_file, image_dir, settings):
    extra = [a for s in settings for a in ("--set", s)]
    if "loss.target=embedding" in settings:  # the fixture file has no head: a random teacher with a classifier
        extra += ["--teacher-weights", "random"]
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 2, *extra)) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for s in settings:
        key, value = s.split("=")
        section, name = key.split(".")
        assert str(cfg[section][name]) == value
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


# ---- bench/ablate.py -------------------------------------------------------------------------------------

def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "kwargs" else {prefix + k: v})
    return out


def test_ablation_grid_flips_one_switch_at_a_time_and_shares_the_curves_default():
    from bench.ablate import GRID, ablation_cells
    from bench.repro import Setup, curve_cells
    setup = Setup(seeds=(0, 1))
    cells = ablation_cells(setup, 750)
    fd = [c for c in cells if c.kind == "fd"]
    assert [(c.tags["switch"], c.tags["seed"]) for c in fd] == [(a.name, s) for s in (0, 1) for a in GRID]
    base = {s: _flat(c.spec["config"]) for c in fd if c.tags["switch"] == "default" for s in [c.tags["seed"]]}
    for c, a in zip(fd, GRID * 2):
        flat = _flat(c.spec["config"])
        changed = {k for k, v in flat.items() if v != base[c.tags["seed"]][k]}
        assert changed == set(a.overrides), a.name
        assert flat["optim.steps"] == 750 and flat["runtime.seed"] == c.tags["seed"]
    # each switch's student is probed and fine-tuned exactly as the default's is
    for c in cells:
        if c.kind == "ft":
            assert c.spec["config"] == next(d for d in cells if d.kind == "ft" and d.tags["seed"] == c.tags["seed"]
                                            ).spec["config"]
    # the default's cells ARE the curve's cells at that budget: one key, run once for both
    curve = {c.key for c in curve_cells(Setup(seeds=(0, 1), budgets=(0, 250, 750, 2000)))}
    default = [c for c in cells if c.tags["switch"] == "default"]
    assert len(default) == 6 and all(c.key in curve for c in default)
    assert not any(c.key in curve for c in cells if c.tags["switch"] != "default")


def test_the_ablation_report_marks_differences_beyond_two_standard_errors(tmp_path):
    from bench.ablate import GRID, ablation_cells, rows_of, write_report
    from bench.repro import Runner, Setup
    setup = Setup()
    cells = ablation_cells(setup, 750)
    top1 = {"default": [80, 81, 82], "whiten_off": [70, 71, 72], "target_cls": [79, 81, 83],
            "kind_l2": [90, 91, 92], "teacher_drop_path": [80, 82]}  # pos_bias_per_block: nothing finished
    (tmp_path / "cells").mkdir()
    for c in cells:
        values = top1.get(c.tags["switch"], [])
        if c.kind != "ft" or c.tags["seed"] >= len(values):
            continue
        rec = {"kind": "ft", "wall_s": 60.0, "result": {"top1": values[c.tags["seed"]], "best_top1": 90.0}}
        (tmp_path / "cells" / f"{c.name}.json").write_text(json.dumps(rec))
    rows = {r["switch"]: r for r in rows_of(cells, Runner(setup, tmp_path))}
    assert [r for r in rows] == [a.name for a in GRID]
    assert rows["default"]["stats"]["ft_top1"]["mean"] == 81 and "verdict" not in rows["default"]
    worse = rows["whiten_off"]["vs_default"]["ft_top1"]
    assert worse["diff"] == -10 and worse["se"] == pytest.approx((2 / 3) ** 0.5) and worse["separates"]
    assert rows["whiten_off"]["verdict"] == "worse: the paper's ordering holds"
    assert not rows["target_cls"]["vs_default"]["ft_top1"]["separates"]
    assert rows["target_cls"]["verdict"].startswith("no difference beyond 2 SE")
    assert rows["kind_l2"]["verdict"] == "better: the paper's ordering does not hold"
    assert rows["teacher_drop_path"]["stats"]["ft_top1"]["n"] == 2
    assert rows["pos_bias_per_block"]["verdict"] == "not measured yet"
    text = write_report(list(rows.values()), 750, tmp_path)
    assert "| whiten_off | loss.whiten=False | 71.00 +- 1.00, -10.00 ** |" in text
    assert "| target_cls | loss.target=cls | 81.00 +- 2.00, +0.00 |" in text
    assert "81.00 +- 1.41 (n=2), +0.00" in text
    lines = [json.loads(x) for x in (tmp_path / "ablations.jsonl").read_text().splitlines()]
    assert [r["switch"] for r in lines] == [a.name for a in GRID] and lines[0]["steps"] == 750
    assert (tmp_path / "ablations.png").stat().st_size > 10_000
