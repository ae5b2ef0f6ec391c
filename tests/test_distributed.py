"""Real torch.distributed on the CPU: torchrun, 2 processes, gloo. DDP and FSDP2 train the same model."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train import tiny_args


def build_run(cfg, info=None):
    """The Run `fdfast train` builds for cfg (fp32), its loader closed: the tests feed their own images."""
    from fdfast.distributed import DistInfo
    from fdfast.run import build_fd_run
    from fdfast.runtime import Runtime
    run = build_fd_run(cfg, Runtime(info or DistInfo(), None))
    run.loader.close()
    return run


def checkpointer(info=None, fmt="full", strategy="fsdp"):
    from fdfast.checkpointer import Checkpointer
    from fdfast.distributed import DistInfo
    return Checkpointer(None, info or DistInfo(), fmt, 2, False, strategy)


def torchrun(out, teacher_file, image_dir, *extra):
    """The tiny run of test_train on 2 processes (batch 2 each: the same global batch of 4), drop path off."""
    args = tiny_args(out, teacher_file, image_dir, 4, "--set", "model.drop_path=0", *extra)
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "fdfast", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_and_fsdp_agree_and_fsdp_resumes(tmp_path, teacher_file, image_dir):
    ddp = torchrun(tmp_path / "ddp", teacher_file, image_dir)
    fsdp = torchrun(tmp_path / "fsdp", teacher_file, image_dir, "--set", "dist.strategy=fsdp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]  # one log line per step: rank 0 writes alone
    for a, b in zip(ddp, fsdp):
        assert a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    sa, sb = load_file(str(tmp_path / "ddp" / "student.safetensors")), load_file(str(tmp_path / "fsdp" / "student.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:  # FSDP's gathered full state equals DDP's replica
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)

    # kill-and-resume under FSDP: drop step 4, resume from the committed step 2 (sharded state reloaded)
    from fdfast import checkpoint as ckpt
    rng_straight = ckpt.load_train_state(tmp_path / "fsdp" / "checkpoints" / "step-4")["rng"]
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-4")
    (tmp_path / "fsdp" / "student.safetensors").unlink()
    again = torchrun(tmp_path / "fsdp", teacher_file, image_dir, "--set", "dist.strategy=fsdp", "--resume", "auto")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(fsdp[3]["loss"], rel=1e-5)
    rng_again = ckpt.load_train_state(tmp_path / "fsdp" / "checkpoints" / "step-4")["rng"]
    assert len(rng_again) == 2 and not torch.equal(rng_again[0]["torch"], rng_again[1]["torch"])
    for a, b in zip(rng_straight, rng_again):  # each rank continued its own RNG stream
        assert torch.equal(a["torch"], b["torch"])
    two_to_one(tmp_path, teacher_file, image_dir)


def two_to_one(tmp_path, teacher_file, image_dir):
    """FSDP's checkpoints are DCP (ckpt.format auto); one process reads and resumes them."""
    import contextlib
    import io
    from fdfast import checkpoint as ckpt
    from fdfast.cli import build_parser, main
    from fdfast.train import config_from_args
    fsdp = tmp_path / "fsdp"
    step4 = fsdp / "checkpoints" / "step-4"
    assert ckpt.is_dcp(step4) and not (step4 / "model.safetensors").exists()
    final = load_file(str(fsdp / "student.safetensors"))
    _, student = ckpt.read_student(step4)  # 2 ranks' shards reassembled in one process
    assert student.keys() == final.keys() and all(torch.equal(student[k], final[k]) for k in final)
    # the AdamW moments of the 2-rank DCP step 2, loaded in one process, equal DDP's full-format ones
    args = tiny_args(tmp_path / "one", teacher_file, image_dir, 4, "--set", "model.drop_path=0")
    cfg, _ = config_from_args(build_parser().parse_args(args))
    p = build_run(cfg)
    assert checkpointer().load(fsdp / "checkpoints" / "step-2", p)["step"] == 2
    ddp = ckpt.load_train_state(tmp_path / "ddp" / "checkpoints" / "step-2")["optimizer"]["state"]
    own = p.optimizer.state_dict()["state"]
    assert own.keys() == ddp.keys()
    for i in own:
        torch.testing.assert_close(own[i]["exp_avg"], ddp[i]["exp_avg"], rtol=1e-4, atol=1e-7)
    # the CLI continues it in one process (global batch 4 as before) and says what it could not restore
    shutil.copytree(fsdp, tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "step-4")
    (tmp_path / "one" / "student.safetensors").unlink()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(tiny_args(tmp_path / "one", teacher_file, image_dir, 4, "--resume", "auto")) == 0
    notes = [line for line in err.getvalue().splitlines() if "RNG" in line]
    assert len(notes) == 1 and "saved by 2 ranks" in notes[0], err.getvalue()[-2000:]


