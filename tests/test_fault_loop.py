"""The fault loop (issue 14 item 6, issue 17 item 5): kill `fdfast train` at random moments, resume, compare.

Each trial starts a tiny run in its own session and sends SIGTERM or SIGKILL to its whole process group (as
SLURM preemption, a pod deletion or Ctrl-C do: main process and loader worker alike), at a random moment or
right when a checkpoint folder is being written; then `--resume auto`, maybe interrupted again, until the run
ends. A trial passes when
- after every kill, each checkpoint with a COMMITTED marker matches its recorded sizes and CRC-32s, and so does
  the final student file if it has a record (no marker ever sits on an incomplete checkpoint);
- the final student.safetensors holds tensors bitwise equal to those of an uninterrupted run.

Run as a script for a report (one JSON line per trial, then a summary):
    python tests/test_fault_loop.py --trials 20 --out /tmp/faults
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # script mode: the helpers beside this file
from helpers_signals import GroupRun  # noqa: E402

STEPS, EVERY = 12, 3  # checkpoints at steps 3, 6, 9 (+ the final 12): a kill may land before any of them
MAX_ATTEMPTS = 8  # runs per trial (the first + resumes) before the trial counts as stuck
ENV = {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_argv(out: Path, teacher_file: Path, image_dir: Path, *extra: str) -> list[str]:
    """`python -m fdfast train` on the tiny ViT of the other tests, torch loader with one worker process."""
    from test_train import tiny_args
    args = tiny_args(out, teacher_file, image_dir, STEPS, "--set", f"ckpt.every={EVERY}", "--set", "ckpt.keep=2",
                     "--set", "data.num_workers=1", *extra)  # progress: a "step N/12" line per step on stderr
    return [sys.executable, "-m", "fdfast", *args]


def reference_run(work: Path, teacher_file: Path, image_dir: Path) -> tuple[dict, dict]:
    """The uninterrupted run: its student tensors, and its timing {start_s: until the first step's line,
    train_s: from there to the end}."""
    from safetensors.torch import load_file
    out = work / "reference"
    t0 = time.monotonic()
    run = GroupRun(train_argv(out, teacher_file, image_dir), work / "reference-logs", env=ENV)
    run.wait_for(lambda: training(run), timeout=600)
    t1 = time.monotonic()
    rc = run.wait(timeout=600)
    assert rc == 0, run.stderr[-3000:]
    timing = {"start_s": round(t1 - t0, 2), "train_s": round(time.monotonic() - t1, 2)}
    return load_file(str(out / "student.safetensors")), timing


def training(run: GroupRun) -> bool:
    """The run has logged a step (the progress line ``step N/12``): start-up is over."""
    return f"/{STEPS}  loss" in run.stderr


def in_flight(out: Path, since: float = 0.0) -> list[str]:
    """Checkpoint folders being written: .tmp-step-N, or a renamed step-N still without its marker (changed
    after the time ``since``, so that a leftover of an earlier kill does not count as a save in progress)."""
    root, found = out / "checkpoints", []
    for d in root.iterdir() if root.is_dir() else ():
        try:
            partial = d.name.startswith(".tmp-step-") or (d.name.startswith("step-") and not (d / "COMMITTED").exists())
            if partial and d.stat().st_mtime > since:
                found.append(d.name)
        except FileNotFoundError:  # renamed or removed while we looked
            pass
    return sorted(found)


def committed_but_damaged(out: Path) -> list[str]:
    """Every COMMITTED marker whose checkpoint does not match it (the invariant: always empty)."""
    from fdfast import checkpoint as ckpt
    bad = [f"{d.name}: {why}" for _, d in ckpt.committed_steps(out) if (why := ckpt.damage(d)) is not None]
    if (out / "COMMITTED").is_file() and (why := ckpt.damage(out)) is not None:
        bad.append(f"student.safetensors: {why}")
    return bad


def interrupt(run: GroupRun, out: Path, rng: random.Random, timing: dict) -> dict:
    """Wait for a random moment (in start-up, in training, or the start of a checkpoint write), signal the
    whole group, wait for it to end; returns what happened."""
    sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
    mode = rng.choice(["startup", "training", "training", "save", "save"])
    t0 = time.monotonic()
    if mode == "startup":
        wait_until(run, lambda: False, rng.uniform(0.1, timing["start_s"]))
    else:
        wait_until(run, lambda: training(run), 2 * timing["start_s"] + 60)
        if mode == "training":
            wait_until(run, lambda: False, rng.uniform(0, timing["train_s"]))
        else:
            since = time.time()
            wait_until(run, lambda: bool(in_flight(out, since)), 2 * timing["train_s"] + 60, poll=0.001)
    event = {"signal": signal.Signals(sig).name, "mode": mode, "after_s": round(time.monotonic() - t0, 3)}
    if run.proc.poll() is not None:  # the run ended before the moment came
        event.update(rc=run.proc.returncode, missed=True)
        return event
    run.killpg(sig)
    event["rc"] = run.wait(timeout=300)
    event["group_left"] = run.group_alive(grace=5)  # a worker outliving the main process
    if event["group_left"]:
        run.kill()
    event["in_flight"] = in_flight(out)  # what the kill cut off (SIGKILL during a save leaves these)
    event["damaged"] = committed_but_damaged(out)
    event["traceback"] = "Traceback" in run.stderr
    from fdfast import checkpoint as ckpt
    event["committed"] = [s for s, _ in ckpt.committed_steps(out)]
    return event


def wait_until(run: GroupRun, ready, seconds: float, poll: float = 0.01) -> None:
    """Until ready(), `seconds` passed, or the run ended."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and run.proc.poll() is None and not ready():
        time.sleep(poll)


