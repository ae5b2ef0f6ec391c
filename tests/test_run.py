"""One builder, one step, one loop (issue 22): plan == train by construction, the collective skip of a non-finite
loss OR gradient for FD and fine-tuning, one host sync per step, and a library call that leaves the process as
it found it."""
import json
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from fdfast.config import load_config, recipe_names
from fdfast.distributed import DistInfo
from fdfast.run import build_fd_run
from fdfast.runtime import Runtime, resolve_precision
from fdfast.step import train_step

META = torch.device("meta")


def _tensors(module) -> dict:
    """name -> (shape, dtype, requires_grad) of every parameter and buffer."""
    out = {f"param {n}": (tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters()}
    out.update({f"buffer {n}": (tuple(b.shape), b.dtype, False) for n, b in module.named_buffers()})
    return out


@pytest.mark.parametrize("recipe", recipe_names())
def test_plan_builds_the_model_training_builds(recipe):
    """`fdfast plan` traces the very model `fdfast train` builds for the recipe on a GPU: every parameter and buffer,
    teacher included, with the same shape, dtype (the teacher stored in the compute dtype) and requires_grad."""
    from fdfast.data.synthetic import SyntheticFDLoader
    from fdfast.data.files import EpochOrder
    from fdfast.plan import amp_dtype_of, fake_parts
    cfg = load_config(recipe, {"teacher.weights": "random"})  # the recipes' weight files are not here
    amp = resolve_precision(cfg.runtime.precision, torch.device("cuda"))  # what training resolves on a GPU
    loader = SyntheticFDLoader(EpochOrder(8, 1, seed=0), image_size=cfg.model.img_size, device="cpu")
    run = build_fd_run(cfg, Runtime(DistInfo(device=META), amp), loader=loader)  # `fdfast train`'s own builder
    trained = _tensors(run.task)
    assert amp_dtype_of(cfg) == amp
    with fake_parts(cfg, amp_dtype_of(cfg)) as (planned, _, _):
        planned = _tensors(planned)
    assert planned.keys() == trained.keys()
    assert {k: v for k, v in planned.items() if v != trained[k]} == {}
    teacher = {v[1] for k, v in trained.items() if k.startswith("param teacher.")}
    assert teacher == {amp or torch.float32}  # e.g. SwinV2-G's 3-billion-parameter teacher in bf16, not fp32


def _nan_gradient(module):
    """Every gradient of ``module``'s first parameter turns NaN in backward; the loss itself stays finite."""
    p = next(q for q in module.parameters() if q.requires_grad)
    return p.register_hook(lambda g: torch.full_like(g, float("nan")))


def _untouched_by_a_nan_gradient(run, batch):
    before = {k: v.detach().clone() for k, v in run.task.state_dict().items()}
    hook = _nan_gradient(run.task.trained_model())
    r = train_step(run, iter([batch]), 1)
    hook.remove()
    assert r.skipped and r.diverged and r.grad_norm is None and torch.isfinite(torch.tensor(r.loss))
    after = run.task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched
    assert not run.optimizer.state  # no AdamW moment was created or moved
    r = train_step(run, iter([batch]), 2)  # the next finite step updates again
    assert not r.skipped and r.grad_norm > 0 and len(run.optimizer.state) > 0


def test_a_nan_gradient_with_a_finite_loss_skips_the_fd_update(teacher_file, image_dir, tmp_path):
    from test_train import tiny_parts
    _, run = tiny_parts(tmp_path, teacher_file, image_dir)
    _untouched_by_a_nan_gradient(run, torch.randn(4, 3, 32, 32))


def test_a_nan_gradient_with_a_finite_loss_skips_the_finetune_update(tmp_path):
    from fdfast.finetune.config import FinetuneConfig
    from fdfast.run import build_finetune_run
    from test_finetune import _colour_set, _student_cfg  # noqa: F401 (fixture helpers)
    from fdfast.io import atomic_save_safetensors
    from fdfast.checkpoint import STUDENT_META_KEY
    from fdfast.config import ModelConfig
    from fdfast.models.student import build_student
    data = tmp_path / "data"
    _colour_set(data / "train", per_class=4, seed=0)
    _colour_set(data / "val", per_class=2, seed=1)
    model_cfg = _student_cfg()
    student = build_student(ModelConfig(**model_cfg))
    atomic_save_safetensors(student.state_dict(), tmp_path / "student.safetensors",
                            metadata={STUDENT_META_KEY: json.dumps(model_cfg)})
    cfg = FinetuneConfig.from_dict({"data": {"path": str(data), "batch_size": 4, "num_workers": 0, "img_size": 32},
                                    "optim": {"epochs": 1, "warmup_epochs": 0}, "runtime": {"progress": False}})
    run = build_finetune_run(cfg, str(tmp_path / "student.safetensors"), Runtime(DistInfo(), None))
    _untouched_by_a_nan_gradient(run, next(run.loader))
    run.loader.close()


def test_one_host_sync_per_step(teacher_file, image_dir, tmp_path, monkeypatch):
    """Outside logging steps a step reads the device once: loss, gradient norm and stop flag in one tensor.
    (The loss runs on its reference path: the CPU's row-chunked "torch" path reads its incoming gradient as a
    host number, free on the CPU; the CUDA Triton path does not.)"""
    from test_train import tiny_parts
    _, run = tiny_parts(tmp_path, teacher_file, image_dir, "--set", "optim.accum_steps=2",
                        "--set", "loss.backend=reference", batch=2)
    batches = iter([torch.randn(2, 3, 32, 32) for _ in range(4)])
    train_step(run, batches, 1)  # warm: lazily built states
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    r = train_step(run, batches, 2)
    monkeypatch.undo()
    assert reads == ["tolist"] and not r.skipped


def test_train_twice_in_one_process_leaves_the_process_as_it_was(teacher_file, image_dir, tmp_path, monkeypatch):
    """A library call changes no process-wide state: no mallopt, no warning filter, the signal handlers back."""
    from fdfast import hostmem
    from fdfast.cli import build_parser
    from fdfast.train import config_from_args, train
    from test_train import tiny_args
    monkeypatch.setattr(hostmem, "configure", lambda *a, **k: pytest.fail("a library call set glibc malloc"))
    applied = hostmem._APPLIED  # what an earlier CLI call in this test process may have set
    filters, handlers = list(warnings.filters), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for run in ("a", "b"):
        cfg, out = config_from_args(build_parser().parse_args(tiny_args(tmp_path / run, teacher_file, image_dir, 2)))
        summary = train(cfg, out)
        assert summary["malloc"] == applied or "command line" in summary["malloc"]["why"]
        assert warnings.filters == filters
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert hostmem._APPLIED is applied


def test_importing_the_library_installs_no_warning_filter():
    code = ("import warnings, torch, torchvision, timm, numpy; before = list(warnings.filters); "  # theirs, not ours
            "import fdfast.checkpoint, fdfast.checkpointer, "
            "fdfast.io, fdfast.train, fdfast.run, fdfast.finetune; assert warnings.filters == before, "
            "warnings.filters[:3]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