# ----------------------------------------------------------------------------- per-rank RNG, FSDP2 accumulation, DCP
def _copy_without_last(src, dst):
    """A copy of a finished run as a kill right after its step-2 commit leaves it (no step 4, no final student)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-4")
    for name in ("student.safetensors", "COMMITTED"):
        (dst / name).unlink()


@pytest.mark.slow
def test_each_rank_resumes_its_own_drop_path_stream(tmp_path, teacher_file, image_dir):
    """Drop path on (0.3): the masks come from each rank's RNG; a resume must give every rank its own stream back,
    so the resumed 2-rank DDP run ends bitwise equal to the uninterrupted one (the default suite checks the
    streams themselves, in test_ddp_and_fsdp_agree_and_fsdp_resumes)."""
    from fdfast import checkpoint as ckpt
    straight = torchrun(tmp_path / "straight", teacher_file, image_dir, "--set", "model.drop_path=0.3")
    state = ckpt.load_train_state(tmp_path / "straight" / "checkpoints" / "step-2")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # rank 0's stream would be wrong
    _copy_without_last(tmp_path / "straight", tmp_path / "resumed")
    again = torchrun(tmp_path / "resumed", teacher_file, image_dir, "--set", "model.drop_path=0.3", "--resume", "auto")
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]
    sa = load_file(str(tmp_path / "straight" / "student.safetensors"))
    sb = load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for a, b in zip(ckpt.load_train_state(tmp_path / "straight" / "checkpoints" / "step-4")["rng"],
                    ckpt.load_train_state(tmp_path / "resumed" / "checkpoints" / "step-4")["rng"]):
        assert torch.equal(a["torch"], b["torch"])


def _count_reduce_scatters():
    """Wrap torch.distributed's reduce-scatter entry points (FSDP2 looks them up at call time); returns the count."""
    import torch.distributed as dist
    count, depth = [0], [0]

    def wrap(fn):
        def counted(*a, **k):
            count[0] += depth[0] == 0
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
        return counted
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name)))
    return count


def _fsdp_worker(rank, world, port, argv, single_step, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fdfast import distributed
    from fdfast.cli import build_parser
    from fdfast.step import train_step
    from fdfast.train import config_from_args
    info = distributed.init_distributed(torch.device("cpu"))
    count = _count_reduce_scatters()
    images = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))  # 2 steps, 4 per rank
    result = {}
    for accum in (1, 2):
        args = list(argv) + ["--set", f"optim.accum_steps={accum}"]
        args[args.index("--batch-size") + 1] = str(4 // accum)
        cfg, _ = config_from_args(build_parser().parse_args(args))
        p = build_run(cfg, info)
        before = count[0]
        for step in (1, 2):
            x = images[step - 1]
            train_step(p, iter([x] if accum == 1 else [x[:2], x[2:]]), step)
        result[f"reduce_scatters_{accum}"] = count[0] - before
        result[f"state_{accum}"] = checkpointer(info).model_tensors(p)
    ckpter = checkpointer(info)
    ckpter.load(single_step, p)  # 1 -> 2: a one-process DCP checkpoint into FSDP2 shards
    result["resumed"] = (ckpter.model_tensors(p), ckpter.full_optimizer_state(p))
    if rank == 0:
        torch.save(result, out)
    distributed.shutdown()


def test_fsdp2_accumulation_and_a_one_rank_dcp_checkpoint_on_two(tmp_path, teacher_file, image_dir):
    """FSDP2 (2 gloo ranks): 2 micro-batches of 2 = 1 batch of 4, with one reduce-scatter per FSDP unit per step,
    not per micro-batch; and a DCP checkpoint written by one process loads into the 2-rank shards exactly."""
    import socket
    import torch.multiprocessing as mp
    from fdfast import checkpoint as ckpt
    from fdfast.cli import main
    from fdfast.train import config_from_args
    from fdfast.cli import build_parser

    single = tmp_path / "single"
    base = tiny_args(single, teacher_file, image_dir, 4, "--set", "model.drop_path=0", "--set", "ckpt.format=dcp")
    assert main(base) == 0
    step = ckpt.latest_intact(single)
    argv = tiny_args(tmp_path / "unused", teacher_file, image_dir, 4, "--set", "model.drop_path=0",
                     "--set", "optim.clip_grad=null", "--set", "dist.strategy=fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, argv, str(step), str(tmp_path / "result.pt")), nprocs=2)
    r = torch.load(tmp_path / "result.pt", weights_only=True)

    assert r["reduce_scatters_1"] > 0
    assert r["reduce_scatters_2"] == r["reduce_scatters_1"]  # the first micro-batch of each step sent nothing
    for k, v in r["state_1"].items():
        torch.testing.assert_close(r["state_2"][k], v, rtol=1e-4, atol=1e-6)

    tensors, optim = r["resumed"]
    want = ckpt.read_dcp_model(step)
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
    cfg, _ = config_from_args(build_parser().parse_args(base))
    p = build_run(cfg)  # the same checkpoint in one process
    checkpointer(strategy="none").load(step, p)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    own = get_optimizer_state_dict(p.task, p.optimizer, options=StateDictOptions(full_state_dict=True))
    assert own["state"].keys() == optim["state"].keys()
    for name, moments in own["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[key], optim["state"][name][key]), (name, key)
