"""runtime.tracker=wandb: an offline W&B run of `fdfast train` and of `fdfast finetune`, read back from its .wandb
file (the scalars equal metrics.jsonl's rows; the resolved config and the summary are there); rank 0 only; a resumed
run continues the same W&B run id; everything wandb writes stays in the run directory; the missing extra is one line.
"""
import json
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml

from fdfast.cli import main
from fdfast.errors import FDFastError
from fdfast.metrics import MetricsLog
from fdfast.trackers import RUN_ID_FILE, wandb_mode
from test_finetune import _cfg, _colour_set, student_run  # noqa: F401 - student_run is a fixture used here
from test_train import tiny_args

import wandb  # the wandb extra is part of the dev install (setup.sh); a missing one is tested by hiding it
from wandb.proto import wandb_internal_pb2 as pb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


# ---- a reader of wandb's transaction log (the .wandb file of a run) --------------------------------------------
FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, format version
RECORD_HEADER = struct.Struct("<IHB")  # crc32 of type byte + payload, payload length, type
BLOCK = 32 * 1024  # records never cross a block boundary without being split into FIRST / MIDDLE / LAST pieces
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every wandb_internal Record in a .wandb file, in order; the CRC of every piece checked."""
    data = path.read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, payloads, pending = FILE_HEADER.size, [], None
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER.size:  # too short for a header: zero padding up to the next block
            pos += left
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # padding at the end of a block
            pos += left
            continue
        body = data[pos + RECORD_HEADER.size:pos + RECORD_HEADER.size + length]
        assert len(body) == length and zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"bad record at {pos}"
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            assert pending is None
            payloads.append(body)
        elif kind == FIRST:
            assert pending is None
            pending = body
        elif kind == MIDDLE:
            pending += body
        else:
            assert kind == LAST, kind
            payloads.append(pending + body)
            pending = None
    assert pending is None, "a record cut short"
    return [pb.Record.FromString(p) for p in payloads]


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """read_records once the file holds the run's exit record: wandb's service process writes the file after
    run.finish() returns (it is complete by the time the process that logged it exits)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_records(path)
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except AssertionError:  # a record still being written
            pass
        assert time.monotonic() < deadline, f"{path} got no exit record in {timeout_s} s"
        time.sleep(0.1)


def logged(path: Path) -> dict:
    """What a .wandb file holds: run id, config, history rows by step, summary, exit code."""
    records = finished_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    history, summary, exit_code = {}, {}, None
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.summary.update})
        elif kind == "exit":
            exit_code = r.exit.exit_code
    config.pop("_wandb", None)  # wandb's own bookkeeping
    return {"id": run.run_id, "config": config, "history": history, "summary": summary, "exit_code": exit_code}


def wandb_files(out: Path) -> list[Path]:
    """The run's offline .wandb files, oldest first (one per process that logged)."""
    return sorted(out.glob("wandb/offline-run-*/run-*.wandb"))


def numbers(row: dict, prefix: str = "train") -> dict:
    return {f"{prefix}/{k}": v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def offline_and_contained(tmp_path, monkeypatch):
    """No network (offline, no key); a fresh HOME and working directory, so a file wandb writes outside the run
    directory shows."""
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR",
                 "WANDB_CONFIG_DIR", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home" / ".local" / "share"))
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield
    leaked = [str(p) for where in ("home", "cwd") for p in (tmp_path / where).rglob("*") if "wandb" in str(p).lower()]
    assert not leaked, f"wandb wrote outside the run directory: {leaked}"


def test_train_logs_the_metrics_rows_config_and_summary_offline(tmp_path, teacher_file, image_dir, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, teacher_file, image_dir, 4, "--set", "runtime.tracker=wandb")) == 0
    assert f"W&B run {(out / RUN_ID_FILE).read_text().strip()} logged offline" in capsys.readouterr().err
    (file,) = wandb_files(out)
    got = logged(file)
    assert got["id"] == (out / RUN_ID_FILE).read_text().strip() and got["exit_code"] == 0
    rows = jsonl(out)
    assert sorted(got["history"]) == [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:  # every number of every metrics.jsonl row, exactly (JSON both ways), under train/
        history = got["history"][row["step"]]
        assert {k: v for k, v in history.items() if not k.startswith("_")} == numbers(row)
    assert got["config"] == yaml.safe_load((out / "config.yaml").read_text())  # the resolved config, every key
    assert got["config"]["runtime"]["tracker"] == "wandb"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("steps", "final_loss", "images_seen", "precision", "skipped_steps"):
        assert got["summary"][key] == summary[key], key
    assert got["summary"]["train/loss"] == rows[-1]["loss"]  # wandb's own: the last logged value
    assert not (out / "tb").exists()  # one tracker: W&B instead of TensorBoard


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, teacher_file, image_dir):
    out = tmp_path / "run"
    args = tiny_args(out, teacher_file, image_dir, 4, "--set", "runtime.tracker=wandb")
    assert main(args) == 0
    run_id = (out / RUN_ID_FILE).read_text().strip()
    shutil.rmtree(out / "checkpoints" / "step-4")  # killed after committing step 2: steps 3-4 run again
    (out / "student.safetensors").unlink()
    assert main(args + ["--resume", "auto"]) == 0
    first, second = (logged(f) for f in wandb_files(out))
    assert first["id"] == second["id"] == run_id == (out / RUN_ID_FILE).read_text().strip()
    assert sorted(second["history"]) == [3, 4]  # the resumed process logs from its checkpoint on
    rows = {r["step"]: r for r in jsonl(out)}
    assert all({k: v for k, v in second["history"][s].items() if not k.startswith("_")} == numbers(rows[s])
               for s in (3, 4))
    assert second["summary"]["resumed_from"]["step"] == 2 and second["exit_code"] == 0


