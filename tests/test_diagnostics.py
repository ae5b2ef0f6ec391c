"""fdfast.diagnostics: closed-form attention statistics, loss-landscape slices, capture, `fdfast diagnose`."""
import base64
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fdfast.diagnostics import (attention_distance, capture_attention, curvature_1d, filter_normalized_direction,
                                head_similarity, landscape_1d, landscape_2d)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run small ops; on 2 shared cores two OpenMP threads spin-wait for each other whenever another
    process holds a core (measured: a 5M-element add 10x slower), so they run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair_mean(grid, patch, pairs):
    """Mean of hypot distances (px) over the given (query, key) index pairs, by plain Python arithmetic."""
    rows, cols = grid
    py, px = patch

    def d(q, k):
        return math.hypot((q // cols - k // cols) * py, (q % cols - k % cols) * px)
    total = [w * d(q, k) for q, k, w in pairs]
    return sum(total)


def _with_prefix(patch_attn: torch.Tensor, prefix: int, prefix_weight: float) -> torch.Tensor:
    """[B, H, M, M] patch attention -> [B, H, P+M, P+M]: each patch query gives prefix_weight to every prefix
    key (patch weights scaled to keep rows summing to one); prefix queries attend uniformly."""
    b, h, m, _ = patch_attn.shape
    n = prefix + m
    out = torch.full((b, h, n, n), 1.0 / n, dtype=patch_attn.dtype)
    out[:, :, prefix:, :prefix] = prefix_weight
    out[:, :, prefix:, prefix:] = patch_attn * (1 - prefix * prefix_weight)
    return out


# ---- attention distance: closed forms ----

def test_identity_attention_is_zero_pixels():
    n = 1 + 14 * 14
    attn = torch.eye(n).expand(2, 3, n, n)
    assert torch.allclose(attention_distance(attn, (14, 14), 16, 1), torch.zeros(3), atol=1e-6)


def test_uniform_attention_is_mean_pairwise_patch_distance():
    grid, m = (14, 14), 196
    n = 1 + m
    attn = torch.full((1, 2, n, n), 1.0 / n)  # the CLS key's share is renormalised away
    expected = _pair_mean(grid, (16, 16), [(q, k, 1.0 / m**2) for q in range(m) for k in range(m)])
    assert abs(expected - 116.5) < 0.5  # the value the issue quotes
    got = attention_distance(attn, grid, 16, 1)
    assert torch.allclose(got, torch.full((2,), expected), rtol=1e-5)


def test_head_split_between_itself_and_one_fixed_patch():
    grid, m, fixed = (14, 14), 196, 17  # fixed patch at row 1, col 3
    split = torch.zeros(m, m)
    split[torch.arange(m), torch.arange(m)] = 0.5
    split[:, fixed] += 0.5
    patch_attn = torch.stack([split, torch.eye(m)])[None]  # head 0 split, head 1 identity
    attn = _with_prefix(patch_attn, prefix=1, prefix_weight=0.2)
    expected = _pair_mean(grid, (16, 16), [(q, fixed, 0.5 / m) for q in range(m)])
    got = attention_distance(attn, grid, 16, 1)
    assert got[0].item() == pytest.approx(expected, rel=1e-5)
    assert got[1].item() == pytest.approx(0.0, abs=1e-6)
    assert expected > 50  # a real distance, not a degenerate case


def test_prefix_tokens_are_ignored_and_rectangular_patches_use_both_axes():
    grid, m = (3, 5), 15
    g = torch.Generator().manual_seed(1)
    patch_attn = torch.softmax(torch.randn(2, 4, m, m, generator=g) * 3, dim=-1)
    plain = attention_distance(patch_attn, grid, (8, 16), num_prefix_tokens=0)
    for prefix, weight in [(1, 0.3), (4, 0.1)]:
        attn = _with_prefix(patch_attn, prefix, weight)
        attn[:, :, :prefix] = torch.softmax(torch.randn(2, 4, prefix, prefix + m, generator=g), -1)
        assert torch.allclose(attention_distance(attn, grid, (8, 16), prefix), plain, rtol=1e-5)
    pairs = [(q, k, patch_attn[1, 2, q, k].item() / m) for q in range(m) for k in range(m)]
    single = attention_distance(patch_attn[1:2], grid, (8, 16), 0)[2].item()
    assert single == pytest.approx(_pair_mean(grid, (8, 16), pairs), rel=1e-5)


def test_attention_distance_rejects_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match="prefix"):
        attention_distance(torch.eye(10).expand(1, 1, 10, 10), (3, 3), 16, 0)


# ---- head similarity ----

def test_head_similarity_identical_disjoint_and_a_known_angle():
    n = 5
    one = torch.softmax(torch.randn(n, n), -1)
    assert head_similarity(one.expand(3, 4, n, n)) == pytest.approx(1.0, abs=1e-6)
    disjoint = torch.zeros(1, 2, n, n)
    disjoint[0, 0, :, 0] = 1.0
    disjoint[0, 1, :, 1] = 1.0
    assert head_similarity(disjoint) == pytest.approx(0.0, abs=1e-7)
    # head 0 on key 0; head 1 half on key 0, half on key 1: cosine 1/sqrt(2) in every image
    half = disjoint.clone()
    half[0, 1, :, 0] = 0.5
    half[0, 1, :, 1] = 0.5
    assert head_similarity(torch.cat([half, half])) == pytest.approx(1 / math.sqrt(2), abs=1e-6)


# ---- loss landscape ----

def test_filter_normalisation_keeps_each_filters_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 5), nn.LayerNorm(5))
    with torch.no_grad():
        model[0].weight[2].zero_()  # a dead filter gets a zero direction, not a NaN
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for name, w in model.named_parameters():
        if w.dim() > 1:
            assert torch.allclose(d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(d[name], w)  # random, not a copy
        else:
            assert torch.count_nonzero(d[name]) == 0  # biases and norms stay still (Li et al.)
    d1 = filter_normalized_direction(model, torch.Generator().manual_seed(0), include_1d=True)
    assert d1["3.weight"].norm().item() == pytest.approx(model[3].weight.norm().item(), rel=1e-5)


class _Bowl(nn.Module):
    """A model whose loss is a separable quadratic bowl around its current weights."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("centre", self.weight.detach().clone())
        self.register_buffer("stiffness", torch.rand(3, 4) + 0.5)


def _bowl_loss(model):
    return (model.stiffness * (model.weight - model.centre) ** 2).sum()


def test_landscape_of_a_quadratic_is_the_expected_paraboloid():
    model = _Bowl()
    before = model.weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    d1, d2 = filter_normalized_direction(model, g), filter_normalized_direction(model, g)
    s, a, b = model.stiffness, d1["weight"], d2["weight"]
    one = landscape_1d(model, _bowl_loss, steps=9, span=2.0, direction=d1, progress=False)
    expected_curvature = 2 * (s * a * a).sum().item()  # d2L/dalpha2 of sum s (alpha d1)^2
    assert curvature_1d(one["alphas"], one["losses"]) == pytest.approx(expected_curvature, rel=1e-4)
    assert min(one["losses"]) == pytest.approx(0.0, abs=1e-6) and one["alphas"][4] == 0.0
    two = landscape_2d(model, _bowl_loss, steps=5, span=1.0, directions=(d1, d2), progress=False)
    for i, beta in enumerate(two["betas"]):
        for j, alpha in enumerate(two["alphas"]):
            step = alpha * a + beta * b
            assert two["losses"][i][j] == pytest.approx((s * step * step).sum().item(), rel=1e-4, abs=1e-6)
    assert torch.equal(model.weight, before)  # the weights are put back exactly


def test_landscape_restores_weights_when_the_loss_fails():
    model = _Bowl()
    before = model.weight.detach().clone()
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return _bowl_loss(m)
    with pytest.raises(RuntimeError):
        landscape_1d(model, failing, steps=5, progress=False)
    assert torch.equal(model.weight, before)


# ---- capture ----

def _beit(pos_bias):
    from fdfast.models.student import build_vit_student
    model = build_vit_student("tiny", patch_size=8, img_size=32, drop_path=0.0, pos_bias=pos_bias, depth=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)  # a non-zero bias, so that leaving it out would show
    return model


def _vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def _swinv2():
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    return SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2),
                             num_heads=(2, 4), num_classes=5)


@pytest.mark.parametrize("build", [lambda: _beit("shared"), lambda: _beit("per_block"), _vit, _swinv2],
                         ids=["beit_shared_rpb", "beit_per_block_rpb", "vit", "swinv2"])
def test_capture_does_not_change_outputs(build):
    model = build().eval()
    fused = {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    out, maps = capture_attention(model, x)
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # hooks removed
    assert {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")} == fused
    assert len(maps) == sum(1 for n, _ in model.named_modules() if n.endswith(".attn"))
    for m in maps:
        assert torch.allclose(m.weights.sum(-1), torch.ones(()), atol=1e-5)


def test_capture_sees_through_fdfast_patch_model():
    if importlib.util.find_spec("fdfast.attention") is None:
        pytest.skip("fdfast.patch_model is not built")
    from fdfast import patch_model
    model = _beit("shared").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    patch_model(model, backend="reference")
    classes = [type(m) for m in model.modules()]
    assert sum(c.__module__.startswith("fdfast.") for c in classes) == 3  # the fused forward is in place
    out, maps = capture_attention(model, x)
    assert len(maps) == 3 and torch.allclose(out, reference, atol=1e-5)
    assert [type(m) for m in model.modules()] == classes  # still patched afterwards


def test_capture_reads_the_shared_relative_position_bias():
    model = _beit("shared").eval()
    x = torch.randn(2, 3, 32, 32)
    _, maps = capture_attention(model, x)
    # block 0 by hand: softmax(q k^T / sqrt(d) + shared bias), the bias the model passes to every block
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1)
        attn = model.blocks[0].attn
        h = model.blocks[0].norm1(tokens)
        qkv = nn.functional.linear(h, attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]))
        q, k, _ = qkv.reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)
        expected = torch.softmax(q @ k.transpose(-1, -2) * 64 ** -0.5 + model.rel_pos_bias(), dim=-1)
    assert torch.allclose(maps[0].weights, expected, atol=1e-5)
    assert maps[0].grid == (4, 4) and maps[0].patch_size == (8.0, 8.0) and maps[0].num_prefix_tokens == 1


def test_capture_swin_windows_in_pixels_of_each_stage():
    _, maps = capture_attention(_swinv2().eval(), torch.randn(1, 3, 32, 32))
    assert [m.patch_size for m in maps] == [(2.0, 2.0)] * 2 + [(4.0, 4.0)] * 2  # patch merging doubles the stride
    assert [m.windows for m in maps] == [16, 16, 4, 4] and all(m.grid == (4, 4) for m in maps)
    assert [m.num_heads for m in maps] == [2, 2, 4, 4]


# ---- the pipeline and `fdfast diagnose` ----

def _local_refs(html_text: str) -> list[str]:
    return [r for r in re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html_text) if not r.startswith("data:")]


def test_diagnose_pipeline_on_a_swinv2_model(tmp_path):
    from PIL import Image

    from fdfast.diagnostics.inputs import ModelUnderTest
    from fdfast.diagnostics.run import diagnose
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    mut = ModelUnderTest("swinv2 tiny", _swinv2().eval(), (32, 32), source="built in the test")
    result = diagnose([mut], paths, tmp_path / "out", batch_size=2, landscape_loss="drift",
                      landscape={"steps_1d": 3, "steps_2d": 2, "images": 2}, progress=False)
    out = tmp_path / "out"
    distance = json.loads((out / "attention_distance.json").read_text())
    assert [len(h) for h in distance["layers"]] == [2, 2, 4, 4]
    assert all(0 <= d <= math.hypot(3, 3) * 2 + 1e-6 for h in distance["layers"][:2] for d in h)  # 4x4 window, 2 px
    land = json.loads((out / "loss_landscape.json").read_text())
    assert land["loss"] == "drift" and land["1d"]["losses"][1] == pytest.approx(0.0, abs=1e-6)
    assert all((out / f).is_file() for f in result["files"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step run of `fdfast train` (random-init demo teacher, 2-block student, 28 px)."""
    run = tmp_path_factory.mktemp("diagnose") / "run"
    if importlib.util.find_spec("fdfast.train") is not None:
        cmd = [sys.executable, "-m", "fdfast", "train", "--out", str(run), "--steps", "2", "--batch-size", "4",
               "--device", "cpu", "--set", "model.img_size=28", "--set", "optim.warmup_steps=0",
               "--set", "teacher.weights=random", "--set", "model.kwargs={depth: 2}", "--set", "ckpt.every=1",
               "--set", "runtime.tensorboard=false"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return run
    # no trainer yet: the same layout by hand (student.safetensors + config.yaml)
    from safetensors.torch import save_file

    from fdfast.models.student import build_vit_student
    run.mkdir()
    student = build_vit_student("tiny", 14, 28, 0.1, "shared", depth=2)
    meta = {"arch": "vit", "size": "tiny", "patch_size": 14, "img_size": 28, "drop_path": 0.1,
            "pos_bias": "shared", "kwargs": {"depth": 2}}
    save_file(student.state_dict(), str(run / "student.safetensors"), metadata={"fdfast_model": json.dumps(meta)})
    (run / "config.yaml").write_text("teacher: {name: demo-dinov2-s14, weights: random}\n")
    return run


def test_fdfast_diagnose_writes_every_file_and_a_self_contained_report(tiny_run, tmp_path, capsys):
    from fdfast.cli import main
    run = tiny_run
    out = tmp_path / "diag"
    assert main(["diagnose", str(run), "teacher:demo-dinov2-s14@random", "--images", "3", "--out", str(out),
                 "--landscape-steps", "3", "--landscape-grid", "2", "--landscape-images", "2"]) == 0
    assert "report.html" in capsys.readouterr().out
    expected = {"attention_distance.json", "attention_distance.png", "head_diversity.json", "head_diversity.png",
                "attention_maps.png", "attention_maps_2.png", "loss_landscape.json", "loss_landscape_1d.png",
                "loss_landscape_2d.png", "report.html"}
    assert expected <= {p.name for p in out.iterdir()}
    distance = json.loads((out / "attention_distance.json").read_text())
    assert [len(h) for h in distance["layers"]] == [3, 3]  # 2 blocks x 3 heads of the tiny student
    assert all(0 <= d <= math.hypot(14, 14) for h in distance["layers"] for d in h)  # 2x2 patches of 14 px
    assert len(distance["models"]) == 2 and len(distance["models"][1]["layers"]) == 12  # the ViT-S/14 teacher
    diversity = json.loads((out / "head_diversity.json").read_text())
    assert all(0 <= layer["similarity"] <= 1 + 1e-6 for layer in diversity["layers"])
    land = json.loads((out / "loss_landscape.json").read_text())
    assert land["loss"] == "fd" and len(land["1d"]["losses"]) == 3 and len(land["models"]) == 2
    assert land["models"][0]["projection"].startswith("trained")  # the run's own FD projection
    assert all(math.isfinite(v) for row in land["2d"]["losses"] for v in row)
    html_text = (out / "report.html").read_text()
    refs = _local_refs(html_text)
    assert refs and all((out / r).is_file() for r in refs)
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    assert len(pngs) >= 6 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize("argv, message", [
    (["nope"], "neither an existing run directory"),
    (["teacher:"], "teacher:NAME needs a name"),
    (["teacher:demo-dinov2-s14@random", "--query", "3;4"], "--query expects ROW,COL"),
    (["teacher:demo-dinov2-s14@random", "--images", "0"], "--images must be at least 1"),
])
def test_fdfast_diagnose_bad_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    from fdfast.cli import main
    assert main(["diagnose", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


class _FixedTeacher(nn.Module):
    """A stand-in teacher: the same [B, h*w, Ct] tokens (no prefix) for any images."""

    def __init__(self, tokens, grid):
        super().__init__()
        self.tokens, self.grid, self.num_prefix_tokens, self.dim = tokens, grid, 0, tokens.shape[-1]

    def forward(self, images):
        return self.tokens


def test_landscape_losses_match_their_definitions_at_the_weights():
    from fdfast.diagnostics.landscape import cross_entropy_loss, fd_loss, representation_drift_loss
    from fdfast.kernels.reference import fd_loss_reference
    from fdfast.models import tokens as tk
    model = _vit().eval()
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert cross_entropy_loss(x, labels, batch_size=3)(model).item() == pytest.approx(
            nn.functional.cross_entropy(model(x), labels).item(), rel=1e-5)
        assert representation_drift_loss(x, model, batch_size=3)(model).item() == pytest.approx(0.0, abs=1e-7)
        teacher = torch.randn(4, 4, 4, 10)  # [B, h, w, Ct] on the student's 4x4 grid
        weight, bias = torch.randn(10, 48) * 0.1, torch.randn(10) * 0.1
        got = fd_loss(x, _FixedTeacher(teacher.flatten(1, 2), (4, 4)), model, projection=(weight, bias))(model).item()
        # the teacher has no CLS token, so the student's is dropped: patch tokens only
        tokens = tk.patch_map(tk.final_tokens(model, x), tk.geometry(model)).flatten(1, 2)
        assert got == pytest.approx(fd_loss_reference(tokens, teacher.flatten(1, 2), weight, bias).item(), rel=1e-5)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_landscape_centre_is_the_training_loss(batch_size):
    """The FD landscape evaluates the distiller's own objective: at the centre it IS the training loss."""
    from fdfast.config import LossConfig
    from fdfast.diagnostics.landscape import fd_loss
    from fdfast.distill import FeatureDistiller
    from fdfast.models.student import build_vit_student
    from fdfast.models.teachers import build_teacher
    torch.manual_seed(0)
    student = build_vit_student("tiny", patch_size=8, img_size=32, drop_path=0.0, depth=2).eval()
    teacher = build_teacher("vit_tiny_patch16_224", "random", img_size=48, depth=1)  # 3x3 grid -> resized to 4x4
    distiller = FeatureDistiller(student, teacher, LossConfig(backend="torch")).eval()
    with torch.no_grad():
        distiller.fd_loss.proj.weight.normal_(0, 0.1)
        distiller.fd_loss.proj.bias.normal_(0, 0.1)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        training_loss = distiller(x).item()
    projection = (distiller.fd_loss.proj.weight.detach().clone(), distiller.fd_loss.proj.bias.detach().clone())
    loss_fn = fd_loss(x, teacher, student, projection=projection, batch_size=batch_size)
    curve = landscape_1d(student, loss_fn, steps=3, span=0.5, progress=False)
    assert curve["alphas"][1] == 0.0
    assert abs(curve["losses"][1] - training_loss) <= 1e-6, (curve["losses"][1], training_loss)
    assert min(abs(curve["losses"][k] - training_loss) for k in (0, 2)) > 1e-4  # the weights do move along it
    fitted = fd_loss(x, teacher, student, batch_size=batch_size)(student).item()
    assert fitted < training_loss  # the ridge read-out beats a random projection


def test_diagnose_an_exported_timm_file_gives_the_runs_attention(tiny_run, tmp_path):
    """An exported timm file (per-block copies of the shared bias) diagnoses like the run it came from."""
    from fdfast.cli import main
    if importlib.util.find_spec("fdfast.models.export") is None:
        pytest.skip("fdfast export is not built")
    exported = tmp_path / "student_timm.safetensors"
    assert main(["export", str(tiny_run), "--to", "timm", "--out", str(exported)]) == 0
    common = ["--images", "2", "--landscape-loss", "none", "--data", str(_demo_like_images(tmp_path))]
    assert main(["diagnose", str(tiny_run), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["diagnose", str(exported), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (json.loads((tmp_path / d / "attention_distance.json").read_text()) for d in "ab")
    assert torch.allclose(torch.tensor(a["layers"]), torch.tensor(b["layers"]), atol=1e-4)
    assert not (tmp_path / "b" / "loss_landscape.json").exists()


def _demo_like_images(tmp_path: Path) -> Path:
    from PIL import Image
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(30, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return tmp_path / "images"


def test_a_timm_model_folder_is_a_model_under_test(tmp_path):
    """`fdfast diagnose local-dir:DIR` looks at the model the folder holds (timm's save_for_hf layout)."""
    import timm
    from timm.models import save_for_hf
    from fdfast.diagnostics.inputs import load_model_under_test
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0).eval()
    save_for_hf(model, str(tmp_path / "folder"))
    mut = load_model_under_test(f"local-dir:{tmp_path / 'folder'}", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mut.model.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
    assert mut.image_size[0] == 32
