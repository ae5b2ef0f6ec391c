"""`fdfast plan`: fake-tensor estimates against memory measured on real tensors, FLOPs, batch search, CLI."""
import json

import pytest

from fdfast.cli import main
from fdfast.config import load_config
from fdfast.plan import _largest_batch, _micro_batch, fake_parts, trace_memory, validate

# Real small models, random weights, fp32 on the CPU; batches where activations are a large part of the peak.
MODELS = {
    "vit-tiny pair": ({"model.size": "tiny", "model.patch_size": 16, "model.img_size": 64,
                       "teacher.name": "vit_tiny_patch16_224", "teacher.img_size": 64}, 48, False),
    "vit-tiny pair, AC": ({"model.size": "tiny", "model.patch_size": 16, "model.img_size": 96,
                           "teacher.name": "vit_tiny_patch16_224", "teacher.img_size": 96}, 64, True),
    "vit-small pair": ({"model.size": "small", "model.patch_size": 16, "model.img_size": 64,
                        "teacher.name": "vit_small_patch16_224", "teacher.img_size": 64}, 24, False),
    "swinv2-tiny": ({"model.arch": "swinv2", "model.size": "tiny", "model.patch_size": 4, "model.img_size": 64,
                     "teacher.name": "swinv2_tiny_window8_256", "teacher.img_size": 64,
                     "teacher.kwargs": {"window_size": 8}}, 24, False),
}


def tiny_cfg(overrides, **extra):
    return load_config("demo", dict(overrides, **{"runtime.precision": "fp32"}, **extra))


@pytest.mark.parametrize("name", list(MODELS))
def test_planned_peak_within_15_percent_of_measured(name):
    """The fake-tensor peak (MemTracker) against the CPU allocator's own events on the same step, real tensors."""
    overrides, batch, ac = MODELS[name]
    r = validate(tiny_cfg(overrides), batch, ac)
    print(f"{name}: planned {r['planned'] / 2**20:.1f} MiB, measured {r['measured'] / 2**20:.1f} MiB, "
          f"ratio {r['ratio']:.3f}")
    state = r["breakdown"]["student_params"] + r["breakdown"]["teacher_params"] + r["breakdown"]["optimizer"]
    assert r["breakdown"]["activations"] > 0.4 * state  # the activations are really exercised
    assert abs(r["ratio"] - 1) <= 0.15


def test_activation_checkpointing_keeps_only_block_inputs():
    """ViT-Ti/16 at 96 px, batch 64, AC on: saved are the 12 block inputs [B, 37, 192] fp32 (+ one block being
    recomputed), a fraction of the activations without AC."""
    overrides, batch, _ = MODELS["vit-tiny pair, AC"]
    cfg = tiny_cfg(overrides)
    with fake_parts(cfg) as (distiller, optimizer, _):
        off, on = (trace_memory(distiller, optimizer, batch, 96, None, ac) for ac in (False, True))
    block_inputs = 12 * batch * 37 * 192 * 4
    assert block_inputs < on.activations < 3 * block_inputs
    assert on.activations < 0.4 * off.activations


def test_flops_per_image_match_the_matmul_count():
    """Teacher forward of a ViT-Ti/16 at 64 px: 2 x tokens x linear weights + 4 x tokens^2 x width per block."""
    cfg = tiny_cfg(MODELS["vit-tiny pair"][0])
    with fake_parts(cfg) as (_, _, flops):
        pass
    tokens, width, depth = 17, 192, 12
    per_block = 2 * tokens * (12 * width * width) + 4 * tokens * tokens * width
    patch_embed = 2 * 16 * width * (3 * 16 * 16)
    assert flops["teacher_fwd"] == pytest.approx(depth * per_block + patch_embed, rel=0.01)
    # student backward ~ 2x its forward: fwd/bwd ~ 3x fwd (projection and loss included)
    assert 2.5 < flops["student_fwd_bwd"] / flops["student_fwd"] < 3.5


def test_largest_batch_is_conservative_on_a_convex_peak():
    traced = []

    def cost(b):  # optimizer-step peak 100 below b = 30, then 10 + 3 b (activations)
        traced.append(b)
        return max(100, 10 + 3 * b)

    assert _largest_batch(cost, 70, 4, 8) == 0  # the fixed state alone is over budget
    assert _largest_batch(cost, 400, 4, 8) == 130  # exact: 10 + 3 * 130 = 400
    assert _largest_batch(cost, 401, 40, 80) == 130
    assert len(traced) <= 2 + 2 + 4 + 3


def test_micro_batch_reaches_the_global_batch_exactly():
    assert _micro_batch(48, 1, 2048) == (32, 64)
    assert _micro_batch(100, 64, 2048) == (32, 1)
    assert _micro_batch(5, 3, 100) == (5, 7)  # 5 x 7 x 3 = 105: the nearest above


