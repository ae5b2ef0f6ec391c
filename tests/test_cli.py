"""The `fdfast` command line: exactly the listed commands exist and answer --help; every choice key (a Literal
field of the config) rejects a bad value in one line with exit code 2, before anything is written."""
import dataclasses
import re
import typing

import pytest

from fdfast.cli import COMMANDS, main
from fdfast.config import Config


def literal_fields(cls=Config, prefix=""):
    """(dotted key, allowed values) of every Literal field in the config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from literal_fields(tp, prefix + f.name + ".")
        elif typing.get_origin(tp) is typing.Literal:
            yield prefix + f.name, typing.get_args(tp)


def test_help_lists_exactly_the_listed_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    shown = re.findall(r"^ {4}(\w+)(?:\s|$)", capsys.readouterr().out, flags=re.M)  # the COMMAND section
    assert sorted(shown) == sorted(c for c, _ in COMMANDS)
    assert {"train", "diagnose", "export", "teachers"} <= set(shown)


@pytest.mark.parametrize("command", [c for c, _ in COMMANDS])
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fdfast {command}")


def test_an_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetunee"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_choice_keys_include_the_distributed_strategy():
    keys = dict(literal_fields())
    assert keys["dist.strategy"] == ("auto", "none", "ddp", "fsdp")
    assert {"runtime.precision", "runtime.device", "data.loader", "data.check", "loss.backend", "model.attention",
            "model.arch", "model.pos_bias", "teacher.align", "optim.fused"} <= keys.keys()


@pytest.mark.parametrize("key,allowed", list(literal_fields()))
def test_a_bad_choice_is_one_line_exit_2_and_writes_nothing(key, allowed, tmp_path, capsys):
    out = tmp_path / "run"
    bad = allowed[-1][:-1] + "q"  # one letter off the last allowed value, e.g. dist.strategy=fsdq
    assert main(["train", "--out", str(out), "--set", f"{key}={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert f"{key} must be one of {', '.join(allowed)}, got '{bad}' (did you mean '{allowed[-1]}'?)" in err[0]
    assert not out.exists()
