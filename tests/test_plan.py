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