def trial(index: int, work: Path, teacher_file: Path, image_dir: Path, reference: dict, timing: dict,
          seed: int = 0) -> dict:
    """One trial: 1-3 interruptions, each followed by `--resume auto`, until a run ends; then the comparison."""
    import torch
    from safetensors.torch import load_file
    rng = random.Random(seed * 1000 + index)
    out, kills = work / f"trial-{index:02d}", rng.randint(1, 3)
    events, final_rc = [], None
    for attempt in range(MAX_ATTEMPTS):
        extra = ("--resume", "auto") if attempt else ()
        run = GroupRun(train_argv(out, teacher_file, image_dir, *extra), work / f"trial-{index:02d}-logs-{attempt}",
                       env=ENV)
        if attempt < kills:
            events.append(interrupt(run, out, rng, timing))
            if not events[-1].get("missed"):
                continue
            final_rc = events[-1]["rc"]
        else:
            final_rc = run.wait(timeout=600)
        if final_rc != 0:
            return dict(trial=index, events=events, attempts=attempt + 1, final_rc=final_rc, equal=False,
                        stderr=run.stderr[-1500:])
        break
    student = load_file(str(out / "student.safetensors"))
    equal = student.keys() == reference.keys() and all(torch.equal(student[k], reference[k]) for k in reference)
    return dict(trial=index, events=events, attempts=attempt + 1, final_rc=final_rc, equal=equal,
                leftovers=in_flight(out), damaged=committed_but_damaged(out))


def passed(result: dict) -> bool:
    return (result["final_rc"] == 0 and result["equal"] and not result.get("damaged")
            and not any(e.get("damaged") for e in result["events"]))


def run_loop(trials: int, work: Path, teacher_file: Path, image_dir: Path, seed: int = 0, log=print) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    reference, timing = reference_run(work, teacher_file, image_dir)
    log(json.dumps({"reference": timing}))
    results = []
    for i in range(trials):
        results.append(trial(i, work, teacher_file, image_dir, reference, timing, seed))
        log(json.dumps(results[-1]))
    return results


def summary(results: list[dict]) -> dict:
    events = [e for r in results for e in r["events"]]
    hit = [e for e in events if not e.get("missed")]
    return {
        "trials": len(results), "passed": sum(map(passed, results)),
        "interruptions": len(hit), "missed": len(events) - len(hit),
        "by_signal": {s: sum(e["signal"] == s for e in hit) for s in ("SIGTERM", "SIGKILL")},
        "by_moment": {m: sum(e["mode"] == m for e in hit) for m in ("startup", "training", "save")},
        "exit_codes": {str(rc): sum(e["rc"] == rc for e in hit) for rc in sorted({e["rc"] for e in hit})},
        "cut_a_save": sum(bool(e["in_flight"]) for e in hit),
        "sigterm_tracebacks": sum(e["traceback"] for e in hit if e["signal"] == "SIGTERM"),
        "before_first_checkpoint": sum(not e["committed"] for e in hit),
        "resumes": sum(r["attempts"] - 1 for r in results),
        "leftover_partial_folders": sum(bool(r.get("leftovers")) for r in results),
    }


@pytest.mark.slow
def test_fault_loop(tmp_path, teacher_file, image_dir, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))
    results = run_loop(20, tmp_path, teacher_file, image_dir)
    report = summary(results)
    print(json.dumps(report))
    assert report["trials"] == 20 and report["interruptions"] >= 20
    assert [r["trial"] for r in results if not passed(r)] == [], [r for r in results if not passed(r)]


# ----------------------------------------------------------------------------- script mode
def _fixtures(work: Path) -> tuple[Path, Path]:
    """The conftest fixtures' tiny teacher file and image folder, made without pytest."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    teacher = work / "teacher" / "vit_tiny.safetensors"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    save_file(m.state_dict(), str(teacher))
    images = work / "images"
    images.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = (torch.rand(40 + i, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"img{i}.jpg")
    return teacher, images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="work folder (runs, logs, results.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.update(ENV, FDFAST_CACHE=str(args.out / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    teacher, images = _fixtures(args.out)
    with open(args.out / "results.jsonl", "w") as f:
        def log(line):
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
        results = run_loop(args.trials, args.out, teacher, images, args.seed, log)
        log(json.dumps({"summary": summary(results)}))
    return 0 if all(map(passed, results)) else 1


if __name__ == "__main__":
    sys.exit(main())