def test_finetune_logs_its_rows_with_top1(student_run, tmp_path):  # noqa: F811 - the imported fixture
    from fdfast.finetune import finetune
    data = tmp_path / "data"
    _colour_set(data / "train", per_class=4, seed=0)
    _colour_set(data / "val", per_class=2, seed=1)
    out = tmp_path / "ft"
    cfg = _cfg(data, optim__epochs=1, runtime__tracker="wandb")
    summary = finetune(cfg, str(student_run), out)
    (file,) = wandb_files(out)
    got = logged(file)
    rows = jsonl(out)
    assert len(rows) == 1 and "top1" in rows[0]
    assert {k: v for k, v in got["history"][rows[0]["step"]].items() if not k.startswith("_")} == numbers(rows[0])
    assert got["config"] == cfg.to_dict() and got["config"]["optim"]["epochs"] == 1
    assert got["summary"]["top1"] == summary["top1"] and got["exit_code"] == 0


def test_only_rank_0_logs(tmp_path, monkeypatch):
    """MetricsLog on another rank (enabled=False, as the loop makes it there) starts no W&B run, writes nothing."""
    def refuse(*a, **k):
        raise AssertionError("wandb.init called on a rank that is not 0")
    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "run"
    out.mkdir()
    log = MetricsLog(out, 0, "wandb", enabled=False, config={"a": 1}, command="fdfast train")
    log.log({"step": 1, "loss": 0.5})
    log.close()
    log.finish({"steps": 1})
    assert list(out.iterdir()) == []


def test_a_failed_run_is_finished_as_failed(tmp_path):
    out = tmp_path / "run"
    log = MetricsLog(out, 0, "wandb", config={"a": 1}, command="fdfast train")
    log.log({"step": 1, "loss": 0.5, "lr": 1e-3, "skipped": None})
    log.close(failed=True)
    log.finish({"steps": 1})  # too late: the run already ended as failed
    (file,) = wandb_files(out)
    got = logged(file)
    assert got["exit_code"] == 1 and got["history"][1]["train/loss"] == 0.5 and "steps" not in got["summary"]
    assert got["config"] == {"a": 1}


def test_offline_without_a_key_and_wandbs_choice_with_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"  # nothing set: never the network, never a login prompt
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_mode() is None  # a key: wandb's own choice (online)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "offline"  # the key is for another host
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None


def test_missing_wandb_is_one_line_naming_the_extra(tmp_path, teacher_file, image_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(FDFastError, match=r"pip install 'fdfast\[wandb\]'"):
        MetricsLog(tmp_path, 0, "wandb")
    capsys.readouterr()
    assert main(tiny_args(tmp_path / "run", teacher_file, image_dir, 2, "--set", "runtime.tracker=wandb")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fdfast[wandb]'" in err[0], err
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before anything was written


def test_the_old_tensorboard_key_reads_as_a_tracker():
    from fdfast.config import Config, apply_overrides, load_config
    from fdfast.finetune import load_finetune_config
    assert load_config("demo").runtime.tracker == "tensorboard"
    assert load_finetune_config("ft_demo").runtime.tracker == "none"
    assert Config.from_dict({"runtime": {"tensorboard": False}}).runtime.tracker == "none"
    assert Config.from_dict({"runtime": {"tensorboard": "true"}}).runtime.tracker == "tensorboard"
    saved = {"runtime": {"tensorboard": True}}  # a run's config.yaml from before the rename, resumed with --set
    assert Config.from_dict(apply_overrides(saved, {"runtime.tracker": "wandb"})).runtime.tracker == "wandb"
    saved = {"runtime": {"tracker": "wandb"}}
    assert Config.from_dict(apply_overrides(saved, {"runtime.tensorboard": False})).runtime.tracker == "none"
    with pytest.raises(FDFastError, match="runtime.tensorboard=True .* and runtime.tracker='wandb' disagree"):
        Config.from_dict({"runtime": {"tensorboard": True, "tracker": "wandb"}})
    with pytest.raises(FDFastError, match="runtime.tracker must be one of tensorboard, wandb, none"):
        load_config("demo", {"runtime.tracker": "mlflow"})