def test_cli_json_reports_memory_flops_time_and_settings(capsys):
    args = ["plan", "demo", "--gpus", "2", "--gpu-mem", "0.25", "--json", "--batch", "8"]
    for k, v in MODELS["vit-tiny pair"][0].items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["params"]["student"] == pytest.approx(5.5e6, rel=0.05)
    assert {s["strategy"] for s in p["settings"]} == {"ddp", "fsdp"}
    fsdp = [s for s in p["settings"] if s["strategy"] == "fsdp" and not s["activation_checkpointing"]][0]
    ddp = [s for s in p["settings"] if s["strategy"] == "ddp" and not s["activation_checkpointing"]][0]
    assert fsdp["breakdown_gib"]["optimizer"] == pytest.approx(ddp["breakdown_gib"]["optimizer"] / 2, abs=1e-3)
    assert p["recommended"]["data.batch_size"] * p["recommended"]["optim.accum_steps"] * 2 == 2048
    assert p["time"]["step_s"] > 0 and p["time"]["steps_per_epoch"] == 626


@pytest.mark.parametrize("flag", [["--gpus", "0"], ["--batch", "0"], ["--mfu", "1.5"]])
def test_bad_input_is_one_line_exit_2(capsys, flag):
    assert main(["plan", "demo", *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fdfast plan: error:" in err[0]


@pytest.mark.slow
def test_swinv2_g_fits_one_h200_with_ac():
    from fdfast.plan import plan
    p = plan(load_config("swinv2_g"), gpus=1)
    ac = [s for s in p["settings"] if s["activation_checkpointing"]][0]
    assert ac["per_gpu_gib"] <= 130 and ac["largest_batch"] >= 16
    assert p["params"]["student"] == pytest.approx(2.998e9, rel=0.01)


def test_gpu_check_script_runs_dry_on_the_cpu(tmp_path):
    """bench/plan_check.py (the GPU comparison gpu_check.sh runs) works end to end on the CPU with --dry-run."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "plan_check.py"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "plan_check_dry_run.json").read_text())["rows"][0]
    assert abs(row["aten"]["ratio"] - 1) <= 0.15


# ----------------------------------------------------------------------------- fine-tuning recipes
TINY_STUDENT = {"arch": "vit", "size": "tiny", "patch_size": 16, "img_size": 64, "drop_path": 0.0,
                "pos_bias": "shared", "attention": "auto", "kwargs": {"depth": 4}}


def _ft_cfg(**extra):
    from fdfast.finetune.config import load_finetune_config
    return load_finetune_config("ft_clip_b16", {"data.img_size": 64, "runtime.precision": "fp32", **extra})


def test_finetune_plan_traces_the_classifier_finetune_builds(tmp_path):
    """The planned classifier is the one `fdfast finetune` builds from the same student: every parameter and
    buffer with its shape, dtype and requires_grad; the head has the recipe's classes."""
    import json as _json

    import torch
    from fdfast.checkpoint import STUDENT_META_KEY
    from fdfast.config import ModelConfig
    from fdfast.finetune.model import build_classifier, resolve_model
    from fdfast.io import atomic_save_safetensors
    from fdfast.models.student import build_student
    from fdfast.plan import finetune_task
    path = tmp_path / "student.safetensors"
    atomic_save_safetensors(build_student(ModelConfig(**TINY_STUDENT)).state_dict(), path,
                            metadata={STUDENT_META_KEY: _json.dumps(TINY_STUDENT)})
    cfg = _ft_cfg()
    built = build_classifier(resolve_model(str(path), 64), 7, 64, cfg.model.drop_path, cfg.model.head_init_scale).model
    planned, size = finetune_task(cfg, TINY_STUDENT, 7)
    info = lambda m: {n: (tuple(t.shape), t.dtype, t.requires_grad) for n, t in m.state_dict(keep_vars=True).items()}  # noqa: E731
    assert size == 64 and info(planned.model) == info(built)
    assert built.get_classifier().out_features == 7


def test_finetune_plan_memory_within_15_percent_of_measured():
    """A fine-tuning step of a ViT-Ti classifier at 64 px, batch 32: fake-tensor peak vs the CPU allocator's."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fdfast.finetune.task import build_optimizer
    from fdfast.plan import _inputs, fd_step, finetune_task, measure_step_peak, trace_memory
    cfg = _ft_cfg()
    task, size = finetune_task(cfg, TINY_STUDENT, 10)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = task.to_empty(device="cpu").train()
        optimizer, _ = build_optimizer(fake.model, cfg, 10, 1024)
        fd_step(fake, optimizer, _inputs(1, size, 10), None)  # AdamW states
        planned = trace_memory(fake, optimizer, 32, size, None, False, num_classes=10)
    real = finetune_task(cfg, TINY_STUDENT, 10, device="cpu")[0].train()
    optimizer, _ = build_optimizer(real.model, cfg, 10, 1024)
    fd_step(real, optimizer, (torch.randn(1, 3, size, size), torch.zeros(1, dtype=torch.int64)), None)
    measured = measure_step_peak(real, optimizer, (torch.randn(32, 3, size, size), torch.zeros(32, dtype=torch.int64)),
                                 None)
    assert planned.teacher_params == 0 and planned.activations > 0
    assert abs(planned.peak / measured - 1) <= 0.15, (planned.peak, measured)


def test_plan_cli_on_a_finetune_recipe(capsys):
    assert main(["plan", "ft_clip_b16", "--gpus", "8", "--gpu", "h100", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kind"] == "finetune" and p["time"]["global_batch"] == 1024 and p["time"]["epochs"] == 100
    assert p["recommended"]["global_batch"] == 1024 and p["recommended"]["data.batch_size"] * 8 == 1024
    assert 100 < p["gflops_per_image"] < 110  # ViT-B/16 at 224 px: ~35 GFLOP forward, x3 with backward
